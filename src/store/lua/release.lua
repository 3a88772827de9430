-- Gives a hold back. KEYS[1] = hold record; ARGV = id, retain ms
-- Answers {'OK', 'applied' | 'replayed' | 'tombstoned'} | {'E', 'committed'}
local id, retain = ARGV[1], tonumber(ARGV[2])
local rec = load_record(KEYS[1])
if not rec then
  -- Released before reserved: the tombstone refuses the late reserve.
  save_record(KEYS[1], { s = 'T', c = {} }, retain)
  return { 'OK', 'tombstoned' }
end
if rec.s == 'C' then return { 'E', 'committed' } end
if rec.s ~= 'H' then return { 'OK', 'replayed' } end
undo(rec, id)
rec.s = 'R'
save_record(KEYS[1], rec, retain)
return { 'OK', 'applied' }
