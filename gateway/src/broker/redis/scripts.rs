//! The Lua scripts: each broker operation on a channel is one script, so one round trip,
//! atomic, and every key it touches shares the channel's `{…}` hash tag (one Cluster slot).
//!
//! Every script that reads or writes a channel's stream first settles its epoch
//! (`STREAM_EPOCH`, shared). The epoch is a fact about the stream's identity, and that
//! identity is the Redis instance holding it: the meta hash records which instance (its
//! `run_id`) last vouched for the epoch and whether that instance persisted every write
//! before acknowledging it (AOF with `appendfsync always`). When a script runs on another
//! instance than the recorded one, the stream may have lost acknowledged publications: a
//! restart from an older snapshot, a replica promoted before it had every write, a
//! restored backup. The epoch is then rotated — unless the recorded instance was durable
//! and the current one restarted from that durable data (it is durable itself, so it loaded
//! the AOF, not an older RDB snapshot) rather than being promoted. So an `(epoch, offset)`
//! pair never names two different publications.

/// Settles the channel's epoch; defines
/// `stream_epoch(stream, meta, candidate, durable, run_id, promoted, layout)` returning
/// the epoch to use. A `layout` token other than the one stored (see `layout.rs`) means
/// the server list changed since the epoch was vouched for: the epoch rotates. The node passes who answers on its connection (read when it connected); an
/// empty `run_id` (Redis Cluster) makes the script read it with `INFO`, which costs
/// several microseconds per call. On Cluster the node's `durable` says every master it
/// asked persists every write; the script still confirms that its own master has AOF on
/// (`INFO persistence`), since masters may differ or join later. A missing meta starts a new stream (whatever stream is
/// left belongs to a forgotten epoch); a changed instance rotates the epoch as above but
/// keeps the offsets and the stored publications, which now belong to the new epoch.
const STREAM_EPOCH: &str = r#"
local function instance(run_id, promoted, durable)
  if run_id ~= '' then
    return run_id, promoted == '1', durable
  end
  local server = redis.call('info', 'server')
  local replication = redis.call('info', 'replication')
  local id = string.match(server, 'run_id:(%x+)') or '?'
  local replid2 = string.match(replication, 'master_replid2:(%x+)') or ''
  if durable == '1' and not string.find(redis.call('info', 'persistence'), 'aof_enabled:1', 1, true) then
    durable = '0'
  end
  return id, string.find(replid2, '[^0]') ~= nil, durable
end
local function stream_epoch(stream, meta, candidate, node_durable, node_run_id, node_promoted, layout)
  local m = redis.call('hmget', meta, 'e', 'r', 'd', 'l')
  local run_id, promoted, durable = instance(node_run_id, node_promoted, node_durable)
  if not m[1] then
    redis.call('del', stream)
    redis.call('hset', meta, 'e', candidate, 'o', 0, 'r', run_id, 'd', durable, 'l', layout)
    return candidate
  end
  if layout ~= '' and m[4] ~= layout then
    redis.call('hset', meta, 'e', candidate, 'r', run_id, 'd', durable, 'l', layout)
    return candidate
  end
  if m[2] == run_id then
    if m[3] ~= durable then
      redis.call('hset', meta, 'd', durable)
    end
    return m[1]
  end
  -- Another instance: the data survived whole only if the one that vouched for the
  -- epoch persisted every write, and this one loaded that (it persists every write too,
  -- so it started from the AOF, not an RDB snapshot) rather than being a promoted replica.
  if m[3] == '1' and durable == '1' and not promoted then
    redis.call('hset', meta, 'r', run_id)
    return m[1]
  end
  redis.call('hset', meta, 'e', candidate, 'r', run_id, 'd', durable)
  return candidate
end
"#;

