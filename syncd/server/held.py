"""Recording the queries clients hold, for `syncd migrate --dry-run` (`syncd.core.held`).

A background task, never on the path of a subscription or a transaction: every `period_s` it
writes the replica's held texts to the journal's meta if the set of texts changed since the
last write, so a server writes at most once a period whatever its clients do. The record is
built off the event loop. A write that fails is logged and tried again at the next change; it
never stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from syncd.core.held import MAX_BYTES, MAX_QUERIES, HeldQueries, build_record, encode_record

logger = logging.getLogger("syncd.held")

#: Seconds between writes of the record, at most one each (`--held-queries-every`).
DEFAULT_PERIOD_S = 5.0


class HeldRecorder:
    """Writes `held` through `write` (None deletes the record) when it changed.

    Args:
        held: the replica's `HeldQueries`.
        write: stores the encoded record (the journal's or the lease's `set_meta`).
        schema_version: the stored schema version the queries were compiled under.
        period_s: at most one write per period.
        clock: monotonic seconds (a test passes a fake one).
        wall_us: the wall clock in µs (the record's `written_us`).
    """

    def __init__(
        self,
        held: HeldQueries,
        write: Callable[[bytes | None], Awaitable[None]],
        *,
        schema_version: Callable[[], int],
        period_s: float = DEFAULT_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
        wall_us: Callable[[], int] = lambda: time.time_ns() // 1000,
        max_queries: int = MAX_QUERIES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.held = held
        self._write = write
        self._schema_version = schema_version
        self.period_s = period_s
        self._clock = clock
        self._wall_us = wall_us
        self._max_queries = max_queries
        self._max_bytes = max_bytes
        # `held.changes` when last written (None: never written), and when.
        self._written: int | None = None
        self._written_at = float("-inf")
        self.writes = 0
        self._task: asyncio.Task[None] | None = None

    async def flush(self) -> bool:
        """Write the record now if the set of texts changed since the last write and the last
        write is a period old. Returns whether it wrote. Raises what `write` raises."""
        changes = self.held.changes
        if changes == self._written:
            return False
        now = self._clock()
        if now - self._written_at < self.period_s:
            return False
        # Copy in this tick (the dict changes under the loop); sort and encode off it.
        items = list(self.held.counts.items())
        written_us, version = self._wall_us(), self._schema_version()

        def encode() -> bytes:
            record = build_record(
                items,
                written_us=written_us,
                schema_version=version,
                max_queries=self._max_queries,
                max_bytes=self._max_bytes,
            )
            return encode_record(record)

        data = await asyncio.to_thread(encode) if len(items) > 200 else encode()
        # Counted as written before the write: a failing storage is tried again only at the
        # next change and a period later, never in a loop.
        self._written, self._written_at = changes, now
        self.writes += 1
        await self._write(data)
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="held-queries")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("recording the queries clients hold failed: %s", exc)

    async def stop(self, *, delete: bool = False) -> None:
        """Stop writing. With `delete` the record is removed (a replica whose clients go
        elsewhere: they are recorded there); otherwise the last record stays (an embedded
        server: its clients subscribe to the same queries when it is back)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if delete and self._written is not None:
            try:
                await self._write(None)
            except Exception as exc:
                logger.warning("removing the record of held queries failed: %s", exc)
