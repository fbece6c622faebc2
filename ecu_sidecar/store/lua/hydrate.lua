-- hydrate: rebuild a missing organization from the ledger, race-free: only when the account is
-- absent, so any number of concurrent hydrations by any number of sidecars apply it once.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] granted   ARGV[6] expired grants   ARGV[7] committed   ARGV[8] generation (grants)
--   ARGV[9] auto-top-up threshold ('' = off)   ARGV[10] auto-top-up amount
--   ARGV[11] n scopes, then n groups of 4: prefix ('t' | 'p'), id, cap ('' = none), used
--   then m, then m groups of 3: expiring grant id, expiry ms, unspent rest
--   then k, then k groups of 4: recent grant id, amount, kind, expires at ms (so that a retry of
--   a grant the ledger already holds is answered as a replay, not applied twice)
-- Returns {'OK', 1} when it rebuilt the account, {'OK', 0} when the account already existed.
-- Holds Redis lost are gone (released by definition); the committed total carries over as
-- carried_committed so the hold counters restart from zero and still add up.

if account_exists() then return {'OK', 0} end
local granted, expired, committed = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local balance = granted - expired - committed
redis.call('HSET', ACCT, 'granted', I(granted), 'expired_grants', I(expired), 'committed', I(committed),
  'carried_committed', I(committed), 'balance', I(balance), 'held', 0, 'gen', ARGV[8],
  'ref', I(math.max(balance, 0)), 'hydrated', NOW_S)
if ARGV[9] ~= '' then redis.call('HSET', ACCT, 'atu_t', ARGV[9], 'atu_a', ARGV[10]) end
local b = 12
for _ = 1, tonumber(ARGV[11]) do
  local base = ARGV[b] .. ':' .. ARGV[b + 1] .. ':'
  if ARGV[b + 2] ~= '' then redis.call('HSET', ACCT, base .. 'cap', ARGV[b + 2]) end
  redis.call('HSET', ACCT, base .. 'used', ARGV[b + 3])
  b = b + 4
end
local m = tonumber(ARGV[b])
b = b + 1
for _ = 1, m do
  redis.call('HSET', ACCT, 'g:' .. ARGV[b], ARGV[b + 2])
  redis.call('ZADD', GEXP, ARGV[b + 1], ARGV[b])
  b = b + 3
end
local k = tonumber(ARGV[b])
b = b + 1
for _ = 1, k do
  redis.call('HSET', GRANTS, ARGV[b], cjson.encode({amt = ARGV[b + 1], kind = ARGV[b + 2],
    exp = ARGV[b + 3], t = NOW_S, bal = I(balance), av = I(balance)}))
  b = b + 4
end
emit('hydrate', 'hydrate:' .. NOW_S .. ':' .. I(granted) .. ':' .. I(committed),
  {'granted', granted, 'expired', expired, 'committed', committed, 'balance', balance})
-- Grants already past their expiry while Redis was empty leave now.
sweep()
return {'OK', 1}
