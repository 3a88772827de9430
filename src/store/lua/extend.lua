-- Renews a live hold's lease. KEYS[1] = hold record; ARGV = id, lease ms, retain ms
-- Answers {'OK', new lease end} | {'E', 'unknown' | 'committed' | 'released' | 'expired'}
local id, lease, retain = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rec = load_record(KEYS[1])
if not rec then return { 'E', 'unknown' } end
if rec.s == 'C' then return { 'E', 'committed' } end
if rec.s == 'R' or rec.s == 'T' then return { 'E', 'released' } end
local now = now_ms()
if rec.s == 'X' or now >= rec.e then return { 'E', 'expired' } end

local expires = now + lease
for _, c in ipairs(rec.c) do
  if c.k == 'b' then
    take_out(c.b, rec.e, c.a, now)
    hold_in(c.b, expires, c.a)
    keep_until(c.b, expires + WINDOW_GRACE_MS, now, false)
  elseif c.k == 'u' and c.n == 0 then
    if redis.call('GET', c.u .. ':p') == id then
      redis.call('PEXPIRE', c.u .. ':p', lease)
    end
  end
end
rec.e = expires
save_record(KEYS[1], rec, lease + retain)
return { 'OK', expires }
