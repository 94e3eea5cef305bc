--! include: codec keys
-- apply_price: copies one catalog price (set on shard 0) into a shard's own
-- copy, so that hot-path scripts read prices from their own hash slot.
-- Applying an older version than the shard has changes only the history.
-- KEYS: 1 prices hash, 2 price history hash
-- ARGV[1] (msgpack): now, operation, units_per_quantity, version, effective_at_ms
-- Returns: {applied = bool}.

return run(function()
  local req = decode_request()
  local operation = check_str(req.operation, 'operation', OPERATION_BYTES_MAX)
  local price = check_int(req.units_per_quantity, 'units_per_quantity', 1, UNITS_MAX)
  local version = check_int(req.version, 'version', 1, UNITS_MAX)
  local at = check_int(req.effective_at_ms, 'effective_at_ms', 0, TIMESTAMP_MS_MAX)
  redis.call('HSET', KEYS[2], price_version_field(operation, version), price)
  local raw = redis.call('HGET', KEYS[1], operation)
  if raw and cmsgpack.unpack(raw).version >= version then return {applied = false} end
  redis.call('HSET', KEYS[1], operation, cmsgpack.pack({price = price, version = version, at = at}))
  return {applied = true}
end)
