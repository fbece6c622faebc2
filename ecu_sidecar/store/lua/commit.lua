-- commit: settle one or more holds of one organization with what each step really cost.
--   KEYS: the organization's keys (see _lib.lua)
--   ARGV[5] overage bound in percent of the hold (billed = min(actual, hold + hold*pct/100))
--   ARGV[6] '1' to bill an unknown reservation id as a hold-less (orphan) commit: the replay of
--   a hold granted locally in degraded mode (ecu_sidecar.degraded); '0' otherwise
--   ARGV[7] item count n, then n groups of 7: reservation id, actual, tokens in, tokens out, calls,
--   rate card version the actual was priced with ('' = a plain amount), breakdown JSON ('' = none)
-- Returns {'OK', available_after, then per item 10 values:
--   id, status ('OK' or an error reason), message, committed, released, overage, unbilled, late (0|1),
--   replayed (0|1), available right after this item's commit (a replay answers the original)}
-- Item errors: HOLD_NOT_FOUND, HOLD_RELEASED, IDEMPOTENCY_CONFLICT (a committed hold replayed
-- with another actual or usage), RATE_CARD_MISMATCH (usage priced with another rate card
-- version than the hold pinned). Items are independent.
-- An expired hold still commits (the work happened): it is billed as a late commit, flagged.
-- A hold Redis lost (the account was rebuilt from the ledger since: acct 'hydrated') still
-- commits too: billed at the actual, flagged orphan. Without a rebuild an unknown id is
-- HOLD_NOT_FOUND. Billed amounts burn expiring grants soonest-first.

if not account_exists() then
  return err('ACCOUNT_NOT_FOUND', 'organization has no ECU account (no grant yet)')
end
sweep()
local pct = tonumber(ARGV[5])
local orphan_ok = ARGV[6] == '1' or redis.call('HEXISTS', ACCT, 'hydrated') == 1
local n = tonumber(ARGV[7])
local out = {'OK', 0}

local function item_err(rid, reason, message)
  for _, x in ipairs({rid, reason, message, 0, 0, 0, 0, 0, 0, 0}) do out[#out + 1] = x end
end

local function item_ok(rid, rec, replayed)
  for _, x in ipairs({rid, 'OK', '', tonumber(rec.cm), tonumber(rec.rel), tonumber(rec.ov),
      tonumber(rec.uov), tonumber(rec.late), replayed, tonumber(rec.av1)}) do
    out[#out + 1] = x
  end
end

for i = 0, n - 1 do
  local b = 8 + i * 7
  local rid, actual_s, rcv, lines = ARGV[b], ARGV[b + 1], ARGV[b + 5], ARGV[b + 6]
  local usage = {'tokens_in', ARGV[b + 2], 'tokens_out', ARGV[b + 3], 'calls', ARGV[b + 4]}
  local rec = get_hold(rid)
  if not rec and orphan_ok then
    -- Usage is never dropped: record it against a placeholder hold of amount 0.
    rec = {st = 'O', amt = '0', job = '', mdl = '', ttl = '0', tm = '', pj = '', us = '',
      dl = I(NOW), t0 = I(NOW), av0 = '0', seq = '0', ettl = '0'}
  end
  if not rec then
    item_err(rid, 'HOLD_NOT_FOUND', 'no hold ' .. rid .. ' in organization ' .. ORG)
  else
    settle_deadline(rid, rec)
    if rec.st == 'C' then
      if rec.act == actual_s and rec.ti == ARGV[b + 2] and rec.to == ARGV[b + 3]
          and rec.ca == ARGV[b + 4] then
        item_ok(rid, rec, 1)
      else
        item_err(rid, 'IDEMPOTENCY_CONFLICT', 'hold ' .. rid .. ' was already committed with actual '
          .. rec.act .. ' uECU and other usage or amount')
      end
    elseif rec.st == 'R' then
      item_err(rid, 'HOLD_RELEASED', 'hold ' .. rid .. ' was released; it cannot be committed')
    elseif rcv ~= '' and rec.st ~= 'O' and rcv ~= (rec.rcv or '') then
      item_err(rid, 'RATE_CARD_MISMATCH', "hold " .. rid .. " was priced with rate card version '"
        .. (rec.rcv or '') .. "'; its usage must be priced with that version, not '" .. rcv .. "'")
    else
      local amt = tonumber(rec.amt)
      local actual = tonumber(actual_s)
      local orphan = rec.st == 'O'
      local late = rec.st == 'E' or orphan
      local bound = math.floor(amt * pct / 100)
      local billed = math.min(actual, amt + bound)
      if orphan then billed = actual end
      local overage = math.max(0, billed - amt)
      local unbilled = actual - billed
      local from_hold = math.min(billed, amt)
      local released = 0
      if not late then
        released = amt - from_hold
        redis.call('HINCRBY', ACCT, 'held', I(-amt))
        redis.call('HINCRBY', ACCT, 'committed_from_holds', I(from_hold))
        redis.call('HINCRBY', ACCT, 'released', I(released))
        redis.call('HINCRBY', ACCT, 'overage', I(overage))
        scope_incr(rec, 'held', -amt)
      elseif orphan then
        redis.call('HINCRBY', ACCT, 'orphan_committed', I(billed))
      else
        redis.call('HINCRBY', ACCT, 'late_committed', I(billed))
      end
      burn(billed)
      redis.call('HINCRBY', ACCT, 'balance', I(-billed))
      redis.call('HINCRBY', ACCT, 'committed', I(billed))
      if unbilled > 0 then redis.call('HINCRBY', ACCT, 'unbilled_overage', I(unbilled)) end
      scope_incr(rec, 'used', billed)
      rec.st = 'C'
      rec.act = actual_s
      rec.ti, rec.to, rec.ca = ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
      rec.cm = I(billed)
      rec.rel = I(released)
      rec.ov = I(late and 0 or overage)
      rec.uov = I(unbilled)
      rec.late = late and '1' or '0'
      rec.orphan = orphan and '1' or nil
      rec.fin = I(NOW)
      rec.av1 = I(available())
      put_hold(rid, rec)
      entomb(rid)
      local ev = {'rid', rid, 'amount', rec.amt, 'actual', actual_s, 'committed', billed,
        'released', released, 'overage', rec.ov, 'unbilled', unbilled, 'late', rec.late,
        'orphan', orphan and '1' or '0',
        'team', rec.tm, 'project', rec.pj, 'user', rec.us, 'job', rec.job, 'model', rec.mdl}
      for _, x in ipairs(usage) do ev[#ev + 1] = x end
      if rcv ~= '' then
        for _, x in ipairs({'rcv', rcv, 'lines', lines}) do ev[#ev + 1] = x end
      end
      emit('commit', 'commit:' .. rid .. ':' .. rec.t0, ev)
      item_ok(rid, rec, 0)
    end
  end
end
check_thresholds()
out[2] = available()
return out
