"""RedisRateLimiter: per-key token buckets shared by every replica through Redis.

The same buckets as `syncd.core.ratelimit.RateLimiter` (at most `rate` events a second on
average, in bursts of up to `burst`), kept in Redis so that an identity connected to several
replicas gets one budget, not one per replica. Each `allow` is one round trip: a Lua script
(EVALSHA; EVAL when Redis does not know the script yet, which also caches it) reads the
bucket, refills it for the time elapsed, takes a token and writes it back atomically. A bucket
key expires when the bucket would be full again, so Redis memory follows the active keys.

When Redis cannot be reached, `allow` answers from an in-process `RateLimiter` with the same
settings (each replica then enforces the limit on its own: the shared budget is exceeded by
at most the number of replicas, for the length of the outage), logs that once per outage, and
tries Redis again after `retry_after` seconds. It never raises for network errors.
"""

from __future__ import annotations

import hashlib
import logging
import time

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from syncd.core.ratelimit import RateLimiter

__all__ = ["RedisRateLimiter"]

logger = logging.getLogger("syncd.redis")

# KEYS[1]: the bucket (a hash: tokens, updated). ARGV: rate, burst, now ("" = Redis's clock).
# Returns 1 when a token was taken, 0 when the bucket is empty.
_TOKEN_BUCKET = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
if tokens == nil or updated == nil then
  tokens = burst
  updated = now
elseif now > updated then
  tokens = math.min(burst, tokens + (now - updated) * rate)
  updated = now
end
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'updated', updated)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000))
return taken
"""
_TOKEN_BUCKET_SHA = hashlib.sha1(_TOKEN_BUCKET.encode()).hexdigest()


class RedisRateLimiter:
    """Token buckets in Redis, one per key, with an in-process fallback. See the module doc.

    Args:
        url: the Redis URL (`redis://host:port/db`, `rediss://...`, `unix://...`).
        rate: tokens added per second; 0 or less: no limit (and no Redis traffic).
        burst: bucket size; at least 1.
        prefix: prepended to every key in Redis.
        timeout: seconds to connect or to wait for an answer before falling back.
        retry_after: seconds to stay in-process after a failure before trying Redis again,
            so an outage costs one timeout per `retry_after`, not one per call.

    Counters: `fallbacks` (calls answered in-process), `outages` (times Redis was lost).
    """

    def __init__(
        self,
        url: str,
        rate: float,
        burst: float,
        *,
        prefix: str = "syncd:rl:",
        timeout: float = 0.5,
        retry_after: float = 1.0,
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.prefix = prefix
        self._retry_after = retry_after
        # No redis-py retries: a failed call falls back at once instead of sleeping.
        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        # Answers while Redis is unreachable (its buckets start full at each outage).
        self._local = RateLimiter(rate, self.burst)
        # True from a failed call until the next successful one.
        self._down = False
        # While down: when (time.monotonic()) to try Redis again.
        self._retry_at = 0.0
        self.fallbacks = 0
        self.outages = 0

    @property
    def shared(self) -> bool:
        """Whether the last answer came from Redis (False during an outage)."""
        return not self._down

    async def allow(self, key: str, now: float | None = None) -> bool:
        """Take one token from `key`'s bucket; False if it is empty.

        Args:
            key: whose bucket (an identity).
            now: the time in seconds. None: Redis's clock, shared by every replica (and
                `time.monotonic()` for the in-process fallback). Pass it only from one clock
                for all callers of a key; key expiry runs on Redis's clock either way.

        Never raises for network errors: during an outage the answer is in-process.
        """
        if self.rate <= 0:
            return True
        clock = time.monotonic()
        if self._down and clock < self._retry_at:
            return self._allow_locally(key, now, clock)
        args = (self.rate, self.burst, "" if now is None else repr(now))
        try:
            try:
                taken = await self._redis.evalsha(_TOKEN_BUCKET_SHA, 1, self.prefix + key, *args)
            except NoScriptError:  # a new or restarted Redis: EVAL also caches it
                taken = await self._redis.eval(_TOKEN_BUCKET, 1, self.prefix + key, *args)
        except (RedisError, OSError) as exc:
            if not self._down:
                self._down = True
                self.outages += 1
                logger.warning(
                    "rate limits: Redis unreachable (%s); limiting in-process until it is back",
                    exc,
                )
            self._retry_at = clock + self._retry_after
            return self._allow_locally(key, now, clock)
        if self._down:
            self._down = False
            logger.info("rate limits: Redis is back; limits are shared again")
        return bool(taken == 1)

    def _allow_locally(self, key: str, now: float | None, clock: float) -> bool:
        self.fallbacks += 1
        return self._local.allow(key, clock if now is None else now)

    async def aclose(self) -> None:
        """Close the connections. Idempotent."""
        await self._redis.aclose()

    async def __aenter__(self) -> RedisRateLimiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
