-- Shared by every script of tower-reserve; each script is this file followed by its own body.
--
-- Key layout (every key of one budget or one unique value shares one hash tag, so one slot):
--   <p>:b:{<budget>}<window>      hash: spent, held
--   <p>:b:{<budget>}<window>:h    sorted set of holds: member "<hold id>:<amount>", score = lease end (ms)
--   <p>:u:{<ns>:<digest>}         string: the owner of a unique value
--   <p>:u:{<ns>:<digest>}:p       string: the hold id holding it in flight; expires with the lease
--   <p>:h:{<hold id>}             string: the hold record (MessagePack), see below
--
-- Hold record: { s = phase, e = lease end (ms), f = claims fingerprint, c = claims }
--   phase: H held, C committed, R released, T tombstone (released before reserved), X expired
--   claim: { k = 'b', b = budget key, a = amount, l = limit, w = 1 if windowed }
--        | { k = 'u', u = value key, o = owner, n = 1 if the owner already owned it }
--        | { k = 'r', u = value key, o = owner }

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

-- Clears up to `max` expired holds of one budget, giving their amounts back.
local function expire_holds(bkey, now, max)
  local gone = redis.call('ZRANGEBYSCORE', bkey .. ':h', '-inf', now, 'LIMIT', 0, max)
  if #gone == 0 then return end
  local total = 0
  for _, member in ipairs(gone) do
    total = total + tonumber(string.match(member, ':(%d+)$'))
  end
  redis.call('ZREM', bkey .. ':h', unpack(gone))
  redis.call('HINCRBY', bkey, 'held', -total)
end

local function remaining(bkey, limit)
  local v = redis.call('HMGET', bkey, 'spent', 'held')
  local left = limit - (tonumber(v[1]) or 0) - (tonumber(v[2]) or 0)
  if left < 0 then return 0 end
  return left
end

-- Keeps a windowed budget's keys until at least `at` (ms). Called only for windowed budgets,
-- whose keys always carry a TTL once written.
local function keep_until(bkey, at, now)
  for _, key in ipairs({ bkey, bkey .. ':h' }) do
    local ttl = redis.call('PTTL', key)
    if ttl == -1 or (ttl >= 0 and now + ttl < at) then
      redis.call('PEXPIREAT', key, at)
    end
  end
end

local function load_record(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  return cmsgpack.unpack(raw)
end

local function save_record(key, rec, ttl_ms)
  redis.call('SET', key, cmsgpack.pack(rec), 'PX', ttl_ms)
end

-- Gives back whatever a hold still holds. Safe to repeat: ZREM answers 0 for a hold that an
-- earlier call (or expire_holds) already gave back.
local function undo(rec, id)
  for _, c in ipairs(rec.c) do
    if c.k == 'b' then
      if redis.call('ZREM', c.b .. ':h', id .. ':' .. c.a) == 1 then
        redis.call('HINCRBY', c.b, 'held', -c.a)
      end
    elseif c.k == 'u' and c.n == 0 then
      if redis.call('GET', c.u .. ':p') == id then redis.call('DEL', c.u .. ':p') end
    end
  end
end
