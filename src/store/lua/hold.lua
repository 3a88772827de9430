-- Operations on holds: reserve, check, settle, extend, and, for a reservation across slots on a
-- Cluster, mark (its other groups are held) and forget (undo a group of a denied reservation).
-- Each takes its operation (an array, decoded from MessagePack) and the batch's `now`, and
-- answers an array. A claim in an operation is { 'b', budget base key, amount, limit, window
-- spec } or { 'u' or 'r', value key, owner }.

-- The answer to a retry of a record that is settled: with its memo, if its settler left one.
local function refuse(r)
  local why = ({ C = 'committed', R = 'released', T = 'released', X = 'expired' })[r.s]
  if r.m then return { 'E', why, r.m } end
  return { 'E', why }
end

-- Reads and checks every claim, writing nothing (expired buckets aside). Answers the state to
-- hold them, or a denial naming the first claim that failed.
local function check_claims(id, claims, e, now, max_clear)
  local state = { budgets = {}, rec = {}, remaining = {} }
  local T = bucket(e)
  for i, c in ipairs(claims) do
    if c[1] == 'b' then
      local suffix, ends = window(c[5], now)
      local b = load_budget(c[2] .. suffix, { T })
      expire(b, now, max_clear)
      local left = remaining(b, c[4])
      if c[3] > left then return nil, { 'D', i, 'budget', left } end
      b.window_ends = ends
      state.budgets[i] = b
      state.rec[i] = { 'b', b.key, c[3] }
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
      state.rec[i] = { c[1], c[2], c[3] }
      state.remaining[i] = -1
    end
  end
  return state, nil
end

