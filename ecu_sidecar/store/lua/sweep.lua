-- sweep: expire overdue holds and grants, purge old tombstones of one organization (bounded).
--   KEYS: the organization's keys (see _lib.lua)
-- Returns {'OK', holds expired, overdue holds still waiting (0 when the sweep caught up),
--   ms until the next hold deadline or grant expiry falls due (-1: none)}, so the background
--   sweeper can leave an idle organization alone until then.

local n = sweep()
check_thresholds()
local next_due = -1
for _, key in ipairs({DEADLINES, GEXP}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    local wait = math.max(0, tonumber(first[2]) - NOW)
    if next_due < 0 or wait < next_due then next_due = wait end
  end
end
return {'OK', n, redis.call('ZCOUNT', DEADLINES, '-inf', NOW_S), I(next_due)}
