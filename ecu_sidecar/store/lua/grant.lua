-- grant: credit an organization (creates its account on first grant) and re-arm its
-- low-balance warnings and auto-top-up. An expiring grant (starter) is tracked in GEXP with its
-- unspent rest; commits spend the soonest-expiring grant first (see burn in _lib.lua).
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] grant id   ARGV[6] amount   ARGV[7] kind   ARGV[8] expires at (ms, '0' = never)
--   ARGV[9] the largest granted total an account may reach (keeps sums exact in doubles)
--   ARGV[10] the epoch of the node ('' = unknown; see epoch.lua), recorded by a new account
-- Returns {'OK', balance_after, available_after, replayed (0|1)}
--   or {'ERR', 'IDEMPOTENCY_CONFLICT', msg, 'grant_id', id}
--   or {'ERR', 'BALANCE_LIMIT', msg, 'limit', max}
--   or {'ERR', 'GRANT_ALREADY_EXPIRED', msg, 'expires_at', ms}
-- A replay answers the balance of the original grant.

if FENCED then return fenced_error() end
local gid, amt_s, kind, exp_s, max_s = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local raw = redis.call('HGET', GRANTS, gid)
if raw then
  local g = cjson.decode(raw)
  if g.amt == amt_s and g.kind == kind and g.exp == exp_s then
    return {'OK', tonumber(g.bal), tonumber(g.av), 1}
  end
  return err('IDEMPOTENCY_CONFLICT', 'grant_id ' .. gid .. ' was already used with different parameters',
    'grant_id', gid)
end
if exp_s ~= '0' and tonumber(exp_s) <= NOW then
  return err('GRANT_ALREADY_EXPIRED', 'grant ' .. gid .. ' expires at ' .. exp_s
    .. ' ms, which is not after now (' .. NOW_S .. ')', 'expires_at', exp_s)
end
sweep()
local amt = tonumber(amt_s)
local granted = N(redis.call('HGET', ACCT, 'granted'))
if granted + amt > tonumber(max_s) then
  return err('BALANCE_LIMIT', 'grant would take organization ' .. ORG .. ' past the '
    .. max_s .. ' uECU total an account may be granted', 'limit', max_s)
end
redis.call('HSETNX', ACCT, 'balance', 0)
redis.call('HSETNX', ACCT, 'held', 0)
if ARGV[10] ~= '' then redis.call('HSETNX', ACCT, 'epoch', ARGV[10]) end
redis.call('HINCRBY', ACCT, 'granted', I(amt))
local bal = redis.call('HINCRBY', ACCT, 'balance', I(amt))
if exp_s ~= '0' then
  redis.call('HSET', ACCT, 'g:' .. gid, amt_s)
  redis.call('ZADD', GEXP, exp_s, gid)
end
local av = available()
-- Re-arm: the new reference level is what is available now.
redis.call('HSET', ACCT, 'ref', I(math.max(av, 0)))
redis.call('HDEL', ACCT, 'w20', 'w5', 'atu_req')
redis.call('HINCRBY', ACCT, 'gen', 1)
redis.call('HSET', GRANTS, gid, cjson.encode({amt = amt_s, kind = kind, exp = exp_s, t = NOW_S,
  bal = I(bal), av = I(av)}))
emit('grant', 'grant:' .. gid, 'grant_id', gid, 'amount', amt_s, 'kind', kind, 'expires_at', exp_s)
return {'OK', bal, av, 0}
