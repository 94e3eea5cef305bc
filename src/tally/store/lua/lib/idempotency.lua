--! include: codec
-- idempotency: one record per key and call, kept for the whole window, so it
-- is compact: a msgpack array {fingerprint prefix, written at, the call's own
-- figures...} (each script names its figures). No balance: a replay answers
-- the account's balance as of the replay. The clock decides when a record
-- lapses (written at + window <= now, so tests can move it); Redis' own PX
-- removes it from memory later.

-- What a record keeps of a request's fingerprint: enough bits that another
-- request under the same key is told apart.
local function stored_fingerprint(fingerprint)
  return string.sub(fingerprint, 1, FINGERPRINT_STORED_CHARS)
end

-- The figures stored under this key ({figure 1, figure 2, ...}) and the time
-- they were written, or nil; a different request under the key is refused.
local function idem_lookup(key, fingerprint, now, window_ms)
  local rec = load_blob(key)
  if not rec or rec[2] + window_ms <= now then return nil end
  if rec[1] ~= stored_fingerprint(fingerprint) then
    raise('FAILED_PRECONDITION', 'idempotency_key',
      'idempotency_key was already used with a different request')
  end
  return {unpack(rec, 3)}, rec[2]
end

-- An idempotency record to write with the script's other changes.
local function remember(ctx, key, fingerprint, window_ms, figures)
  local record = {stored_fingerprint(fingerprint), ctx.now}
  for i, figure in ipairs(figures) do record[i + 2] = figure end
  ctx.idem = {key = key, window_ms = window_ms, record = record, expires_at = ctx.now + window_ms}
end
