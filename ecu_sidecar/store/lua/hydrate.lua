-- hydrate: rebuild an organization from the ledger. The rebuild owns the organization's whole
-- key set: it runs only when the account is absent (or when forced, after reconcile found keys
-- lost), so any number of concurrent hydrations by any number of sidecars apply it once, and
-- only when every outbox event is in the ledger the caller read (else the ledger is stale).
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] the outbox's last-generated id the caller saw fully flushed BEFORE reading the ledger
--   ARGV[6] the flusher's consumer group   ARGV[7] '1' = rebuild even though the account exists
--   ARGV[8] granted   ARGV[9] expired grants   ARGV[10] committed   ARGV[11] generation (grants)
--   ARGV[12] auto-top-up threshold ('' = off)   ARGV[13] auto-top-up amount
--   ARGV[14] the notification reference level the ledger recorded ('' = none: available now)
--   ARGV[15] '1' when low_balance_20 was already sent in this generation ('' = not)
--   ARGV[16] the same for low_balance_5   ARGV[17] the same for auto_topup_requested
--   ARGV[18] n scopes, then n groups of 4: prefix ('t' | 'p'), id, cap ('' = none), used
--   then m, then m groups of 3: expiring grant id, expiry ms, unspent rest
--   then k, then k groups of 4: recent grant id, amount, kind, expires at ms (so that a retry of
--   a grant the ledger already holds is answered as a replay, not applied twice)
--   then h, then h groups of 13: an outstanding hold's reservation id, amount, t0 (ms), deadline
--   (ms), ttl (ms), last extend sequence, team, project, user, job type, model, rate card version,
--   job id ('' = a wallet hold)
--   then j, then j groups of 21: a job's id, state ('O' | 'C' | 'X'), approved, extra, extra max,
--   room (open: approved + extra - what its steps billed from it - its outstanding steps),
--   steps held, committed, steps, steps committed, steps ended, policy, team, project, user,
--   job type, rate card version, ttl (ms), t0 (ms), ended at (ms), returned to the wallet
--   then a, then a groups of 4: a job type, its latest closed jobs (at most 100), what they
--   committed, what they approved (Preview's expected cost, see learn_accuracy)
--   then the epoch of the node ('' = unknown; see epoch.lua), recorded in the rebuilt account
-- Returns {'OK', 1} when it rebuilt the account, {'OK', 0} when the account already existed
--   (and no rebuild was forced), {'OK', 'WAIT'} when the outbox moved since the caller looked or
--   holds events not yet in the ledger (the flusher drains it; then rebuild).
-- Every key but the outbox is deleted before anything is written: a partial loss (the account
-- hash evicted, the holds left) can never leave old holds beside a fresh held. Holds the ledger
-- records as outstanding are restored ACTIVE (the worker was told it holds that money); one
-- already past its deadline is expired by the sweep below, like any hold. The committed total
-- carries over as carried_committed, so the hold counters restart from the restored holds and
-- still add up: reserved = held.

local force = ARGV[7] == '1'
if account_exists() and not force then return {'OK', 0} end

-- The same test as reconcile: nothing generated since the caller looked, nothing unflushed.
local expected, group = ARGV[5], ARGV[6]
if not outbox_flushed(expected, group) then
  return {'OK', 'WAIT'}
end

redis.call('DEL', ACCT, HOLDS, DEADLINES, TOMBS, GRANTS, GEXP, JOBS, JOBDL, JSTEPS)
FENCED = false  -- the fence went with the account: the rebuilt organization is open again

local granted, expired, committed = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local balance = granted - expired - committed

-- Locate the groups first: the holds come last, and held is needed before the records.
local b = 19
local n_scopes = tonumber(ARGV[18])
local scopes_at = b
b = b + 4 * n_scopes
local m = tonumber(ARGV[b])
local grants_at = b + 1
b = grants_at + 3 * m
local k = tonumber(ARGV[b])
local recent_at = b + 1
b = recent_at + 4 * k
local h = tonumber(ARGV[b])
local holds_at = b + 1
local held = 0
for i = 0, h - 1 do held = held + tonumber(ARGV[holds_at + 13 * i + 1]) end
b = holds_at + 13 * h
local nj = tonumber(ARGV[b])
local jobs_at = b + 1
-- An open job's room is held too (its steps are among the holds).
for i = 0, nj - 1 do
  local at = jobs_at + 21 * i
  if ARGV[at + 1] == 'O' then held = held + tonumber(ARGV[at + 5]) end
end
local av_s = I(balance - held)
local na = tonumber(ARGV[jobs_at + 21 * nj])
local acc_at = jobs_at + 21 * nj + 1
local epoch = ARGV[acc_at + 4 * na] or ''

local ref = ARGV[14]
if ref == '' then ref = I(math.max(balance - held, 0)) end
redis.call('HSET', ACCT, 'granted', I(granted), 'expired_grants', I(expired), 'committed', I(committed),
  'carried_committed', I(committed), 'balance', I(balance), 'held', I(held), 'reserved', I(held),
  'gen', ARGV[11], 'ref', ref)
if ARGV[12] ~= '' then redis.call('HSET', ACCT, 'atu_t', ARGV[12], 'atu_a', ARGV[13]) end
if epoch ~= '' then redis.call('HSET', ACCT, 'epoch', epoch) end
-- Notifications the ledger already holds for this generation are not sent again.
if ARGV[15] == '1' then redis.call('HSET', ACCT, 'w20', '1') end
if ARGV[16] == '1' then redis.call('HSET', ACCT, 'w5', '1') end
if ARGV[17] == '1' then redis.call('HSET', ACCT, 'atu_req', '1') end

b = scopes_at
for _ = 1, n_scopes do
  local base = ARGV[b] .. ':' .. ARGV[b + 1] .. ':'
  if ARGV[b + 2] ~= '' then redis.call('HSET', ACCT, base .. 'cap', ARGV[b + 2]) end
  redis.call('HSET', ACCT, base .. 'used', ARGV[b + 3])
  b = b + 4
end
b = grants_at
for _ = 1, m do
  redis.call('HSET', ACCT, 'g:' .. ARGV[b], ARGV[b + 2])
  redis.call('ZADD', GEXP, ARGV[b + 1], ARGV[b])
  b = b + 3
end
b = recent_at
for _ = 1, k do
  redis.call('HSET', GRANTS, ARGV[b], cjson.encode({amt = ARGV[b + 1], kind = ARGV[b + 2],
    exp = ARGV[b + 3], t = NOW_S, bal = I(balance), av = I(balance)}))
  b = b + 4
end
b = holds_at
local live = {}  -- job id -> its steps restored here
for _ = 1, h do
  local rid, amt, seq, tm, pj = ARGV[b], ARGV[b + 1], ARGV[b + 5], ARGV[b + 6], ARGV[b + 7]
  -- The record reserve.lua writes. What the ledger does not keep: the job spec's fingerprint
  -- (a retried reserve is then compared by amount), the available balance after the reserve
  -- (a replay answers the rebuilt one), and the ttl of the last extend ('' = unknown: a retry
  -- of that extend is answered as a replay, see extend.lua).
  local jid = ARGV[b + 12]
  put_hold(rid, {st = 'A', amt = amt, job = ARGV[b + 9], mdl = ARGV[b + 10], ttl = ARGV[b + 4],
    tm = tm, pj = pj, us = ARGV[b + 8], dl = ARGV[b + 3], t0 = ARGV[b + 2], av0 = av_s, seq = seq,
    ettl = seq == '0' and '0' or '', rcv = ARGV[b + 11], fp = '', jb = jid ~= '' and jid or nil})
  redis.call('ZADD', DEADLINES, ARGV[b + 3], rid)
  if jid ~= '' then
    redis.call('ZADD', JSTEPS, '0', step_member(jid, rid))
    live[jid] = (live[jid] or 0) + 1
  end
  if tm ~= '' then redis.call('HINCRBY', ACCT, 't:' .. tm .. ':held', amt) end
  if pj ~= '' then redis.call('HINCRBY', ACCT, 'p:' .. pj .. ':held', amt) end
  b = b + 13
end
-- Jobs: open ones get a fresh abandonment ttl (the rebuild is activity); ended ones answer a
-- replayed close until their purge time. What the ledger does not keep: the fingerprint of the
-- approval (a retried approval is then compared by its other parameters).
b = jobs_at
for _ = 1, nj do
  local jid, st = ARGV[b], ARGV[b + 1]
  local j = {st = st, amt = ARGV[b + 2], x = ARGV[b + 3], xmax = ARGV[b + 4], room = ARGV[b + 5],
    sh = ARGV[b + 6], cm = ARGV[b + 7], n = ARGV[b + 8], nc = ARGV[b + 9], nr = ARGV[b + 10],
    pol = ARGV[b + 11], tm = ARGV[b + 12], pj = ARGV[b + 13], us = ARGV[b + 14],
    job = ARGV[b + 15], rcv = ARGV[b + 16], ttl = ARGV[b + 17], dl = '0', t0 = ARGV[b + 18],
    fin = ARGV[b + 19], ret = ARGV[b + 20], av0 = av_s, fp = ''}
  if st == 'O' then
    -- The counters get_job derives sh and n from, set so that it derives the ledger's.
    j.xo = I(tonumber(j.cm) - (tonumber(j.amt) + tonumber(j.x) - tonumber(j.room) - tonumber(j.sh)))
    j.nl = I(tonumber(j.nc) + tonumber(j.nr) + (live[jid] or 0) - tonumber(j.n))
    touch_job(jid, j)
    local room = tonumber(j.room)
    if j.tm ~= '' then redis.call('HINCRBY', ACCT, 't:' .. j.tm .. ':held', I(room)) end
    if j.pj ~= '' then redis.call('HINCRBY', ACCT, 'p:' .. j.pj .. ':held', I(room)) end
  else
    redis.call('ZADD', JOBDL, I(tonumber(j.fin) + TOMB_MS), jid)
  end
  put_job(jid, j)
  b = b + 21
end
b = acc_at
for _ = 1, na do
  local f = 'js:' .. ARGV[b] .. ':'
  redis.call('HSET', ACCT, f .. 'n', ARGV[b + 1], f .. 'c', ARGV[b + 2], f .. 'a', ARGV[b + 3])
  b = b + 4
end
emit('hydrate', 'hydrate:' .. NOW_S .. ':' .. I(granted) .. ':' .. I(committed),
  'granted', I(granted), 'expired', I(expired), 'committed', I(committed), 'balance', I(balance),
  'held', I(held), 'holds', I(h), 'forced', force and '1' or '0')
-- Grants already past their expiry while Redis was empty leave now, and restored holds already
-- past their deadline expire (their expire events are new to the ledger).
sweep()
return {'OK', 1}
