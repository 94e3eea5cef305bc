--! include: codec
-- idempotency: records {fp = request fingerprint, answer = reply, exp = clock
-- value it lapses at}. The clock decides (so tests can move it); Redis' own
-- PX removes the record from memory later.

-- The answer to replay for this key, or nil; a different request under the
-- key is refused.
local function idem_lookup(key, fingerprint, now)
  local rec = load_blob(key)
  if not rec or (rec.exp and rec.exp <= now) then return nil end
  if rec.fp ~= fingerprint then
    raise('FAILED_PRECONDITION', 'idempotency_key',
      'idempotency_key was already used with a different request')
  end
  rec.answer.replayed = true
  return rec.answer
end

-- An idempotency record to write with the script's other changes.
local function remember(ctx, key, fingerprint, answer, window_ms)
  ctx.idem = {key = key, window_ms = window_ms,
    record = {fp = fingerprint, answer = answer, exp = ctx.now + window_ms}}
end
