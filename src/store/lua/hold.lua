-- Operations on holds: reserve, check, settle, extend, and, for a reservation across slots on a
-- Cluster, mark (its other groups are held) and forget (give back what one call held).
-- Each takes the batch's `now` and its text, then its own fields (batch.lua reads them), and
-- answers an array. Claims come as a record's body packs them (common.lua), with the limits of
-- the budget claims apart: a record keeps no limit.
--
-- Each operation reads every key it may write before its first write, and each budget is
-- written by its save alone (common.lua): an operation refused half-way, or whose keys this node
-- no longer serves, has changed nothing.

-- What a settled record answers, by phase.
local WHY = { C = 'committed', R = 'released', T = 'released', X = 'expired' }

-- Answers that need no table of their own.
local OK = { 'OK' }
local OK_APPLIED = { 'OK', 'applied', NONE }
local OK_REPLAYED = { 'OK', 'replayed', NONE }
local OK_TOMBSTONED = { 'OK', 'tombstoned', NONE }
local OK_KEPT = { 'OK', 'kept' }
local UNKNOWN = { 'E', 'unknown' }
local UNKNOWN_NONE = { 'E', 'unknown', NONE }
local IN_FLIGHT = { 'E', 'in_flight' }
local IN_FLIGHT_NONE = { 'E', 'in_flight', NONE }
local EXPIRED = { 'E', 'expired' }
local RELEASED = { 'E', 'released' }
local CONFLICT = { 'E', 'conflict' }

-- The answer to a retry of a record that is settled: with its memo, if its settler left one.
local function refuse(key, r)
  local why = WHY[r.s]
  local mkey = memo_key(key)
  if r.s == 'T' or not mkey then return { 'E', why } end
  local memo = CALL('GET', mkey)
  if memo then return { 'E', why, memo } end
  return { 'E', why }
end

-- Whether a record stands for nothing to a reserve: a forgotten hold, or a tombstone left for
-- another call than `nonce` (a reserve whose answer was lost, given back since).
local function stands_for_nothing(r, nonce)
  return r.s == 'F' or (r.s == 'T' and nonce_of(r) ~= ZEROS and nonce_of(r) ~= nonce)
end