-- The budgets left now, for a retry of a live hold (each budget's limit as the retry gives it).
local function replay(r, nonce, claims, now, max_clear)
  local out = { 'G', r.e, (r.nonce == nonce) and 0 or 1 }
  for i, c in ipairs(r.c) do
    if c[1] == 'b' then
      local b = load_budget(c[2], {})
      expire(b, now, max_clear)
      save_budget(b)
      out[3 + i] = remaining(b, claims[i][4])
    else
      out[3 + i] = -1
    end
  end
  return out
end

-- Gives back whatever a hold still holds.
local function undo(r, id, now, max_clear)
  local T = bucket(r.e)
  for _, c in ipairs(r.c) do
    if c[1] == 'b' then
      local b = load_budget(c[2], { T })
      expire(b, now, max_clear)
      take_out(b, T, c[3], now)
      save_budget(b)
    else
      clear_pending(c[2], id)
    end
  end
end

-- The actual amount `actuals` names for the budget key `bkey` (base key and window spec), if any.
local function actual_for(actuals, bkey)
  for _, a in ipairs(actuals) do
    local base = a[1]
    if string.sub(bkey, 1, #base) == base and spec_of(string.sub(bkey, #base + 1)) == a[2] then
      return a[3]
    end
  end
  return nil
end

-- Op 1. { 1, record, id, lease, retain, fingerprint, nonce, mode, groups, claims, max_clear,
--         spends }
-- mode 'h': the id's own record (a hold on one node, or a Cluster home); 'g': another slot
-- group of a Cluster reservation. A home with groups starts in phase P until marked, and keeps
-- `spends`, the budget claims of every group ({ base key, spec, amount }), to check a commit's
-- actual amounts against before anything is committed.
-- Answers { 'G', lease end, replayed, remaining per claim (-1: not a budget) }
--       | { 'D', claim index (from 1), 'budget' | 'taken' | 'not_owner', remaining }
--       | { 'E', 'conflict' | 'expired' | 'committed' | 'released' | 'in_flight', memo? }
local function reserve(op, now)
  local key, id, lease, retain, fp, nonce = op[2], op[3], op[4], op[5], op[6], op[7]
  local mode, groups, claims, max_clear = op[8], op[9], op[10], op[11]
  local old = load_record(key)
  if old and (mode == 'h' or (old.nonce == nonce and now < old.e)) then
    if old.s == 'T' then return { 'E', 'released' } end
    if old.f ~= fp then return { 'E', 'conflict' } end
    if old.s == 'H' or old.s == 'P' then
      if now >= old.e then return { 'E', 'expired' } end
      -- Another attempt is still reserving this reservation's other groups.
      if old.s == 'P' and old.nonce ~= nonce then return { 'E', 'in_flight' } end
      return replay(old, nonce, claims, now, max_clear)
    end
    return refuse(old)
  end
  -- (A group record of an earlier attempt is replaced: its home decided that attempt.)

  local e = now + lease
  local state, denial = check_claims(id, claims, e, now, max_clear)
  if denial then return denial end
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
  local phase = (#groups > 0) and 'P' or 'H'
  local r = { s = phase, e = e, f = fp, nonce = nonce, c = state.rec, g = groups }
  if #groups > 0 then r.v = op[12] end
  save_record(key, r, lease + retain)
  local out = { 'G', e, 0 }
  for i, x in ipairs(state.remaining) do out[3 + i] = x end
  return out
end

-- Op 9. { 9, record, id, lease, fingerprint, claims, max_clear }: what reserve would answer now,
-- holding nothing.
local function check(op, now)
  local key, id, lease, fp, claims, max_clear = op[2], op[3], op[4], op[5], op[6], op[7]
  local old = load_record(key)
  if old then
    if old.s == 'T' then return { 'E', 'released' } end
    if old.f ~= fp then return { 'E', 'conflict' } end
    if old.s == 'H' or old.s == 'P' then
      if now >= old.e then return { 'E', 'expired' } end
      return replay(old, '', claims, now, max_clear)
    end
    return refuse(old)
  end
  local state, denial = check_claims(id, claims, now + lease, now, max_clear)
  if denial then return denial end
  local out = { 'G', now + lease, 0 }
  for i, x in ipairs(state.remaining) do out[3 + i] = x end
  return out
end

-- Op 2. { 2, record, id, commit (1/0), keep ms (0: forget), retain ms, memo ('' for none),
--         actuals { { budget base key, window spec, amount } }, strict (1/0), max_clear }
-- strict: actual amounts must each name a budget of this hold (a whole hold, or a Cluster home,
-- which checks them against every group); a group applies those that name its own budgets.
-- Answers { 'OK', 'applied' | 'replayed' | 'tombstoned', groups }
--       | { 'E', 'unknown' | 'committed' | 'released' | 'expired' | 'in_flight' | 'exceeds'
--              | 'not_held', groups }
local function settle(op, now)
  local key, id, commit, keep, retain = op[2], op[3], op[4] == 1, op[5], op[6]
  local memo, actuals, strict, max_clear = op[7], op[8], op[9] == 1, op[10]
  if memo == '' then memo = nil end
  local r = load_record(key)
  if not r then
    if commit then return { 'E', 'unknown', {} } end
    -- Released before reserved: the tombstone refuses the late reserve (and is always kept).
    save_record(key, { s = 'T' }, math.max(keep, retain))
    return { 'OK', 'tombstoned', {} }
  end
  local groups = r.g or {}
  if r.s == 'P' then return { 'E', 'in_flight', groups } end
  if r.s ~= 'H' then
    local same = (commit and r.s == 'C') or (not commit and r.s ~= 'C')
    if not same then return { 'E', refuse(r)[2], groups } end
    if r.s ~= 'T' then
      -- Settled the same way before: a memo not yet kept is kept now.
      if memo and not r.m then r.m = memo end
      if keep == 0 and #groups == 0 then
        redis.call('DEL', key)
      else
        save_record(key, r, math.max(keep, redis.call('PTTL', key)))
      end
    end
    return { 'OK', 'replayed', groups }
  end

  if commit and now >= r.e then
    -- The lease ran out: whatever is still held goes back now.
    undo(r, id, now, max_clear)
    r.s = 'X'
    save_record(key, r, retain)
    return { 'E', 'expired', groups }
  end
  if commit then
    if strict then
      -- Check every actual amount before changing anything: against this record's claims, or a
      -- Cluster home's list of every group's budget claims ({ base key, spec, amount }).
      for _, a in ipairs(actuals) do
        local held = nil
        for _, c in ipairs(r.c) do
          if c[1] == 'b' and actual_for({ a }, c[2]) then held = c[3] end
        end
        for _, v in ipairs(r.v or {}) do
          if v[1] == a[1] and v[2] == a[2] then held = v[3] end
        end
        if not held then return { 'E', 'not_held', groups } end
        if a[3] > held then return { 'E', 'exceeds', groups } end
      end
    end
    local T = bucket(r.e)
    for _, c in ipairs(r.c) do
      if c[1] == 'b' then
        local b = load_budget(c[2], { T })
        expire(b, now, max_clear)
        if take_out(b, T, c[3], now) then
          local spend = actual_for(actuals, c[2]) or c[3]
          b.spent = b.spent + math.min(spend, c[3])
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
    r.s = 'C'
  else
    undo(r, id, now, max_clear)
    r.s = 'R'
  end
  r.m = memo
  -- A home with groups is always kept: a commit that did not reach every group is finished by
  -- a retry, which needs the list.
  if keep == 0 and #groups == 0 then
    redis.call('DEL', key)
  else
    save_record(key, r, (keep > 0) and keep or retain)
  end
  return { 'OK', 'applied', groups }
end

-- Op 3. { 3, record, id, lease, retain, max_clear } -> { 'OK', new lease end, groups } | { 'E', why }
local function extend(op, now)
  local key, id, lease, retain, max_clear = op[2], op[3], op[4], op[5], op[6]
  local r = load_record(key)
  if not r then return { 'E', 'unknown' } end
  if r.s == 'P' then return { 'E', 'in_flight' } end
  if r.s ~= 'H' then return refuse(r) end
  if now >= r.e then return { 'E', 'expired' } end
  local e = now + lease
  local old_T, new_T = bucket(r.e), bucket(e)
  for _, c in ipairs(r.c) do
    if c[1] == 'b' then
      local b = load_budget(c[2], { old_T, new_T })
      expire(b, now, max_clear)
      if take_out(b, old_T, c[3], now) then hold_in(b, new_T, c[3]) end
      if b.t > 0 then keep_until(b, e + WINDOW_GRACE_MS) end
      save_budget(b)
    elseif redis.call('GET', c[2] .. ':p') == id then
      redis.call('PEXPIRE', c[2] .. ':p', num(lease))
    end
  end
  r.e = e
  save_record(key, r, lease + retain)
  return { 'OK', e, r.g or {} }
end

-- Op 4. { 4, record, nonce }: a Cluster home whose groups are all held is held too.
local function mark(op, now)
  local key, nonce = op[2], op[3]
  local r = load_record(key)
  if not r then return { 'E', 'unknown' } end
  if r.s ~= 'P' or r.nonce ~= nonce then return { 'E', 'not_pending' } end
  r.s = 'H'
  redis.call('SET', key, pack_record(r), 'KEEPTTL')
  return { 'OK' }
end

-- Op 5. { 5, record, id, nonce, max_clear }: undoes and removes a record of a denied
-- reservation across slots (this attempt's only), so that the id may be reserved again.
local function forget(op, now)
  local key, id, nonce, max_clear = op[2], op[3], op[4], op[5]
  local r = load_record(key)
  if r and r.nonce == nonce and (r.s == 'H' or r.s == 'P') then
    undo(r, id, now, max_clear)
    redis.call('DEL', key)
  end
  return { 'OK' }
end
