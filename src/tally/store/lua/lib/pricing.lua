--! include: codec keys
-- pricing: an operation's price from the shard's copy of the catalog.
-- The price history keeps every version of every operation's price as
-- {price, superseded_at} (0: still current): a superseded version is
-- honoured for the spend context's quote_validity_ms after superseded_at.

local function price_record(history_key, operation, version)
  local raw = redis.call('HGET', history_key, price_version_field(operation, version))
  if raw then return cmsgpack.unpack(raw) end
  return nil
end

local function save_price_record(history_key, operation, version, record)
  redis.call('HSET', history_key, price_version_field(operation, version), cmsgpack.pack(record))
end

-- Records that `version` of the operation was superseded at `at` (the first
-- time only: copies of the catalog keep the time shard 0 recorded).
local function supersede(history_key, operation, version, price, at)
  local record = price_record(history_key, operation, version) or {price = price, superseded_at = 0}
  if record.superseded_at == 0 then
    record.superseded_at = at
    save_price_record(history_key, operation, version, record)
  end
end

-- The price records a run reads are read once: a batch's items share
-- ctx.prices (absent: each call reads them); false caches "no such record".
local function current_price(ctx, prices_key, operation)
  local cache = ctx.prices
  local record = cache and cache[operation]
  if record == nil then
    local raw = redis.call('HGET', prices_key, operation)
    record = raw and cmsgpack.unpack(raw) or false
    if cache then cache[operation] = record end
  end
  return record or nil
end

local function quoted_price(ctx, history_key, operation, version)
  local cache = ctx.prices
  local field = price_version_field(operation, version)
  local record = cache and cache[field]
  if record == nil then
    record = price_record(history_key, operation, version) or false
    if cache then cache[field] = record end
  end
  return record or nil
end

-- The price of `operation` at catalog `version` (0: the current one) and
-- the version it is.
local function price_of(ctx, prices_key, history_key, operation, version)
  local current = current_price(ctx, prices_key, operation)
  if not current then raise('NOT_FOUND', 'operation', 'operation ' .. operation .. ' is not in the price catalog') end
  if version == 0 or version == current.version then return current.price, current.version end
  local old = quoted_price(ctx, history_key, operation, version)
  if not old then
    raise('FAILED_PRECONDITION', 'price_version',
      string.format('price version %d of %s is unknown', version, operation))
  end
  if old.superseded_at ~= 0 then
    local validity_ms = check_int(ctx.quote_validity_ms, 'quote_validity_ms', 0, TIMESTAMP_MS_MAX)
    if ctx.now >= old.superseded_at + validity_ms then
      raise('FAILED_PRECONDITION', 'price_version', string.format(
        'price_version %d of %s was superseded %d ms or more ago; quote again',
        version, operation, validity_ms))
    end
  end
  return old.price, version
end

local function units_for(price, quantity)
  local units = price * quantity
  if units > UNITS_MAX then raise('INVALID_ARGUMENT', 'quantity', 'quantity times price exceeds 2^53 - 1 units') end
  return units
end
