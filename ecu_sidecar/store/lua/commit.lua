-- commit: settle one or more holds of one organization with what each step really cost.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] overage bound in percent of the hold (bound = floor(hold * pct / 100), exact)
--   ARGV[6] k: holds the caller knows that Redis may lack (after the items)
--   ARGV[7] item count n, then n groups of 7: reservation id, actual, tokens in, tokens out, calls,
--   rate card version the actual was priced with ('' = a plain amount), breakdown JSON ('' = none)
--   then k groups of 9, each a known hold: reservation id, kind ('L': the ledger recorded it,
--   'D': granted locally in degraded mode), amount, t0 (its creation time, ms), team, project,
--   user, job type, model. A known hold is used only when Redis has no record of that id.
-- Returns {'OK', available_after, then per item 10 values:
--   id, status ('OK' or an error reason), message, committed, released, overage, unbilled, late (0|1),
--   replayed (0|1), available right after this item's commit (a replay answers the original)}
-- Item errors: HOLD_NOT_FOUND, HOLD_RELEASED, IDEMPOTENCY_CONFLICT (a committed hold replayed
-- with another actual or usage), RATE_CARD_MISMATCH (usage priced with another rate card
-- version than the hold pinned). Items are independent.
-- Billing, with bound = floor(hold * pct / 100):
--   a live hold:  min(actual, hold + bound); below the hold the rest returns (released);
--   a late commit (the hold expired, or a known hold 'L' the ledger recorded and Redis lacks):
--     min(actual, hold + bound, max(0, available) + bound): its money may have been lent again,
--     so it bills at most what is available now plus its own bound; the rest is recorded
--     unbilled (late_unbilled). Total billed never exceeds the grants plus the overage bounds;
--   a known hold 'D' (degraded mode's local hold): min(actual, hold + bound), flagged orphan
--     (the configured allowance is the overspend bound of degraded mode).
-- Every commit of a hold, known or not, has the event id commit:<rid>:<t0>, so a commit the
-- ledger already holds is never billed twice there. An id neither Redis nor the caller knows
-- is HOLD_NOT_FOUND: a reservation id never reserved is never billed.
-- Billed amounts burn expiring grants soonest-first.
-- A step of an approved job bills from the job's money: its hold, then (above it, within the
-- bound) the job's room; what is above both is billed from the wallet under policy 'wallet' and
-- recorded unbilled under 'refuse', so a job under 'refuse' never bills more than its approval.
-- The unused part of its hold returns to the room. A step that expired while its job is still
-- open bills late from the room (at most the room); once the job has ended, like any late
-- commit. The event's job_uecu is what the step took from the job's money.

-- Cost: a fixed handful of commands plus, per item, its counters (HINCRBY each), its burn of
-- expiring grants and one XADD (its event). A batch reads its hold records with one HMGET and
-- writes them with one HSET; tombstones move with one ZREM and one ZADD. Each item's available
-- right after it comes from running totals (`bal`, `held`) that track the acct fields exactly.

if FENCED then return fenced_error() end
if not account_exists() then
  return no_account()
end
sweep()
local pct = tonumber(ARGV[5])
local n = tonumber(ARGV[7])
local out = {'OK', 0}

local function item_err(rid, reason, message)
  local k = #out
  out[k + 1], out[k + 2], out[k + 3] = rid, reason, message
  for j = k + 4, k + 10 do out[j] = 0 end
end

local function item_ok(rid, rec, replayed)
  local k = #out
  out[k + 1], out[k + 2], out[k + 3], out[k + 4], out[k + 5] = rid, 'OK', '', tonumber(rec.cm), tonumber(rec.rel)
  out[k + 6], out[k + 7], out[k + 8], out[k + 9], out[k + 10] = tonumber(rec.ov), tonumber(rec.uov),
    tonumber(rec.late), replayed, tonumber(rec.av1)
end

-- recs[rid]: the hold record, decoded once (false: none), as this call left it.
local recs = {}
local rids = {}
for i = 0, n - 1 do rids[i + 1] = ARGV[8 + i * 7] end
local got = n == 1 and {redis.call('HGET', HOLDS, rids[1])} or call_sliced('HMGET', HOLDS, rids, 1)
-- The jobs of these steps, ended first when abandoned (which ends their ACTIVE steps: those
-- records are read again). jobs[jid]: an open job's step view (job_view), in which this call
-- gathers what it moves of the job's counters (added once at the end: a batch of one job's
-- steps moves each counter once, as a single step does); an ended job's record (written back
-- at the end when a late commit changed it, dirty); false: no such job.
local jobs = {}
local ended = false
for i = 1, n do
  got[i] = got[i] and cjson.decode(got[i])
  local jid = got[i] and got[i].jb
  if jid and jobs[jid] == nil then
    local v, now_ended = open_job_view(jid)
    ended = ended or now_ended
    if v then
      v.droom, v.dcm, v.dxo, v.dnc, v.dnl, v.touched = 0, 0, 0, 0, 0, false
      jobs[jid] = v
    else
      jobs[jid] = get_job(jid) or false
    end
  end