-- Whether `pending`, a value's in-flight marker, names the hold of record `key`: the record's
-- key itself, or the hold's id in a marker the previous release left ('<p>:h:{id}' for an id of
-- its own slot; '<p>:h:{tag}name' for 'name@slot', whose record and values share the slot of
-- `tag`; '<p>:g:{tag}id' for a slot group).
local function holds(pending, key)
  if pending == key then return true end
  if not pending then return false end
  if is_group(key) then return string.sub(key, -#pending - 1) == '}' .. pending end
  if string.sub(key, -#pending - 2) == '{' .. pending .. '}' then return true end
  local name = string.match(pending, '^(.+)@%d+$')
  return name ~= nil and string.sub(key, -#name - 1) == '}' .. name
end

-- Reads and checks every claim (`limits`: each budget claim's limit, by claim index), writing
-- nothing. Keeps each budget claim's budget with it, to hold it in (its `LOADED` place), and
-- writes what each claim has left once held (-1: not a budget) into `answer`, from its fourth
-- place on; answers nil, or a denial naming the first claim that failed.
local function check_claims(key, claims, limits, e, now, answer)
  local T = bucket(e)
  for i = 1, #claims do
    local c = claims[i]
    if c[1] == 'b' then
      local b = load_budget(c[5], T)
      expire(b, now)
      local room = remaining(b, limits[i])
      if c[3] > room then return { 'D', i, 'budget', room, c[6] or -1 } end
      -- A second bucket creates the sorted set: read it first (see the top of this file).
      if b.c == 1 and b.n ~= T then CALL('EXISTS', b.key .. ':h') end
      if c[6] then b.window_ends = c[6] end
      c[LOADED] = b
      answer[3 + i] = room - c[3]
    else
      local v = CALL('MGET', c[2], c[2] .. ':p')
      local owner, pending = v[1], v[2]
      if c[1] == 'u' then
        if owner and owner ~= c[4] then return { 'D', i, 'taken', 0 } end
      elseif owner ~= c[4] then
        return { 'D', i, 'not_owner', 0 }
      end
      -- One hold at a time has a value in flight, whatever it claims of it.
      if pending and not holds(pending, key) then return { 'D', i, 'taken', 0 } end
      answer[3 + i] = -1
    end
  end
  return nil
end

-- The answer to a retry of a live hold: the same hold, with what the retry's own budget claims
-- have left now (a retry may work out other claims than its first attempt: with a payload, the
-- payload identifies the reservation).
local function replay(r, nonce, claims, limits, now)
  local out = { 'G', r.e, (nonce_of(r) == nonce) and 0 or 1 }
  for i = 1, #claims do
    local c = claims[i]
    if c[1] == 'b' then
      local b = load_budget(c[5])
      expire(b, now)
      out[3 + i] = remaining(b, limits[i])
    else
      out[3 + i] = -1
    end
  end
  return out
end

-- The limits of a reserve's claims: the first claim's, and the others' as the client packed them
-- (nil when there are none). A lone claim's is kept in one table for every operation (each
-- reads it before the next runs), not in a new one each.
local ONE_LIMIT = {}
local function read_limits(limit, more)
  if not more then
    ONE_LIMIT[1] = limit
    return ONE_LIMIT
  end
  return { limit, MP_UNPACK(more) }
end

-- The actual amounts a commit carries, as the client packed them: a count, then base key, spec,
-- amount each.
local function read_actuals(packed)
  local off, count = MP_READ(packed, 1, 0)
  return (read_spends(packed, off, count))
end

-- Reads what settling a hold's claims needs: each budget with the hold taken out of it (and,
-- committing, what it spends added), each value claim with its owner and in-flight marker.
-- Writes nothing: what it read is kept with each claim (its `LOADED` place), and `write_settled`
-- writes it. Answers the claims.
local function read_settled(r, commit, actuals, now)
  local T = bucket(r.e)
  local claims = claims_of(r)
  for i = 1, #claims do
    local c = claims[i]
    if c[1] == 'b' then
      local b = load_budget(c[5], T)
      expire(b, now)
      if take_out(b, T, c[3], now) and commit then
        local actual = nil
        for j = 1, #actuals do
          local a = actuals[j]
          if a[1] == c[2] and a[2] == c[4] then actual = a[3] end
        end
        if not actual or actual > c[3] then actual = c[3] end
        spend(b, actual)
      end
      c[LOADED] = b
    else
      -- The value's owner and in-flight marker.
      c[LOADED] = CALL('MGET', c[2], c[2] .. ':p')
    end
  end
  return claims
end

-- Writes what read_settled read for the hold of record `key`: committing, held values become
-- their owners' (again, for an owner that claimed what it owned, even if an operator removed it
-- meanwhile) and release-on-commit values are freed; either way the hold's in-flight markers go.
local function write_settled(claims, key, commit)
  for i = 1, #claims do
    local c = claims[i]
    local loaded = c[LOADED]
    if c[1] == 'b' then
      save_budget(loaded)
    else
      local owner, pending = loaded[1], loaded[2]
      if holds(pending, key) then
        if commit and c[1] == 'u' then
          CALL('SET', c[2], c[4])
        elseif commit and owner == c[4] then
          CALL('DEL', c[2])
        end
        CALL('DEL', c[2] .. ':p')
      elseif commit and c[1] == 'r' and owner == c[4] then
        CALL('DEL', c[2])
      end
    end
  end
end

-- Gives back whatever a hold still holds.
local function undo(r, key, now)
  write_settled(read_settled(r, false, NONE, now), key, false)
end

-- The kind of record and the phase a reserve writes, by mode: 1, the id's own record (a hold on
-- one node, or a Cluster home); 2, a Cluster home with groups, which starts in phase P until
-- marked; 3, another slot group of a Cluster reservation.
local MODES = { { 'h', 'H' }, { 'h', 'P' }, { 'g', 'H' } }

