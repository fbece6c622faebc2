-- reserve: place one or more holds for one account, all or nothing.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] team ('' = none)   ARGV[6] project ('' = none)   ARGV[7] user ('' = none)
--   ARGV[8] job id: the approved job the steps draw from ('' = the wallet)
--   ARGV[9] item count n, then n groups of 7: reservation id, amount, job type, model, ttl ms,
--   rate card version ('' = a plain amount), job fingerprint ('' = a plain amount)
-- Returns {'OK', available_after, replayed_all (0|1), the job's room after ('' without a job),
--   then per item: id, amount, deadline, state, pinned rate card version}
--   or {'ERR', 'ACCOUNT_NOT_FOUND', msg, 'organization', org}
--   or {'ERR', 'JOB_NOT_FOUND' | 'JOB_CLOSED' | 'JOB_SCOPE_MISMATCH' | 'STEP_EXCEEDS_APPROVAL', ...}
--   or {'ERR', 'RATE_CARD_MISMATCH', msg, 'rate_card_version', the job's version, 'job_id', id}
--   or {'ERR', 'IDEMPOTENCY_CONFLICT', msg, 'reservation_id', id}
--   or {'ERR', 'INSUFFICIENT_ECU', msg, 'scope', s, 'scope_id', id, 'requested', r, 'available', a}
-- A reservation id already held with the same parameters is answered from its record (a replay)
-- and not charged again; with different parameters the whole call is refused. A hold priced
-- from a job spec is compared by the spec's fingerprint, not its amount, so a retry that lands
-- after a rate card reload is still a replay of the hold priced (and pinned) the first time.
-- Steps of a job take their holds from its room, not from the wallet: they succeed at zero
-- available balance while the room covers them, and carry the job's team and project (whose
-- caps the approval was checked against). Beyond the room, policy 'refuse' refuses
-- (INSUFFICIENT_ECU, scope job) and policy 'wallet' draws the rest from the wallet like a hold,
-- within the job's extra max.

-- Cost: a fixed handful of commands plus one XADD per fresh item: a batch reads its records
-- with one HMGET and writes them with one HSET and its deadlines with one ZADD; the threshold
-- state is read with the balance (nothing here changes it but held, whose new value is known).

if FENCED then return fenced_error() end
if not account_exists() then
  return no_account()
end
sweep()

local team, project, user = ARGV[5], ARGV[6], ARGV[7]
local jid = ARGV[8]
local n = tonumber(ARGV[9])
-- jv: what a step reads of an open job (job_view); jrec: the job whole, read only where a step
-- needs more (its policy and bounds when the room is short), or when the job is not open (an
-- ended job still answers replays of its steps).
local jv, jrec
if jid ~= '' then
  jv = open_job_view(jid)
  if not jv then
    jrec = get_job(jid)
    if not jrec then
      return err('JOB_NOT_FOUND', 'no job ' .. jid .. ' in organization ' .. ORG, 'job_id', jid,
        'organization', ORG)
    end
  end
  local jtm, jpj = (jv or jrec).tm, (jv or jrec).pj
  if (team ~= '' and team ~= jtm) or (project ~= '' and project ~= jpj) then
    return err('JOB_SCOPE_MISMATCH', 'job ' .. jid .. " was approved for team '" .. jtm
      .. "' and project '" .. jpj .. "'; its steps cannot name team '" .. team
      .. "' and project '" .. project .. "'", 'job_id', jid, 'team', jtm, 'project', jpj)
  end
  team, project = jtm, jpj
end
-- Item i (0-based) is ARGV[10 + 7i ..]: rid, amount, job, model, ttl, rate card version,
-- fingerprint; read in place (a table per item was a measurable part of a batch).
local recs = {}  -- i + 1 -> the hold already recorded under the id (a replay), or false
local need = 0
local fresh = 0

-- Phase 1: read and check everything; no writes.
local raws
if n == 1 then
  raws = {redis.call('HGET', HOLDS, ARGV[10])}
else
  local rids = {}
  for i = 0, n - 1 do rids[i + 1] = ARGV[10 + i * 7] end
  raws = n > 0 and call_sliced('HMGET', HOLDS, rids, 1) or {}
