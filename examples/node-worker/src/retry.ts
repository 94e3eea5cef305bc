// Retrying UNAVAILABLE the way Tally's published service config says, never
// past the caller's deadline. Connect has no gRPC service config, so the policy
// is read from protos/tally/v1/service_config.json rather than copied here.

import { readFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";

import { Code, ConnectError } from "@connectrpc/connect";

export interface RetryPolicy {
  readonly maxAttempts: number;
  readonly initialBackoffMs: number;
  readonly maxBackoffMs: number;
  readonly backoffMultiplier: number;
}

// The published config retries only UNAVAILABLE: nothing was applied, so the
// same request (same idempotency key) is safe to send again.
const RETRYABLE = "UNAVAILABLE";

function seconds(text: unknown, name: string): number {
  if (typeof text !== "string" || !/^\d+(\.\d+)?s$/.test(text)) {
    throw new Error(`service config: ${name} must be a duration like "0.1s", not ${String(text)}`);
  }
  return Number(text.slice(0, -1)) * 1000;
}

function positive(value: unknown, name: string): number {
  if (typeof value !== "number" || !(value > 0)) {
    throw new Error(`service config: ${name} must be a positive number, not ${String(value)}`);
  }
  return value;
}

/** The retry policy of tally.v1.QuotaService in a gRPC service config file. */
export function loadRetryPolicy(path: string | URL): RetryPolicy {
  const config = JSON.parse(readFileSync(path, "utf-8")) as {
    methodConfig?: { name?: { service?: string }[]; retryPolicy?: Record<string, unknown> }[];
  };
  const method = config.methodConfig?.find((m) =>
    m.name?.some((n) => n.service === "tally.v1.QuotaService"),
  );
  const policy = method?.retryPolicy;
  if (policy === undefined) {
    throw new Error(`service config ${String(path)}: no retryPolicy for tally.v1.QuotaService`);
  }
  const codes = policy["retryableStatusCodes"];
  if (!Array.isArray(codes) || codes.length !== 1 || codes[0] !== RETRYABLE) {
    throw new Error(`service config: expected retryableStatusCodes ["${RETRYABLE}"], got ${JSON.stringify(codes)}`);
  }
  return {
    maxAttempts: positive(policy["maxAttempts"], "maxAttempts"),
    initialBackoffMs: seconds(policy["initialBackoff"], "initialBackoff"),
    maxBackoffMs: seconds(policy["maxBackoff"], "maxBackoff"),
    backoffMultiplier: positive(policy["backoffMultiplier"], "backoffMultiplier"),
  };
}

/**
 * Runs `call` until it succeeds, fails with anything but UNAVAILABLE, the
 * policy's attempts are used up, or the deadline (a performance.now() value)
 * would pass. Each attempt gets the time left as its own gRPC deadline, and no
 * backoff sleep is started that would end past the deadline. `call` must send
 * the same request every time (build it, and its idempotency key, outside).
 */
export async function withRetry<T>(
  policy: RetryPolicy,
  deadline: number,
  call: (timeoutMs: number) => Promise<T>,
): Promise<T> {
  let backoffMs = policy.initialBackoffMs;
  for (let attempt = 1; ; attempt++) {
    const timeoutMs = Math.floor(deadline - performance.now());
    if (timeoutMs <= 0) {
      throw new ConnectError(`deadline passed before attempt ${attempt}`, Code.DeadlineExceeded);
    }
    try {
      return await call(timeoutMs);
    } catch (reason) {
      const error = ConnectError.from(reason);
      if (error.code !== Code.Unavailable || attempt >= policy.maxAttempts) {
        throw error;
      }
      // gRPC's jitter: a uniform wait in [0, backoff), so clients cut off
      // together do not come back together.
      const waitMs = Math.random() * backoffMs;
      if (performance.now() + waitMs >= deadline) {
        throw error;
      }
      await sleep(waitMs);
      backoffMs = Math.min(backoffMs * policy.backoffMultiplier, policy.maxBackoffMs);
    }
  }
}