-- Op 1: record, lease, fingerprint and nonce (8 bytes each), mode, body, limit, more limits
-- `body`: the record's body (see common.lua); `limit`: the first claim's limit (0 for a value),
-- `more limits`: the other claims', a MessagePack sequence by claim index (nil for none).
-- Answers { 'G', lease end, replayed, remaining per claim (-1: not a budget) }
--       | { 'D', claim index (from 1), 'budget', remaining, window end or -1 (lifetime) }
--       | { 'D', claim index (from 1), 'taken' | 'not_owner', 0 }
--       | { 'E', 'conflict' | 'expired' | 'committed' | 'released' | 'in_flight', memo? }
local function reserve(now, key, lease, fpnonce, mode, body, limit, more_limits)
  local e = now + lease
  if now < 1e12 or e >= 1e13 then
    -- A clock this far off is a misconfigured server: refuse to hold by it.
    return { 'X', 'the server clock is outside the years 2001 to 2286' }
  end
  local kind, phase = MODES[mode][1], MODES[mode][2]
  local limits = read_limits(limit, more_limits)
  local claims = read_body(body, 0, now)
  local r = read_record(key)
  if r then
    local fp, nonce = string.sub(fpnonce, 1, 8), string.sub(fpnonce, 9)
    if stands_for_nothing(r, nonce) then
      -- Replaced below.
    elseif r.s == 'T' then
      -- A tombstone refuses the id's own record, and a group's only the call it was left for.
      if kind == 'h' or nonce_of(r) == nonce then return RELEASED end
    elseif kind == 'h' or (nonce_of(r) == nonce and now < r.e) then
      if fp_of(r) ~= fp then return CONFLICT end
      if r.s == 'H' or r.s == 'P' then
        if now >= r.e then return EXPIRED end
        -- Another attempt is still reserving this reservation's other groups.
        if r.s == 'P' and nonce_of(r) ~= nonce then return IN_FLIGHT end
        local answer = replay(r, nonce, claims, limits, now)
        if kind == 'h' and nonce_of(r) ~= nonce and nonce_of(r) ~= ZEROS then
          -- Two calls have now been told they have this hold: it is no longer one call's to give
          -- back. Either may have lost its answer, and its store then gives back what that call
          -- held (forget, by its nonce); a zero nonce is no call's, so neither forget undoes it.
          CALL('SET', key, string.sub(r.raw, 1, 10) .. ZEROS .. string.sub(r.raw, 19), 'KEEPTTL')
        end
        return answer
      end
      return refuse(key, r)
    end
    -- Otherwise a group record of an earlier attempt: its home decided that attempt (a new
    -- attempt reaches a group only once its home has taken it), and this one replaces it. What
    -- the earlier one still holds goes back first: the call that gives it back may not have
    -- come yet, or may never (a home that lost its record in a failover).
    if r.s == 'H' then undo(r, key, now) end
  end

  -- A grant's answer, what each claim has left filled in by check_claims (made with room for
  -- one, if there is one, so that a lone claim's does not grow it).
  local answer = { 'G', e, 0, claims[1] and -1 }
  local denial = check_claims(key, claims, limits, e, now, answer)
  if denial then return denial end
  local T = bucket(e)
  for i = 1, #claims do
    local b = claims[i][1] == 'b' and claims[i][LOADED]
    if b then
      hold_in(b, T, claims[i][3])
      if b.window_ends then keep_until(b, math.max(b.window_ends, e) + WINDOW_GRACE_MS) end
      save_budget(b)
    else
      CALL('SET', claims[i][2] .. ':p', key, 'PX', num(lease))
    end
  end
  CALL('SET', key, phase .. V .. fpnonce .. times(e, now) .. body, 'PX', num(lease + RETAIN))
  return answer
end

-- Op 9: record, lease, fingerprint (8 bytes), body, limit, more limits: what reserve would answer now,
-- holding nothing.
local function check(now, key, lease, fp, body, limit, more_limits)
  local limits = read_limits(limit, more_limits)
  local claims = read_body(body, 0, now)
  -- A slot group's record is its home's to answer for: only its claims are checked here.
  local r = not is_group(key) and read_record(key)
  if r then
    if not stands_for_nothing(r, '') then
      if r.s == 'T' then return RELEASED end
      if fp_of(r) ~= fp then return CONFLICT end
      if r.s == 'H' or r.s == 'P' then
        if now >= r.e then return EXPIRED end
        return replay(r, '', claims, limits, now)
      end
      return refuse(key, r)
    end
  end
  local answer = { 'G', now + lease, 0, claims[1] and -1 }
  return check_claims(key, claims, limits, now + lease, now, answer) or answer
end

-- Keeps `key` at least `keep` ms from now; answers false when it does not exist.
local function keep_at_least(key, keep)
  local ttl = CALL('PTTL', key)
  if ttl == -2 then return false end
  if ttl >= 0 and ttl < keep then CALL('PEXPIRE', key, num(keep)) end
  return true
end

-- A commit of a hold whose lease ran out (here, or in a group that cannot follow): whatever is
-- still held goes back now, and the record says it expired.
local function expire_now(key, r, nonce, now)
  undo(r, key, now)
  CALL('SET', key, settled_by(r, 'X', nonce), 'PX', num(RETAIN))
  return { 'E', 'expired', r.g }
