-- balance: sweep overdue holds, then read the organization's counters.
--   KEYS: the organization's keys (see _lib.lua)
-- Returns {'OK', outstanding holds, then the acct hash as field, value, ...}
--   or {'ERR', 'ACCOUNT_NOT_FOUND', msg, 'organization', org}

if not account_exists() then
  return no_account()
end
sweep()
check_thresholds()
local out = {'OK', redis.call('ZCARD', DEADLINES)}
for _, x in ipairs(redis.call('HGETALL', ACCT)) do out[#out + 1] = x end
return out
