-- extend: push the deadline of a live hold to max(deadline, now + ttl) (a heartbeat for long runs).
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] reservation id   ARGV[6] ttl ms from now ('0' = the hold's own ttl)
--   ARGV[7] sequence (>= 1): each heartbeat carries a larger number than the last
-- Returns {'OK', deadline, replayed (0|1)}
--   or {'ERR', 'ACCOUNT_NOT_FOUND', msg, 'organization', org}
--   or {'ERR', reason, msg, 'reservation_id', id} with reason HOLD_NOT_FOUND, HOLD_COMMITTED,
--   HOLD_RELEASED, HOLD_EXPIRED, IDEMPOTENCY_CONFLICT (same sequence, other ttl) or
--   STALE_SEQUENCE (a sequence below the last one applied). The last sequence of a hold restored
--   from the ledger is answered as a replay whatever its ttl (the ledger does not keep it).

if FENCED then return fenced_error() end
if not account_exists() then
  return no_account()
end
sweep()
local rid, ttl_s, seq_s = ARGV[5], ARGV[6], ARGV[7]
local rec = get_hold(rid)
if not rec then
  return err('HOLD_NOT_FOUND', 'no hold ' .. rid .. ' in organization ' .. ORG, 'reservation_id', rid)
end
settle_deadline(rid, rec)
if rec.st == 'C' then
  return err('HOLD_COMMITTED', 'hold ' .. rid .. ' was committed; it cannot be extended', 'reservation_id', rid)
elseif rec.st == 'R' then
  return err('HOLD_RELEASED', 'hold ' .. rid .. ' was released; it cannot be extended', 'reservation_id', rid)
elseif rec.st == 'E' then
  return err('HOLD_EXPIRED', 'hold ' .. rid .. ' expired before this extend; reserve again',
    'reservation_id', rid)
end
local seq, last = tonumber(seq_s), tonumber(rec.seq)
if seq == last then
  -- ettl '' : a hold restored from the ledger, which does not keep the ttl of an extend.
  if rec.ettl == ttl_s or rec.ettl == '' then return {'OK', tonumber(rec.dl), 1} end
  return err('IDEMPOTENCY_CONFLICT', 'extend sequence ' .. seq_s .. ' of hold ' .. rid
    .. ' was already used with ttl_ms ' .. rec.ettl, 'reservation_id', rid)
elseif seq < last then
  return err('STALE_SEQUENCE', 'extend sequence ' .. seq_s .. ' of hold ' .. rid
    .. ' is older than the last applied (' .. rec.seq .. ')', 'reservation_id', rid)
end
local ttl = tonumber(ttl_s)
if ttl == 0 then ttl = tonumber(rec.ttl) end
-- An extend never shortens a hold: the deadline only moves forward.
local dl = math.max(tonumber(rec.dl), NOW + ttl)
rec.dl = I(dl)
rec.seq = seq_s
rec.ettl = ttl_s
put_hold(rid, rec)
redis.call('ZADD', DEADLINES, I(dl), rid)
-- A step's heartbeat is its job's too.
local jv = rec.jb and job_view(rec.jb)
if jv and tonumber(jv.dl) > NOW then touch_job(rec.jb, jv) end
emit('extend', 'extend:' .. rid .. ':' .. rec.t0 .. ':' .. seq_s, 'rid', rid, 'deadline', rec.dl,
  'sequence', seq_s)
return {'OK', dl, 0}
