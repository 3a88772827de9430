-- Sets a budget's spent amount in its current window. KEYS[1] = budget base key;
-- ARGV = spent, window spec
local now = now_ms()
local suffix, ends = window(ARGV[2], now)
local bkey = KEYS[1] .. suffix
redis.call('HSET', bkey, 'spent', ARGV[1])
if ends then keep_until(bkey, ends + WINDOW_GRACE_MS, now, true) end
return { 1 }
