-- Operations on holds: reserve, check, settle, extend, and, for a reservation across slots on a
-- Cluster, mark (its other groups are held) and forget (give back what one call held).
-- Each takes its operation (an array, decoded from MessagePack), the batch's `now` and its text,
-- and answers an array. A claim to check is { 'b', budget base key, amount, limit, window spec }
-- or { 'u' or 'r', value key, owner }.
--
-- Each operation reads every key it may write before its first write, and each budget is
-- written by its save alone (common.lua): an operation refused half-way, or whose keys this node
-- no longer serves, has changed nothing.

-- What a settled record answers, by phase.
local WHY = { C = 'committed', R = 'released', T = 'released', X = 'expired' }

-- The answer to a retry of a record that is settled: with its memo, if its settler left one.
local function refuse(key, r)
  local why = WHY[r.s]
  local mkey = memo_key(key)
  if r.s == 'T' or not mkey then return { 'E', why } end
  local memo = redis.call('GET', mkey)
  if memo then return { 'E', why, memo } end
  return { 'E', why }
end

-- Whether a record stands for nothing to a reserve: a forgotten hold, or a tombstone left for
-- another call than `nonce` (a reserve whose answer was lost, given back since).
local function stands_for_nothing(r, nonce)
  return r.s == 'F' or (r.s == 'T' and r.nonce ~= ZEROS and r.nonce ~= nonce)
end

-- Reads and checks every claim, writing nothing. Answers the budgets and values to hold them
-- (state.budgets by claim index), or a denial naming the first claim that failed.
local function check_claims(id, claims, e, now, now_text)
  local state = { budgets = {}, remaining = {} }
  local T = bucket(e)
  for i, c in ipairs(claims) do
    if c[1] == 'b' then
      local suffix, ends = window(c[5], now)
      local b = load_budget(c[2] .. suffix, { T })
      expire(b, now, now_text)
      local left = remaining(b, c[4])
      if c[3] > left then return nil, { 'D', i, 'budget', left, ends or -1 } end
      -- A second bucket creates the sorted set: read it first (see the top of this file).
      if b.c == 1 and b.n ~= T then redis.call('EXISTS', b.key .. ':h') end
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
      out[3 + i] = remaining(b, c[4])
    else
      out[3 + i] = -1
    end
  end
  return out
end

