-- release: void one hold; its amount returns to available.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] reservation id
-- Returns {'OK', available_after, released, state ('R' or 'E'), replayed (0|1)}
--   or {'ERR', 'ACCOUNT_NOT_FOUND', msg, 'organization', org}
--   or {'ERR', 'HOLD_NOT_FOUND' | 'HOLD_COMMITTED', msg, 'reservation_id', id}
-- Releasing a hold that already expired is not an error: nothing is held either way (state 'E').
-- A step of an open job returns its amount to the job's room, not to the wallet.

if FENCED then return fenced_error() end
if not account_exists() then
  return no_account()
end
sweep()
local rid = ARGV[5]
local rec = get_hold(rid)
if not rec then
  return err('HOLD_NOT_FOUND', 'no hold ' .. rid .. ' in organization ' .. ORG, 'reservation_id', rid)
end
local jid = rec.jb
local jv, ended
if jid then jv, ended = open_job_view(jid) end
if ended then rec = get_hold(rid) end
settle_deadline(rid, rec)
if rec.st == 'C' then
  return err('HOLD_COMMITTED', 'hold ' .. rid .. ' was committed; it cannot be released',
    'reservation_id', rid)
end
if rec.st == 'R' then
  return {'OK', tonumber(rec.av1), tonumber(rec.rel), 'R', 1}
end
if rec.st == 'E' then
  -- Mark the record so that a replay of this release says so; no money moves.
  local replayed = rec.rls and 1 or 0
  if replayed == 0 then
    rec.rls = '1'
    put_hold(rid, rec)
  end
  return {'OK', available(), 0, 'E', replayed}
end
local amt = tonumber(rec.amt)
if jv then
  job_incr(jid, 'room', amt)
  job_incr(jid, 'nr', 1)
  touch_job(jid, jv)
  redis.call('ZREM', JSTEPS, step_member(jid, rid))
else
  redis.call('HINCRBY', ACCT, 'held', I(-amt))
  redis.call('HINCRBY', ACCT, 'released', I(amt))
  scope_incr(rec, 'held', -amt)
end
rec.st = 'R'
rec.rel = rec.amt
rec.fin = NOW_S
local after = available()
rec.av1 = I(after)
put_hold(rid, rec)
entomb(rid)
emit('release', 'release:' .. rid .. ':' .. rec.t0, 'rid', rid, 'amount', I(amt), 'team', rec.tm,
  'project', rec.pj, 'user', rec.us, 'job', rec.job, 'model', rec.mdl, 'job_id', jid or '')
return {'OK', after, amt, 'R', 0}
