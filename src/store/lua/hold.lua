-- Operations on holds: reserve, check, settle, extend, and, for a reservation across slots on a
-- Cluster, mark (its other groups are held) and forget (undo a group of a denied reservation).
-- Each takes its operation (an array, decoded from MessagePack), the batch's `now` and its text,
-- and answers an array. A claim to check is { 'b', budget base key, amount, limit, window spec }
-- or { 'u' or 'r', value key, owner }.

-- The answer to a retry of a record that is settled: with its memo, if its settler left one.
local function refuse(key, r)
  local why = ({ C = 'committed', R = 'released', T = 'released', X = 'expired' })[r.s]
  if r.s == 'T' then return { 'E', why } end
  local memo = redis.call('GET', key .. ':m')
  if memo then return { 'E', why, memo } end
  return { 'E', why }
end

-- Reads and checks every claim, writing nothing (expired buckets aside). Answers the state to
-- hold them, or a denial naming the first claim that failed.
local function check_claims(id, claims, e, now, now_text)
  local state = { budgets = {}, remaining = {} }
  local T = bucket(e)
  for i, c in ipairs(claims) do
    if c[1] == 'b' then
      local suffix, ends = window(c[5], now)
      local b = load_budget(c[2] .. suffix, { T })
      expire(b, now, now_text)
      local left = remaining(b, c[4])
      if c[3] > left then return nil, { 'D', i, 'budget', left } end
      b.window_ends = ends
      state.budgets[i] = b
      state.remaining[i] = left - c[3]
    else
      local v = redis.call('MGET', c[2], c[2] .. ':p')
      local owner, pending = v[1], v[2]
      if c[1] == 'u' then
        if owner and owner ~= c[3] then return nil, { 'D', i, 'taken', 0 } end
      elseif owner ~= c[3] then
        return nil, { 'D', i, 'not_owner', 0 }
      end
      -- One hold at a time has a value in flight, whatever it claims of it.
      if pending and pending ~= id then return nil, { 'D', i, 'taken', 0 } end
      state.remaining[i] = -1
    end
  end
  return state, nil
end

-- The answer to a retry of a live hold: the same hold, with what the retry's own budget claims
-- have left now (a retry may work out other claims than its first attempt: with a payload, the
-- payload identifies the reservation).
local function replay(r, nonce, claims, now, now_text)
  local out = { 'G', r.e, (r.nonce == nonce) and 0 or 1 }
  for i, c in ipairs(claims) do
    if c[1] == 'b' then
      local b = load_budget(c[2] .. window(c[5], now), {})
      expire(b, now, now_text)
      save_budget(b)
      out[3 + i] = remaining(b, c[4])
    else
      out[3 + i] = -1
    end
  end
  return out
end

-- Gives back whatever a hold still holds.
local function undo(r, id, now, now_text)
  local T = bucket(r.e)
  for _, c in ipairs(claims_of(r)) do
    if c[1] == 'b' then
      local b = load_budget(c.key, { T })
      expire(b, now, now_text)
      take_out(b, T, c[3], now_text)
      save_budget(b)
    else
      clear_pending(c[2], id)
    end
  end
end

-- The actual amount `actuals` names for a budget claim (by base key and window spec), if any.
local function actual_for(actuals, c)
  for _, a in ipairs(actuals) do
    if a[1] == c[2] and a[2] == c[4] then return a[3] end
  end
  return nil
end

-- Op 1. { 1, record, id, lease, fingerprint and nonce (32 hex), mode, claims, body }
-- mode 'hH': the id's own record (a hold on one node, or a Cluster home); 'hP': a Cluster home
-- with groups, which starts in phase P until marked; 'gH': another slot group of a Cluster
-- reservation. `body` is the record's body (see common.lua).
-- Answers { 'G', lease end, replayed, remaining per claim (-1: not a budget) }
--       | { 'D', claim index (from 1), 'budget' | 'taken' | 'not_owner', remaining }
--       | { 'E', 'conflict' | 'expired' | 'committed' | 'released' | 'in_flight', memo? }
local function reserve(op, now, now_text)
  local key, id, lease, fpnonce, mode, claims, body = op[2], op[3], op[4], op[5], op[6], op[7], op[8]
  local fp, nonce = string.sub(fpnonce, 1, 16), string.sub(fpnonce, 17)
  local ttl = num(lease + RETAIN)
  local e = now + lease
  local e_text = num(e)
  if #e_text ~= 13 or #now_text ~= 13 then
    return { 'X', 'the server clock is outside the years 2001 to 2286' }
  end
  local raw = string.sub(mode, 2) .. fpnonce .. e_text .. now_text .. body
  mode = string.sub(mode, 1, 1)
  -- Written at once (nothing is there, as a rule), taken back below if the claims are denied.
  local old = redis.call('SET', key, raw, 'PX', ttl, 'NX', 'GET')
  if old then
    local r = parse(old)
    if mode == 'h' or (r.nonce == nonce and now < r.e) then
      if r.s == 'T' then return { 'E', 'released' } end
      if r.f ~= fp then return { 'E', 'conflict' } end
      if r.s == 'H' or r.s == 'P' then
        if now >= r.e then return { 'E', 'expired' } end
        -- Another attempt is still reserving this reservation's other groups.
        if r.s == 'P' and r.nonce ~= nonce then return { 'E', 'in_flight' } end
        return replay(r, nonce, claims, now, now_text)
      end
      return refuse(key, r)
    end
    -- A group record of an earlier attempt: its home decided that attempt; this one replaces it.
    redis.call('SET', key, raw, 'PX', ttl)
  end

  local state, denial = check_claims(id, claims, e, now, now_text)
  if denial then
    redis.call('DEL', key)
    return denial
  end
  local T = bucket(e)
  for i, c in ipairs(claims) do
    local b = state.budgets[i]
    if b then
      hold_in(b, T, c[3])
      if b.window_ends then keep_until(b, math.max(b.window_ends, e) + WINDOW_GRACE_MS) end
      save_budget(b)
    else
      redis.call('SET', c[2] .. ':p', id, 'PX', num(lease))
    end
  end
  local out = { 'G', e, 0 }
  for i, x in ipairs(state.remaining) do out[3 + i] = x end
  return out
