-- Operations on budgets (read one, seed its spent amount, refund into it) and on owned values
-- (who owns one, remove one).

-- Operations that are not idempotent by themselves (setting a spent amount, removing an owned
-- value: a retry after a commit in between would undo the commit) carry a random call nonce; a
-- call that ran leaves '<key>#<nonce>' with its answer for ANSWER_MS, so that the same call sent
-- again (its answer was lost, or the Cluster client sent it twice) is answered, not run again.
-- '#' is in no key's name.
local function ran_before(key, nonce)
  return CALL('GET', key .. '#' .. nonce)
end

local function ran(key, nonce, answer)
  CALL('SET', key .. '#' .. nonce, answer, 'PX', num(ANSWER_MS))
end

-- Op 6: budget base key, window spec -> { spent, held, window end or -1 }
local function budget(now, base, spec)
  local suffix, ends = window(spec, now)
  local b = load_budget(base .. suffix)
  expire(b, now)
  return { b.spent, b.held, ends or -1 }
end

-- Op 7: budget base key, window spec, spent, call nonce (16 hex) -> { 'OK' }
local function set_spent(now, base, spec, spent, nonce)
  local suffix, ends = window(spec, now)
  local key = base .. suffix
  if ran_before(key, nonce) then return OK end
  local b = load_budget(key)
  expire(b, now)
  b.spent = spent
  b.changed = true
  if ends then keep_until(b, ends + WINDOW_GRACE_MS) end
  save_budget(b)
  ran(key, nonce, '1')
  return OK
end

-- Op 8: refund record, budget base key, window spec, at (0: now), amount, fingerprint, retain
-- The refund's record ('<p>:f:{budget}#<id>', beside the budget, whatever window the refund goes
-- to) is kept `retain` ms, so that a retry counts once; its fingerprint covers the window spec.
-- Answers { 'OK', 'applied' | 'replayed' } | { 'E', 'conflict' | 'exceeds_spent' | 'expired' | 'future' }
local function refund(now, key, base, spec, at, amount, fp, retain)
  if at == 0 then at = now end
  if at > now + 1000 then return { 'E', 'future' } end
  local done = CALL('GET', key)
  if done then
    if done == fp then return { 'OK', 'replayed' } end
    return { 'E', 'conflict' }
  end
  local suffix, ends = window(spec, at)
  if ends and ends <= now then return { 'E', 'expired' } end
  local b = load_budget(base .. suffix)
  expire(b, now)
  if amount > b.spent then return { 'E', 'exceeds_spent' } end
  b.spent = b.spent - amount
  b.changed = true
  save_budget(b)
  CALL('SET', key, fp, 'PX', num(retain))
  return { 'OK', 'applied' }
end

-- Op 10: value key -> { owner } | {}: who owns a value (holds in flight are not ownership).
local function owner(now, key)
  local who = CALL('GET', key)
  if who then return { who } end
  return {}
end

-- Op 11: value key, call nonce (16 hex) -> { 1 } if it was owned, { 0 } if not: frees a value at
-- once.
local function remove(now, key, nonce)
  local before = ran_before(key, nonce)
  if before then return { tonumber(before) } end
  local owned = CALL('DEL', key)
  ran(key, nonce, tostring(owned))
  return { owned }
end
