--! include: codec
-- lease_release: gives a lease back (a process stopping, or shedding what is beyond
-- its fair share), so another takes it at once rather than after it lapses. Only the
-- holder's own release deletes it.
-- KEYS: 1 the lease
-- ARGV[1] (msgpack): now, owner
-- Returns: {released (1: it was `owner`'s and is free now)}.

return run(function()
  local req = decode_request()
  local owner = check_str(req.owner, 'owner', LEASE_OWNER_BYTES_MAX)
  if redis.call('HGET', KEYS[1], 'owner') ~= owner then return {released = 0} end
  redis.call('DEL', KEYS[1])
  return {released = 1}
end)