end
for i = 0, n - 1 do
  local b = 10 + i * 7
  local rec = raws[i + 1] and cjson.decode(raws[i + 1]) or false
  if rec then
    local fp = ARGV[b + 6]
    local same_cost = rec.amt == ARGV[b + 1] and (rec.fp or '') == ''
    if (rec.fp or '') ~= '' then same_cost = rec.fp == fp end
    if not same_cost or rec.job ~= ARGV[b + 2] or rec.mdl ~= ARGV[b + 3] or rec.ttl ~= ARGV[b + 4]
        or rec.tm ~= team or rec.pj ~= project or rec.us ~= user or (rec.jb or '') ~= jid then
      return err('IDEMPOTENCY_CONFLICT',
        'reservation_id ' .. ARGV[b] .. ' was already used with different parameters',
        'reservation_id', ARGV[b])
    end
  else
    need = need + tonumber(ARGV[b + 1])
    fresh = fresh + 1
  end
  recs[i + 1] = rec
end

-- A job's steps: the room covers need, or policy 'wallet' draws the rest (wneed) from the
-- wallet, which the checks below then cover like any hold.
local wneed = need
if jid ~= '' and fresh > 0 then
  if not jv then
    return err('JOB_CLOSED', 'job ' .. jid .. ' is ' .. (jrec.st == 'C' and 'closed' or 'abandoned')
      .. '; its steps cannot be reserved', 'job_id', jid, 'state', jrec.st)
  end
  local room = jv.room
  wneed = math.max(0, need - room)
  -- Beyond the room the job whole decides, by its bounds and policy (read only then: a step
  -- beyond what the job may ever hold is beyond its room too, which is at most that).
  local most
  if wneed > 0 then
    jrec = get_job(jid)
    most = tonumber(jrec.amt) + tonumber(jrec.xmax)
  end
  for i = 0, n - 1 do
    local b = 10 + i * 7
    if not recs[i + 1] then
      if ARGV[b + 5] ~= '' and ARGV[b + 5] ~= jv.rcv then
        return err('RATE_CARD_MISMATCH', 'job ' .. jid .. " is pinned to rate card version '"
          .. jv.rcv .. "'; step " .. ARGV[b] .. " was priced with '" .. ARGV[b + 5] .. "'",
          'rate_card_version', jv.rcv, 'job_id', jid)
      end
      if most and tonumber(ARGV[b + 1]) > most then
        return err('STEP_EXCEEDS_APPROVAL', 'step ' .. ARGV[b] .. ' needs ' .. ARGV[b + 1]
          .. ' uECU, more than job ' .. jid .. ' may ever hold (' .. I(most) .. ' uECU)',
          'job_id', jid, 'requested', ARGV[b + 1], 'approved', jrec.amt, 'extra_max', jrec.xmax)
      end
    end
  end
  if wneed > 0 then
    local extra_left = tonumber(jrec.xmax) - tonumber(jrec.x)
    if jrec.pol ~= 'wallet' or wneed > extra_left then
      local can = room
      if jrec.pol == 'wallet' then can = room + extra_left end
      return err('INSUFFICIENT_ECU', 'insufficient ECU: job ' .. jid .. ' has ' .. I(can)
        .. ' uECU of room left, ' .. I(need) .. ' requested (policy ' .. jrec.pol .. ')',
        'scope', 'job', 'scope_id', jid, 'requested', I(need), 'available', I(can))
    end
  end
end

