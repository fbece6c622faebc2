-- Shared prelude, prepended to every operation script by ecu_sidecar.store.scripts.
--
-- Every operation script touches only the keys of one organization, all sharing the hash tag
-- {org}, always passed in this order:
--   KEYS[1] acct       hash: wallet counters, team/project caps (t:<team>:cap|held|used, p:<project>:...),
--                      the unspent rest of each expiring grant (g:<grant id>), threshold state,
--                      closed jobs' accuracy per job type (js:<job type>:n|c|a, learn_accuracy)
--   KEYS[2] holds      hash: reservation id -> cjson hold record (live holds and tombstones)
--   KEYS[3] deadlines  zset: reservation id -> deadline (ms) of every ACTIVE hold
--   KEYS[4] tombs      zset: reservation id -> purge time (ms) of every terminal hold
--   KEYS[5] outbox     stream: one event per state change, for the ledger flusher
--   KEYS[6] grants     hash: grant id -> cjson grant record
--   KEYS[7] gexp       zset: grant id -> expiry (ms) of every expiring grant with an unspent rest
--   KEYS[8] jobs       hash: job id -> cjson job record, and an open job's counters beside it as
--                      '<job id>:<name>' (see the approved jobs section below and job.lua)
--   KEYS[9] jobdl      zset: job id -> abandonment deadline (ms) of an open job (at or before
--                      its real one, its dl field: see touch_job), purge time (ms) of an
--                      ended one
--   KEYS[10] jsteps    zset: '<job id>:<reservation id>' of every ACTIVE step of an open job, all
--                      scored 0, so that one lex range lists a job's steps (ids exclude ':')
-- and these leading arguments:
--   ARGV[1] organization id (recorded in events)
--   ARGV[2] clock offset in ms added to Redis TIME (0 in production; tests step time with it)
--   ARGV[3] tombstone retention in ms (how long terminal holds answer replays)
--   ARGV[4] sweep limit: at most this many expired holds / old tombstones handled per call
-- Operation arguments start at ARGV[5].
--
-- Numbers: every amount is integer micro-ECU, validated by the caller to stay far below 2^53,
-- so Lua doubles hold them exactly. Numbers are written back through I() so that Redis never
-- sees an exponent. Record fields hold numbers as decimal strings for the same reason.
--
-- Errors are returned, not raised: {'ERR', reason, message, key1, value1, ...}. A script
-- validates everything before its first write, so an error leaves no trace.

local ACCT, HOLDS, DEADLINES, TOMBS, OUTBOX, GRANTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local GEXP = KEYS[7]
local JOBS, JOBDL, JSTEPS = KEYS[8], KEYS[9], KEYS[10]
local ORG = ARGV[1]
local TOMB_MS = tonumber(ARGV[3])
local SWEEP_LIMIT = tonumber(ARGV[4])

local format = string.format
local function I(n)
  if n == 0 then return '0' end  -- the commonest amount by far (overage, unbilled, released)
  return format('%d', n)
end

local function N(s)
  if s == nil or s == false or s == '' then return 0 end
  return tonumber(s)
end

-- Exact integer arithmetic on doubles: a product of two amounts can pass 2^53 (hold 10^15 x
-- 1000 %), so shares are taken from an exact quotient and remainder (math.fmod is exact).

-- The overage bound floor(amt * pct / 100), exact; capped at 2^52, which is above any amount a
-- request may carry, so the cap never decides a min() with one.
local BOUND_CAP = 4503599627370496
local function overage_bound(amt, pct)
  local r = math.fmod(amt, 100)
  local b = ((amt - r) / 100) * pct
  if b >= BOUND_CAP then return BOUND_CAP end
  return math.min(b + math.floor(r * pct / 100), BOUND_CAP)
end

-- avail * d < ref, exactly, for a reference ref >= 0 (d = 5: below 20 %; d = 20: below 5 %).
local function below_share(avail, ref, d)
  local r = math.fmod(ref, d)
  local q = (ref - r) / d
  if r > 0 then return avail <= q end
  return avail < q
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
end

local NOW = now_ms()
-- The same as decimal strings, as commands take them (a Lua number argument would be formatted
-- again on every call).
local NOW_S = I(NOW)
local SWEEP_LIMIT_S = I(SWEEP_LIMIT)

