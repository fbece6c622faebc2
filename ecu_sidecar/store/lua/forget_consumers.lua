-- Remove the consumers of an outbox's group that have nothing pending and have been idle long
-- enough: flushers that died (each leaves a consumer in every stream it read or claimed from).
-- Run on its own, without _lib.lua. Atomic, so a consumer that reads between the caller's look
-- and this removal keeps its pending entries (XGROUP DELCONSUMER would drop them unwritten).
--   KEYS[1] the outbox stream
--   ARGV[1] the consumer group
--   ARGV[2] least idle time (ms) of a consumer removed
--   ARGV[3] a consumer never removed (the caller's own)
-- Returns the number of consumers removed (0 when the stream or the group does not exist).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then
  return 0 -- NOGROUP: nothing to remove
end
local min_idle = tonumber(ARGV[2])
local removed = 0
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c, 2 do
    f[c[i]] = c[i + 1]
  end
  if f['name'] ~= ARGV[3] and tonumber(f['pending']) == 0 and tonumber(f['idle']) >= min_idle then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed = removed + 1
  end
end
return removed