-- The threshold state is read here too: nothing below changes it but held, by wneed. Steps
-- the job's room covers (wneed 0) need only the available balance (speed: with the zero
-- HINCRBY commit.lua skips, 1-3 points of the job/wallet ratio in 4 paired runs; issue 16).
local fields = {'balance', 'held'}
if wneed > 0 then
  fields = {unpack(THRESHOLD_FIELDS)}
  if team ~= '' then
    local f = 't:' .. team .. ':'
    fields[#fields + 1], fields[#fields + 2], fields[#fields + 3] = f .. 'cap', f .. 'held', f .. 'used'
  end
  if project ~= '' then
    local f = 'p:' .. project .. ':'
    fields[#fields + 1], fields[#fields + 2], fields[#fields + 3] = f .. 'cap', f .. 'held', f .. 'used'
  end
end
local v = redis.call('HMGET', ACCT, unpack(fields))
local avail = N(v[1]) - N(v[2])

if wneed > 0 then
  if wneed > avail then
    return err('INSUFFICIENT_ECU', 'insufficient ECU: organization ' .. ORG .. ' has ' .. I(avail)
      .. ' uECU available, ' .. I(wneed) .. ' requested',
      'scope', 'organization', 'scope_id', ORG, 'requested', I(wneed), 'available', I(avail))
  end
  local k = #THRESHOLD_FIELDS + 1
  for _, sc in ipairs({{'team', team}, {'project', project}}) do
    if sc[2] ~= '' then
      if v[k] then
        local left = N(v[k]) - N(v[k + 1]) - N(v[k + 2])
        if wneed > left then
          return err('INSUFFICIENT_ECU', 'insufficient ECU: ' .. sc[1] .. ' ' .. sc[2] .. ' cap has '
            .. I(left) .. ' uECU left, ' .. I(wneed) .. ' requested',
            'scope', sc[1], 'scope_id', sc[2], 'requested', I(wneed), 'available', I(left))
        end
      end
      k = k + 3
    end
  end
end

-- Phase 2: write.
local after = avail - wneed
if fresh == 0 then after = tonumber(recs[n].av0) end
local out = {'OK', after, fresh == 0 and 1 or 0, ''}
-- What each fresh step of a job takes from the room; the rest of it comes from the wallet.
local room_left = jv and jv.room or 0
local steps = {}
local puts, deadlines, np = {}, {}, 0
local after_s = I(after)
local dls = {}  -- ttl -> deadline: a batch's steps mostly share one ttl
for i = 0, n - 1 do
  local b = 10 + i * 7
  local rid, rec = ARGV[b], recs[i + 1]
  if not rec then
    local amt, job, mdl, ttl, rcv = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
    local dl = dls[ttl]
    if not dl then
      dl = I(NOW + tonumber(ttl))
      dls[ttl] = dl
    end
    rec = {st = 'A', amt = amt, job = job, mdl = mdl, ttl = ttl, tm = team, pj = project,
      us = user, dl = dl, t0 = NOW_S, av0 = after_s, seq = '0', ettl = '0', rcv = rcv,
      fp = ARGV[b + 6], jb = jv and jid or nil}
    puts[np + 1], puts[np + 2] = rid, cjson.encode(rec)
    deadlines[np + 1], deadlines[np + 2] = dl, rid
    np = np + 2
    local extra = 0
    if jid ~= '' then
      local take = math.min(room_left, tonumber(amt))
      room_left = room_left - take
      extra = tonumber(amt) - take
      steps[#steps + 1], steps[#steps + 2] = '0', step_member(jid, rid)
    end
    emit('reserve', 'reserve:' .. rid .. ':' .. NOW_S, 'rid', rid, 'amount', amt,
      'team', team, 'project', project, 'user', user, 'job', job, 'model', mdl, 'deadline', dl,
      'rcv', rcv, 'job_id', jid, 'extra', I(extra))
  end
  local k = 5 + i * 5
  out[k], out[k + 1], out[k + 2], out[k + 3], out[k + 4] = rid, tonumber(rec.amt), tonumber(rec.dl),
    rec.st, rec.rcv or ''
end
if fresh > 0 then
  call_sliced('HSET', HOLDS, puts, 2)
  call_sliced('ZADD', DEADLINES, deadlines, 2)
  if jv then
    call_sliced('ZADD', JSTEPS, steps, 2)
    job_incr(jid, 'room', -(need - wneed))
    job_incr(jid, 'x', wneed)
    touch_job(jid, jv)
  end
  if wneed > 0 then
    redis.call('HINCRBY', ACCT, 'held', I(wneed))
    redis.call('HINCRBY', ACCT, 'reserved', I(wneed))
    if team ~= '' then redis.call('HINCRBY', ACCT, 't:' .. team .. ':held', I(wneed)) end
    if project ~= '' then redis.call('HINCRBY', ACCT, 'p:' .. project .. ':held', I(wneed)) end
    v[1], v[2] = N(v[1]), N(v[2]) + wneed
    check_thresholds(v)
  end
end
if jv then
  out[4] = jv.room - (need - wneed)
elseif jrec then
  out[4] = tonumber(jrec.room)
end
return out
