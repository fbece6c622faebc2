-- reserve: place one or more holds for one account, all or nothing.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] team ('' = none)   ARGV[6] project ('' = none)   ARGV[7] user ('' = none)
--   ARGV[8] item count n, then n groups of 7: reservation id, amount, job type, model, ttl ms,
--   rate card version ('' = a plain amount), job fingerprint ('' = a plain amount)
-- Returns {'OK', available_after, replayed_all (0|1), then per item: id, amount, deadline, state,
--   pinned rate card version}
--   or {'ERR', 'ACCOUNT_NOT_FOUND', msg}
--   or {'ERR', 'IDEMPOTENCY_CONFLICT', msg, 'reservation_id', id}
--   or {'ERR', 'INSUFFICIENT_ECU', msg, 'scope', s, 'scope_id', id, 'requested', r, 'available', a}
-- A reservation id already held with the same parameters is answered from its record (a replay)
-- and not charged again; with different parameters the whole call is refused. A hold priced
-- from a job spec is compared by the spec's fingerprint, not its amount, so a retry that lands
-- after a rate card reload is still a replay of the hold priced (and pinned) the first time.

if not account_exists() then
  return err('ACCOUNT_NOT_FOUND', 'organization has no ECU account (no grant yet)')
end
sweep()

local team, project, user = ARGV[5], ARGV[6], ARGV[7]
local n = tonumber(ARGV[8])
local items = {}
local need = 0
local fresh = 0

-- Phase 1: read and check everything; no writes.
for i = 0, n - 1 do
  local b = 9 + i * 7
  local it = {rid = ARGV[b], amt = ARGV[b + 1], job = ARGV[b + 2], mdl = ARGV[b + 3], ttl = ARGV[b + 4],
    rcv = ARGV[b + 5], fp = ARGV[b + 6]}
  local rec = get_hold(it.rid)
  if rec then
    local same_cost = rec.amt == it.amt and (rec.fp or '') == ''
    if (rec.fp or '') ~= '' then same_cost = rec.fp == it.fp end
    if not same_cost or rec.job ~= it.job or rec.mdl ~= it.mdl or rec.ttl ~= it.ttl
        or rec.tm ~= team or rec.pj ~= project or rec.us ~= user then
      return err('IDEMPOTENCY_CONFLICT',
        'reservation_id ' .. it.rid .. ' was already used with different parameters',
        'reservation_id', it.rid)
    end
    it.rec = rec
  else
    need = need + tonumber(it.amt)
    fresh = fresh + 1
  end
  items[#items + 1] = it
end

local fields = {'balance', 'held'}
if team ~= '' then
  for _, f in ipairs({'cap', 'held', 'used'}) do fields[#fields + 1] = 't:' .. team .. ':' .. f end
end
if project ~= '' then
  for _, f in ipairs({'cap', 'held', 'used'}) do fields[#fields + 1] = 'p:' .. project .. ':' .. f end
end
local v = redis.call('HMGET', ACCT, unpack(fields))
local avail = N(v[1]) - N(v[2])

if fresh > 0 then
  if need > avail then
    return err('INSUFFICIENT_ECU', 'insufficient ECU: organization ' .. ORG .. ' has ' .. I(avail)
      .. ' uECU available, ' .. I(need) .. ' requested',
      'scope', 'organization', 'scope_id', ORG, 'requested', I(need), 'available', I(avail))
  end
  local k = 3
  for _, sc in ipairs({{'team', team}, {'project', project}}) do
    if sc[2] ~= '' then
      if v[k] then
        local left = N(v[k]) - N(v[k + 1]) - N(v[k + 2])
        if need > left then
          return err('INSUFFICIENT_ECU', 'insufficient ECU: ' .. sc[1] .. ' ' .. sc[2] .. ' cap has '
            .. I(left) .. ' uECU left, ' .. I(need) .. ' requested',
            'scope', sc[1], 'scope_id', sc[2], 'requested', I(need), 'available', I(left))
        end
      end
      k = k + 3
    end
  end
end

-- Phase 2: write.
local after = avail - need
if fresh == 0 then after = tonumber(items[#items].rec.av0) end
local out = {'OK', after, fresh == 0 and 1 or 0}
for _, it in ipairs(items) do
  local rec = it.rec
  if not rec then
    local dl = NOW + tonumber(it.ttl)
    rec = {st = 'A', amt = it.amt, job = it.job, mdl = it.mdl, ttl = it.ttl, tm = team, pj = project,
      us = user, dl = I(dl), t0 = I(NOW), av0 = I(after), seq = '0', ettl = '0', rcv = it.rcv,
      fp = it.fp}
    put_hold(it.rid, rec)
    redis.call('ZADD', DEADLINES, I(dl), it.rid)
    emit('reserve', 'reserve:' .. it.rid .. ':' .. rec.t0, {'rid', it.rid, 'amount', it.amt, 'team', team,
      'project', project, 'user', user, 'job', it.job, 'model', it.mdl, 'deadline', rec.dl,
      'rcv', it.rcv})
  end
  out[#out + 1] = it.rid
  out[#out + 1] = tonumber(rec.amt)
  out[#out + 1] = tonumber(rec.dl)
  out[#out + 1] = rec.st
  out[#out + 1] = rec.rcv or ''
end
if fresh > 0 then
  redis.call('HINCRBY', ACCT, 'held', I(need))
  redis.call('HINCRBY', ACCT, 'reserved', I(need))
  if team ~= '' then redis.call('HINCRBY', ACCT, 't:' .. team .. ':held', I(need)) end
  if project ~= '' then redis.call('HINCRBY', ACCT, 'p:' .. project .. ':held', I(need)) end
  check_thresholds()
end
return out
