--! include: codec pricing fence
-- apply_price: copies one version of a catalog price (set on shard 0) into a
-- shard's own copy, so that hot-path scripts read prices from their own hash
-- slot. A newer version than the shard's becomes its price and supersedes
-- the shard's one at effective_at_ms, as set_price did on shard 0; an older
-- one changes only the history. It checks the shard's fence before any write
-- (it writes no events, so it stamps none).
-- KEYS: 1 prices hash, 2 price history hash, 3 the shard's fence hash
-- ARGV[1] (msgpack): now, prefix, shard, fence_floor, operation, units_per_quantity, version, effective_at_ms,
--   superseded_at_ms (0: current as far as shard 0 knows)
-- Returns: {applied = bool}.

return run(function()
  local req = decode_request()
  shard_ctx(req, KEYS[3])
  local operation = check_str(req.operation, 'operation', OPERATION_BYTES_MAX)
  local price = check_int(req.units_per_quantity, 'units_per_quantity', 1, UNITS_MAX)
  local version = check_int(req.version, 'version', 1, UNITS_MAX)
  local at = check_int(req.effective_at_ms, 'effective_at_ms', 0, TIMESTAMP_MS_MAX)
  local superseded_at = check_int(req.superseded_at_ms, 'superseded_at_ms', 0, TIMESTAMP_MS_MAX)
  if not price_record(KEYS[2], operation, version) then
    save_price_record(KEYS[2], operation, version, {price = price, superseded_at = 0})
  end
  if superseded_at ~= 0 then supersede(KEYS[2], operation, version, price, superseded_at) end
  local raw = redis.call('HGET', KEYS[1], operation)
  local current = raw and cmsgpack.unpack(raw)
  if current and current.version >= version then return {applied = false} end
  if current then supersede(KEYS[2], operation, current.version, current.price, at) end
  redis.call('HSET', KEYS[1], operation, cmsgpack.pack({price = price, version = version, at = at}))
  return {applied = true}
end)
