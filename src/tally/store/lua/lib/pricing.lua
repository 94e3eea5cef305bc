--! include: codec keys
-- pricing: an operation's price from the shard's copy of the catalog.

-- The price of `operation` at catalog `version` (0: the current one) and
-- the version it is.
local function price_of(ctx, prices_key, history_key, operation, version)
  local raw = redis.call('HGET', prices_key, operation)
  if not raw then raise('NOT_FOUND', 'operation', 'operation ' .. operation .. ' is not in the price catalog') end
  local current = cmsgpack.unpack(raw)
  if version == 0 or version == current.version then return current.price, current.version end
  local old = redis.call('HGET', history_key, price_version_field(operation, version))
  if not old then
    raise('FAILED_PRECONDITION', 'price_version',
      string.format('price version %d of %s is unknown', version, operation))
  end
  return tonumber(old), version
end

local function units_for(price, quantity)
  local units = price * quantity
  if units > UNITS_MAX then raise('INVALID_ARGUMENT', 'quantity', 'quantity times price exceeds 2^53 - 1 units') end
  return units
end
