-- Operations on budgets (read one, seed its spent amount, refund into it) and on owned values
-- (who owns one, remove one).

-- Op 6. { 6, budget base key, window spec } -> { spent, held, window end or -1 }
local function budget(op, now, now_text)
  local suffix, ends = window(op[3], now)
  local b = load_budget(op[2] .. suffix, {})
  expire(b, now, now_text)
  save_budget(b)
  return { b.spent, b.held, ends or -1 }
end

-- Op 7. { 7, budget base key, window spec, spent } -> { 'OK' }
local function set_spent(op, now)
  local suffix, ends = window(op[3], now)
  local b = load_budget(op[2] .. suffix, {})
  b.spent = op[4]
  b.spent_changed = true
  b.changed = true
  if ends then keep_until(b, ends + WINDOW_GRACE_MS) end
  save_budget(b)
  return { 'OK' }
end

-- Op 8. { 8, refund key head, budget base key, window spec, at (0: now), amount, fingerprint,
--         retain, refund id }
-- The refund's record is <head><window>:<id>, beside the budget, kept `retain` ms so that a retry
-- counts once.
-- Answers { 'OK', 'applied' | 'replayed' } | { 'E', 'conflict' | 'exceeds_spent' | 'expired' | 'future' }
local function refund(op, now, now_text)
  local head, base, spec, at, amount, fp = op[2], op[3], op[4], op[5], op[6], op[7]
  local retain, id = op[8], op[9]
  if at == 0 then at = now end
  if at > now + 1000 then return { 'E', 'future' } end
  local suffix, ends = window(spec, at)
  if ends and ends <= now then return { 'E', 'expired' } end
  local key = head .. suffix .. ':' .. id
  local done = redis.call('GET', key)
  if done then
    if done == fp then return { 'OK', 'replayed' } end
    return { 'E', 'conflict' }
  end
  local b = load_budget(base .. suffix, {})
  expire(b, now, now_text)
  if amount > b.spent then return { 'E', 'exceeds_spent' } end
  b.spent = b.spent - amount
  b.spent_changed = true
  b.changed = true
  save_budget(b)
  redis.call('SET', key, fp, 'PX', num(retain))
  return { 'OK', 'applied' }
end

-- Op 10. { 10, value key } -> { owner } | {}: who owns a value (holds in flight are not ownership).
local function owner(op, now)
  local who = redis.call('GET', op[2])
  if who then return { who } end
  return {}
end

-- Op 11. { 11, value key } -> { 1 } if it was owned, { 0 } if not: frees a value at once.
local function remove(op, now)
  return { redis.call('DEL', op[2]) }
end
