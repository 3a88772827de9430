-- The store's one function: runs a batch of operations in order, each as atomic as if it ran alone
-- (a function call is atomic as a whole), and answers each on its own.
-- args[1] = MessagePack array of operations (see hold.lua and budget.lua), args[2] = the store's
-- retention of settled records (ms), args[3] = how long a forgotten hold and a call nonce answer a
-- retry (ms), args[4] = a test clock's shift (ms; read by a test library only); the answer is the
-- MessagePack array of their answers, in order. One TIME for the whole batch.
--
-- It is a Redis Function, not a script: the library (everything above) is run once, when it is
-- loaded, so that a call pays only for its operations.
--
-- On a Cluster a batch carries the operations of one node, each touching the keys of one slot;
-- keys[1] is a key of the first, so that a node that does not serve it answers MOVED. An
-- operation whose keys this node does not serve (the slot map moved) fails on its first key,
-- before it writes anything, and is answered { 'M' } to be sent again where it belongs.

local OPS = { reserve, settle, extend, mark, forget, budget, set_spent, refund, check, owner, remove }

local function run(keys, args)
  TEXT = {}
  RETAIN = tonumber(args[2])
  ANSWER_MS = tonumber(args[3])
  if TEST_CLOCK then SHIFT = tonumber(args[4]) end
  local ops = cmsgpack.unpack(args[1])
  local now, now_text = now_ms()
  local out = {}
  for i, op in ipairs(ops) do
    local ok, answer = pcall(OPS[op[1]], op, now, now_text)
    if ok then
      out[i] = answer
    else
      local message = type(answer) == 'table' and answer.err or tostring(answer)
      if string.find(message, 'non local key', 1, true) or string.find(message, 'MOVED', 1, true)
        or string.find(message, 'ASK', 1, true) or string.find(message, 'CLUSTERDOWN', 1, true)
        or string.find(message, 'TRYAGAIN', 1, true) then
        out[i] = { 'M' }
      else
        out[i] = { 'X', message }
      end
    end
  end
  return cmsgpack.pack(out)
end

redis.register_function {
  function_name = FUNCTION_NAME,
  callback = run,
  flags = { 'allow-cross-slot-keys' },
}
