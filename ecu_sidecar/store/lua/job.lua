-- job: approve, close, heartbeat or read an approved job of one organization.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] op: 'open' | 'close' | 'touch' | 'get'   ARGV[6] job id
--   open: ARGV[7] approved amount   ARGV[8] job type   ARGV[9] team ('' = none)
--         ARGV[10] project ('' = none)   ARGV[11] user ('' = none)
--         ARGV[12] rate card version ('' = a plain amount)   ARGV[13] policy ('refuse' | 'wallet')
--         ARGV[14] abandonment ttl ms   ARGV[15] overage bound in percent (policy 'wallet': steps
--         may draw up to floor(approved * pct / 100) beyond the approval from the wallet)
--         ARGV[16] fingerprint of what was approved (the quote), compared on a replay
-- Returns {'OK', replayed (0|1), available, then the job: state, approved, extra, extra max,
--   room, steps held, committed, steps, steps committed, steps ended, policy, team, project,
--   user, job type, rate card version, ttl, deadline, t0, ended at, returned}
--   or {'ERR', reason, message, ...}: ACCOUNT_NOT_FOUND, JOB_NOT_FOUND, JOB_CLOSED (touch),
--   IDEMPOTENCY_CONFLICT (open, other parameters), INSUFFICIENT_ECU (open), REBUILDING.
-- Open holds the approved amount against the wallet and the team/project caps, all or nothing,
-- like a reserve; close returns the room and the job's ACTIVE steps to the wallet at once
-- (end_job); closing an ended job is a replay. Get changes nothing but what is overdue.

local op, jid = ARGV[5], ARGV[6]
if FENCED and op ~= 'get' then return fenced_error() end
if not account_exists() then
  return no_account()
end
sweep()

local function answer(j, replayed)
  return {'OK', replayed, available(), j.st, tonumber(j.amt), tonumber(j.x), tonumber(j.xmax),
    tonumber(j.room), tonumber(j.sh), tonumber(j.cm), tonumber(j.n), tonumber(j.nc),
    tonumber(j.nr), j.pol, j.tm, j.pj, j.us, j.job, j.rcv, tonumber(j.ttl), tonumber(j.dl),
    tonumber(j.t0), tonumber(j.fin), tonumber(j.ret)}
end

local function not_found()
  return err('JOB_NOT_FOUND', 'no job ' .. jid .. ' in organization ' .. ORG, 'job_id', jid,
    'organization', ORG)
end

local j = get_job(jid)
if j then settle_job(jid, j) end

if op == 'open' then
  local amt_s, team, project, user = ARGV[7], ARGV[9], ARGV[10], ARGV[11]
  local pol, ttl, fp = ARGV[13], ARGV[14], ARGV[16]
  if j then
    if j.amt ~= amt_s or j.job ~= ARGV[8] or j.tm ~= team or j.pj ~= project or j.us ~= user
        or j.rcv ~= ARGV[12] or j.pol ~= pol or j.ttl ~= ttl or (j.fp ~= '' and j.fp ~= fp) then
      return err('IDEMPOTENCY_CONFLICT', 'job_id ' .. jid .. ' was already approved with '
        .. 'different parameters', 'job_id', jid)
    end
    return answer(j, 1)
  end
  local amt = tonumber(amt_s)
  local fields = {'balance', 'held'}
  for _, sc in ipairs({{'t', team}, {'p', project}}) do
    if sc[2] ~= '' then
      local f = sc[1] .. ':' .. sc[2] .. ':'
      fields[#fields + 1], fields[#fields + 2], fields[#fields + 3] = f .. 'cap', f .. 'held', f .. 'used'
    end
  end
  local v = redis.call('HMGET', ACCT, unpack(fields))
  local avail = N(v[1]) - N(v[2])
  if amt > avail then
    return err('INSUFFICIENT_ECU', 'insufficient ECU: organization ' .. ORG .. ' has ' .. I(avail)
      .. ' uECU available, ' .. amt_s .. ' requested for job ' .. jid,
      'scope', 'organization', 'scope_id', ORG, 'requested', amt_s, 'available', I(avail))
  end
  local k = 3
  for _, sc in ipairs({{'team', team}, {'project', project}}) do
    if sc[2] ~= '' then
      if v[k] then
        local left = N(v[k]) - N(v[k + 1]) - N(v[k + 2])
        if amt > left then
          return err('INSUFFICIENT_ECU', 'insufficient ECU: ' .. sc[1] .. ' ' .. sc[2] .. ' cap has '
            .. I(left) .. ' uECU left, ' .. amt_s .. ' requested for job ' .. jid,
            'scope', sc[1], 'scope_id', sc[2], 'requested', amt_s, 'available', I(left))
        end
      end
      k = k + 3
    end
  end
  local xmax = 0
  if pol == 'wallet' then xmax = overage_bound(amt, tonumber(ARGV[15])) end
  j = {st = 'O', amt = amt_s, x = '0', xmax = I(xmax), room = amt_s, sh = '0', cm = '0', xo = '0',
    n = '0', nc = '0', nr = '0', nl = '0', pol = pol, tm = team, pj = project, us = user, job = ARGV[8],
    rcv = ARGV[12], ttl = ttl, dl = '0', t0 = NOW_S, fin = '0', ret = '0',
    av0 = I(avail - amt), fp = fp}
  touch_job(jid, j)
  put_job(jid, j)
  redis.call('HINCRBY', ACCT, 'held', amt_s)
  redis.call('HINCRBY', ACCT, 'reserved', amt_s)
  scope_incr(j, 'held', amt)
  emit('job_open', 'job_open:' .. jid .. ':' .. NOW_S, 'job_id', jid, 'amount', amt_s,
    'team', team, 'project', project, 'user', user, 'job', ARGV[8], 'rcv', ARGV[12],
    'policy', pol, 'ttl', ttl, 'extra_max', I(xmax))
  check_thresholds()
  return answer(j, 0)
end

if not j then return not_found() end
if op == 'close' then
  if j.st ~= 'O' then return answer(j, 1) end
  end_job(jid, j, 'C')
  check_thresholds()
  return answer(j, 0)
end
if op == 'touch' then
  if j.st ~= 'O' then
    return err('JOB_CLOSED', 'job ' .. jid .. ' is ' .. (j.st == 'C' and 'closed' or 'abandoned')
      .. '; approve a new job', 'job_id', jid, 'state', j.st)
  end
  touch_job(jid, j)
end
return answer(j, 0)
