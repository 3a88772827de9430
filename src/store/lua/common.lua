-- Shared by the scripts of tower-reserve: the calendar, numbers, hold records, budgets, values.
-- The store runs one script, batch.lua: this file, hold.lua and budget.lua, then its dispatch.
--
-- Key layout (every key of one budget or one unique value shares one hash tag, so one slot):
--   <p>:b:{<budget>}<window>     hash: the budget in one window (window '' for lifetime)
--       spent     spent amount
--       h         '<held>,<n>,<c>': amount held by holds in flight, the earliest end of a bucket
--                 of their lease ends (ms), and how many such buckets there are
--       x<T>      with two buckets or more: the amount held by holds whose lease ends in the
--                 100 ms bucket that ends at T (with one bucket, that amount is <held>, its end n)
--       t         windowed budgets: when the keys of this window expire (ms)
--   <p>:b:{<budget>}<window>:h   sorted set of the bucket ends T, only with two buckets or more
--   <p>:u:{<ns>:<digest>}        string: the owner of a unique value
--   <p>:u:{<ns>:<digest>}:p      string: the hold that has the value in flight; expires with it
--   <p>:h:{<tag>}<name>          string: a hold record (see pack_record), in the slot of <tag>
--   <p>:f:{<budget>}<window>:<id> string: a refund's fingerprint, for as long as it is kept
--
-- Every number a script writes is a non-negative integer below 2^54, formatted by num(): Lua's
-- numbers are doubles, exact up to 2^53, and amounts and limits are at most 2^53 - 1.

