-- Shared by the operations of tower-reserve: numbers, the calendar, hold records, budgets, values.
-- The store loads one library of Redis Functions: this file, hold.lua, budget.lua, then batch.lua,
-- which registers the one function it calls.
--
-- Key layout (every key of one budget or one unique value shares one hash tag, so one slot):
--   <p>:b:{<budget>}<window>     hash: the budget in one window (window '' for lifetime)
--       s         its state, packed (STATE): the spent amount; the amount held by holds in
--                 flight; how many buckets of lease ends those holds fall in (100 ms each); the
--                 earliest of those buckets' ends (ms); for a windowed budget, when the keys of
--                 this window expire (ms)
--       x<T>      with two buckets or more: the amount held by holds whose lease ends in the
--                 bucket that ends at T (with one bucket, that amount is the held amount)
--   <p>:b:{<budget>}<window>:h   sorted set of the bucket ends T, only with two buckets or more
--   <p>:u:{<ns>:<digest>}        string: the owner of a unique value
--   <p>:u:{<ns>:<digest>}:p      string: the hold that has the value in flight; expires with it
--   <p>:h:{<tag>}<name>          string: a hold record (see below), in the slot of <tag>
--   <p>:g:{<tag>}<id>            string: the record of one slot group of a hold across slots
--   <p>:m:{<tag>}<name>          string: what the hold's settler kept with it (a memo), if any
--   <p>:f:{<budget>}#<id>        string: a refund's fingerprint, for as long as it is kept
--
-- What a call costs Redis is its commands, their arguments and answers, and every Lua value it
-- makes: each string and table is an allocation (and garbage to collect), each conversion of a
-- number to text or back a C library call, and each call of a C function (string.sub, tonumber,
-- redis.call) costs as much as dozens of Lua operations. So an operation runs as few commands
-- as it can (a purchase: three to reserve and three to commit, after the batch's one TIME),
-- reads its fields without building a table for them (batch.lua), reads a hold record's fixed
-- head and a budget's state in one call each, with no number as text, and leaves the rare
-- paths (windows, many buckets, value claims, a Cluster's groups) to pay for themselves.

-- The C functions the operations call most, bound when the first batch runs (a library's own
-- code runs when it is loaded, where only the registering API is visible), so that a call finds
-- each in one step, not by name in a global table: CALL is redis.call.
local CALL, PACK, UNPACK, MP_PACK, MP_UNPACK, MP_READ

local function bind()
  CALL = redis.call
  PACK, UNPACK = struct.pack, struct.unpack
  MP_PACK, MP_UNPACK, MP_READ = cmsgpack.pack, cmsgpack.unpack, cmsgpack.unpack_limit
end

-- Integers as text, for Redis: %d is exact to 2^63 (Lua's numbers are doubles, exact to 2^53,
-- and amounts and limits are at most 2^53 - 1). Values are never negative; zero is '0', never
-- '-0'. Memoized for the batch (batch.lua starts each with an empty table): expiries and bucket
-- ends repeat across its operations.
local TEXT = {}
local function num(x)
  if x <= 0 then return '0' end
  local text = TEXT[x]
  if not text then
    text = string.format('%d', x)
    TEXT[x] = text
  end
  return text
end

-- Tests only: the library a store with a test clock loads says `true` here (connection.rs), and
-- each of its calls carries how far that clock is ahead of the server's (batch.lua sets SHIFT).
-- The store's own library has no way to be shifted.
local TEST_CLOCK = false
local SHIFT = 0

-- The store's clock in milliseconds.
local function now_ms()
  local t = CALL('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + SHIFT
end

-- A time on the store's clock as the server's own, for PEXPIREAT.
local function server_time(at)
  return num(at - SHIFT)
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

-- The end of the bucket of lease end `e`.
local function bucket(e)
  local past = e % BUCKET_MS
  if past == 0 then return e end
  return e - past + BUCKET_MS
end

-- Hold records are bytes: a fixed head of 30, read in one call, then the claims as the client
-- packed them:
--   <phase: 1><version: 1, \1><fingerprint: 8><nonce: 8><lease end: 6><start: 6><body>
--   phase: H held, P held but still reserving its other slot groups (a Cluster home record),
--          C committed, R released, X expired, T tombstone (released before reserved: with a
--          zero nonce it refuses every reserve of the id, and its fingerprint is the release
--          call's nonce; with a reserve call's nonce, only that call, whose answer was lost and
--          whose hold was given back), F forgotten (settled, then dropped; see below)
--   version: the layout, \1 for this one; the previous release's records are text, their
--          second byte a hex digit, and are read as this layout (upgraded, below)
--   nonce: which call reserved it, so that a call's own retried request is not taken for another
--          attempt's; once settled, which call settled it
--   lease end, start: ms, unsigned big-endian; start is when it was reserved (windowed budgets
--          are found again by it)
--   body:  a MessagePack sequence (no arrays, so that reading it builds no table but the
--          claims'): n, then n claims; then, only for a Cluster home with groups, g and v, then
--          g groups and v spends
--          claim: 'b', budget base key, amount, window spec | 'u' or 'r', value key, 0, owner
--          group: on a Cluster, the record of one of a reservation's other slot groups (home only)
--          spend: a Cluster home's list of every group's budget claims: base key, spec, amount,
--                 to check a commit's actual amounts against
-- A tombstone is the head alone (zero times). A forgotten hold leaves, for ANSWER_MS only, 'F',
-- a zero fingerprint, the settling call's nonce, zero times and 'a' (it applied) or 'p' (it
-- replayed an earlier settlement): the same call sent again (its answer was lost) is answered as
-- it was; to everyone else the hold is gone, as if nothing were left.
--
-- Key names are injective: records are '<p>:h:{tag}name' (the id's own) or '<p>:g:{tag}id' (a
-- slot group), a record's memo '<p>:m:{tag}name', and none of the parts may hold a brace.

local V = '\1'
local ZEROS = '\0\0\0\0\0\0\0\0'
local NO_TIMES = '\0\0\0\0\0\0\0\0\0\0\0\0'
-- The phase, then (past the version, the fingerprint and the nonce) the lease end and the start.
local HEAD = '>c1xxxxxxxxxxxxxxxxxI6I6'
-- Where a record's body starts, as MessagePack reads offsets (from 0).
local BODY = 30
-- The phases a record can be in.
local PHASES = { H = true, P = true, C = true, R = true, X = true, T = true, F = true }

-- A shared empty list (never written to): no groups, no spends.
local NONE = {}

-- The lease end and start of a record, packed; memoized for the batch (a batch's reserves with
-- one lease share them).
local TIMES = {}
local function times(e, now)
  local packed = TIMES[e]
  if not packed then
    packed = PACK('>I6I6', e, now)
    TIMES[e] = packed
  end
  return packed
end

-- A tombstone that refuses every reserve of the id, left by the release call `nonce` (in the
-- fingerprint's place, so that the same call sent again is answered as it was).
local function tombstone(nonce)
  return 'T' .. V .. nonce .. ZEROS .. NO_TIMES
end

-- A tombstone that refuses one reserve call only: the one with `nonce`.
local function tombstone_for(nonce)
  return 'T' .. V .. ZEROS .. nonce .. NO_TIMES
end

-- What a forgotten hold leaves for the call `nonce` that forgot it, which `replayed` an earlier
-- settlement or applied its own.
local FORGOTTEN = 'F' .. V .. ZEROS
local APPLIED, REPLAYED = NO_TIMES .. 'a', NO_TIMES .. 'p'
local function forgotten(nonce, replayed)
  return FORGOTTEN .. nonce .. (replayed and REPLAYED or APPLIED)
end

-- What the call that left the forgotten record `r` answered.
local function forgot_with(r)
  return string.sub(r.raw, BODY + 1, BODY + 1) == 'p' and 'replayed' or 'applied'
end

-- The key of a record's memo ('<p>:h:{..}..' -> '<p>:m:{..}..'); nil for a slot group's record,
-- which keeps none.
local function memo_key(key)
  local brace = string.find(key, '{', 1, true)
  if string.sub(key, brace - 2, brace - 2) ~= 'h' then return nil end
  return string.sub(key, 1, brace - 3) .. 'm' .. string.sub(key, brace - 1)
end

-- A key or record this version cannot read stops the operation before it wrote anything (its
-- answer is { 'X', message }, a store error): taken for nothing, it would grant what it holds
-- or owns a second time.
local function unreadable(what, key)
  error({ err = 'tower-reserve: ' .. what .. ' in no layout this version reads: ' .. key })
end

-- The bytes that `hex` (two hex digits a byte) spells.
local function unhex(hex)
  return (string.gsub(hex, '..', function(h) return string.char(tonumber(h, 16)) end))
end

-- The previous release's records: text, with the same phases and fields,
--   <phase><fingerprint: 16 hex><nonce: 16 hex><lease end: 13 digits><start: 13 digits><body>
-- its body a MessagePack array { claims, groups, spends }, a claim { 'b', key, amount, spec }
-- or { 'u' or 'r', key, owner }; a forgotten hold 'F', 16 zeros, the nonce and 'a' or 'p'.
local PREVIOUS_HEAD = '^[HPCRXT]%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x'
  .. '%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d'
local PREVIOUS_FORGOTTEN = '^F0000000000000000%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x[ap]$'

-- The record `raw` of the previous release (at `key`) in this layout: the same record, so that
-- a hold reserved before an upgrade is settled, extended, replayed or refused after it as it
-- would have been before. Whoever writes the record next writes it in this layout.
local function upgraded(raw, key)
  if string.find(raw, PREVIOUS_FORGOTTEN) then
    return FORGOTTEN .. unhex(string.sub(raw, 18, 33)) .. NO_TIMES .. string.sub(raw, 34)
  end
  if not string.find(raw, PREVIOUS_HEAD) then unreadable('a hold record', key) end
  local out = { string.sub(raw, 1, 1), V, unhex(string.sub(raw, 2, 33)),
    PACK('>I6I6', tonumber(string.sub(raw, 34, 46)), tonumber(string.sub(raw, 47, 59))) }
  if #raw > 59 then
    local ok, body = pcall(MP_UNPACK, string.sub(raw, 60))
    if not ok or type(body) ~= 'table' or type(body[1]) ~= 'table' then
      unreadable('a hold record', key)
    end
    local claims, groups, spends = body[1], body[2] or NONE, body[3] or NONE
    out[#out + 1] = MP_PACK(#claims)
    for _, c in ipairs(claims) do
      if c[1] == 'b' then
        out[#out + 1] = MP_PACK(c[1], c[2], c[3], c[4])
      else
        out[#out + 1] = MP_PACK(c[1], c[2], 0, c[3])
      end
    end
    if #groups > 0 or #spends > 0 then
      out[#out + 1] = MP_PACK(#groups, #spends)
      for _, g in ipairs(groups) do out[#out + 1] = MP_PACK(g) end
      for _, v in ipairs(spends) do out[#out + 1] = MP_PACK(v[1], v[2], v[3]) end
    end
  end
  return table.concat(out)
end

-- The record at `key`, or nil: its phase, lease end and start, read in one call; its claims,
-- groups and spends are read when needed (claims_of), its fingerprint and nonce too (fp_of,
-- nonce_of).
local function read_record(key)
  local raw = CALL('GET', key)
  if not raw then return nil end
  if string.byte(raw, 2) ~= 1 then raw = upgraded(raw, key) end
  if #raw < BODY then unreadable('a hold record', key) end
  local s, e, start = UNPACK(HEAD, raw)
  if not PHASES[s] then unreadable('a hold record', key) end
  return { raw = raw, s = s, e = e, start = start, c = false, g = false, v = false }
end

local function fp_of(r)
  return string.sub(r.raw, 3, 10)
end

local function nonce_of(r)
  return string.sub(r.raw, 11, 18)
end

-- `count` spends (base key, spec, amount) of `packed` from `off`; answers them and the offset
-- after them.
local function read_spends(packed, off, count)
  if count == 0 then return NONE, off end
  local spends = {}
  for i = 1, count do
    local key, spec, amount
    off, key, spec, amount = MP_READ(packed, 3, off)
    spends[i] = { key, spec, amount }
  end
  return spends, off
end

-- Where a claim keeps what an operation read for it before it writes: a budget claim its budget
-- (load_budget), a value claim its owner and in-flight marker. Made with its place (false), so
-- that keeping it never grows the claim's table.
local LOADED = 7

-- The claims, groups and spends of a body that starts at `from` of `packed`, for a hold reserved
-- at `start`. A budget claim is { 'b', base key, amount, spec, key in its window, window end,
-- loaded }; a value claim { 'u' or 'r', value key, 0, owner, -, -, loaded }.
local function read_body(packed, from, start)
  -- The count and the first claim in one call; without a claim, the count alone.
  local off, n, kind, key, amount, other = MP_READ(packed, 5, from)
  if n == 0 then off = MP_READ(packed, 1, from) end
  local claims = {}
  for i = 1, n do
    if i > 1 then off, kind, key, amount, other = MP_READ(packed, 4, off) end
    if kind ~= 'b' then
      claims[i] = { kind, key, amount, other, false, false, false }
    elseif other == '0' then
      claims[i] = { kind, key, amount, other, key, false, false }
    else
      local suffix, ends = window(other, start)
      claims[i] = { kind, key, amount, other, key .. suffix, ends, false }
    end
  end
  if off == -1 then return claims, NONE, NONE end
  local g, v
  off, g, v = MP_READ(packed, 2, off)
  local groups = NONE
  if g > 0 then
    groups = {}
    for i = 1, g do off, groups[i] = MP_READ(packed, 1, off) end
  end
  return claims, groups, (read_spends(packed, off, v))
end

-- The record's claims, groups and spends (read only when needed; a tombstone has none).
local function claims_of(r)
  if r.c then return r.c end
  if #r.raw > BODY then
    r.c, r.g, r.v = read_body(r.raw, BODY, r.start)
  else
    r.c, r.g, r.v = NONE, NONE, NONE
  end
  return r.c
end

local function groups_of(r)
  claims_of(r)
  return r.g
end

-- The same record in another phase.
local function with_phase(r, phase)
  return phase .. string.sub(r.raw, 2)
end

-- The record settled by the call `nonce`: its phase, and that call's nonce in place of the
-- reserve's (a reserve is answered by the phase alone from now on), so that the same call sent
-- again (its answer was lost) is answered as it was.
local function settled_by(r, phase, nonce)
  return phase .. V .. fp_of(r) .. nonce .. string.sub(r.raw, 19)
end

-- Whether a record is a slot group's (its home decides for it).
local function is_group(key)
  return memo_key(key) == nil
end

-- ---------------------------------------------------------------------------------------------
-- Budgets: read, changed in memory, and written by save_budget alone. Nothing an operation does
-- to a budget reaches Redis before its save, so an operation that returns early (a denial, a
-- check, a refused refund) leaves the budget exactly as it was: its state cannot be
-- half-written. Operations read every key they touch before their first write, so that a key
-- this node does not serve (a slot moving) fails the operation before it changed anything.
--
-- A budget's state is one field, `s`, packed: read in one command and one call, written in one,
-- with no number converted to text or back. Bucket ends are numbers (ms); they become text only
-- as the names of their fields and members, with two buckets or more.
local STATE = '>I7I7I4I6I6'
local STATE_BYTES = 30

-- The fields in which the previous release kept a budget's state, as decimal text: spent, held,
-- the earliest bucket end (n), the bucket count (c), the expiry (t). Its bucket fields (x<T>)
-- and sorted set are this layout's.
local PREVIOUS = { 'spent', 'held', 'n', 'c', 't' }

-- The state of a budget the previous release wrote, packed, or nil when `bkey` has none of its
-- fields either (a budget never written).
local function previous_state(bkey)
  local v = CALL('HMGET', bkey, unpack(PREVIOUS))
  if not (v[1] or v[2] or v[3] or v[4] or v[5]) then return nil end
  local x = {}
  for i = 1, 5 do
    if v[i] and not string.find(v[i], '^%d+$') then unreadable('a budget', bkey) end
    x[i] = tonumber(v[i]) or 0
  end
  local spent, held, n, c, t = x[1], x[2], x[3], x[4], x[5]
  if spent >= 2 ^ 53 or held >= 2 ^ 53 then unreadable('a budget', bkey) end
  if c == 0 then held, n = 0, 0 end
  return PACK(STATE, spent, held, c, n, t)
end

-- Reads budget `bkey` and, with two buckets or more, the sums of the buckets ending at T1 and T2
-- (either may be nil). The table holds the budget's fields by name and, with two buckets or
-- more, each bucket's sum under its end (b[T]; a number, never a field's name). It is made with
-- the fields every operation has, so that the common ones never grow it.
local function load_budget(bkey, T1, T2)
  local state = CALL('HGET', bkey, 's')
  local b = { key = bkey, spent = 0, held = 0, c = 0, n = 0, t = 0, exists = state, changed = false }
  if not state then
    -- A budget of the previous release: read as it was, written in this layout (its old fields
    -- gone) by the first operation that changes it.
    state = previous_state(bkey)
    if not state then return b end
    b.exists = true
    b.del = { spent = true, held = true, n = true, c = true, t = true }
  end
  if #state ~= STATE_BYTES then unreadable('a budget', bkey) end
  b.spent, b.held, b.c, b.n, b.t = UNPACK(STATE, state)
  if b.c >= 2 and T1 then
    local x = CALL('HMGET', bkey, 'x' .. num(T1), T2 and 'x' .. num(T2) or 'x')
    b[T1] = x[1] and tonumber(x[1])
    if T2 then b[T2] = x[2] and tonumber(x[2]) end
  end
  return b
end

local function set_field(b, field, value)
  b.set = b.set or {}
  b.set[field] = value
  if b.del then b.del[field] = nil end
end

local function del_field(b, field)
  b.del = b.del or {}
  b.del[field] = true
  if b.set then b.set[field] = nil end
end

local function spend(b, amount)
  b.spent = b.spent + amount
  b.changed = true
end

-- The bucket ends the sorted set gains and loses when the budget is saved. `gone`: the whole set
-- goes (then `add` is what the new one holds).
local function zset_of(b)
  if not b.z then b.z = { add = {}, rem = {}, gone = false } end
  return b.z
end

local function zadd(b, T)
  local z = zset_of(b)
  z.add[T] = true
  z.rem[T] = nil
end

local function zrem(b, T)
  local z = zset_of(b)
  z.add[T] = nil
  if not z.gone then z.rem[T] = true end
end

-- The sorted set goes whole: one bucket or none is left, kept in `held` and `n`.
local function zgone(b)
  b.z = { add = {}, rem = {}, gone = true }
end

-- The earliest bucket end the sorted set will hold once saved (0 if none): the first of its
-- members this operation did not remove (at most as many reads past the start as it removed),
-- or one it added, whichever is earlier.
local function earliest(b)
  local z = zset_of(b)
  local first = nil
  for T in pairs(z.add) do
    if not first or T < first then first = T end
  end
  if not z.gone then
    local removed = 0
    for _ in pairs(z.rem) do removed = removed + 1 end
    for _, member in ipairs(CALL('ZRANGE', b.key .. ':h', 0, removed)) do
      local T = tonumber(member)
      if not z.rem[T] then
        if not first or T < first then first = T end
        break
      end
    end
  end
  return first or 0
end

-- The field of the sum of the bucket that ends at T.
local function x_field(T)
  return 'x' .. num(T)
end

-- With exactly one bucket left, goes back to keeping it in `held` and `n`.
local function collapse(b)
  local only = earliest(b)
  zgone(b)
  if only ~= 0 then
    del_field(b, x_field(only))
    b[only] = nil
    b.n = only
  end
end

-- How many expired buckets of one budget an operation clears at most (MAX_EXPIRED_PER_CALL in
-- store/mod.rs): work per call stays bounded, and what is not cleared yet counts as held.
local MAX_CLEAR = 64

-- The store's retention of settled records, in ms: sent with each batch (batch.lua sets it).
local RETAIN = 600000

-- How long a forgotten hold still answers a retry of the settlement that forgot it, in ms: sent
-- with each batch (batch.lua sets it).
local ANSWER_MS = 4000

-- Gives back up to MAX_CLEAR buckets whose end has passed by `now`. Called right after
-- load_budget, before anything else changed the budget.
local function expire(b, now)
  if b.c == 0 or b.n > now then return end
  b.changed = true
  if b.c == 1 then
    b.held, b.c = 0, 0
    return
  end
  local due = CALL('ZRANGEBYSCORE', b.key .. ':h', '-inf', num(now), 'LIMIT', 0, MAX_CLEAR)
  if #due > 0 then
    local fields = {}
    for i, member in ipairs(due) do fields[i] = 'x' .. member end
    local sum = 0
    for _, v in ipairs(CALL('HMGET', b.key, unpack(fields))) do sum = sum + (tonumber(v) or 0) end
    for i, member in ipairs(due) do
      local T = tonumber(member)
      del_field(b, fields[i])
      b[T] = nil
      zrem(b, T)
    end
    b.held = math.max(0, b.held - sum)
    b.c = math.max(0, b.c - #due)
  end
  if b.c == 0 then
    zgone(b)
    b.held = 0
  elseif b.c == 1 then
    collapse(b)
  else
    b.n = earliest(b)
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
    zadd(b, b.n)
    zadd(b, T)
    set_field(b, x_field(b.n), num(b.held))
    set_field(b, x_field(T), num(amount))
    b[b.n], b[T] = b.held, amount
    b.c = 2
    if T < b.n then b.n = T end
  elseif b[T] then
    b[T] = b[T] + amount
    set_field(b, x_field(T), num(b[T]))
  else
    zadd(b, T)
    b[T] = amount
    set_field(b, x_field(T), num(amount))
    b.c = b.c + 1
    if T < b.n then b.n = T end
  end
  b.held = b.held + amount
end

-- Takes a hold of `amount` out of the bucket that ends at T. Answers true when it was still
-- held; false when its bucket's end has passed by `now` (its capacity is back, or comes back as
-- soon as that bucket is cleared, and until then it counts as held, never as free) or is gone.
local function take_out(b, T, amount, now)
  if T <= now or b.c == 0 then return false end
  if b.c == 1 then
    if T ~= b.n then return false end
    b.changed = true
    b.held = b.held - amount
    if b.held <= 0 then b.held, b.c = 0, 0 end
    return true
  end
  local x = b[T]
  if not x then return false end
  b.changed = true
  b.held = math.max(0, b.held - amount)
  x = x - amount
  if x > 0 then
    b[T] = x
    set_field(b, x_field(T), num(x))
    return true
  end
  b[T] = nil
  del_field(b, x_field(T))
  zrem(b, T)
  b.c = b.c - 1
  if b.c == 1 then
    collapse(b)
  elseif T == b.n then
    b.n = earliest(b)
  end
  return true
end

-- Keeps a windowed budget's keys until at least `at`.
local function keep_until(b, at)
  if at > b.t then
    b.t = at
    b.expire = true
    b.changed = true
  end
end

-- Writes the sorted set's changes: members are added before any is removed, and a set that goes
-- while it gains members is emptied around them, never deleted. A key that stops existing
-- mid-operation cannot be written again in it on a Cluster: while its slot is moving, the node
-- refuses a command on a key it does not hold, after the writes before it had landed.
local function save_zset(zkey, z)
  local add, ends = {}, {}
  for T in pairs(z.add) do
    add[#add + 1] = T
    add[#add + 1] = num(T)
    ends[#ends + 1] = T
  end
  if #add > 0 then CALL('ZADD', zkey, unpack(add)) end
  if z.gone then
    if #ends == 0 then
      CALL('DEL', zkey)
      return
    end
    table.sort(ends)
    local from = '-inf'
    for i = 1, #ends do
      CALL('ZREMRANGEBYSCORE', zkey, from, '(' .. num(ends[i]))
      from = '(' .. num(ends[i])
    end
    CALL('ZREMRANGEBYSCORE', zkey, from, '+inf')
    return
  end
  local rem = {}
  for T in pairs(z.rem) do rem[#rem + 1] = num(T) end
  if #rem > 0 then CALL('ZREM', zkey, unpack(rem)) end
end

-- Writes what changed: the state in one command (with the fields of buckets that change, a
-- second when one goes), the sorted set in one or two. A lifetime budget with nothing spent and
-- nothing held is deleted: there is nothing to remember. A key a write creates gets its expiry
-- at once (windowed budgets).
local function save_budget(b)
  if not b.changed then return end
  local zkey = b.key .. ':h'
  local z = b.z
  if z then save_zset(zkey, z) end
  if b.t == 0 and b.spent <= 0 and b.c == 0 then
    if b.exists then CALL('DEL', b.key) end
    return
  end
  local state = PACK(STATE, b.spent, b.held, b.c, b.c > 0 and b.n or 0, b.t)
  if b.set then
    local args = { 's', state }
    for field, value in pairs(b.set) do
      args[#args + 1] = field
      args[#args + 1] = value
    end
    CALL('HSET', b.key, unpack(args))
  else
    CALL('HSET', b.key, 's', state)
  end
  if b.del then
    local dels = {}
    for field in pairs(b.del) do dels[#dels + 1] = field end
    if #dels > 0 then CALL('HDEL', b.key, unpack(dels)) end
  end
  if b.t > 0 then
    if b.expire or not b.exists then CALL('PEXPIREAT', b.key, server_time(b.t)) end
    if b.c >= 2 and (b.expire or (z and next(z.add))) then
      CALL('PEXPIREAT', zkey, server_time(b.t))
    end
  end
end
