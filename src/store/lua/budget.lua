-- Reads a budget's current window. KEYS[1] = budget base key; ARGV = window spec, max to clear
-- Answers {spent, held, window end or -1}
local now = now_ms()
local suffix, ends = window(ARGV[1], now)
local bkey = KEYS[1] .. suffix
expire_buckets(bkey, now, tonumber(ARGV[2]))
local v = redis.call('HMGET', bkey, 'spent', 'held')
return { tonumber(v[1]) or 0, tonumber(v[2]) or 0, ends or -1 }
