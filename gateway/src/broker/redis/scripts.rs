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

/// Publishes a batch: several publications, in order, in one call (one round trip, one
/// script run, however many sessions published meanwhile). On Redis Cluster a batch holds
/// one publication (its keys share one slot).
///
/// KEYS: per publication, stream, meta, idempotency key. ARGV: publish command (`publish`,
/// or `spublish` on Redis Cluster), then the instance: durable ("1"/"0"), run_id (or ""),
/// promoted ("1"/"0"), layout token (or ""); a candidate epoch; then per publication seven:
/// payload, history size, history TTL (s), pub/sub channel, idempotency TTL (s), has key
/// ("1"/"0"), meta TTL (s). Returns {offset, epoch, duplicate} per publication, flat.
///
/// The batch's publications are grouped by channel (keeping their order within it): per
/// channel the epoch is settled, the offsets taken (one `HINCRBY` by their count), each
/// one added to the stream, the stream trimmed to the history size once, the TTLs renewed
/// and one pub/sub message sent: "<offset> <epoch> <payload>" for one publication,
/// "m <epoch> <first offset> <len1>,<len2>,… <payload1><payload2>…" for several
/// (consecutive offsets from the first; all 0 without history). Every step is inside one
/// script, so nobody sees the stream over its size. A key already used (stored, or by an
/// earlier publication of the batch) makes a duplicate: stored nothing, answered with the
/// original's position.
pub fn publish() -> String {
    format!(
        "{STREAM_EPOCH}{}",
        r#"
local command, durable, run_id, promoted, layout, candidate =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local n = #KEYS / 3
local answers, groups, order, keys = {}, {}, {}, {}
for i = 0, n - 1 do
  local meta, idem = KEYS[i * 3 + 2], KEYS[i * 3 + 3]
  local has_key = ARGV[6 + i * 7 + 6] == '1'
  local prev = has_key and (keys[idem] or redis.call('get', idem))
  if prev then
    answers[i] = prev
  else
    if has_key then
      keys[idem] = i
    end
    local g = groups[meta]
    if not g then
      g = {first = i, items = {}}
      groups[meta] = g
      order[#order + 1] = g
    end
    g.items[#g.items + 1] = i
  end
end
local positions = {}
for _, g in ipairs(order) do
  local stream, meta = KEYS[g.first * 3 + 1], KEYS[g.first * 3 + 2]
  local a = 6 + g.first * 7
  local history, k = tonumber(ARGV[a + 2]), #g.items
  local offset, epoch = 0, ''
  if history > 0 then
    epoch = stream_epoch(stream, meta, candidate, durable, run_id, promoted, layout)
    offset = redis.call('hincrby', meta, 'o', k) - k + 1
    for j, i in ipairs(g.items) do
      redis.call('xadd', stream, (offset + j - 1) .. '-0', 'd', ARGV[6 + i * 7 + 1])
    end
    redis.call('xtrim', stream, 'MAXLEN', history)
    redis.call('expire', stream, ARGV[a + 3])
    redis.call('expire', meta, ARGV[a + 7])
  end
  local message
  if k == 1 then
    message = offset .. ' ' .. epoch .. ' ' .. ARGV[a + 1]
  else
    local lens, payloads = {}, {}
    for j, i in ipairs(g.items) do
      payloads[j] = ARGV[6 + i * 7 + 1]
      lens[j] = #payloads[j]
    end
    message = 'm ' .. epoch .. ' ' .. offset .. ' ' .. table.concat(lens, ',') .. ' ' ..
      table.concat(payloads)
  end
  redis.call(command, ARGV[a + 4], message)
  for j, i in ipairs(g.items) do
    local o = history > 0 and offset + j - 1 or 0
    positions[i] = {o, epoch}
    if ARGV[6 + i * 7 + 6] == '1' then
      redis.call('set', KEYS[i * 3 + 3], o .. ' ' .. epoch, 'EX', ARGV[6 + i * 7 + 5])
    end
  end
end
local out = {}
for i = 0, n - 1 do
  local a = answers[i]
  if a == nil then
    out[#out + 1] = positions[i][1]
    out[#out + 1] = positions[i][2]
    out[#out + 1] = 0
  else
    if type(a) == 'number' then
      a = positions[a][1] .. ' ' .. positions[a][2]
    end
    local sep = string.find(a, ' ', 1, true)
    out[#out + 1] = tonumber(string.sub(a, 1, sep - 1))
    out[#out + 1] = string.sub(a, sep + 1)
    out[#out + 1] = 1
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