local function num(x)
  if x <= 0 then return '0' end
  return string.format('%.0f', x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- The window that `now` falls in: the key suffix and when it ends (nil for a lifetime budget).
-- `spec` is '0' (lifetime), 's<seconds>' (fixed, aligned to the epoch) or 'm' (calendar month).
-- Window::slot in claim.rs computes the same.
local function window(spec, now)
  if spec == '0' then return '', nil end
  if spec == 'm' then
    local y, m = civil_from_days(math.floor(now / 86400000))
    local ny, nm = y, m + 1
    if nm == 13 then ny, nm = y + 1, 1 end
    return string.format(':m%04d%02d', y, m), days_from_civil(ny, nm, 1) * 86400000
  end
  local secs = tonumber(string.sub(spec, 2))
  local index = math.floor(now / (secs * 1000))
  return string.format(':s%d.%.0f', secs, index), (index + 1) * secs * 1000
end

-- The spec of a window suffix (the inverse of window's first answer, up to the index).
local function spec_of(suffix)
  if suffix == '' then return '0' end
  if string.sub(suffix, 2, 2) == 'm' then return 'm' end
  return string.match(suffix, '^:(s%d+)%.')
end

-- How long a windowed budget outlives its window and its last hold.
local WINDOW_GRACE_MS = 60000

-- Holds are counted per bucket of lease ends, not one by one, so that a budget keeps one entry
-- per 100 ms of lease ends however many holds are in flight. A bucket is given back whole once
-- its end has passed: an expired hold's capacity returns at most 100 ms after its lease.
local BUCKET_MS = 100

local function bucket(e)
  return math.ceil(e / BUCKET_MS) * BUCKET_MS
end

-- Hold records, packed with MessagePack as an array (absent fields as false: no holes):
--   { phase, lease end, fingerprint, nonce, claims, groups, memo, spends }
--   phase: H held, P held but still reserving its other slot groups (a Cluster home record),
--          C committed, R released, T tombstone (released before reserved), X expired
--   claim: { 'b', budget key with its window, amount } | { 'u' or 'r', value key, owner }
--   groups: on a Cluster, the records of a reservation's other slot groups (home record only)
--   memo: what its settler left with it (an idempotent request's response)
--   spends: a Cluster home's list of the budget claims of every group, to check actual amounts
--   nonce: which call reserved it, so that a call's own retry is not mistaken for another's
local function pack_record(r)
  return cmsgpack.pack({
    r.s, r.e or 0, r.f or '', r.nonce or '', r.c or {}, r.g or {}, r.m or false, r.v or false,
  })
end

local function unpack_record(raw)
  local p = cmsgpack.unpack(raw)
  return {
    s = p[1], e = p[2], f = p[3], nonce = p[4], c = p[5], g = p[6], m = p[7] or nil, v = p[8] or nil,
  }
end

local function load_record(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  return unpack_record(raw)
end

local function save_record(key, r, ttl_ms)
  redis.call('SET', key, pack_record(r), 'PX', num(ttl_ms))
end

-- ---------------------------------------------------------------------------------------------
-- Budgets: read once, changed in memory, written once (save_budget).

-- Reads budget `bkey` and the bucket sums of the bucket ends in `ends` (a list).
local function load_budget(bkey, ends)
  local fields = { 'spent', 'h', 't' }
  for i, T in ipairs(ends) do fields[3 + i] = 'x' .. num(T) end
  local v = redis.call('HMGET', bkey, unpack(fields))
  local b = {
    key = bkey, spent = tonumber(v[1]) or 0, held = 0, n = 0, c = 0, t = tonumber(v[3]) or 0,
    x = {}, set = {}, del = {}, changed = false, exists = v[1] or v[2],
  }
  if v[2] then
    local held, n, c = string.match(v[2], '^(%d+),(%d+),(%d+)$')
    b.held, b.n, b.c = tonumber(held), tonumber(n), tonumber(c)
  end
  for i, T in ipairs(ends) do b.x[T] = tonumber(v[3 + i]) end
  return b
end

local function set_field(b, field, value)
  b.set[field] = value
  b.del[field] = nil
end

local function del_field(b, field)
  b.del[field] = true
  b.set[field] = nil
end

-- With exactly one bucket left in the sorted set, goes back to keeping it in `h` alone.
local function collapse(b)
  local zkey = b.key .. ':h'
  local first = redis.call('ZRANGE', zkey, 0, 0)
  local only = tonumber(first[1])
  redis.call('DEL', zkey)
  if only then
    del_field(b, 'x' .. num(only))
    b.x[only] = nil
    b.n = only
  end
end

-- The earliest bucket end, from the sorted set (two buckets or more).
local function earliest(b)
  local first = redis.call('ZRANGE', b.key .. ':h', 0, 0)
  b.n = tonumber(first[1]) or 0
end

-- Gives back up to `max` buckets whose end has passed.
local function expire(b, now, max)
  if b.c == 0 or b.n > now then return end
  b.changed = true
  if b.c == 1 then
    b.held, b.n, b.c = 0, 0, 0
    return
  end
  local zkey = b.key .. ':h'
  local due = redis.call('ZRANGEBYSCORE', zkey, '-inf', num(now), 'LIMIT', 0, max)
  if #due > 0 then
    local fields = {}
    for i, T in ipairs(due) do fields[i] = 'x' .. T end
    local sum = 0
    for _, v in ipairs(redis.call('HMGET', b.key, unpack(fields))) do sum = sum + (tonumber(v) or 0) end
    redis.call('HDEL', b.key, unpack(fields))
    redis.call('ZREM', zkey, unpack(due))
    for _, T in ipairs(due) do b.x[tonumber(T)] = nil; b.set['x' .. T] = nil end
    b.held = math.max(0, b.held - sum)
    b.c = math.max(0, b.c - #due)
  end
  if b.c == 0 then
    redis.call('DEL', zkey)
    b.held, b.n = 0, 0
  elseif b.c == 1 then
    collapse(b)
  else
    earliest(b)
  end
end

local function remaining(b, limit)
  local left = limit - b.spent - b.held
  if left < 0 then return 0 end
  return left
end

-- Holds `amount` in the bucket that ends at T.
local function hold_in(b, T, amount)
  b.changed = true
  if b.c == 0 then
    b.n, b.c = T, 1
  elseif b.c == 1 and T == b.n then
    -- The same bucket: its sum is `held`.
  elseif b.c == 1 then
    -- A second bucket: both go into the sorted set, their sums into fields of their own.
    local zkey = b.key .. ':h'
    redis.call('ZADD', zkey, num(b.n), num(b.n), num(T), num(T))
    b.zset_new = true
    set_field(b, 'x' .. num(b.n), num(b.held))
    set_field(b, 'x' .. num(T), num(amount))
    b.x[b.n], b.x[T] = b.held, amount
    b.c = 2
    if T < b.n then b.n = T end
  elseif b.x[T] then
    b.x[T] = b.x[T] + amount
    set_field(b, 'x' .. num(T), num(b.x[T]))
  else
    redis.call('ZADD', b.key .. ':h', num(T), num(T))
    b.x[T] = amount
    set_field(b, 'x' .. num(T), num(amount))
    b.c = b.c + 1
    if T < b.n then b.n = T end
  end
  b.held = b.held + amount
end

-- Takes a hold of `amount` out of the bucket that ends at T. Answers true when it was still
-- held; false when its bucket's end has passed (its capacity is back, or comes back as soon as
-- that bucket is cleared, and until then it counts as held, never as free) or is gone.
local function take_out(b, T, amount, now)
  if T <= now then return false end
  if b.c == 0 then return false end
  if b.c == 1 then
    if T ~= b.n then return false end
    b.changed = true
    b.held = b.held - amount
    if b.held <= 0 then b.held, b.n, b.c = 0, 0, 0 end
    return true
  end
  local x = b.x[T]
  if not x then return false end
  b.changed = true
  b.held = math.max(0, b.held - amount)
  x = x - amount
  if x > 0 then
    b.x[T] = x
    set_field(b, 'x' .. num(T), num(x))
    return true
  end
  b.x[T] = nil
  del_field(b, 'x' .. num(T))
  redis.call('ZREM', b.key .. ':h', num(T))
  b.c = b.c - 1
  if b.c == 1 then
    collapse(b)
  elseif T == b.n then
    earliest(b)
  end
  return true
end

-- Keeps a windowed budget's keys until at least `at`.
local function keep_until(b, at)
  if at > b.t then
    b.t = at
    b.expire = true
    set_field(b, 't', num(at))
    b.changed = true
  end
end

-- Writes what changed. A lifetime budget with nothing spent and nothing held is deleted: there is
-- nothing to remember. A key a write creates gets its expiry at once (windowed budgets).
local function save_budget(b)
  if not b.changed then return end
  if b.t == 0 and b.spent <= 0 and b.c == 0 then
    if b.exists then redis.call('DEL', b.key) end
    return
  end
  local args = { 'spent', num(b.spent), 'h', num(b.held) .. ',' .. num(b.n) .. ',' .. b.c }
  for field, value in pairs(b.set) do
    args[#args + 1] = field
    args[#args + 1] = value
  end
  redis.call('HSET', b.key, unpack(args))
  local dels = {}
  for field in pairs(b.del) do dels[#dels + 1] = field end
  if #dels > 0 then redis.call('HDEL', b.key, unpack(dels)) end
  if b.t > 0 then
    if b.expire or not b.exists then redis.call('PEXPIREAT', b.key, num(b.t)) end
    if b.c >= 2 and (b.expire or b.zset_new) then redis.call('PEXPIREAT', b.key .. ':h', num(b.t)) end
  end
end

-- ---------------------------------------------------------------------------------------------
-- Unique values

-- Clears `id`'s in-flight marker on a value, if it is `id`'s.
local function clear_pending(ukey, id)
  if redis.call('GET', ukey .. ':p') == id then redis.call('DEL', ukey .. ':p') end
end