end

-- Op 9. { 9, record, id, lease, fingerprint, claims }: what reserve would answer now, holding
-- nothing.
local function check(op, now, now_text)
  local key, id, lease, fp, claims = op[2], op[3], op[4], op[5], op[6]
  local old = redis.call('GET', key)
  if old then
    local r = parse(old)
    if r.s == 'T' then return { 'E', 'released' } end
    if r.f ~= fp then return { 'E', 'conflict' } end
    if r.s == 'H' or r.s == 'P' then
      if now >= r.e then return { 'E', 'expired' } end
      return replay(r, '', claims, now, now_text)
    end
    return refuse(key, r)
  end
  local state, denial = check_claims(id, claims, now + lease, now, now_text)
  if denial then return denial end
  local out = { 'G', now + lease, 0 }
  for i, x in ipairs(state.remaining) do out[3 + i] = x end
  return out
end

-- Keeps a settled record (`keep` ms) with its memo. With `keep` 0 the record is already gone
-- (settle took it), and no memo is kept.
local function keep_record(key, raw, keep, memo)
  if keep == 0 then return end
  redis.call('SET', key, raw, 'PX', num(keep))
  if memo then redis.call('SET', key .. ':m', memo, 'PX', num(keep)) end
end

-- Op 2. { 2, record, id, how, keep ms (0: forget), memo ('' for none),
--         actuals { { budget base key, window spec, amount } } }
-- how: 'c' commit or 'r' release, then '1' strict or '0'. strict: actual amounts must each name a budget of this hold (a whole hold, or a Cluster home,
-- which checks them against every group's); a group applies those that name its own budgets.
-- Answers { 'OK', 'applied' | 'replayed' | 'tombstoned', groups }
--       | { 'E', 'unknown' | 'committed' | 'released' | 'expired' | 'in_flight' | 'exceeds'
--              | 'not_held', groups }
local function settle(op, now, now_text)
  local key, id, how, keep, memo, actuals = op[2], op[3], op[4], op[5], op[6], op[7]
  local commit, strict, retain = string.sub(how, 1, 1) == 'c', string.sub(how, 2) == '1', RETAIN
  if memo == '' then memo = nil end
  -- A record to forget is taken at once; what must stay is put back below.
  local raw = redis.call(keep == 0 and 'GETDEL' or 'GET', key)
  if not raw then
    if commit then return { 'E', 'unknown', {} } end
    -- Released before reserved: the tombstone refuses the late reserve (and is always kept).
    redis.call('SET', key, TOMBSTONE, 'PX', num(math.max(keep, retain)))
    return { 'OK', 'tombstoned', {} }
  end
  local r = parse(raw)
  if r.s ~= 'H' then
    -- Not held: nothing changes, and a record taken to be forgotten goes back if it must stay
    -- (a tombstone; a reservation still reserving; one settled the other way).
    local same = (commit and r.s == 'C') or (not commit and r.s ~= 'C' and r.s ~= 'P')
    if keep == 0 and (r.s == 'T' or not same) then
      redis.call('SET', key, raw, 'PX', num(retain))
    elseif same and r.s ~= 'T' then
      -- Settled the same way before: a memo not yet kept is kept now.
      if memo then redis.call('SET', key .. ':m', memo, 'PX', num(math.max(keep, retain)), 'NX') end
      if keep == 0 then redis.call('DEL', key .. ':m') end
    end
    if r.s == 'P' then return { 'E', 'in_flight', {} } end
    if not same then return { 'E', refuse(key, r)[2], groups_of(r) } end
    return { 'OK', 'replayed', groups_of(r) }
  end

  local groups = groups_of(r)
  -- A home with groups is always kept: a commit that did not reach every group is finished by
  -- a retry, which needs the list.
  if #groups > 0 and keep == 0 then keep = retain end
  if commit and now >= r.e then
    -- The lease ran out: whatever is still held goes back now.
    undo(r, id, now, now_text)
    redis.call('SET', key, with_phase(r, 'X'), 'PX', num(retain))
    return { 'E', 'expired', groups }
  end
  local claims = claims_of(r)
  if commit then
    if strict then
      -- Check every actual amount before changing anything: against this record's claims, and
      -- a Cluster home's list of every group's budget claims.
      for _, a in ipairs(actuals) do
        local held = nil
        for _, c in ipairs(claims) do
          if c[1] == 'b' and a[1] == c[2] and a[2] == c[4] then held = c[3] end
        end
        for _, v in ipairs(r.v or {}) do
          if v[1] == a[1] and v[2] == a[2] then held = v[3] end
        end
        if not held or a[3] > held then
          if keep == 0 then redis.call('SET', key, raw, 'PX', num(retain)) end
          return { 'E', held and 'exceeds' or 'not_held', groups }
        end
      end
    end
    local T = bucket(r.e)
    for _, c in ipairs(claims) do
      if c[1] == 'b' then
        local b = load_budget(c.key, { T })
        expire(b, now, now_text)
        if take_out(b, T, c[3], now_text) then
          spend(b, math.min(actual_for(actuals, c) or c[3], c[3]))
        end
        save_budget(b)
      elseif c[1] == 'u' then
        -- Held in flight by this hold: the owner's now (again, for an owner that claimed what it
        -- owned, even if an operator removed it meanwhile).
        if redis.call('GET', c[2] .. ':p') == id then
          redis.call('SET', c[2], c[3])
          redis.call('DEL', c[2] .. ':p')
        end
      else
        clear_pending(c[2], id)
        if redis.call('GET', c[2]) == c[3] then redis.call('DEL', c[2]) end
      end
    end
    keep_record(key, with_phase(r, 'C'), keep, memo)
  else
    undo(r, id, now, now_text)
    keep_record(key, with_phase(r, 'R'), keep, memo)
  end
  return { 'OK', 'applied', groups }
