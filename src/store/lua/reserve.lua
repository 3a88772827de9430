-- Checks every claim of a reservation and holds them all, or none.
-- KEYS[1] = hold record; KEYS[1 + i] = base key of claim i
-- ARGV = id, lease ms, retain ms, fingerprint, max expired to clear per budget,
--        then four per claim: kind ('b', 'u', 'r'), then
--        'b': amount, limit, window spec | 'u', 'r': owner, '', ''
-- Answers {'G', lease end, replayed, remaining per claim (-1 for non-budget claims)}
--       | {'D', claim index (1-based), 'budget' | 'taken' | 'not_owner', remaining}
--       | {'E', 'conflict' | 'expired' | 'committed' | 'released'}
local id, lease, retain, fp = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local max_clear = tonumber(ARGV[5])
local n = #KEYS - 1
local now = now_ms()

local rec = load_record(KEYS[1])
if rec then
  if rec.s ~= 'T' and rec.f ~= fp then return { 'E', 'conflict' } end
  if rec.s == 'H' then
    if now >= rec.e then return { 'E', 'expired' } end
    local out = { 'G', rec.e, 1 }
    -- Same fingerprint, same claims: each budget's limit is the one given again here.
    for i, c in ipairs(rec.c) do
      out[3 + i] = (c.k == 'b') and remaining(c.b, tonumber(ARGV[5 + (i - 1) * 4 + 3])) or -1
    end
    return out
  end
  if rec.s == 'C' then return { 'E', 'committed' } end
  if rec.s == 'X' then return { 'E', 'expired' } end
  return { 'E', 'released' }
end

-- Check everything before writing anything.
local claims, out = {}, { 'G', now + lease, 0 }
for i = 1, n do
  local base, j = KEYS[i + 1], 5 + (i - 1) * 4
  local kind = ARGV[j + 1]
  if kind == 'b' then
    local amount, limit = tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
    local suffix, ends = window(ARGV[j + 4], now)
    local bkey = base .. suffix
    expire_buckets(bkey, now, max_clear)
    local left = remaining(bkey, limit)
    if amount > left then return { 'D', i, 'budget', left } end
    claims[i] = { k = 'b', b = bkey, a = amount, ends = ends }
    out[3 + i] = left - amount
  else
    local owner = ARGV[j + 2]
    local owned = redis.call('GET', base)
    if kind == 'u' then
      if owned and owned ~= owner then return { 'D', i, 'taken', 0 } end
      local pending = redis.call('GET', base .. ':p')
      if pending and pending ~= id then return { 'D', i, 'taken', 0 } end
      claims[i] = { k = 'u', u = base, o = owner, n = owned and 1 or 0 }
    else
      if owned ~= owner then return { 'D', i, 'not_owner', 0 } end
      claims[i] = { k = 'r', u = base, o = owner }
    end
    out[3 + i] = -1
  end
end

local expires = now + lease
for _, c in ipairs(claims) do
  if c.k == 'b' then
    hold_in(c.b, expires, c.a)
    if c.ends then keep_until(c.b, math.max(c.ends, expires) + WINDOW_GRACE_MS, now, true) end
    c.ends = nil
  elseif c.k == 'u' and c.n == 0 then
    redis.call('SET', c.u .. ':p', id, 'PX', lease)
  end
end
save_record(KEYS[1], { s = 'H', e = expires, f = fp, c = claims }, lease + retain)
return out
