-- Gives a hold back. KEYS[1] = hold record; ARGV = id, retain ms, and optionally 'forget'
-- (undo a group of a denied multi-slot reservation and leave no record, so that it may be retried)
-- Answers {'OK', 'applied' | 'replayed' | 'tombstoned'} | {'E', 'committed'}
local id, retain, forget = ARGV[1], tonumber(ARGV[2]), ARGV[3] == 'forget'
local rec = load_record(KEYS[1])
if forget then
  if rec and rec.s == 'H' then undo(rec, id, now_ms()) end
  if rec and rec.s ~= 'C' then redis.call('DEL', KEYS[1]) end
  return { 'OK', 'applied' }
end
if not rec then
  -- Released before reserved: the tombstone refuses the late reserve.
  save_record(KEYS[1], { s = 'T', c = {} }, retain)
  return { 'OK', 'tombstoned' }
end
if rec.s == 'C' then return { 'E', 'committed' } end
if rec.s ~= 'H' then return { 'OK', 'replayed' } end
undo(rec, id, now_ms())
rec.s = 'R'
save_record(KEYS[1], rec, retain)
return { 'OK', 'applied' }