end

-- Op 3. { 3, record, id, lease }
-- Answers { 'OK', new lease end, groups } | { 'E', why }
local function extend(op, now, now_text)
  local key, id, lease = op[2], op[3], op[4]
  local raw = redis.call('GET', key)
  if not raw then return { 'E', 'unknown' } end
  local r = parse(raw)
  if r.s == 'P' then return { 'E', 'in_flight' } end
  if r.s ~= 'H' then return refuse(key, r) end
  if now >= r.e then return { 'E', 'expired' } end
  local e = now + lease
  local old_T, new_T = bucket(r.e), bucket(e)
  for _, c in ipairs(claims_of(r)) do
    if c[1] == 'b' then
      local b = load_budget(c.key, { old_T, new_T })
      expire(b, now, now_text)
      if take_out(b, old_T, c[3], now_text) then hold_in(b, new_T, c[3]) end
      if b.t > 0 then keep_until(b, e + WINDOW_GRACE_MS) end
      save_budget(b)
    elseif redis.call('GET', c[2] .. ':p') == id then
      redis.call('PEXPIRE', c[2] .. ':p', num(lease))
    end
  end
  local rest = string.sub(raw, 47)
  redis.call('SET', key, record('H', r.f, r.nonce, num(e), '', rest), 'PX', num(lease + RETAIN))
  return { 'OK', e, r.g or {} }
end

-- Op 4. { 4, record, nonce }: a Cluster home whose groups are all held is held too.
local function mark(op, now)
  local key, nonce = op[2], op[3]
  local raw = redis.call('GET', key)
  if not raw then return { 'E', 'unknown' } end
  local r = parse(raw)
  if r.s ~= 'P' or r.nonce ~= nonce then return { 'E', 'not_pending' } end
  redis.call('SET', key, with_phase(r, 'H'), 'KEEPTTL')
  return { 'OK' }
end

-- Op 5. { 5, record, id, nonce }: undoes and removes a record of a denied
-- reservation across slots (this attempt's only), so that the id may be reserved again.
local function forget(op, now, now_text)
  local key, id, nonce = op[2], op[3], op[4]
  local raw = redis.call('GET', key)
  if raw then
    local r = parse(raw)
    if r.nonce == nonce and (r.s == 'H' or r.s == 'P') then
      undo(r, id, now, now_text)
      redis.call('DEL', key)
    end
  end
  return { 'OK' }
end
