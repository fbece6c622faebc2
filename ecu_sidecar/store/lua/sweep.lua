-- sweep: expire overdue holds and purge old tombstones of one organization (bounded).
--   KEYS: the organization's keys (see _lib.lua)
-- Returns {'OK', holds expired, overdue holds still waiting (0 when the sweep caught up)}

local n = sweep()
return {'OK', n, redis.call('ZCOUNT', DEADLINES, '-inf', I(NOW))}
