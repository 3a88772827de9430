-- Makes a hold permanent. KEYS[1] = hold record; ARGV = id, retain ms
-- Answers {'OK', 'applied' | 'replayed'} | {'E', 'unknown' | 'released' | 'expired'}
local id, retain = ARGV[1], tonumber(ARGV[2])
local rec = load_record(KEYS[1])
if not rec then return { 'E', 'unknown' } end
if rec.s == 'C' then return { 'OK', 'replayed' } end
if rec.s == 'R' or rec.s == 'T' then return { 'E', 'released' } end
if rec.s == 'X' then return { 'E', 'expired' } end

local now = now_ms()
if now >= rec.e then
  -- The lease ran out: whatever is still held goes back now.
  undo(rec, id, now)
  rec.s = 'X'
  save_record(KEYS[1], rec, retain)
  return { 'E', 'expired' }
end

for _, c in ipairs(rec.c) do
  if c.k == 'b' then
    -- Within the lease the hold's bucket has not ended yet, so it is still held.
    if take_out(c.b, rec.e, c.a, now) then redis.call('HINCRBY', c.b, 'spent', c.a) end
  elseif c.k == 'u' then
    if c.n == 0 then
      redis.call('SET', c.u, c.o)
      if redis.call('GET', c.u .. ':p') == id then redis.call('DEL', c.u .. ':p') end
    end
  elseif c.k == 'r' then
    if redis.call('GET', c.u) == c.o then redis.call('DEL', c.u) end
  end
end
rec.s = 'C'
save_record(KEYS[1], rec, retain)
return { 'OK', 'applied' }
