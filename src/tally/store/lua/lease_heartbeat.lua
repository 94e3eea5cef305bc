--! include: codec
-- lease_heartbeat: one process of a per-shard job says it is alive until now + ttl_ms,
-- and learns how many are (its fair share of the shards is ceil(shards / live)). The
-- registry drops lapsed members first; it holds members_max members at most: a
-- process beyond that is not added and counts the registry as full.
-- KEYS: 1 the job's registry (zset owner -> lapses_at)
-- ARGV[1] (msgpack): now, owner, ttl_ms, members_max
-- Returns: {live (processes alive, this one included, at most members_max)}.

return run(function()
  local req = decode_request()
  local owner = check_str(req.owner, 'owner', LEASE_OWNER_BYTES_MAX)
  local ttl_ms = check_int(req.ttl_ms, 'ttl_ms', 1, LEASE_TTL_MS_MAX)
  local members_max = check_int(req.members_max, 'members_max', 1, LEASE_MEMBERS_MAX)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', req.now))
  local live = redis.call('ZCARD', KEYS[1])
  if redis.call('ZSCORE', KEYS[1], owner) or live < members_max then
    redis.call('ZADD', KEYS[1], string.format('%d', req.now + ttl_ms), owner)
    live = redis.call('ZCARD', KEYS[1])
  end
  return {live = live}
end)
