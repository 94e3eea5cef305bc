--! include: codec
-- lease_acquire: takes or renews one lease of background work (store/leases.py) for
-- `owner` until now + ttl_ms. A lease is a hash {owner, lapses_at}; one whose `lapses_at`
-- has passed is free. The key stays when it lapses (one per job, or per job and shard: a
-- bounded number), so taking over a lapsed owner's lease is told from a first take.
-- `now` is the leasing process's wall clock, never a test's business clock.
-- KEYS: 1 the lease
-- ARGV[1] (msgpack): now, owner, ttl_ms
-- Returns: {held (1: `owner` holds it until now + ttl_ms), taken_over (1: it was
--    another owner's, lapsed), holder (who holds it now)}.

return run(function()
  local req = decode_request()
  local owner = check_str(req.owner, 'owner', LEASE_OWNER_BYTES_MAX)
  local ttl_ms = check_int(req.ttl_ms, 'ttl_ms', 1, LEASE_TTL_MS_MAX)
  local current = redis.call('HMGET', KEYS[1], 'owner', 'lapses_at')
  local holder, lapses_at = current[1], tonumber(current[2])
  if holder and holder ~= owner and lapses_at and lapses_at > req.now then
    return {held = 0, taken_over = 0, holder = holder}
  end
  redis.call('HSET', KEYS[1], 'owner', owner, 'lapses_at', string.format('%d', req.now + ttl_ms))
  local taken_over = 0
  if holder and holder ~= owner then taken_over = 1 end
  return {held = 1, taken_over = taken_over, holder = owner}
end)
