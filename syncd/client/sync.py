"""A blocking client for scripts: `connect_sync` runs a `Connection` on an event loop of its
own, in a background thread, and waits for each answer.

::

    with syncd.client.connect_sync("ws://127.0.0.1:3000") as conn:
        conn.call("send_message", "hello")
        sub = conn.subscribe("SELECT * FROM message")
        rows = sub.wait_for(lambda rows: len(rows) >= 3, timeout=10)
        print(conn.sql("SELECT COUNT(*) AS n FROM message"))

Everything the async client does happens on that thread: reconnecting, resuming, the cache.
Each method here hands its work to the loop and blocks until it is done, at most `timeout`
seconds (`TimeoutError` after that; the request is cancelled). Reads of the cache
(`rows`, `find`, `filter`, `SyncSubscription.rows`) run on the loop too, so they never see a
transaction half applied. `close` (or leaving the ``with`` block) closes the connection, stops
the loop and joins the thread: nothing is left running. Callbacks given to the async API
(``conn.connection.db[...].on_insert``) run on the loop's thread, not the caller's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from syncd.client.cache import _MISSING
from syncd.client.connection import CallResult, Connection, Subscription, connect
from syncd.client.schema import Row
from syncd.core.ids import Identity, Offset
from syncd.errors import ConnectionClosed

__all__ = ["SyncConnection", "SyncSubscription", "connect_sync"]

T = TypeVar("T")

#: Default seconds a blocking method waits for its answer.
DEFAULT_TIMEOUT = 30.0
# How often `wait_for` looks at the set's state besides after each change (it fails at once
# when the set fails or the connection ends; those need not change a row).
_RECHECK = 0.25
_DEFAULT: Any = object()


class SyncSubscription:
    """A query set of a `SyncConnection`: its rows, a blocking wait on them, and `close`."""

    def __init__(self, owner: SyncConnection, subscription: Subscription) -> None:
        self._owner = owner
        #: The async `Subscription` (use it only on the connection's loop).
        self.subscription = subscription

    def __repr__(self) -> str:
        return f"<SyncSubscription {self.subscription!r}>"

    @property
    def state(self) -> str:
        """ "live", "pending", "failed" (see `error`) or "ended"."""
        return self.subscription.state

    @property
    def error(self) -> Exception | None:
        """Why the server dropped the set, when `state` is "failed"."""
        return self.subscription.error

    def rows(self) -> list[Row]:
        """The rows the set's queries return now (see `Subscription.rows`)."""
        return self._owner._on_loop(self.subscription.rows)

    def wait_for(
        self, predicate: Callable[[list[Row]], object], timeout: float = DEFAULT_TIMEOUT
    ) -> list[Row]:
        """Block until ``predicate(rows)`` is true for the set's rows; return those rows.

        `predicate` runs on the connection's thread, once now and after every change of the
        cache, with the rows as `rows` returns them.

        Raises:
            TimeoutError: still false after `timeout` seconds.
            SubscriptionError: the server dropped the set meanwhile (`error`).
            ConnectionClosed: the connection ended for good, or the set was closed.
        """
        coro = self._wait(predicate, timeout)
        return self._owner._run(coro, timeout + 5.0)

    async def _wait(self, predicate: Callable[[list[Row]], object], seconds: float) -> list[Row]:
        sub = self.subscription
        conn = sub.connection
        changed = asyncio.Event()
        on_commit = conn._cache.on_commit(changed.set)
        on_applied = sub.on_applied(lambda _: changed.set())
        rows: list[Row] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        try:
            while True:
                rows = sub.rows()
                if predicate(rows):
                    return rows
                if sub.state == "failed" and sub.error is not None:
                    raise sub.error
                if sub.state in ("failed", "ended") or conn.closed:
                    raise ConnectionClosed(
                        conn.close_code or 1000, conn.close_reason or "the query set ended"
                    )
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(
                        f"wait_for: the predicate was still false after {seconds:g}s "
                        f"({len(rows)} rows)"
                    )
                changed.clear()
                # One timer at a time (no nesting): a wake-up per change, or a re-check.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(_RECHECK, left))
        finally:
            on_commit()
            on_applied()

    def close(self) -> None:
        """Unsubscribe (its rows leave the cache unless another set returns them). Idempotent."""
        if self._owner.closed:
            return
        self._owner._run(self.subscription.unsubscribe(), self._owner.timeout)

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncConnection:
    """A `Connection` driven from synchronous code; create it with `connect_sync`.

    Attributes:
        timeout: default seconds each blocking method waits (None: no limit).
        connection: the async `Connection` (use it only on `loop`, e.g. through
            ``asyncio.run_coroutine_threadsafe``).
        loop: the event loop the connection runs on, in a thread of its own.
    """

    def __init__(self, url: str | Sequence[str], timeout: float | None, kwargs: Any) -> None:
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="syncd-client-sync", daemon=True)
        self._thread.start()

        async def open_connection() -> Connection:
            return await connect(url, **kwargs)

        try:
            self.connection: Connection = self._run(open_connection(), timeout)
        except BaseException:
            self._stop()
            raise

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def __repr__(self) -> str:
        return f"<SyncConnection {getattr(self, 'connection', None)!r}>"

    # -- running on the loop ------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = _DEFAULT) -> T:
        if timeout is _DEFAULT:
            timeout = self.timeout
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a blocking syncd call from the connection's own thread (a callback) would "
                "wait forever; use the async API there (SyncConnection.connection)"
            )
        if self._closed or not self._thread.is_alive():
            coro.close()
            raise ConnectionClosed(1000, "the connection was closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            concurrent.futures.wait([future], timeout)
            if not future.done():
                future.cancel()
                raise TimeoutError(f"no answer within {timeout:g}s")
            return future.result()
        except BaseException:
            future.cancel()  # KeyboardInterrupt while waiting: stop the request too
            raise

    def _on_loop(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self._run(run())

    # -- the API ------------------------------------------------------------------------------

    @property
    def identity(self) -> Identity:
        """Who the server says we are (hex)."""
        return self.connection.identity

    @property
    def writer_id(self) -> str:
        """The writer id of `set_lww` and `increment`."""
        return self.connection.writer_id

    @property
    def is_connected(self) -> bool:
        """True while a socket is up (False while reconnecting)."""
        return self.connection.is_connected

    @property
    def closed(self) -> bool:
        """True after `close`, or once the connection ended for good."""
        return self._closed or self.connection.closed

    def call(
        self,
        reducer: str,
        *args: Any,
        idempotency_key: str | None = None,
        timeout: float | None = _DEFAULT,
    ) -> CallResult:
        """`Connection.call`, blocking (at most `timeout` seconds, default `self.timeout`)."""
        return self._run(
            self.connection.call(reducer, *args, idempotency_key=idempotency_key), timeout
        )

    def merge(
        self, table: str, pk: Any, column: str, op: Any, *, timeout: float | None = _DEFAULT
    ) -> Offset | None:
        """`Connection.merge`, blocking."""
        return self._run(self.connection.merge(table, pk, column, op), timeout)

    def set_lww(
        self, table: str, pk: Any, column: str, value: Any, *, timeout: float | None = _DEFAULT
    ) -> Offset | None:
        """`Connection.set_lww`, blocking."""
        return self._run(self.connection.set_lww(table, pk, column, value), timeout)

    def increment(
        self, table: str, pk: Any, column: str, by: int = 1, *, timeout: float | None = _DEFAULT
    ) -> Offset | None:
        """`Connection.increment`, blocking."""
        return self._run(self.connection.increment(table, pk, column, by), timeout)

    def sql(self, query: str, *, timeout: float | None = _DEFAULT) -> list[Row]:
        """`Connection.sql`, blocking."""
        return self._run(self.connection.sql(query), timeout)

    def ping(self, *, timeout: float | None = _DEFAULT) -> float:
        """`Connection.ping`, blocking (raises `NotConnected` at once while reconnecting)."""
        return self._run(self.connection.ping(), timeout)

    def subscribe(
        self, queries: str | Sequence[str], *, timeout: float | None = _DEFAULT
    ) -> SyncSubscription:
        """`Connection.subscribe`, blocking until the initial rows are in the cache."""
        sub = self._run(self.connection.subscribe(queries), timeout)
        return SyncSubscription(self, sub)

    def rows(self, table: str) -> list[Row]:
        """Every cached row of `table`."""
        return self._on_loop(lambda: self.connection.db[table].rows())

    def find(self, table: str, key_or_column: Any, value: Any = _MISSING) -> Row | None:
        """`TableCache.find` on `table`: ``find(table, pk)`` or ``find(table, column, value)``."""
        return self._on_loop(lambda: self.connection.db[table].find(key_or_column, value))

    def filter(self, table: str, column: str, value: Any) -> list[Row]:
        """`TableCache.filter` on `table`."""
        return self._on_loop(lambda: self.connection.db[table].filter(column, value))

    def close(self) -> None:
        """Close the connection, stop the loop and join its thread. Idempotent."""
        if self._closed:
            return
        self._stop()

    def _stop(self) -> None:
        self._closed = True
        if self._thread.is_alive():
            conn: Connection | None = getattr(self, "connection", None)
            future = asyncio.run_coroutine_threadsafe(self._shutdown(conn), self.loop)
            future.result()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()

    async def _shutdown(self, conn: Connection | None) -> None:
        if conn is not None:
            await conn.close()
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loop.shutdown_asyncgens()
        await self.loop.shutdown_default_executor()

    def __enter__(self) -> SyncConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect_sync(
    url: str | Sequence[str], *, timeout: float | None = DEFAULT_TIMEOUT, **kwargs: Any
) -> SyncConnection:
    """Connect with a blocking API: ``with connect_sync(url) as conn: conn.call(...)``.

    Args:
        url: as for `connect`.
        timeout: default seconds each blocking method (and connecting) waits; None: no limit.
        **kwargs: `connect`'s keyword arguments (``token``, ``merge_state``, ``fmt``, ...).

    Raises:
        As `connect` does; `TimeoutError` when connecting takes over `timeout`. Nothing is
        left running when it raises.
    """
    return SyncConnection(url, timeout, kwargs)
