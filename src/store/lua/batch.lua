-- The store's one function: runs a batch of operations in order, each as atomic as if it ran alone
-- (a function call is atomic as a whole), and answers each on its own.
-- args[1] = the operations, args[2] = the store's retention of settled records (ms), args[3] =
-- how long a forgotten hold and a call nonce answer a retry (ms), args[4] = a test clock's shift
-- (ms; read by a test library only); the answer is the MessagePack array of their answers, in
-- order. One TIME for the whole batch.
--
-- The operations are one MessagePack sequence, not an array: each is OP_VALUES values, its code
-- then its fields (nil past the last), read in one call and handed to the operation as its
-- arguments, so that no table is built to hold them.
--
-- It is a Redis Function, not a script: the library (everything above) is run once, when it is
-- loaded, so that a call pays only for its operations.
--
-- On a Cluster a batch carries the operations of one node, each touching the keys of one slot;
-- keys[1] is a key of the first, so that a node that does not serve it answers MOVED. An
-- operation whose keys this node does not serve (the slot map moved) fails on its first key,
-- before it writes anything, and is answered { 'M' } to be sent again where it belongs.

local OPS = { reserve, settle, extend, mark, forget, budget, set_spent, refund, check, owner, remove }
local OP_VALUES = 10

-- The answers that are the same every time, packed once.
local CONSTANT = { OK, OK_APPLIED, OK_REPLAYED, OK_TOMBSTONED, OK_KEPT, UNKNOWN, UNKNOWN_NONE, IN_FLIGHT,
  IN_FLIGHT_NONE, EXPIRED, RELEASED, CONFLICT }
local PACKED = {}

local function packed(answer)
  return PACKED[answer] or MP_PACK(answer)
end

local function failed(message)
  if string.find(message, 'non local key', 1, true) or string.find(message, 'MOVED', 1, true)
    or string.find(message, 'ASK', 1, true) or string.find(message, 'CLUSTERDOWN', 1, true)
    or string.find(message, 'TRYAGAIN', 1, true) then
    return { 'M' }
  end
  return { 'X', message }
end

-- Runs operation `code` on its fields; answers where the next operation starts and the answer,
-- packed.
local function run_one(now, next_op, code, ...)
  local ok, answer = pcall(OPS[code], now, ...)
  if ok then return next_op, packed(answer) end
  return next_op, MP_PACK(failed(type(answer) == 'table' and answer.err or tostring(answer)))
end

-- The texts RETAIN and ANSWER_MS were last read from: every call of a store sends the same.
local RETAIN_ARG, ANSWER_ARG

local function run(keys, args)
  if not MP_READ then
    bind()
    for i = 1, #CONSTANT do PACKED[CONSTANT[i]] = MP_PACK(CONSTANT[i]) end
  end
  TEXT, TIMES = {}, {}
  if args[2] ~= RETAIN_ARG then RETAIN, RETAIN_ARG = tonumber(args[2]), args[2] end
  if args[3] ~= ANSWER_ARG then ANSWER_MS, ANSWER_ARG = tonumber(args[3]), args[3] end
  if TEST_CLOCK then SHIFT = tonumber(args[4]) end
  local ops = args[1]
  local now = now_ms()
  local out, at = {}, 0
  while at ~= -1 do
    at, out[#out + 1] = run_one(now, MP_READ(ops, OP_VALUES, at))
  end
  local head = #out < 16 and PACK('B', 0x90 + #out) or PACK('>BH', 0xdc, #out)
  return head .. table.concat(out)
end

redis.register_function {
  function_name = FUNCTION_NAME,
  callback = run,
  flags = { 'allow-cross-slot-keys' },
}
