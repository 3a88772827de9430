-- Shared by every script of tower-reserve; each script is this file followed by its own body.
--
-- Key layout (every key of one budget or one unique value shares one hash tag, so one slot):
--   <p>:b:{<budget>}<window>      hash: spent, held, and x<T> = the amount held by holds whose
--                                 lease ends in the 100 ms bucket that ends at T (ms)
--   <p>:b:{<budget>}<window>:h    sorted set of those buckets: member and score T
--   <p>:u:{<ns>:<digest>}         string: the owner of a unique value
--   <p>:u:{<ns>:<digest>}:p       string: the hold id holding it in flight; expires with the lease
--   <p>:h:{<hold id>}             string: the hold record (MessagePack), see below
--
-- Hold record, as the scripts see it: { s = phase, e = lease end (ms), f = claims fingerprint,
-- c = claims }
--   phase: H held, C committed, R released, T tombstone (released before reserved), X expired
--   claim: { k = 'b', b = budget key, a = amount }
--        | { k = 'u', u = value key, o = owner, n = 1 if the owner already owned it }
--        | { k = 'r', u = value key, o = owner }
-- Stored packed (save_record, load_record): arrays rather than maps, and each key without the
-- '<p>:b:{' or '<p>:u:{' head it shares with the record's own key, so that a hold in flight
-- costs Redis as little memory as possible.

local WINDOW_GRACE_MS = 60000

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

-- Holds are counted per bucket of lease ends, not one by one, so that a budget keeps one entry
-- per 100 ms of lease ends however many holds are in flight. A bucket is given back whole once
-- its end has passed: an expired hold's capacity returns at most 100 ms after its lease.
local BUCKET_MS = 100

local function bucket(e)
  return string.format('%.0f', math.ceil(e / BUCKET_MS) * BUCKET_MS)
end

-- Gives back up to `max` buckets of one budget whose end has passed.
local function expire_buckets(bkey, now, max)
  local due = redis.call('ZRANGEBYSCORE', bkey .. ':h', '-inf', now, 'LIMIT', 0, max)
  if #due == 0 then return end
  local fields = {}
  for i, t in ipairs(due) do fields[i] = 'x' .. t end
  local total = 0
  for _, v in ipairs(redis.call('HMGET', bkey, unpack(fields))) do
    total = total + (tonumber(v) or 0)
  end
  redis.call('HDEL', bkey, unpack(fields))
  redis.call('ZREM', bkey .. ':h', unpack(due))
  redis.call('HINCRBY', bkey, 'held', -total)
end

-- Holds `amount` until lease end `e`.
local function hold_in(bkey, e, amount)
  local t = bucket(e)
  redis.call('HINCRBY', bkey, 'x' .. t, amount)
  redis.call('ZADD', bkey .. ':h', t, t)
  redis.call('HINCRBY', bkey, 'held', amount)
end

-- Takes a hold (lease end `e`) out of its bucket. Answers true when it was still held; false
-- when its bucket's end has passed, so that the bucket, this hold with it, is (now) given back
-- whole. Called at most once per hold: the record's phase sees to that.
local function take_out(bkey, e, amount, now)
  local t = bucket(e)
  if tonumber(t) <= now then
    if redis.call('ZREM', bkey .. ':h', t) == 1 then
      local sum = tonumber(redis.call('HGET', bkey, 'x' .. t)) or 0
      redis.call('HDEL', bkey, 'x' .. t)
      redis.call('HINCRBY', bkey, 'held', -sum)
    end
    return false
  end
  if redis.call('HINCRBY', bkey, 'x' .. t, -amount) <= 0 then
    redis.call('HDEL', bkey, 'x' .. t)
    redis.call('ZREM', bkey .. ':h', t)
  end
  redis.call('HINCRBY', bkey, 'held', -amount)
  return true
end

local function remaining(bkey, limit)
  local v = redis.call('HMGET', bkey, 'spent', 'held')
  local left = limit - (tonumber(v[1]) or 0) - (tonumber(v[2]) or 0)
  if left < 0 then return 0 end
  return left
end

-- Keeps a windowed budget's keys until at least `at` (ms). A lifetime budget's keys carry no TTL
-- and are left alone; `created` marks keys a reserve has just written, whose TTL is still unset.
local function keep_until(bkey, at, now, created)
  for _, key in ipairs({ bkey, bkey .. ':h' }) do
    local ttl = redis.call('PTTL', key)
    if (ttl == -1 and created) or (ttl >= 0 and now + ttl < at) then
      redis.call('PEXPIREAT', key, at)
    end
  end
end

-- The key prefix, read off a hold record's key (<p>:h:{...}); prefixes carry no braces.
local function prefix_of(record_key)
  return string.match(record_key, '^(.-):h:{')
end

local function load_record(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  local packed, p = cmsgpack.unpack(raw), prefix_of(key)
  local rec = { s = packed[1], e = packed[2], f = packed[3], c = {} }
  for i, c in ipairs(packed[4]) do
    if c[1] == 'b' then
      rec.c[i] = { k = 'b', b = p .. ':b:{' .. c[2], a = c[3] }
    else
      rec.c[i] = { k = c[1], u = p .. ':u:{' .. c[2], o = c[3], n = c[4] }
    end
  end
  return rec
end

local function save_record(key, rec, ttl_ms)
  local head = #prefix_of(key) + 5
  local claims = {}
  for i, c in ipairs(rec.c) do
    if c.k == 'b' then
      claims[i] = { 'b', string.sub(c.b, head), c.a }
    elseif c.k == 'u' then
      claims[i] = { 'u', string.sub(c.u, head), c.o, c.n }
    else
      claims[i] = { 'r', string.sub(c.u, head), c.o }
    end
  end
  local packed = cmsgpack.pack({ rec.s, rec.e or 0, rec.f or '', claims })
  redis.call('SET', key, packed, 'PX', ttl_ms)
end

-- Gives back whatever a hold still holds.
local function undo(rec, id, now)
  for _, c in ipairs(rec.c) do
    if c.k == 'b' then
      take_out(c.b, rec.e, c.a, now)
    elseif c.k == 'u' and c.n == 0 then
      if redis.call('GET', c.u .. ':p') == id then redis.call('DEL', c.u .. ':p') end
    end
  end
end
