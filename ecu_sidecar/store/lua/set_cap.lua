-- set_cap: set or clear a team or project cap (held + used may not exceed it).
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] scope prefix ('t' team | 'p' project)   ARGV[6] scope id   ARGV[7] cap ('' = clear)
-- Returns {'OK', cap ('' when none), held, used}
--   or {'ERR', 'ACCOUNT_NOT_FOUND', msg, 'organization', org}
-- Setting the same cap twice is naturally idempotent (an absolute value, not an increment).

if FENCED then return fenced_error() end
if not account_exists() then
  return no_account()
end
local pfx, id, cap = ARGV[5], ARGV[6], ARGV[7]
local base = pfx .. ':' .. id .. ':'
local cur = redis.call('HGET', ACCT, base .. 'cap')
if (cur or '') ~= cap then
  if cap == '' then
    redis.call('HDEL', ACCT, base .. 'cap')
  else
    redis.call('HSET', ACCT, base .. 'cap', cap)
  end
  emit('cap', 'cap:' .. base .. NOW_S .. ':' .. redis.call('HINCRBY', ACCT, 'cap_changes', 1),
    'scope', pfx == 't' and 'team' or 'project', 'scope_id', id, 'cap', cap)
end
local v = redis.call('HMGET', ACCT, base .. 'held', base .. 'used')
return {'OK', cap, N(v[1]), N(v[2])}
