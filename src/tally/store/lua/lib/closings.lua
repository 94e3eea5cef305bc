-- closings: each shard's index of its accounts by when their next closing is
-- due (ctx.closings_key, a declared key): the end of the billing period, or the expiry of a grant
-- if one comes first. The period sweeper closes the due ones (close_period),
-- so that periods close on time for accounts nobody writes.

local function next_closing_at(acct)
  local due = acct.period_end
  for _, g in ipairs(acct.grants) do
    if g.expires_at ~= 0 and g.expires_at < due then due = g.expires_at end
  end
  return due
end

local function index_closing(ctx)
  redis.call('ZADD', ctx.closings_key, next_closing_at(ctx.acct), ctx.acct.id)
end
