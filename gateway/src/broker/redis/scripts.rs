//! The Lua scripts: each broker operation on a channel is one script, so one round trip,
//! atomic, and every key it touches shares the channel's `{…}` hash tag (one Cluster slot).

/// KEYS: stream, meta, idempotency key. ARGV: payload, history size, history TTL (s),
/// candidate epoch, pub/sub channel, idempotency TTL (s), has key ("1"/"0"), meta TTL (s),
/// publish command (`publish`, or `spublish` on Redis Cluster).
/// Returns {offset, epoch, duplicate}. The pub/sub message is "<offset> <epoch> <payload>".
pub const PUBLISH: &str = r#"
if ARGV[7] == '1' then
  local prev = redis.call('get', KEYS[3])
  if prev then
    local sep = string.find(prev, ' ', 1, true)
    return {tonumber(string.sub(prev, 1, sep - 1)), string.sub(prev, sep + 1), 1}
  end
end
local offset, epoch = 0, ''
if tonumber(ARGV[2]) > 0 then
  epoch = redis.call('hget', KEYS[2], 'e')
  if not epoch then
    -- A new epoch: whatever stream is left belongs to the old one.
    epoch = ARGV[4]
    redis.call('del', KEYS[1])
    redis.call('hset', KEYS[2], 'e', epoch, 'o', 0)
  end
  offset = redis.call('hincrby', KEYS[2], 'o', 1)
  redis.call('xadd', KEYS[1], 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[1])
  redis.call('expire', KEYS[1], ARGV[3])
  redis.call('expire', KEYS[2], ARGV[8])
end
redis.call(ARGV[9], ARGV[5], offset .. ' ' .. epoch .. ' ' .. ARGV[1])
if ARGV[7] == '1' then
  redis.call('set', KEYS[3], offset .. ' ' .. epoch, 'EX', ARGV[6])
end
return {offset, epoch, 0}
"#;

/// KEYS: stream, meta. ARGV: since offset, count (0: position only), candidate epoch,
/// meta TTL (s). Returns {offset, epoch, id1, data1, id2, data2, …}, read atomically so
/// the offset is never behind the entries returned.
pub const HISTORY: &str = r#"
local epoch = redis.call('hget', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[3]
  redis.call('del', KEYS[1])
  redis.call('hset', KEYS[2], 'e', epoch, 'o', 0)
end
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
"#;

/// KEYS: presence zset, presence hash. ARGV: now (ms). Drops expired members and returns
/// {client1, user1, client2, user2, …}.
pub const PRESENCE: &str = r#"
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
local clients = redis.call('zrange', KEYS[1], 0, -1)
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