/// Publishes a batch: several publications, grouped by channel (each channel's in their
/// order), in one call: one round trip and one script run however many sessions
/// published meanwhile. On Redis Cluster a batch holds one publication (a script's keys
/// share one slot).
///
/// KEYS: per channel, stream and meta; then the idempotency keys the publications name.
/// ARGV: publish command (`publish`, or `spublish` on Redis Cluster), then the instance:
/// durable ("1"/"0"), run_id (or ""), promoted ("1"/"0"), layout token (or ""); a
/// candidate epoch; then per channel: pub/sub channel, history size, history TTL (s),
/// meta TTL (s), idempotency TTL (s), count k, and k pairs (index of its idempotency key
/// in KEYS or 0, payload). Returns {offset, epoch, duplicate} per publication, flat, in
/// the order given.
///
/// Per channel the epoch is settled, the offsets taken (one `HINCRBY` by their count),
/// each publication added to the stream, the stream trimmed to the history size once and
/// the TTLs renewed, all inside the script (nobody sees the stream over its size), and
/// one pub/sub message sent: "<offset> <epoch> <payload>" for one publication,
/// "m <epoch> <first offset> <len1>,<len2>,… <payload1><payload2>…" for several
/// (consecutive offsets from the first; all 0 without history). A key already used
/// (stored, or by an earlier publication of the batch) makes a duplicate: nothing stored,
/// answered with the original's position.
pub fn publish() -> String {
    format!(
        "{STREAM_EPOCH}{}",
        r#"
local command, durable, run_id, promoted, layout, candidate =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local out, a, g = {}, 7, 0
while a <= #ARGV do
  local stream, meta = KEYS[g * 2 + 1], KEYS[g * 2 + 2]
  g = g + 1
  local channel, history, history_ttl = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2]
  local meta_ttl, idem_ttl, k = ARGV[a + 3], ARGV[a + 4], tonumber(ARGV[a + 5])
  a = a + 6
  local fresh, key_of, fresh_of, dup_of, stored, used = {}, {}, {}, {}, {}, {}
  for j = 1, k do
    local key = tonumber(ARGV[a])
    local name = key > 0 and KEYS[key]
    local prev = name and (used[name] or redis.call('get', name))
    if type(prev) == 'number' then
      dup_of[j] = prev
    elseif prev then
      stored[j] = prev
    else
      local f = #fresh + 1
      fresh[f] = ARGV[a + 1]
      fresh_of[j] = f
      if name then
        used[name] = f
        key_of[f] = name
      end
    end
    a = a + 2
  end
  local n, offset, epoch = #fresh, 0, ''
  if n > 0 then
    if history > 0 then
      epoch = stream_epoch(stream, meta, candidate, durable, run_id, promoted, layout)
      offset = redis.call('hincrby', meta, 'o', n) - n + 1
      for f = 1, n do
        redis.call('xadd', stream, (offset + f - 1) .. '-0', 'd', fresh[f])
      end
      redis.call('xtrim', stream, 'MAXLEN', history)
      redis.call('expire', stream, history_ttl)
      redis.call('expire', meta, meta_ttl)
    end
    if n == 1 then
      redis.call(command, channel, offset .. ' ' .. epoch .. ' ' .. fresh[1])
    else
      local lens = {}
      for f = 1, n do
        lens[f] = #fresh[f]
      end
      redis.call(command, channel, 'm ' .. epoch .. ' ' .. offset .. ' ' ..
        table.concat(lens, ',') .. ' ' .. table.concat(fresh))
    end
  end
  local function at(f)
    if history > 0 then
      return offset + f - 1
    end
    return 0
  end
  for f, name in pairs(key_of) do
    redis.call('set', name, at(f) .. ' ' .. epoch, 'EX', idem_ttl)
  end
  for j = 1, k do
    if stored[j] then
      local sep = string.find(stored[j], ' ', 1, true)
      out[#out + 1] = tonumber(string.sub(stored[j], 1, sep - 1))
      out[#out + 1] = string.sub(stored[j], sep + 1)
      out[#out + 1] = 1
    else
      out[#out + 1] = at(fresh_of[j] or dup_of[j])
      out[#out + 1] = epoch
      out[#out + 1] = dup_of[j] and 1 or 0
    end
  end
end
return out
"#
    )
}

/// KEYS: stream, meta. ARGV: since offset, count (0: position only), candidate epoch,
/// meta TTL (s), then the instance: durable, run_id, promoted, layout token. Returns {offset, epoch, id1, data1, id2, data2, …},
/// read atomically so the offset is never behind the entries returned.
pub fn history() -> String {
    format!(
        "{STREAM_EPOCH}{}",
        r#"
local epoch = stream_epoch(KEYS[1], KEYS[2], ARGV[3], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
redis.call('expire', KEYS[2], ARGV[4])
local offset = tonumber(redis.call('hget', KEYS[2], 'o') or '0')
local out = {offset, epoch}
local count = tonumber(ARGV[2])
if count > 0 then
  local from = tostring(tonumber(ARGV[1]) + 1) .. '-0'
  for _, e in ipairs(redis.call('xrange', KEYS[1], from, '+', 'COUNT', count)) do
    out[#out + 1] = e[1]
    out[#out + 1] = e[2][2]
  end
end
return out
"#
    )
}

/// KEYS: meta. ARGV: the stale epoch, candidate epoch. Rotates the epoch if it is still
/// the stale one (a node saw the stream go backwards under it); returns {offset, epoch}.
pub const ROTATE: &str = r#"
local epoch = redis.call('hget', KEYS[1], 'e')
if epoch == ARGV[1] then
  redis.call('hset', KEYS[1], 'e', ARGV[2])
  epoch = ARGV[2]
end
return {tonumber(redis.call('hget', KEYS[1], 'o') or '0'), epoch or ''}
"#;

/// KEYS: presence zset, presence hash. ARGV: now (ms). Returns the members that have not
/// expired, {client1, user1, client2, user2, …}. Expired ones are left for
/// `PRESENCE_EXPIRE`, which announces their Leave.
pub const PRESENCE: &str = r#"
local clients = redis.call('zrangebyscore', KEYS[1], ARGV[1], '+inf')
local out = {}
if #clients > 0 then
  local users = redis.call('hmget', KEYS[2], unpack(clients))
  for i, c in ipairs(clients) do
    out[#out + 1] = c
    out[#out + 1] = users[i] or ''
  end
end
return out
"#;

/// KEYS: presence zset, presence hash. ARGV: now (ms), at most how many. Removes expired
/// members (whose node stopped refreshing them: it crashed) and returns them,
/// {client1, user1, …}, so exactly one node announces each one's Leave.
pub const PRESENCE_EXPIRE: &str = r#"
local gone = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
if #gone > 0 then
  local users = redis.call('hmget', KEYS[2], unpack(gone))
  redis.call('zrem', KEYS[1], unpack(gone))
  redis.call('hdel', KEYS[2], unpack(gone))
  for i, c in ipairs(gone) do
    out[#out + 1] = c
    out[#out + 1] = users[i] or ''
  end
end
return out
"#;
