-- set_auto_topup: configure (or turn off) an organization's auto-top-up.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] threshold in uECU ('' = off)   ARGV[6] top-up amount in uECU
-- Returns {'OK', threshold, amount}
--   or {'ERR', 'ACCOUNT_NOT_FOUND', msg, 'organization', org}
-- When available falls below the threshold, exactly one auto_topup_requested notification is
-- emitted (the billing system charges the card and calls Grant); the grant re-arms it.

if FENCED then return fenced_error() end
if not account_exists() then
  return no_account()
end
local t, a = ARGV[5], ARGV[6]
local cur = redis.call('HMGET', ACCT, 'atu_t', 'atu_a')
if (cur[1] or '') ~= t or (t ~= '' and cur[2] ~= a) then
  if t == '' then
    redis.call('HDEL', ACCT, 'atu_t', 'atu_a', 'atu_req')
  else
    redis.call('HSET', ACCT, 'atu_t', t, 'atu_a', a)
  end
  emit('autotopup', 'autotopup:' .. NOW_S .. ':' .. redis.call('HINCRBY', ACCT, 'cap_changes', 1),
    'threshold', t, 'amount', t == '' and '0' or a)
  check_thresholds()
end
return {'OK', t, t == '' and 0 or tonumber(a)}
