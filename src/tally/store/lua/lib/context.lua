--! include: codec fence
-- context: one script run's state and the account it works on.
-- Nothing here writes to Redis: every change is made in memory on ctx and
-- written by commit_ctx (write_phase) once every check has passed.
--
-- ctx = {now (the account's clock once it is loaded), prefix, shard, acct,
--        acct_key, holds_key, expiries_key, events_key, events = {},
--        holds = {rid -> hold loaded}, dirty = {rid -> true for holds to write},
--        usage = {counter changes}, idem = the idempotency record to write,
--        retention_ms, closed_window_ms, quote_validity_ms,
--        accounts = {acct_key -> account} and prices = {} when a batch shares its
--        decoded accounts and price records between items (lib/batch.lua)}

-- The shard's part of a ctx, from the request: checked once per script run
-- (a batch runs many items on it), the shard's fence checked with it.
local function shard_state(req)
  local shard = {
    prefix = check_str(req.prefix, 'prefix', KEY_PREFIX_BYTES_MAX),
    shard = check_str(req.shard, 'shard', SHARD_TAG_BYTES_MAX),
    retention_ms = check_int(req.retention_ms or 0, 'retention_ms', 0, TIMESTAMP_MS_MAX),
    closed_window_ms = check_int(req.closed_window_ms or 0, 'closed_window_ms', 0, TIMESTAMP_MS_MAX),
    -- spend scripts only; pricing checks it when a superseded version is quoted
    quote_validity_ms = req.quote_validity_ms,
  }
  check_fence(shard, req.fence_floor)
  return shard
end

-- A ctx on one account of the shard: keys 1 account blob, 2 account holds zset,
-- 3 shard expiries zset, 4 shard event stream.
local function account_ctx(shard, now, keys)
  return {
    now = now, prefix = shard.prefix, shard = shard.shard, fence_key = shard.fence_key,
    acct_key = keys[1], holds_key = keys[2], expiries_key = keys[3], events_key = keys[4],
    events = {}, holds = {}, dirty = {}, usage = {},
    retention_ms = shard.retention_ms, closed_window_ms = shard.closed_window_ms,
    quote_validity_ms = shard.quote_validity_ms,
  }
end

local function new_ctx(req, keys)
  return account_ctx(shard_state(req), req.now, keys)
end

-- Fields added after an account was first written get their neutral value.
local function upgrade(acct)
  acct.event_seq = acct.event_seq or 0
  acct.period_purchased = acct.period_purchased or 0
  acct.period_expired = acct.period_expired or 0
  acct.alerts = acct.alerts or {percent = {}, below = 0, overage = false}
  acct.fired = acct.fired or {}
  acct.budgets = acct.budgets or {}
  acct.clock = acct.clock or 0
end

-- Makes acct the account ctx works on, on the account's clock: the latest
-- now a script used on it. Servers' clocks differ slightly; a script whose
-- clock is behind uses the account's instead, so that nothing it does
-- (expiries, periods, idempotency lapses, event times) goes back in time.
local function adopt_account(ctx, acct)
  upgrade(acct)
  if acct.clock > ctx.now then ctx.now = acct.clock end
  acct.clock = ctx.now
  ctx.acct = acct
end

-- A batch decodes each account once: its items share the account as the
-- last item left it (written by that item's commit_ctx; lib/batch.lua drops
-- it when an item fails, since a failed item may have changed it in memory).
local function load_account(ctx, account_id)
  local accounts = ctx.accounts
  local acct = accounts and accounts[ctx.acct_key] or load_blob(ctx.acct_key)
  if not acct then raise('NOT_FOUND', 'account_id', 'account ' .. account_id .. ' not found') end
  if accounts then accounts[ctx.acct_key] = acct end
  adopt_account(ctx, acct)
  return acct
end

-- Ids of grants and holds come from one counter per account (seq).
local function next_seq(acct)
  acct.seq = acct.seq + 1
  return acct.seq
end
