-- reconcile: compare the ledger's balance with Redis's and repair drift with an absolute SET.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] the outbox's last-generated id the caller saw fully flushed before reading the ledger
--   ARGV[6] the ledger balance (granted - expired grants - committed)
--   ARGV[7] the flusher's consumer group
--   ARGV[8] how many jobs the ledger records as open ('' = not compared)
-- Returns {'OK', 'SKIP', 0} when events arrived or are still unflushed since the caller looked
-- (the ledger value would be stale: try again later), {'OK', 'LOSS', 0, why} when the
-- organization's keys do not add up (a key lost beside the account: eviction, a manual DEL),
-- or {'OK', 'DONE', drift} where drift is Redis minus ledger before the repair (0 = in agreement).
-- Lost keys are not repaired here: the caller rebuilds the organization from the ledger (the
-- hydrate script, forced, with the same outbox id), which owns every key. They are found by:
--   held = the sum of the ACTIVE holds the deadline index lists, every one of them ACTIVE, plus
--   the rooms of the open jobs; every ACTIVE step of a job is in the step index, and its job
--   is open and its steps held (derived from its counters, get_job) add up to what its ACTIVE
--   steps hold; each open job has its fields beside its record, and no other job any;
--   every job record is in the job deadline index, and every entry there has a record; as
--   many jobs are open as the ledger records (a job record lost with nothing held by it);
--   every hold record is either in the deadline index or in the tombstone index;
--   one grant-expiry index entry per g:<grant id> rest in the account;
--   the grants hash exists once anything was granted.
-- Cost: O(active holds + jobs + account fields); no balance repair runs while keys are lost.
-- The repair sets balance to the ledger's value (restoring balance = granted - expired_grants -
-- committed, which only a fault outside the scripts can break) and counts the correction in
-- 'repaired' for operators.

if not account_exists() then return {'OK', 'SKIP', 0} end
local expected, ledger, group, ledger_jobs = ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8]
if not outbox_flushed(expected, group) then
  return {'OK', 'SKIP', 0}
end
local function key_loss()
  local v = redis.call('HMGET', ACCT, 'held', 'granted')
  local held, granted = N(v[1]), N(v[2])
  local rids = redis.call('ZRANGE', DEADLINES, '0', '-1')
  local active, sum, steps = 0, 0, 0
  -- Job records, and the fields beside the open ones' (their ids hold a ':').
  local jobs, njobs, beside = {}, 0, 0
  for _, f in ipairs(redis.call('HKEYS', JOBS)) do
    if string.find(f, ':', 1, true) then
      beside = beside + 1
    else
      jobs[f] = get_job(f)
      njobs = njobs + 1
    end
  end
  local step_sum = {}  -- job id -> what its ACTIVE steps hold
  if #rids > 0 then
    local raws = call_sliced('HMGET', HOLDS, rids, 1)
    for i = 1, #rids do
      local rec = raws[i] and cjson.decode(raws[i])
      if rec and rec.st == 'A' then
        active = active + 1
        sum = sum + tonumber(rec.amt)
        if rec.jb then
          local j = jobs[rec.jb]
          if not j or j.st ~= 'O' then
            return 'step ' .. rids[i] .. ' is active but its job ' .. rec.jb .. ' is not open'
          end
          if not redis.call('ZSCORE', JSTEPS, step_member(rec.jb, rids[i])) then
            return 'step ' .. rids[i] .. ' of job ' .. rec.jb .. ' is not in the step index'
          end
          steps = steps + 1
          step_sum[rec.jb] = (step_sum[rec.jb] or 0) + tonumber(rec.amt)
        end
      end
    end
  end
  local rooms, open = 0, 0
  for jid, j in pairs(jobs) do
    if j.st == 'O' then
      open = open + 1
      rooms = rooms + tonumber(j.room)
      if tonumber(j.sh) ~= (step_sum[jid] or 0) then
        return 'job ' .. jid .. ' records ' .. j.sh .. ' uECU in steps but its active steps hold '
          .. I(step_sum[jid] or 0)
      end
    end
    if not redis.call('ZSCORE', JOBDL, jid) then
      return 'job ' .. jid .. ' is not in the job deadline index'
    end
  end
  if beside ~= open * (#JOB_COUNTERS + #JOB_STEP_FIELDS) then
    return open .. ' open jobs but ' .. beside .. ' job fields beside the records'
  end
  if ledger_jobs ~= '' and open ~= tonumber(ledger_jobs) then
    return 'the ledger records ' .. ledger_jobs .. ' open jobs but Redis ' .. open
  end
  if held ~= sum + rooms then
    return 'held ' .. I(held) .. ' uECU but the active holds hold ' .. I(sum)
      .. ' and the open jobs\' rooms ' .. I(rooms)
  end
  if redis.call('ZCARD', JSTEPS) ~= steps then
    return 'the step index lists ' .. redis.call('ZCARD', JSTEPS) .. ' steps, of which ' .. steps
      .. ' are active'
  end
  local indexed_jobs = redis.call('ZCARD', JOBDL)
  if indexed_jobs ~= njobs then
    return indexed_jobs .. ' jobs in the job deadline index but ' .. njobs .. ' job records'
  end
  if #rids ~= active then
    return 'the deadline index lists ' .. #rids .. ' holds, of which ' .. active .. ' are active'
  end
  local records, tombs = redis.call('HLEN', HOLDS), redis.call('ZCARD', TOMBS)
  if records ~= #rids + tombs then
    return records .. ' hold records but ' .. #rids .. ' active and ' .. tombs .. ' tombstones indexed'
  end
  local rests = 0
  for _, f in ipairs(redis.call('HKEYS', ACCT)) do
    if string.sub(f, 1, 2) == 'g:' then rests = rests + 1 end
  end
  local indexed = redis.call('ZCARD', GEXP)
  if rests ~= indexed then
    return rests .. ' expiring grant rests but ' .. indexed .. ' in the grant-expiry index'
  end
  if granted > 0 and redis.call('EXISTS', GRANTS) == 0 then
    return 'the grants hash is missing'
  end
  return nil
end
local loss = key_loss()
if loss then return {'OK', 'LOSS', 0, loss} end

local bal = N(redis.call('HGET', ACCT, 'balance'))
local drift = bal - ledger
if drift ~= 0 then
  redis.call('HSET', ACCT, 'balance', I(ledger))
  redis.call('HINCRBY', ACCT, 'repaired', I(-drift))
  emit('repair', 'repair:' .. expected .. ':' .. NOW_S, 'redis_balance', I(bal),
    'ledger_balance', I(ledger), 'drift', I(drift))
  check_thresholds()
end
return {'OK', 'DONE', drift}
