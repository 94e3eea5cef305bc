--! include: codec context
-- batch: one script run doing many items of one shard, each exactly what its
-- single script would do (its own checks, idempotency record, events, write
-- phase and answer), one after the other. What every item would repeat is
-- done once per run: the request's shard fields are checked and the shard's
-- fence is read once, each account is decoded once (its items share it, see
-- load_account), each price record is read once (see price_of).
-- An item that fails answers its own error and changes nothing: every script
-- checks everything before its first write, and the account it may have
-- changed in memory is dropped (the next item reads it again from Redis).
-- A failure that is not a typed one (a bug) answers INTERNAL for that item.
--
-- KEYS: the shard's keys first (`shared` of them: 1 expiries zset, 2 event stream,
-- 3 closings zset, 4 fence hash, then the script's own), then `stride` keys per
-- item: account blob, account holds zset, the account's two usage counter
-- slots, held reservations hash, then the item's own (its idempotency record,
-- its reservation's key).
-- The request: the shard's fields, and `items` (1 to BATCH_ITEMS_MAX maps).
-- The answer: {results = {one per item, in order: {ok = true, r = <answer>} or
-- {ok = false, code, field, message, extra}}}.

-- The request's fields every item shares (everything but `items`).
local function batch_fields(req)
  local shared = {}
  for k, v in pairs(req) do
    if k ~= 'items' then shared[k] = v end
  end
  return shared
end

local function check_items(req, keys, shared, stride)
  local items = req.items
  if type(items) ~= 'table' or #items == 0 then
    raise('INVALID_ARGUMENT', 'items', 'items must hold at least one item')
  end
  if #items > BATCH_ITEMS_MAX then
    raise('INVALID_ARGUMENT', 'items', string.format('items may hold at most %d items', BATCH_ITEMS_MAX))
  end
  if #keys ~= shared + stride * #items then
    raise('INVALID_ARGUMENT', 'items', string.format('%d items need %d keys, not %d', #items,
      shared + stride * #items, #keys))
  end
  return items
end

-- An item's failure as its answer.
local function item_failure(err)
  if type(err) == 'table' and err.tally_err then
    return {ok = false, code = err.code, field = err.field or '', message = err.message or '',
      extra = err.extra or {}}
  end
  return {ok = false, code = 'INTERNAL', field = '', message = tostring(err), extra = {}}
end

-- Runs body(ctx, item, item_keys) for every item of the request; item_keys are
-- the item's `stride` keys. Returns the batch's answer.
local function run_items(req, keys, shared, stride, body)
  local shard = shard_state(req, keys[1], keys[2], keys[3], keys[4])
  local items = check_items(req, keys, shared, stride)
  local fields = batch_fields(req)
  local accounts, prices = {}, {}
  local results = {}
  for i, item in ipairs(items) do
    local base = shared + stride * (i - 1)
    local item_keys = {}
    for k = 1, stride do item_keys[k] = keys[base + k] end
    local ok, result = false, {tally_err = true, code = 'INVALID_ARGUMENT', field = 'items',
      message = 'an item must be a map'}
    if type(item) == 'table' then
      for k, v in pairs(fields) do item[k] = v end
      local ctx = account_ctx(shard, req.now, item_keys)
      ctx.accounts, ctx.prices = accounts, prices
      ok, result = pcall(body, ctx, item, item_keys)
    end
    if ok then
      results[i] = {ok = true, r = result}
    else
      accounts[item_keys[1]] = nil
      results[i] = item_failure(result)
    end
  end
  return {results = results}
end