end

-- Op 2: record, commit (boolean), strict (boolean), prepared, keep ms (0: forget), memo (nil
-- for none), actuals (nil for none; else a count, then base key, window spec, amount each, a
-- MessagePack sequence), call nonce (8 bytes)
-- strict: actual amounts must each name a budget of this hold (a whole hold, or a Cluster home,
-- which checks them against every group's), else a group applies those that name its own
-- budgets. prepared, for a Cluster home's commit: '1' when its groups were made sure to outlive
-- the commit (see cluster.rs), 'x' when one of them has ended (the commit expires), 'f' when
-- every group has followed a settlement that forgets (the home, kept for them, goes now), else
-- '0'.
-- Answers { 'OK', 'applied' | 'replayed' | 'tombstoned', groups }
--       | { 'E', 'unknown' | 'committed' | 'released' | 'expired' | 'in_flight' | 'exceeds'
--              | 'not_held' | 'prepare', groups, memo? }
-- 'prepare': a commit of a home with groups that were not made sure of: nothing changed.
local function settle(now, key, commit, strict, prepared, keep, memo, actuals, nonce)
  local r = read_record(key)
  if prepared == 'f' then
    -- Forgotten as a whole hold is: for ANSWER_MS its settling call is still answered.
    if r and (r.s == 'C' or r.s == 'R' or r.s == 'X') then
      local mkey = memo_key(key)
      CALL('SET', key, forgotten(nonce_of(r), false), 'PX', num(ANSWER_MS))
      if mkey then CALL('DEL', mkey) end
    end
    return OK_APPLIED
  end
  -- The same call sent again (its answer was lost) is answered as it was.
  if r and r.s == 'F' and nonce_of(r) == nonce then
    return forgot_with(r) == 'replayed' and OK_REPLAYED or OK_APPLIED
  end
  if r and r.s == 'T' and fp_of(r) == nonce then return OK_TOMBSTONED end
  -- What a forgotten hold or a lost reserve call left is nothing to anyone else.
  if r and stands_for_nothing(r, '') then r = nil end
  if not r then
    if commit then return UNKNOWN_NONE end
    -- Released before reserved: the tombstone refuses the late reserve (and is always kept).
    CALL('SET', key, tombstone(nonce), 'PX', num(math.max(keep, RETAIN)))
    return OK_TOMBSTONED
  end
  if r.s ~= 'H' then
    if r.s == 'P' then return IN_FLIGHT_NONE end
    local same = (commit and r.s == 'C') or (not commit and r.s ~= 'C')
    if not same then return { 'E', WHY[r.s], groups_of(r) } end
    -- The same call sent again (its answer was lost) is answered as it was.
    if nonce_of(r) == nonce and r.s ~= 'T' then return { 'OK', 'applied', groups_of(r) } end
    if r.s ~= 'T' then
      -- Settled the same way before. A retry that forgets drops the record (a home with groups
      -- once they have followed, as below); one that keeps it keeps it (and its memo, or this
      -- one if none was kept) at least as long as it asks.
      local mkey = memo_key(key)
      if keep == 0 and #groups_of(r) > 0 then keep = RETAIN end
      if keep == 0 then
        CALL('SET', key, forgotten(nonce, true), 'PX', num(ANSWER_MS))
        if mkey then CALL('DEL', mkey) end
      else
        -- A memo lives as long as its record.
        local ttl = math.max(keep, CALL('PTTL', key))
        local kept = mkey and keep_at_least(mkey, ttl)
        if memo and mkey and not kept then CALL('SET', mkey, memo, 'PX', num(ttl)) end
        keep_at_least(key, keep)
      end
    end
    return { 'OK', 'replayed', groups_of(r) }
  end

  local groups = groups_of(r)
  -- A home with groups is kept until they have followed: a commit that did not reach every
  -- group is finished by a retry, which needs the list (cluster.rs drops it afterwards when
  -- the settlement forgets).
  if #groups > 0 and keep == 0 then keep = RETAIN end
  if commit and now >= r.e then return expire_now(key, r, nonce, now) end
  actuals = actuals and read_actuals(actuals) or NONE
  if commit and strict then
    -- Every actual amount is checked before anything changes (a Cluster home's groups too):
    -- against this record's claims, and a Cluster home's list of every group's budget claims.
    local claims, spends = r.c, r.v
    for i = 1, #actuals do
      local a = actuals[i]
      local held = nil
      for j = 1, #claims do
        local c = claims[j]
        if c[1] == 'b' and a[1] == c[2] and a[2] == c[4] then held = c[3] end
      end
      for j = 1, #spends do
        local v = spends[j]
        if v[1] == a[1] and v[2] == a[2] then held = v[3] end
      end
      if not held or a[3] > held then return { 'E', held and 'exceeds' or 'not_held', groups } end
    end
  end
  if commit and #groups > 0 and prepared == '0' then return { 'E', 'prepare', groups } end
  if commit and prepared == 'x' then return expire_now(key, r, nonce, now) end
  local claims = read_settled(r, commit, actuals, now)
  local mkey = keep > 0 and memo and memo_key(key)
  if mkey then CALL('EXISTS', mkey) end
  -- Writes, every key read above.
  write_settled(claims, key, commit)
  if keep == 0 then
    CALL('SET', key, forgotten(nonce, false), 'PX', num(ANSWER_MS))
  else
    CALL('SET', key, settled_by(r, commit and 'C' or 'R', nonce), 'PX', num(keep))
    if mkey then CALL('SET', mkey, memo, 'PX', num(keep)) end
  end
  if groups == NONE then return OK_APPLIED end
  return { 'OK', 'applied', groups }
end

-- Op 3: record, lease, at least (boolean): renews a live hold's lease to `lease` from now (at
-- least: never shortened, for a slot group, whose lease must outlast its home's).
-- Answers { 'OK', new lease end, groups } | { 'E', why }
local function extend(now, key, lease, at_least)
  local r = read_record(key)
  if not r then return UNKNOWN end
  if stands_for_nothing(r, '') then return UNKNOWN end
  if r.s == 'P' then return IN_FLIGHT end
  if r.s ~= 'H' then return refuse(key, r) end
  if now >= r.e then return EXPIRED end
  local e = now + lease
  if at_least and e <= r.e then return { 'OK', r.e, groups_of(r) } end
  local old_T, new_T = bucket(r.e), bucket(e)
  local budgets, values = {}, {}
  local claims = claims_of(r)
  for i = 1, #claims do
    local c = claims[i]
    if c[1] == 'b' then
      local b = load_budget(c[5], old_T, new_T)
      expire(b, now)
      if take_out(b, old_T, c[3], now) then
        if b.c == 1 and b.n ~= new_T then CALL('EXISTS', b.key .. ':h') end
        hold_in(b, new_T, c[3])
      end
      if b.t > 0 then keep_until(b, e + WINDOW_GRACE_MS) end
      budgets[#budgets + 1] = b
    elseif holds(CALL('GET', c[2] .. ':p'), key) then
      values[#values + 1] = c[2] .. ':p'
    end
  end
  for i = 1, #budgets do save_budget(budgets[i]) end
  for i = 1, #values do CALL('PEXPIRE', values[i], num(lease)) end
  CALL('SET', key, 'H' .. string.sub(r.raw, 2, 18) .. PACK('>I6', e) .. string.sub(r.raw, 25),
    'PX', num(lease + RETAIN))
  return { 'OK', e, r.g }
end

-- Op 4: record, nonce: a Cluster home whose groups are all held is held too.
local function mark(now, key, nonce)
  local r = read_record(key)
  if not r then return UNKNOWN end
  if r.s ~= 'P' or nonce_of(r) ~= nonce then return { 'E', 'not_pending' } end
  CALL('SET', key, with_phase(r, 'H'), 'KEEPTTL')
  return OK
end

-- Op 5: record, nonce: gives back what one reserve call held under `record` (a call denied
-- elsewhere, or whose answer was lost), and leaves a tombstone that refuses that call, should it
-- still arrive. Any other record (another call's, a hold answered to a second call, or one
-- settled since) is left alone, and the answer says so: a Cluster home's groups then stay too.
-- Answers { 'OK' } | { 'OK', 'kept' }
local function forget(now, key, nonce)
  local r = read_record(key)
  if r then
    if nonce_of(r) ~= nonce or not (r.s == 'H' or r.s == 'P') then
      -- This call's own tombstone: given back before (this is the same forget sent again).
      if r.s == 'T' and nonce_of(r) == nonce then return OK end
      if not stands_for_nothing(r, nonce) then return OK_KEPT end
    else
      undo(r, key, now)
    end
  end
  CALL('SET', key, tombstone_for(nonce), 'PX', num(RETAIN))
  return OK
end
