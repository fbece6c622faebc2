-- sweep: expire overdue holds and grants, purge old tombstones of one organization (bounded).
--   KEYS: the organization's keys (see _lib.lua)
-- Returns {'OK', holds expired, overdue holds still waiting (0 when the sweep caught up)}

local n = sweep()
check_thresholds()
return {'OK', n, redis.call('ZCOUNT', DEADLINES, '-inf', I(NOW))}
