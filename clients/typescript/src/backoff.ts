/**
 * Reconnect delays: capped exponential backoff with jitter, as docs/protocol.md §9.2 suggests
 * (0.5 s doubling up to 30 s, times a random factor in [0.5, 1)).
 *
 * The n-th delay in a row (from 0) is `min(cap, base * factor**n) * (0.5 + 0.5 * rand())`. Keeping
 * half of the ceiling avoids the near-zero waits of full jitter when a whole fleet lost the same
 * server, while the random half still spreads them out. The policy is pure: `rand` is injected.
 */
export interface BackoffOptions {
  baseMs?: number;
  capMs?: number;
  factor?: number;
  /** Returns a number in [0, 1); `Math.random` by default. */
  rand?: () => number;
}

export class Backoff {
  readonly baseMs: number;
  readonly capMs: number;
  readonly factor: number;
  private readonly rand: () => number;
  // Delays handed out since the last reset: the exponent of the next ceiling.
  private attemptCount = 0;

  constructor(options: BackoffOptions = {}) {
    this.baseMs = options.baseMs ?? 500;
    this.capMs = options.capMs ?? 30_000;
    this.factor = options.factor ?? 2;
    this.rand = options.rand ?? Math.random;
    if (!(this.baseMs > 0)) throw new RangeError(`baseMs must be positive, got ${this.baseMs}`);
    if (!(this.capMs >= this.baseMs)) throw new RangeError(`capMs (${this.capMs}) must be at least baseMs (${this.baseMs})`);
    if (!(this.factor >= 1)) throw new RangeError(`factor must be at least 1, got ${this.factor}`);
  }

  /** How many delays were handed out since the last `reset`. */
  get attempt(): number {
    return this.attemptCount;
  }

  /** The largest delay the `attempt`-th delay may take: `min(cap, base * factor**attempt)`. */
  ceiling(attempt: number): number {
    const c = this.baseMs * Math.pow(this.factor, attempt);
    return Number.isFinite(c) ? Math.min(c, this.capMs) : this.capMs;
  }

  /** The next delay in ms, in `[ceiling/2, ceiling)`; counts one attempt. */
  next(): number {
    const r = Math.min(Math.max(this.rand(), 0), 1);
    const delay = this.ceiling(this.attemptCount) * (0.5 + 0.5 * r);
    this.attemptCount++;
    return delay;
  }

  /** Start over from `baseMs`, once a connection has stayed up for a while. */
  reset(): void {
    this.attemptCount = 0;
  }
}