-- Reads what settling a hold's claims needs: each budget with the hold taken out of it (and,
-- committing, what it spends added), each value with its owner and in-flight marker. Writes
-- nothing; `write_settled` writes it.
local function read_settled(r, commit, actuals, now, now_text)
  local T = bucket(r.e)
  local plan = {}
  for _, c in ipairs(claims_of(r)) do
    if c[1] == 'b' then
      local b = load_budget(c.key, { T })
      expire(b, now, now_text)
      if take_out(b, T, c[3], now_text) and commit then
        local actual = nil
        for _, a in ipairs(actuals) do
          if a[1] == c[2] and a[2] == c[4] then actual = a[3] end
        end
        spend(b, math.min(actual or c[3], c[3]))
      end
      plan[#plan + 1] = { b = b }
    else
      local v = redis.call('MGET', c[2], c[2] .. ':p')
      plan[#plan + 1] = { c = c, owner = v[1], pending = v[2] }
    end
  end
  return plan
end

-- Writes what read_settled planned for hold `id`: committing, held values become their owners'
-- (again, for an owner that claimed what it owned, even if an operator removed it meanwhile)
-- and release-on-commit values are freed; either way the hold's in-flight markers go.
local function write_settled(plan, id, commit)
  for _, p in ipairs(plan) do
    if p.b then
      save_budget(p.b)
    elseif p.pending == id then
      local c = p.c
      if commit and c[1] == 'u' then
        redis.call('SET', c[2], c[3])
      elseif commit and p.owner == c[3] then
        redis.call('DEL', c[2])
      end
      redis.call('DEL', c[2] .. ':p')
    elseif commit and p.c[1] == 'r' and p.owner == p.c[3] then
      redis.call('DEL', p.c[2])
    end
  end
end

-- Gives back whatever a hold still holds.
local function undo(r, id, now, now_text)
  write_settled(read_settled(r, false, {}, now, now_text), id, false)
end

-- Op 1. { 1, record, id, lease, fingerprint and nonce (32 hex), mode, claims, body }
-- mode 'hH': the id's own record (a hold on one node, or a Cluster home); 'hP': a Cluster home
-- with groups, which starts in phase P until marked; 'gH': another slot group of a Cluster
-- reservation. `body` is the record's body (see common.lua).
-- Answers { 'G', lease end, replayed, remaining per claim (-1: not a budget) }
--       | { 'D', claim index (from 1), 'budget', remaining, window end or -1 (lifetime) }
--       | { 'D', claim index (from 1), 'taken' | 'not_owner', 0 }
--       | { 'E', 'conflict' | 'expired' | 'committed' | 'released' | 'in_flight', memo? }
local function reserve(op, now, now_text)
  local key, id, lease, fpnonce, mode, claims, body = op[2], op[3], op[4], op[5], op[6], op[7], op[8]
  local fp, nonce = string.sub(fpnonce, 1, 16), string.sub(fpnonce, 17)
  local e = now + lease
  local e_text = num(e)
  if #e_text ~= 13 or #now_text ~= 13 then
    return { 'X', 'the server clock is outside the years 2001 to 2286' }
  end
  mode = string.sub(mode, 1, 1)
  local old = redis.call('GET', key)
  if old then
    local r = parse(old)
    if stands_for_nothing(r, nonce) then
      -- Replaced below.
    elseif r.s == 'T' then
      -- A tombstone refuses the id's own record, and a group's only the call it was left for.
      if mode == 'h' or r.nonce == nonce then return { 'E', 'released' } end
    elseif mode == 'h' or (r.nonce == nonce and now < r.e) then
      if r.f ~= fp then return { 'E', 'conflict' } end
      if r.s == 'H' or r.s == 'P' then
        if now >= r.e then return { 'E', 'expired' } end
        -- Another attempt is still reserving this reservation's other groups.
        if r.s == 'P' and r.nonce ~= nonce then return { 'E', 'in_flight' } end
        return replay(r, nonce, claims, now, now_text)
      end
      return refuse(key, r)
    end
    -- Otherwise a group record of an earlier attempt: its home decided that attempt (a new
    -- attempt reaches a group only once its home has taken it), and this one replaces it. What
    -- the earlier one still holds goes back first: the call that gives it back may not have
    -- come yet, or may never (a home that lost its record in a failover).
    if r.s == 'H' then undo(r, id, now, now_text) end
  end

  local state, denial = check_claims(id, claims, e, now, now_text)
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
  redis.call('SET', key, string.sub(op[6], 2) .. fpnonce .. e_text .. now_text .. body,
    'PX', num(lease + RETAIN))
  local out = { 'G', e, 0 }
  for i, x in ipairs(state.remaining) do out[3 + i] = x end
  return out
end

-- Op 9. { 9, record, id, lease, fingerprint, claims }: what reserve would answer now, holding
-- nothing.
local function check(op, now, now_text)
  local key, id, lease, fp, claims = op[2], op[3], op[4], op[5], op[6]
  -- A slot group's record is its home's to answer for: only its claims are checked here.
  local old = not is_group(key) and redis.call('GET', key)
  if old then
    local r = parse(old)
    if not stands_for_nothing(r, '') then
      if r.s == 'T' then return { 'E', 'released' } end
      if r.f ~= fp then return { 'E', 'conflict' } end
      if r.s == 'H' or r.s == 'P' then
        if now >= r.e then return { 'E', 'expired' } end
        return replay(r, '', claims, now, now_text)
      end
      return refuse(key, r)
    end
  end
  local state, denial = check_claims(id, claims, now + lease, now, now_text)
  if denial then return denial end
  local out = { 'G', now + lease, 0 }
  for i, x in ipairs(state.remaining) do out[3 + i] = x end
  return out
end

-- Keeps `key` at least `keep` ms from now; answers false when it does not exist.
local function keep_at_least(key, keep)
  local ttl = redis.call('PTTL', key)
  if ttl == -2 then return false end
  if ttl >= 0 and ttl < keep then redis.call('PEXPIRE', key, num(keep)) end
  return true
end

-- Op 2. { 2, record, id, how, keep ms (0: forget), memo ('' for none),
--         actuals { { budget base key, window spec, amount } }, call nonce (16 hex) }
-- how: 'c' commit or 'r' release; then '1' strict or '0': strict, actual amounts must each name
-- a budget of this hold (a whole hold, or a Cluster home, which checks them against every
-- group's), else a group applies those that name its own budgets; then, for a Cluster home's
-- commit, '1' when its groups were made sure to outlive the commit (see cluster.rs), 'x' when
-- one of them has ended (the commit expires), 'f' when every group has followed a settlement
-- that forgets (the home, kept for them, goes now), else '0'.
-- Answers { 'OK', 'applied' | 'replayed' | 'tombstoned', groups }
--       | { 'E', 'unknown' | 'committed' | 'released' | 'expired' | 'in_flight' | 'exceeds'
--              | 'not_held' | 'prepare', groups, memo? }
-- 'prepare': a commit of a home with groups that were not made sure of: nothing changed.
local function settle(op, now, now_text)
  local key, id, how, keep, memo, actuals, nonce = op[2], op[3], op[4], op[5], op[6], op[7], op[8]
  local commit = string.sub(how, 1, 1) == 'c'
  local strict, prepared = string.sub(how, 2, 2) == '1', string.sub(how, 3, 3)
  if memo == '' then memo = nil end
  local mkey = memo_key(key)
  local raw = redis.call('GET', key)
  local r = raw and parse(raw)
  if prepared == 'f' then
    -- Forgotten as a whole hold is: for ANSWER_MS its settling call is still answered.
    if r and (r.s == 'C' or r.s == 'R' or r.s == 'X') then
      redis.call('SET', key, forgotten(r.nonce, false), 'PX', num(ANSWER_MS))
      if mkey then redis.call('DEL', mkey) end
    end
    return { 'OK', 'applied', {} }
  end
  -- The same call sent again (its answer was lost) is answered as it was.
  if r and r.s == 'F' and r.nonce == nonce then return { 'OK', forgot_with(r), {} } end
  if r and r.s == 'T' and r.f == nonce then return { 'OK', 'tombstoned', {} } end
  -- What a forgotten hold or a lost reserve call left is nothing to anyone else.
  if r and stands_for_nothing(r, '') then r = nil end
  if not r then
    if commit then return { 'E', 'unknown', {} } end
    -- Released before reserved: the tombstone refuses the late reserve (and is always kept).
    redis.call('SET', key, tombstone(nonce), 'PX', num(math.max(keep, RETAIN)))
    return { 'OK', 'tombstoned', {} }
  end
  if r.s ~= 'H' then
    if r.s == 'P' then return { 'E', 'in_flight', {} } end
    local same = (commit and r.s == 'C') or (not commit and r.s ~= 'C')
    if not same then return { 'E', WHY[r.s], groups_of(r) } end
    -- The same call sent again (its answer was lost) is answered as it was.
    if r.nonce == nonce and r.s ~= 'T' then return { 'OK', 'applied', groups_of(r) } end
    if r.s ~= 'T' then
      -- Settled the same way before. A retry that forgets drops the record (a home with groups
      -- once they have followed, as below); one that keeps it keeps it (and its memo, or this
      -- one if none was kept) at least as long as it asks.
      if keep == 0 and #groups_of(r) > 0 then keep = RETAIN end
      if keep == 0 then
        redis.call('SET', key, forgotten(nonce, true), 'PX', num(ANSWER_MS))
        if mkey then redis.call('DEL', mkey) end
      else
        -- A memo lives as long as its record.
        local ttl = math.max(keep, redis.call('PTTL', key))
        local kept = mkey and keep_at_least(mkey, ttl)
        if memo and mkey and not kept then redis.call('SET', mkey, memo, 'PX', num(ttl)) end
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
  local function expire_now()
    -- The lease ran out (here, or in a group that cannot follow): whatever is still held goes
    -- back now.
    undo(r, id, now, now_text)
    redis.call('SET', key, settled_by(r, 'X', nonce), 'PX', num(RETAIN))
    return { 'E', 'expired', groups }
  end
  if commit and now >= r.e then return expire_now() end
  if commit and strict then
    -- Every actual amount is checked before anything changes (a Cluster home's groups too):
    -- against this record's claims, and a Cluster home's list of every group's budget claims.
    local claims = claims_of(r)
    for _, a in ipairs(actuals) do
      local held = nil
      for _, c in ipairs(claims) do
        if c[1] == 'b' and a[1] == c[2] and a[2] == c[4] then held = c[3] end
      end
      for _, v in ipairs(r.v or {}) do
        if v[1] == a[1] and v[2] == a[2] then held = v[3] end
      end
      if not held or a[3] > held then return { 'E', held and 'exceeds' or 'not_held', groups } end
    end
  end
  if commit and #groups > 0 and prepared == '0' then return { 'E', 'prepare', groups } end
  if commit and prepared == 'x' then return expire_now() end
  local plan = read_settled(r, commit, actuals, now, now_text)
  local kept_memo = keep > 0 and memo and mkey
  if kept_memo then redis.call('EXISTS', mkey) end
  -- Writes, every key read above.
  write_settled(plan, id, commit)
  if keep == 0 then
    redis.call('SET', key, forgotten(nonce, false), 'PX', num(ANSWER_MS))
  else
    redis.call('SET', key, settled_by(r, commit and 'C' or 'R', nonce), 'PX', num(keep))
    if kept_memo then redis.call('SET', mkey, memo, 'PX', num(keep)) end
  end
  return { 'OK', 'applied', groups }
end

-- Op 3. { 3, record, id, lease, at least ('1') or exactly ('0') }: renews a live hold's lease to
-- `lease` from now (at least: never shortened, for a slot group, whose lease must outlast its
-- home's).
-- Answers { 'OK', new lease end, groups } | { 'E', why }
local function extend(op, now, now_text)
  local key, id, lease, at_least = op[2], op[3], op[4], op[5] == '1'
  local raw = redis.call('GET', key)
  if not raw then return { 'E', 'unknown' } end
  local r = parse(raw)
  if stands_for_nothing(r, '') then return { 'E', 'unknown' } end
  if r.s == 'P' then return { 'E', 'in_flight' } end
  if r.s ~= 'H' then return refuse(key, r) end
  if now >= r.e then return { 'E', 'expired' } end
  local e = now + lease
  if at_least and e <= r.e then return { 'OK', r.e, groups_of(r) } end
  local old_T, new_T = bucket(r.e), bucket(e)
  local budgets, values = {}, {}
  for _, c in ipairs(claims_of(r)) do
    if c[1] == 'b' then
      local b = load_budget(c.key, { old_T, new_T })
      expire(b, now, now_text)
      if take_out(b, old_T, c[3], now_text) then
        if b.c == 1 and b.n ~= new_T then redis.call('EXISTS', b.key .. ':h') end
        hold_in(b, new_T, c[3])
      end
      if b.t > 0 then keep_until(b, e + WINDOW_GRACE_MS) end
      budgets[#budgets + 1] = b
    elseif redis.call('GET', c[2] .. ':p') == id then
      values[#values + 1] = c[2] .. ':p'
    end
  end
  for _, b in ipairs(budgets) do save_budget(b) end
  for _, pkey in ipairs(values) do redis.call('PEXPIRE', pkey, num(lease)) end
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

-- Op 5. { 5, record, id, nonce }: gives back what one reserve call held under `record` (a call
-- denied elsewhere, or whose answer was lost), and leaves a tombstone that refuses that call,
-- should it still arrive. Another call's record is left alone.
local function forget(op, now, now_text)
  local key, id, nonce = op[2], op[3], op[4]
  local raw = redis.call('GET', key)
  if raw then
    local r = parse(raw)
    if r.nonce ~= nonce or not (r.s == 'H' or r.s == 'P') then
      if not stands_for_nothing(r, nonce) then return { 'OK' } end
    else
      undo(r, id, now, now_text)
    end
  end
  redis.call('SET', key, tombstone_for(nonce), 'PX', num(RETAIN))
  return { 'OK' }
end
