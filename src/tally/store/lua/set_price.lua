--! include: codec pricing fence
-- set_price: sets an operation's price in the authoritative catalog (shard 0),
-- under a new catalog version; the version it replaces is superseded now.
-- Setting the current price again is a no-op. Like an account script it
-- checks shard 0's fence before any write and stamps its event (lib/fence.lua):
-- after a wipe the catalog version restarts and its event id would repeat one
-- the ledger holds.
-- KEYS: 1 prices hash, 2 price history hash, 3 catalog meta hash, 4 event stream,
--   5 fence hash
-- ARGV[1] (msgpack): now, prefix, shard, fence_floor, operation, units_per_quantity, by (optional)
-- Returns: {operation, units_per_quantity, version, effective_at_ms, changed}.
-- The prices hash keeps its records as {price, version, at}.

return run(function()
  local req = decode_request()
  local shard = shard_ctx(req, KEYS[5])
  local operation = check_str(req.operation, 'operation', OPERATION_BYTES_MAX)
  local price = check_int(req.units_per_quantity, 'units_per_quantity', 1, UNITS_MAX)
  local by = check_by(req.by)
  local raw = redis.call('HGET', KEYS[1], operation)
  local current = raw and cmsgpack.unpack(raw)
  if current and current.price == price then
    return {operation = operation, units_per_quantity = price, version = current.version,
      effective_at_ms = current.at, changed = false}
  end
  local version = redis.call('HINCRBY', KEYS[3], 'version', 1)
  local record = {price = price, version = version, at = req.now}
  redis.call('HSET', KEYS[1], operation, cmsgpack.pack(record))
  if current then supersede(KEYS[2], operation, current.version, current.price, req.now) end
  save_price_record(KEYS[2], operation, version, {price = price, superseded_at = 0})
  local event = {'type', ENTRY.PRICE_CHANGE, 'event_id', 'catalog/' .. int_text(version),
    'operation', operation, 'units', price, 'price_version', version, 'at', req.now,
    'fence', next_fence(shard)}
  if by then
    event[#event + 1] = 'by'
    event[#event + 1] = by
  end
  redis.call('XADD', KEYS[4], '*', unpack(event))
  return {operation = operation, units_per_quantity = price, version = version,
    effective_at_ms = req.now, changed = true}
end)
