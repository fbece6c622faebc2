-- epoch: has Redis kept the history the flusher last rebuilt or checked this organization in?
-- An epoch names one history of one Redis node: its run id (a restart) and replication id (a
-- replica promoted after a failover) as the flusher read them from INFO. A failover to a
-- replica that lagged, or a restart that lost its last writes, keeps the keys but takes back
-- their newest changes, which the ledger may hold already (the wait off, or a promoted replica
-- that was not among those that confirmed): that organization is rebuilt from the ledger.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] the epoch of the node that holds the organization now ('<run id>:<replication id>')
--   ARGV[6] how long the rebuild fence lasts (ms)
-- Returns {'OK', 'SAME'}, {'OK', 'NONE'} (no account), {'OK', 'STAMPED'} (an account from
-- before epochs were recorded: it is recorded now), or {'OK', 'CHANGED', recorded epoch}: then
-- the rebuild fence is set (see _lib.lua) for ARGV[6] ms, so that the outbox drains; the
-- rebuild (hydrate) records the new epoch and lifts the fence. A fence that lapses (the flusher
-- died) is set again next pass. Accounts record their epoch when created (grant.lua) or rebuilt
-- (hydrate.lua), in the same script: a failover that takes the record back takes the account.

if not account_exists() then return {'OK', 'NONE'} end
local now_epoch, fence_ms = ARGV[5], tonumber(ARGV[6])
local seen = redis.call('HGET', ACCT, 'epoch')
if seen == now_epoch then return {'OK', 'SAME'} end
if not seen then
  redis.call('HSET', ACCT, 'epoch', now_epoch)
  return {'OK', 'STAMPED'}
end
redis.call('HSET', ACCT, 'fence', I(NOW + fence_ms))
return {'OK', 'CHANGED', seen}
