-- Shared prelude, prepended to every operation script by ecu_sidecar.store.scripts.
--
-- Every operation script touches only the keys of one organization, all sharing the hash tag
-- {org}, always passed in this order:
--   KEYS[1] acct       hash: wallet counters and team/project caps (t:<team>:cap|held|used, p:<project>:...)
--   KEYS[2] holds      hash: reservation id -> cjson hold record (live holds and tombstones)
--   KEYS[3] deadlines  zset: reservation id -> deadline (ms) of every ACTIVE hold
--   KEYS[4] tombs      zset: reservation id -> purge time (ms) of every terminal hold
--   KEYS[5] outbox     stream: one event per state change, for the ledger flusher
--   KEYS[6] grants     hash: grant id -> cjson grant record
-- and these leading arguments:
--   ARGV[1] organization id (recorded in events)
--   ARGV[2] clock offset in ms added to Redis TIME (0 in production; tests step time with it)
--   ARGV[3] tombstone retention in ms (how long terminal holds answer replays)
--   ARGV[4] sweep limit: at most this many expired holds / old tombstones handled per call
-- Operation arguments start at ARGV[5].
--
-- Numbers: every amount is integer micro-ECU, validated by the caller to stay far below 2^53,
-- so Lua doubles hold them exactly. Numbers are written back through I() so that Redis never
-- sees an exponent. Record fields hold numbers as decimal strings for the same reason.
--
-- Errors are returned, not raised: {'ERR', reason, message, key1, value1, ...}. A script
-- validates everything before its first write, so an error leaves no trace.

local ACCT, HOLDS, DEADLINES, TOMBS, OUTBOX, GRANTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ORG = ARGV[1]
local TOMB_MS = tonumber(ARGV[3])
local SWEEP_LIMIT = tonumber(ARGV[4])

local function I(n)
  return string.format('%d', n)
end

local function N(s)
  if s == nil or s == false or s == '' then return 0 end
  return tonumber(s)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
end

local NOW = now_ms()

local function err(reason, message, ...)
  local out = {'ERR', reason, message}
  for _, v in ipairs({...}) do out[#out + 1] = v end
  return out
end

local function get_hold(rid)
  local raw = redis.call('HGET', HOLDS, rid)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function put_hold(rid, rec)
  redis.call('HSET', HOLDS, rid, cjson.encode(rec))
end

-- Append one event to the outbox. fields: flat list of name, value (strings or numbers).
local function emit(etype, eid, fields)
  local args = {'XADD', OUTBOX, '*', 'type', etype, 'eid', eid, 'org', ORG, 'ts', I(NOW)}
  for i = 1, #fields, 2 do
    local v = fields[i + 1]
    if type(v) == 'number' then v = I(v) end
    args[#args + 1] = fields[i]
    args[#args + 1] = v
  end
  redis.call(unpack(args))
end

-- Move a terminal hold from the deadline index to the tombstone index.
local function entomb(rid)
  redis.call('ZREM', DEADLINES, rid)
  redis.call('ZADD', TOMBS, I(NOW + TOMB_MS), rid)
end

-- Counters of the team/project scopes a hold is charged to: add delta to <scope>:<field>.
local function scope_incr(rec, field, delta)
  if delta == 0 then return end
  if rec.tm ~= '' then redis.call('HINCRBY', ACCT, 't:' .. rec.tm .. ':' .. field, I(delta)) end
  if rec.pj ~= '' then redis.call('HINCRBY', ACCT, 'p:' .. rec.pj .. ':' .. field, I(delta)) end
end

-- Expire one ACTIVE hold whose deadline has passed: its amount returns to available.
local function expire_hold(rid, rec)
  local amt = tonumber(rec.amt)
  rec.st = 'E'
  rec.fin = I(NOW)
  put_hold(rid, rec)
  entomb(rid)
  redis.call('HINCRBY', ACCT, 'held', I(-amt))
  redis.call('HINCRBY', ACCT, 'expired', I(amt))
  redis.call('HINCRBY', ACCT, 'expired_holds', 1)
  scope_incr(rec, 'held', -amt)
  emit('expire', 'expire:' .. rid, {'rid', rid, 'amount', amt, 'team', rec.tm, 'project', rec.pj,
    'user', rec.us, 'job', rec.job, 'model', rec.mdl})
end

-- Expire up to SWEEP_LIMIT overdue holds and purge up to SWEEP_LIMIT old tombstones.
-- O(log n + limit). Returns the number of holds expired.
local function sweep()
  local n = 0
  local due = redis.call('ZRANGEBYSCORE', DEADLINES, '-inf', I(NOW), 'LIMIT', 0, SWEEP_LIMIT)
  for _, rid in ipairs(due) do
    local rec = get_hold(rid)
    if rec and rec.st == 'A' then
      expire_hold(rid, rec)
      n = n + 1
    else
      redis.call('ZREM', DEADLINES, rid)
    end
  end
  local old = redis.call('ZRANGEBYSCORE', TOMBS, '-inf', I(NOW), 'LIMIT', 0, SWEEP_LIMIT)
  if #old > 0 then
    redis.call('HDEL', HOLDS, unpack(old))
    redis.call('ZREM', TOMBS, unpack(old))
  end
  return n
end

-- An ACTIVE hold past its deadline is expired on first touch, whether or not a sweep ran.
local function settle_deadline(rid, rec)
  if rec.st == 'A' and tonumber(rec.dl) <= NOW then
    expire_hold(rid, rec)
  end
end

local function available()
  local v = redis.call('HMGET', ACCT, 'balance', 'held')
  return N(v[1]) - N(v[2])
end

local function account_exists()
  return redis.call('HEXISTS', ACCT, 'balance') == 1
end
