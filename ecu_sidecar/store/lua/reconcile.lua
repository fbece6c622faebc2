-- reconcile: compare the ledger's balance with Redis's and repair drift with an absolute SET.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] the outbox's last-generated id the caller saw fully flushed before reading the ledger
--   ARGV[6] the ledger balance (granted - expired grants - committed)
--   ARGV[7] the flusher's consumer group
-- Returns {'OK', 'SKIP', 0} when events arrived or are still unflushed since the caller looked
-- (the ledger value would be stale: try again later), or {'OK', 'DONE', drift} where drift is
-- Redis minus ledger before the repair (0 = in agreement).
-- The repair sets balance to the ledger's value (restoring balance = granted - expired_grants -
-- committed, which only a fault outside the scripts can break) and counts the correction in
-- 'repaired' for operators.

if not account_exists() then return {'OK', 'SKIP', 0} end
local expected, ledger, group = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local function field(list, name)
  for i = 1, #list, 2 do
    if list[i] == name then return list[i + 1] end
  end
  return nil
end
local last, pending, delivered = '0-0', 0, '0-0'
if redis.call('EXISTS', OUTBOX) == 1 then
  last = field(redis.call('XINFO', 'STREAM', OUTBOX), 'last-generated-id')
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', OUTBOX)) do
    if field(g, 'name') == group then
      pending = tonumber(field(g, 'pending'))
      delivered = field(g, 'last-delivered-id')
    end
  end
end
if last ~= expected or pending ~= 0 or (last ~= '0-0' and delivered ~= last) then
  return {'OK', 'SKIP', 0}
end
local bal = N(redis.call('HGET', ACCT, 'balance'))
local drift = bal - ledger
if drift ~= 0 then
  redis.call('HSET', ACCT, 'balance', I(ledger))
  redis.call('HINCRBY', ACCT, 'repaired', I(-drift))
  emit('repair', 'repair:' .. expected .. ':' .. NOW_S, {'redis_balance', bal, 'ledger_balance', ledger,
    'drift', drift})
  check_thresholds()
end
return {'OK', 'DONE', drift}