local function err(reason, message, ...)
  local out = {'ERR', reason, message}
  for _, v in ipairs({...}) do out[#out + 1] = v end
  return out
end

-- The rebuild fence (acct field 'fence', ms): while the flusher rebuilds the organization from
-- the ledger after Redis lost history (a failover to a replica that lagged), nothing may add
-- to its outbox, so that the outbox drains and the rebuild sees every event in the ledger.
-- Mutating scripts refuse with REBUILDING (a retry settles it); sweeps and notifications wait.
-- The fence lapses on its own if the flusher dies: the next pass fences again.
local FENCE = tonumber(redis.call('HGET', ACCT, 'fence') or '0')
local FENCED = FENCE > NOW

local function fenced_error()
  return err('REBUILDING', 'organization ' .. ORG .. ' is being rebuilt from the ledger after '
    .. 'Redis lost part of its history; retry with the same id', 'retry_after_ms', I(FENCE - NOW))
end

-- The refusal of an operation on an organization that has no account: it names the
-- organization, in the message and in the metadata.
local function no_account()
  return err('ACCOUNT_NOT_FOUND', 'organization ' .. ORG .. ' has no ECU account (no grant yet)',
    'organization', ORG)
end

local function get_hold(rid)
  local raw = redis.call('HGET', HOLDS, rid)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function put_hold(rid, rec)
  redis.call('HSET', HOLDS, rid, cjson.encode(rec))
end

-- Append one event to the outbox. ...: its fields as name, value arguments, every value a
-- string (I() writes an amount as one). eid is unique per organization for all time: hold
-- events carry the hold's creation time (t0), so a reservation id reused after its tombstone was
-- purged makes new event ids.
local function emit(etype, eid, ...)
  redis.call('XADD', OUTBOX, '*', 'type', etype, 'eid', eid, 'org', ORG, 'ts', NOW_S, ...)
end

-- Run one variadic command (HMGET, HSET, ZADD, ZREM ...) on key over a flat argument list of
-- groups of `group` values, in slices of at most 1000 groups: unpack() stops at Lua's C stack
-- limit (8000 values) and a batch may hold 2,000 items. args must not be empty. Returns the
-- reply; for several slices, their array replies concatenated (HMGET: every value, in order).
local function call_sliced(cmd, key, args, group)
  local width = 1000 * group
  if #args <= width then return redis.call(cmd, key, unpack(args)) end
  local out = {}
  for first = 1, #args, width do
    local r = redis.call(cmd, key, unpack(args, first, math.min(first + width - 1, #args)))
    if type(r) == 'table' then
      for j = 1, #r do out[#out + 1] = r[j] end
    end
  end
  return out
end

-- Move a terminal hold from the deadline index to the tombstone index.
local function entomb(rid)
  redis.call('ZREM', DEADLINES, rid)
  redis.call('ZADD', TOMBS, I(NOW + TOMB_MS), rid)
end

-- Counters of the team/project scopes a hold is charged to: add delta to <scope>:<field>.
local function scope_incr(rec, field, delta)
  if delta == 0 then return end
  if rec.tm ~= '' then redis.call('HINCRBY', ACCT, 't:' .. rec.tm .. ':' .. field, I(delta)) end
  if rec.pj ~= '' then redis.call('HINCRBY', ACCT, 'p:' .. rec.pj .. ':' .. field, I(delta)) end
end

local function available()
  local v = redis.call('HMGET', ACCT, 'balance', 'held')
  return N(v[1]) - N(v[2])
end

-- ---- approved jobs (job.lua) ----
-- A job is a cjson record in JOBS under its id (numbers as decimal strings): st 'O' open | 'C'
-- closed | 'X' abandoned, amt the approved amount, xmax what steps may draw from the wallet
-- beyond it (policy 'wallet'), pol the policy for a step beyond the room ('refuse' | 'wallet'),
-- tm / pj / us its account, job its job type, rcv the rate card version it is pinned to, ttl its
-- abandonment ttl, t0 its creation time, av0 available right after the approval, fp the
-- approval's parameters (for replays); once ended, fin when it ended, ret what its end returned
-- to the wallet, and its final counters (below).
-- While a job is open, what its steps change lives beside the record, as fields
-- '<job id>:<name>' of JOBS (job ids exclude ':'), so that a step reads them with one HMGET and
-- moves them with HINCRBY, never decoding or re-encoding the record (speed: that read, decode,
-- encode and write in both scripts of a step made a job step ~1.15 x a wallet step inside
-- Redis; docs/benchmarks.md, issue 16):
--   room  the approved money no step holds       dl  its abandonment deadline (ms)
--   x     what steps drew from the wallet beyond the approval (policy 'wallet')
--   cm    what its steps billed                  xo  the part of cm the wallet paid (beyond
--                                                    hold and room, policy 'wallet')
--   nc    steps committed                        nr  steps ended unbilled (released, expired)
--   nl    late commits of expired steps (each counted in nr too)
--   and what a step reads besides: ttl, tm, pj, rcv (copies of the record's).
-- Two figures are derived when read (get_job), not kept per step: sh, what its ACTIVE steps
-- hold, = amt + x - room - (cm - xo) (the job's money is in its room, in its steps, or billed),
-- and n, steps reserved, = nc + nr - nl + its entries in the step index. When the job ends they
-- fold into the record and the fields go (put_job). A job is open exactly while they exist.
-- The wallet holds an open job's room + sh (both in held, and in its team's and project's held):
-- a step moves money from the room to its own hold and back, never through the wallet; what a
-- step bills leaves held as committed_from_holds. An ACTIVE step's job is always open.

local JOB_COUNTERS = {'room', 'dl', 'x', 'cm', 'xo', 'nc', 'nr', 'nl'}
local JOB_STEP_FIELDS = {'ttl', 'tm', 'pj', 'rcv'}

local function step_member(jid, rid)
  return jid .. ':' .. rid
end

-- The record alone (nil: no such job): what a step reads only off its hot path (the policy).
local function job_record(jid)
  local raw = redis.call('HGET', JOBS, jid)
  if not raw then return nil end
  return cjson.decode(raw)
end

-- A job whole (nil: no such job): the record, and for an open job its counters and the
-- derived sh and n.
local function get_job(jid)
  local j = job_record(jid)
  if j and j.st == 'O' then
    local names = {}
    for i, f in ipairs(JOB_COUNTERS) do names[i] = jid .. ':' .. f end
    local v = redis.call('HMGET', JOBS, unpack(names))
    for i, f in ipairs(JOB_COUNTERS) do j[f] = v[i] or '0' end
    j.sh = I(tonumber(j.amt) + tonumber(j.x) - tonumber(j.room) - tonumber(j.cm) + tonumber(j.xo))
    j.n = I(tonumber(j.nc) + tonumber(j.nr) - tonumber(j.nl)
      + redis.call('ZLEXCOUNT', JSTEPS, '[' .. jid .. ':', '(' .. jid .. ';'))
  end
  return j
end

-- Write a job whole (a new or rebuilt one, or one that ended): an open job's record without its
-- counters, with the counters beside it; an ended job's record with its final counters, and its
-- fields gone.
local function put_job(jid, j)
  local beside = {}
  for _, f in ipairs(JOB_COUNTERS) do beside[#beside + 1] = f end
  for _, f in ipairs(JOB_STEP_FIELDS) do beside[#beside + 1] = f end
  if j.st == 'O' then
    local rec = {}
    for k, v in pairs(j) do rec[k] = v end
    for _, f in ipairs(JOB_COUNTERS) do rec[f] = nil end
    rec.sh, rec.n = nil, nil
    local args = {jid, cjson.encode(rec)}
    for _, f in ipairs(beside) do
      args[#args + 1], args[#args + 2] = jid .. ':' .. f, j[f]
    end
    redis.call('HSET', JOBS, unpack(args))
  else
    j.xo, j.nl = nil, nil
    redis.call('HSET', JOBS, jid, cjson.encode(j))
    for i, f in ipairs(beside) do beside[i] = jid .. ':' .. f end
    redis.call('HDEL', JOBS, unpack(beside))
  end
end

-- What a step of a job reads, with one HMGET: nil when the job is not open (none, or ended).
-- room is a number; dl and ttl stay decimal strings.
local function job_view(jid)
  local v = redis.call('HMGET', JOBS, jid .. ':room', jid .. ':dl', jid .. ':ttl', jid .. ':tm',
    jid .. ':pj', jid .. ':rcv')
  if not v[1] then return nil end
  return {st = 'O', room = tonumber(v[1]), dl = v[2], ttl = v[3], tm = v[4], pj = v[5], rcv = v[6]}
end

-- Add d to an open job's counter f.
local function job_incr(jid, f, d)
  if d ~= 0 then redis.call('HINCRBY', JOBS, jid .. ':' .. f, I(d)) end
end

-- Add d to the numeric field f of an ended job's record (a late commit of one of its steps).
local function jadd(j, f, d)
  if d == 0 then return end
  j[f] = I(tonumber(j[f]) + d)
end

-- Steps or a heartbeat keep an open job alive for another ttl: its dl field moves (v: a job_view
-- or a whole open job; its dl follows). The job deadline index may lag behind the real deadline
-- (never ahead): it is moved only when the job is first indexed or when the sweep finds the
-- entry due and the job extended (sweep() re-indexes it there). A script that makes or restores
-- a job (job.lua open, hydrate) leaves its dl '0' before this call: that is what indexes it.
-- Speed: a ZADD in both scripts of a step was ~18,600 of its ~933,000 instructions inside Redis
-- (docs/benchmarks.md, issue 16).
local function touch_job(jid, v)
  local was = tonumber(v.dl)
  local dl = NOW + tonumber(v.ttl)
  v.dl = I(dl)
  redis.call('HSET', JOBS, jid .. ':dl', v.dl)
  if was == 0 or dl < was then redis.call('ZADD', JOBDL, v.dl, jid) end
end

-- Expire one ACTIVE hold whose deadline has passed: its amount returns to available, or to its
-- job's room when it is a step.
local function expire_hold(rid, rec)
  local amt = tonumber(rec.amt)
  rec.st = 'E'
  rec.fin = NOW_S
  put_hold(rid, rec)
  entomb(rid)
  local jid = rec.jb or ''
  if jid ~= '' and redis.call('HEXISTS', JOBS, jid .. ':room') == 1 then
    job_incr(jid, 'room', amt)
    job_incr(jid, 'nr', 1)
    redis.call('ZREM', JSTEPS, step_member(jid, rid))
  else
    redis.call('HINCRBY', ACCT, 'held', I(-amt))
    redis.call('HINCRBY', ACCT, 'expired', I(amt))
    redis.call('HINCRBY', ACCT, 'expired_holds', 1)
    scope_incr(rec, 'held', -amt)
  end
  emit('expire', 'expire:' .. rid .. ':' .. rec.t0, 'rid', rid, 'amount', I(amt), 'team', rec.tm,
    'project', rec.pj, 'user', rec.us, 'job', rec.job, 'model', rec.mdl, 'job_id', jid)
end

-- What Preview's expected cost learns from (docs/jobs.md): per job type, the organization's
-- closed jobs, the µECU they committed and the µECU they approved, as acct fields
-- js:<job type>:n|c|a. Halved at 2 x ACC_WINDOW jobs, so the latest 100 to 200 weigh. Not
-- money: a ratio shown beside the worst case (abandoned jobs stopped early: not counted).
local ACC_WINDOW = 100  -- ecu_sidecar.jobs.ACCURACY_WINDOW (the ledger keeps that many)
local function learn_accuracy(j)
  local f = 'js:' .. j.job .. ':'
  local n = redis.call('HINCRBY', ACCT, f .. 'n', 1)
  local c = redis.call('HINCRBY', ACCT, f .. 'c', j.cm)
  local a = redis.call('HINCRBY', ACCT, f .. 'a', j.amt)
  if n >= 2 * ACC_WINDOW then
    redis.call('HSET', ACCT, f .. 'n', I(math.floor(n / 2)), f .. 'c', I(math.floor(c / 2)),
      f .. 'a', I(math.floor(a / 2)))
  end
end

-- End an open job: 'C' closed by its owner (its ACTIVE steps are released) or 'X' abandoned (no
-- step and no heartbeat for its ttl; its ACTIVE steps expire, so that a late commit still bills
-- them). Its room and its steps' holds return to the wallet at once. O(its ACTIVE steps).
-- j: the job whole (get_job).
local function end_job(jid, j, how)
  local members = redis.call('ZRANGEBYLEX', JSTEPS, '[' .. jid .. ':', '(' .. jid .. ';')
  local live, steps = {}, 0
  for _, m in ipairs(members) do
    local rid = string.sub(m, #jid + 2)
    local rec = get_hold(rid)
    if rec and rec.st == 'A' then
      live[#live + 1] = {rid, rec}
      steps = steps + tonumber(rec.amt)
    end
  end
  -- A released step answers a replayed release with the available balance right after the end.
  local after = I(available() + tonumber(j.room) + steps)
  for _, x in ipairs(live) do
    local rid, rec = x[1], x[2]
    local amt = rec.amt
    rec.fin = NOW_S
    if how == 'C' then
      rec.st, rec.rel, rec.av1 = 'R', amt, after
    else
      rec.st = 'E'
    end
    put_hold(rid, rec)
    entomb(rid)
    jadd(j, 'nr', 1)
    emit(how == 'C' and 'release' or 'expire', (how == 'C' and 'release:' or 'expire:') .. rid
      .. ':' .. rec.t0, 'rid', rid, 'amount', amt, 'team', rec.tm, 'project', rec.pj,
      'user', rec.us, 'job', rec.job, 'model', rec.mdl, 'job_id', jid)
  end
  if #members > 0 then redis.call('ZREM', JSTEPS, unpack(members)) end
  local room = tonumber(j.room)
  local back = room + steps
  redis.call('HINCRBY', ACCT, 'held', I(-back))
  redis.call('HINCRBY', ACCT, how == 'C' and 'released' or 'expired', I(back))
  scope_incr(j, 'held', -back)
  j.st, j.ret, j.room, j.sh, j.fin = how, I(back), '0', '0', NOW_S
  put_job(jid, j)
  redis.call('ZADD', JOBDL, I(NOW + TOMB_MS), jid)
  emit('job_close', 'job_close:' .. jid .. ':' .. j.t0, 'job_id', jid, 'state', how,
    'returned', I(room), 'steps_uecu', I(steps), 'committed', j.cm, 'approved', j.amt,
    'extra', j.x, 'job', j.job, 'team', j.tm, 'project', j.pj)
  if how == 'C' then learn_accuracy(j) end
end

-- An open job past its abandonment deadline is ended on first touch, whether or not a sweep ran
-- (not while the rebuild fence is up). j: a job whole (get_job) or a step's view (job_view).
local function abandoned(j)
  return j.st == 'O' and tonumber(j.dl) <= NOW and not FENCED
end

local function settle_job(jid, j)
  if abandoned(j) then end_job(jid, j, 'X') end
end

-- What a step reads of its job (job_view), once an abandoned job is ended: nil when the job is
-- not open; true as second value when this call ended it.
local function open_job_view(jid)
  local v = job_view(jid)
  if v and abandoned(v) then
    end_job(jid, get_job(jid), 'X')
    return nil, true
  end
  return v, false
end

-- Spend order: expiring grants soonest-expiry first, then the never-expiring pool (implicit).
-- Each expiring grant keeps its unspent rest in acct g:<id>; a commit burns them in order.
-- A grant at or past its expiry is never burnt, even while a sweep held to ECU_SWEEP_LIMIT
-- has not expired it yet: its rest is left whole for its expiry (expire_grants), as the
-- ledger's replay of the burn order assumes (ecu_sidecar/ledger/burn.py).
local function burn(amount)
  while amount > 0 do
    local first = redis.call('ZRANGEBYSCORE', GEXP, '(' .. NOW_S, '+inf', 'LIMIT', '0', '1')
    if #first == 0 then return end
    local gid = first[1]
    local rest = N(redis.call('HGET', ACCT, 'g:' .. gid))
    local take = math.min(rest, amount)
    amount = amount - take
    if rest - take <= 0 then
      redis.call('HDEL', ACCT, 'g:' .. gid)
      redis.call('ZREM', GEXP, gid)
    else
      redis.call('HINCRBY', ACCT, 'g:' .. gid, I(-take))
    end
  end
end

-- Expire up to SWEEP_LIMIT grants past their expiry: their unspent rest leaves the balance,
-- except the part outstanding holds need (balance - held short of the rest). That part stays
-- in the balance for those holds' commits, so no µECU is both expired and billed:
-- expired + committed <= granted for every grant. (If those holds are released instead, it
-- stays spendable: the customer keeps at most what was held when the grant expired.)
local function expire_grants()
  local due = redis.call('ZRANGEBYSCORE', GEXP, '-inf', NOW_S, 'LIMIT', '0', SWEEP_LIMIT_S)
  for _, gid in ipairs(due) do
    local rest = N(redis.call('HGET', ACCT, 'g:' .. gid))
    redis.call('HDEL', ACCT, 'g:' .. gid)
    redis.call('ZREM', GEXP, gid)
    if rest > 0 then
      local gone = math.min(rest, math.max(0, available()))
      if gone > 0 then
        redis.call('HINCRBY', ACCT, 'balance', I(-gone))
        redis.call('HINCRBY', ACCT, 'expired_grants', I(gone))
      end
      emit('grant_expire', 'grant_expire:' .. gid, 'grant_id', gid, 'amount', I(gone),
        'kept', I(rest - gone))
    end
  end
  return #due
end

-- Expire up to SWEEP_LIMIT overdue holds and purge up to SWEEP_LIMIT old tombstones.
-- O(log n + limit). Returns the number of holds expired.
local function sweep()
  if FENCED then return 0 end
  expire_grants()
  local n = 0
  local due = redis.call('ZRANGEBYSCORE', DEADLINES, '-inf', NOW_S, 'LIMIT', '0', SWEEP_LIMIT_S)
  for _, rid in ipairs(due) do
    local rec = get_hold(rid)
    if rec and rec.st == 'A' then
      expire_hold(rid, rec)
      n = n + 1
    else
      redis.call('ZREM', DEADLINES, rid)
    end
  end
  -- Jobs: abandon the open ones past their deadline, purge the ended ones past retention.
  -- An open job's entry may be older than its deadline (touch_job): then it moves there.
  for _, jid in ipairs(redis.call('ZRANGEBYSCORE', JOBDL, '-inf', NOW_S, 'LIMIT', '0', SWEEP_LIMIT_S)) do
    local j = get_job(jid)
    if j and j.st == 'O' and tonumber(j.dl) > NOW then
      redis.call('ZADD', JOBDL, j.dl, jid)
    elseif j and j.st == 'O' then
      end_job(jid, j, 'X')
    else
      redis.call('HDEL', JOBS, jid)
      redis.call('ZREM', JOBDL, jid)
    end
  end
  local old = redis.call('ZRANGEBYSCORE', TOMBS, '-inf', NOW_S, 'LIMIT', '0', SWEEP_LIMIT_S)
  if #old > 0 then
    redis.call('HDEL', HOLDS, unpack(old))
    redis.call('ZREM', TOMBS, unpack(old))
  end
  return n
end

-- An ACTIVE hold past its deadline is expired on first touch, whether or not a sweep ran.
local function settle_deadline(rid, rec)
  if rec.st == 'A' and tonumber(rec.dl) <= NOW then
    expire_hold(rid, rec)
  end
end

local function account_exists()
  return redis.call('HEXISTS', ACCT, 'balance') == 1
end

-- Low-balance warnings and auto-top-up. "Remaining" is available (balance - held) as a share of
-- the reference level: the available balance right after the latest grant. Each crossing of
-- 20% and of 5%, and of the auto-top-up threshold, notifies once (a flag in acct); a grant
-- re-arms all three and starts a new generation (part of the notification's event id).
local function notify(kind, avail, extra)
  local gen = redis.call('HGET', ACCT, 'gen') or '0'
  local fields = {'kind', kind, 'available', I(avail), 'generation', gen}
  for _, x in ipairs(extra) do fields[#fields + 1] = x end
  emit('notify', 'notify:' .. kind .. ':' .. gen, unpack(fields))
end

-- THRESHOLD_FIELDS: what check_thresholds reads. A caller that already holds their current
-- values (balance and held as numbers, the rest as HMGET returned them) passes them as v and
-- saves the read. Returns available (balance - held).
local THRESHOLD_FIELDS = {'balance', 'held', 'ref', 'w20', 'w5', 'atu_t', 'atu_a', 'atu_req'}

local function check_thresholds(v)
  v = v or redis.call('HMGET', ACCT, unpack(THRESHOLD_FIELDS))
  local avail = N(v[1]) - N(v[2])
  if FENCED then return avail end  -- notified once the rebuild is done
  local ref = N(v[3])
  if ref > 0 then
    if not v[4] and below_share(avail, ref, 5) then
      redis.call('HSET', ACCT, 'w20', '1')
      notify('low_balance_20', avail, {'reference', I(ref)})
    end
    if not v[5] and below_share(avail, ref, 20) then
      redis.call('HSET', ACCT, 'w5', '1')
      notify('low_balance_5', avail, {'reference', I(ref)})
    end
  end
  if v[6] and not v[8] and avail < N(v[6]) then
    redis.call('HSET', ACCT, 'atu_req', '1')
    notify('auto_topup_requested', avail, {'threshold', v[6], 'amount', v[7] or '0'})
  end
  return avail
end

-- Whether the outbox is exactly as the caller saw it fully flushed: no entry generated since
-- `expected` (its last-generated id then), nothing pending or undelivered in `group`. A caller
-- that read the ledger after seeing that may trust the ledger to hold every event.
local function outbox_flushed(expected, group)
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
  return last == expected and pending == 0 and (last == '0-0' or delivered == last)
end
