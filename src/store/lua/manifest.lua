-- On Redis Cluster, the claims of one reservation may fall on several slots. Each slot group
-- gets a hold record of its own (reserve.lua and the others, unchanged); this manifest, in the
-- hold id's own slot, lists the groups so that commit, release and extend find them by id.
-- KEYS[1] = manifest; ARGV[1] = operation, then its arguments:
--   open  fingerprint lease-ms retain-ms group-record-keys... -> {'new', lease end}
--                                     | {'old', phase, fingerprint matches (1/0), lease end, expired (1/0), groups...}
--   get                               -> {'none'} | {'old', phase, 1, lease end, expired, groups...}
--   mark  phase retain-ms             -> {'ok'}   (phase C, R or X; a missing manifest becomes a
--                                                  tombstone T when phase is R)
--   extend lease-ms retain-ms         -> {'ok', lease end}
--   forget                            -> {'ok'}   (a denied reservation leaves nothing behind)
local op = ARGV[1]
local now = now_ms()

local function load_manifest(key)
  local raw = redis.call('GET', key)
  return raw and cmsgpack.unpack(raw)
end

local function save_manifest(key, manifest, ttl_ms)
  redis.call('SET', key, cmsgpack.pack(manifest), 'PX', ttl_ms)
end

local rec = load_manifest(KEYS[1])

local function describe(fp_ok)
  local out = { 'old', rec.s, fp_ok, rec.e or 0, (rec.e and now >= rec.e) and 1 or 0 }
  for _, g in ipairs(rec.g or {}) do out[#out + 1] = g end
  return out
end

if op == 'open' then
  local fp, lease, retain = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  if rec then return describe((rec.f == fp) and 1 or 0) end
  local groups = {}
  for i = 5, #ARGV do groups[#groups + 1] = ARGV[i] end
  save_manifest(KEYS[1], { s = 'H', f = fp, e = now + lease, g = groups }, lease + retain)
  return { 'new', now + lease }
elseif op == 'get' then
  if not rec then return { 'none' } end
  return describe(1)
elseif op == 'mark' then
  local phase, retain = ARGV[2], tonumber(ARGV[3])
  if not rec then
    if phase == 'R' then save_manifest(KEYS[1], { s = 'T', g = {} }, retain) end
    return { 'ok' }
  end
  rec.s = phase
  save_manifest(KEYS[1], rec, retain)
  return { 'ok' }
elseif op == 'extend' then
  local lease, retain = tonumber(ARGV[2]), tonumber(ARGV[3])
  if not rec then return { 'none' } end
  rec.e = now + lease
  save_manifest(KEYS[1], rec, lease + retain)
  return { 'ok', rec.e }
elseif op == 'forget' then
  redis.call('DEL', KEYS[1])
  return { 'ok' }
end
return redis.error_reply('unknown manifest operation ' .. tostring(op))
