-- sweep: expire overdue holds and grants, purge old tombstones of one organization (bounded).
--   KEYS: the organization's keys (see _lib.lua)
-- Returns {'OK', holds expired, overdue holds and job index entries still waiting (0 when the
--   sweep caught up), ms until the next hold deadline, grant expiry or job index entry (an open
--   job's abandonment deadline, an ended job's purge time) falls due (-1: none)}, so the
--   background sweeper can leave an idle organization alone until then.

local n = sweep()
check_thresholds()
local next_due = -1
for _, key in ipairs({DEADLINES, GEXP, JOBDL}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    local wait = math.max(0, tonumber(first[2]) - NOW)
    if next_due < 0 or wait < next_due then next_due = wait end
  end
end
local waiting = redis.call('ZCOUNT', DEADLINES, '-inf', NOW_S)
  + redis.call('ZCOUNT', JOBDL, '-inf', NOW_S)
return {'OK', n, waiting, I(next_due)}