end
if ended then
  got = call_sliced('HMGET', HOLDS, rids, 1)
  for i = 1, n do got[i] = got[i] and cjson.decode(got[i]) end
end
for i = 1, n do recs[rids[i]] = got[i] end
local puts, tombed = {}, {}
-- Ended jobs whose records this call changed, and the steps to drop from the step index, with
-- one ZREM.
local dirty, unstep = {}, {}

-- Read once, when an item first needs it: the threshold state (no item changes it) with balance
-- and held, which `bal` and `held` then follow.
local wallet, bal, held
local function load_wallet()
  if wallet then return end
  wallet = redis.call('HMGET', ACCT, unpack(THRESHOLD_FIELDS))
  bal, held = N(wallet[1]), N(wallet[2])
end
-- known[rid] = the index in ARGV of a known hold's group.
local known = {}
local kb = 8 + n * 7
for j = 0, tonumber(ARGV[6]) - 1 do
  known[ARGV[kb + j * 9]] = kb + j * 9
end

local function add(field, d)
  redis.call('HINCRBY', ACCT, field, I(d))
end

for i = 0, n - 1 do
  local b = 8 + i * 7
  local rid, actual_s, rcv, lines = ARGV[b], ARGV[b + 1], ARGV[b + 5], ARGV[b + 6]
  local rec = recs[rid] or nil
  if not rec and known[rid] then
    local k = known[rid]
    rec = {st = ARGV[k + 1] == 'D' and 'O' or 'E', amt = ARGV[k + 2], t0 = ARGV[k + 3],
      tm = ARGV[k + 4], pj = ARGV[k + 5], us = ARGV[k + 6], job = ARGV[k + 7], mdl = ARGV[k + 8],
      ttl = '0', dl = ARGV[k + 3], av0 = '0', seq = '0', ettl = '0', known = ARGV[k + 1]}
  end
  if not rec then
    item_err(rid, 'HOLD_NOT_FOUND', 'no hold ' .. rid .. ' in organization ' .. ORG)
  else
    local jid = rec.jb
    local j = jid and jobs[jid] or nil
    if rec.st == 'A' and tonumber(rec.dl) <= NOW then
      -- expire_hold adds to the job's counters in Redis itself (the deltas this call gathers
      -- add to them at the end); the view's room follows here.
      settle_deadline(rid, rec)
      if j and j.st == 'O' then
        j.room = j.room + tonumber(rec.amt)
      elseif wallet then
        held = held - tonumber(rec.amt)
      end
    end
    if rec.st == 'C' then
      if rec.act == actual_s and rec.ti == ARGV[b + 2] and rec.to == ARGV[b + 3]
          and rec.ca == ARGV[b + 4] then
        item_ok(rid, rec, 1)
      else
        item_err(rid, 'IDEMPOTENCY_CONFLICT', 'hold ' .. rid .. ' was already committed with actual '
          .. rec.act .. ' uECU and other usage or amount')
      end
    elseif rec.st == 'R' then
      item_err(rid, 'HOLD_RELEASED', 'hold ' .. rid .. ' was released; it cannot be committed')
    elseif rcv ~= '' and not rec.known and rcv ~= (rec.rcv or '') then
      item_err(rid, 'RATE_CARD_MISMATCH', "hold " .. rid .. " was priced with rate card version '"
        .. (rec.rcv or '') .. "'; its usage must be priced with that version, not '" .. rcv .. "'")
    else
      load_wallet()
      local amt = tonumber(rec.amt)
      local actual = tonumber(actual_s)
      local orphan = rec.st == 'O'
      local late = rec.st == 'E'
      local bound = overage_bound(amt, pct)
      local billed = math.min(actual, amt + bound)
      local job_open = j and j.st == 'O'
      local room = job_open and j.room or 0
      local job_uecu = 0
      if late and job_open then
        billed = math.min(billed, room)
      elseif late then
        billed = math.min(billed, math.max(0, bal - held) + bound)
      elseif job_open and billed > amt then
        local ov_room = math.min(billed - amt, room)
        if not j.pol then j.pol = job_record(jid).pol end
        if j.pol ~= 'wallet' then billed = amt + ov_room end
        job_uecu = amt + ov_room
      end
      local overage = math.max(0, billed - amt)
      local unbilled = actual - billed
      local from_hold = math.min(billed, amt)
      local released = 0
      local tm, pj = rec.tm, rec.pj
      if job_open then
        -- The job's money: the hold (live) or the room (late) pays job_uecu, the rest of a live
        -- hold returns to the room, and only an overage beyond the room (policy 'wallet') is
        -- the wallet's.
        if late then
          -- expired while the job is open: counted in nr then, and committed now (nl).
          job_uecu = billed
          j.room, j.droom, j.dnl = j.room - billed, j.droom - billed, j.dnl + 1
        else
          if job_uecu == 0 then job_uecu = from_hold end
          released = amt - from_hold
          if billed ~= job_uecu then  -- speed: no zero HINCRBY (reserve.lua)
            add('overage', billed - job_uecu)
            j.dxo = j.dxo + billed - job_uecu
          end
          j.room, j.droom = j.room + amt - job_uecu, j.droom + amt - job_uecu
          unstep[#unstep + 1] = step_member(jid, rid)
        end
        if job_uecu ~= 0 then
          add('held', -job_uecu)
          add('committed_from_holds', job_uecu)
          if tm ~= '' then add('t:' .. tm .. ':held', -job_uecu) end
          if pj ~= '' then add('p:' .. pj .. ':held', -job_uecu) end
        end
        held = held - job_uecu
      elseif not late and not orphan then
        released = amt - from_hold
        add('held', -amt)
        add('committed_from_holds', from_hold)
        add('released', released)
        add('overage', overage)
        if amt ~= 0 then
          if tm ~= '' then add('t:' .. tm .. ':held', -amt) end
          if pj ~= '' then add('p:' .. pj .. ':held', -amt) end
        end
        held = held - amt
      elseif orphan then
        add('orphan_committed', billed)
      else
        add('late_committed', billed)
      end
      burn(billed)
      add('balance', -billed)
      add('committed', billed)
      bal = bal - billed
      if unbilled > 0 then add(late and 'late_unbilled' or 'unbilled_overage', unbilled) end
      if job_open then
        j.dcm, j.dnc, j.touched = j.dcm + billed, j.dnc + 1, true
      elseif j then
        jadd(j, 'cm', billed)
        jadd(j, 'nc', 1)
        dirty[jid] = true
      end
      if billed ~= 0 then
        if tm ~= '' then add('t:' .. tm .. ':used', billed) end
        if pj ~= '' then add('p:' .. pj .. ':used', billed) end
      end
      rec.st = 'C'
      rec.act = actual_s
      rec.ti, rec.to, rec.ca = ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
      rec.cm = I(billed)
      rec.rel = I(released)
      rec.ov = I((late or orphan) and 0 or overage)
      rec.uov = I(unbilled)
      rec.late = (late or orphan) and '1' or '0'
      rec.orphan = orphan and '1' or nil
      rec.fin = NOW_S
      rec.av1 = I(bal - held)
      local r = cjson.encode(rec)
      recs[rid] = rec
      puts[#puts + 1] = rid
      puts[#puts + 1] = r
      tombed[#tombed + 1] = rid
      local ev = {'rid', rid, 'amount', rec.amt, 'actual', actual_s, 'committed', rec.cm,
        'released', rec.rel, 'overage', rec.ov, 'unbilled', rec.uov, 'late', rec.late,
        'orphan', orphan and '1' or '0',
        'team', tm, 'project', pj, 'user', rec.us, 'job', rec.job, 'model', rec.mdl,
        'tokens_in', ARGV[b + 2], 'tokens_out', ARGV[b + 3], 'calls', ARGV[b + 4],
        'job_id', jid or '', 'job_uecu', I(job_uecu)}
      if rcv ~= '' then
        ev[#ev + 1], ev[#ev + 2], ev[#ev + 3], ev[#ev + 4] = 'rcv', rcv, 'lines', lines
      end
      emit('commit', 'commit:' .. rid .. ':' .. rec.t0, unpack(ev))
      item_ok(rid, rec, 0)
    end
  end
end
for jid, j in pairs(jobs) do
  if j and j.st == 'O' then
    job_incr(jid, 'room', j.droom)
    job_incr(jid, 'cm', j.dcm)
    job_incr(jid, 'xo', j.dxo)
    job_incr(jid, 'nc', j.dnc)
    job_incr(jid, 'nl', j.dnl)
    if j.touched then touch_job(jid, j) end
  elseif dirty[jid] then
    put_job(jid, j)
  end
end
if #unstep > 0 then call_sliced('ZREM', JSTEPS, unstep, 1) end
if #tombed > 0 then
  call_sliced('HSET', HOLDS, puts, 2)
  -- entomb() for each committed hold: they share one purge time.
  call_sliced('ZREM', DEADLINES, tombed, 1)
  local purge_at = I(NOW + TOMB_MS)
  for j = #tombed, 1, -1 do
    tombed[2 * j], tombed[2 * j - 1] = tombed[j], purge_at
  end
  call_sliced('ZADD', TOMBS, tombed, 2)
end
if wallet then
  wallet[1], wallet[2] = bal, held
  out[2] = check_thresholds(wallet)
else
  out[2] = check_thresholds()
end
return out
