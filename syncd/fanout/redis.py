"""RedisBroker: committed transactions from the leader to every replica through Redis pub/sub.

Guarantees (see `syncd.ports.Broker`): local handlers get every published transaction
synchronously inside `publish`, in order, exactly once. Other processes get them later, in
publish order, **at most once**: Redis pub/sub drops messages while a subscriber is
disconnected, when Redis restarts, when a subscriber is too slow (Redis closes it at
`client-output-buffer-limit pubsub`), and this broker drops the oldest queued copies when its
queue is full while Redis is down. Replicas detect the gap by offset and read the missing range
from the journal, so nothing here retries or acknowledges. A frame whose write failed is not
re-sent either (Redis may have delivered it already: re-sending could deliver it twice).

Transport:

* Sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`, Redis >= 7) when the server has it, else classic
  `PUBLISH`/`SUBSCRIBE`; each connection finds out by trying the sharded command first
  (`sharded=None`), or is told (`sharded=True/False`). Every replica must see the same server
  (or cluster node): cluster routing of the channel's slot is not implemented.
* Frames are MessagePack (msgspec): `[instance, [[offset, payload], ...]]`, `payload` being the
  journal encoding (`core.tx.encode_tx`). A sender task takes everything queued since its last
  write and sends it as one frame (split at `max_frame_bytes`, the parts pipelined in one
  write), so the leader pays one Redis round trip per tick, not per transaction. Frames from
  this broker's own `instance` are skipped on receipt (its handlers already had them).
* Both tasks reconnect by themselves with capped exponential backoff and jitter. The receiving
  connection PINGs Redis after `health_interval` seconds of silence and gives the connection
  up when no answer comes within `health_timeout`, so a hung (paused) Redis is noticed too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from syncd.core.tx import Tx

__all__ = ["RedisBroker"]

logger = logging.getLogger("syncd.redis")

#: A frame on the channel: (sending instance, [(offset, payload), ...]).
_encoder = msgspec.msgpack.Encoder()
# The head first: frames from this instance are skipped without decoding their payloads.
_head_decoder = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])
_entries_decoder = msgspec.msgpack.Decoder(list[tuple[int, bytes]])

# Errors that mean "the connection or the server is not usable right now".
_NETWORK_ERRORS = (RedisError, OSError)


class Backoff:
    """Capped exponential backoff with jitter: the n-th delay is uniform in [d/2, d] with
    d = min(cap, base * 2**n), so replicas that lost Redis together do not return together."""

    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap
        # Failures since the last success.
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * float(1 << min(self.attempt, 32)))
        self.attempt += 1
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0


class RedisBroker:
    """Fan-out between replicas through one Redis channel. At most once; see the module doc.

    Args:
        url: `redis://[user:password@]host:port/db`, `rediss://...` or `unix://...`.
        decode: turns a journal payload back into a `Tx` (`lambda b: decode_tx(schema, b)`).
            A payload it cannot decode (it raises) is logged and skipped: a gap, as if dropped.
        instance: this replica's name, unique among the replicas on this channel.
        channel: the pub/sub channel; one per database.
        sharded: True: SPUBLISH/SSUBSCRIBE; False: PUBLISH/SUBSCRIBE; None: sharded when the
            server knows the commands.
        max_queue: transactions kept for Redis while it is down or slow; beyond it the oldest
            are dropped (counted in `dropped`).
        max_frame_bytes: payload bytes per frame before a tick's batch is split.
        timeout: seconds to connect, and to wait for Redis to answer a publish.
        health_interval: seconds of silence on the subscription before it is PINGed.
        health_timeout: seconds to wait for that PING's answer before reconnecting.
        backoff_base, backoff_cap: reconnect delays (seconds), see `Backoff`.
        flush_timeout: how long `aclose` lets the sender write what is still queued.

    Counters for operators (monotonic): `published` (transactions Redis accepted),
    `dropped` (transactions never handed to Redis: queue overflow, or a failed write),
    `received` (transactions from other instances delivered to the handlers),
    `reconnects` (times either connection came back after being lost), `frames_published`,
    `frames_received`, `bad_frames` (frames or payloads that did not decode).
    """

    def __init__(
        self,
        url: str,
        *,
        decode: Callable[[bytes], Tx],
        instance: str,
        channel: str = "syncd:tx",
        sharded: bool | None = None,
        max_queue: int = 100_000,
        max_frame_bytes: int = 1 << 20,
        timeout: float = 2.0,
        health_interval: float = 1.0,
        health_timeout: float = 3.0,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
        flush_timeout: float = 1.0,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.url = url
        self.instance = instance
        self.channel = channel
        self._decode = decode
        self._timeout = timeout
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._flush_timeout = flush_timeout
        self._max_frame_bytes = max_frame_bytes
        # The channel name as Redis sends it back in messages.
        self._channel_bytes = channel.encode()
        # Connection settings (URL + ours); each task makes its own connection from it.
        # No redis-py retries: the tasks own reconnecting, with their own backoff.
        self._pool = ConnectionPool.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=re.sub(r"[^\w.:-]", "_", f"syncd:{instance}"),
        )
        # The subscriber parses RESP2 pub/sub replies, whatever the URL asks for.
        self._pool.connection_kwargs["protocol"] = 2
        self._pool.connection_kwargs["decode_responses"] = False
        # Which commands each side uses: None until its connection has found out.
        self._sharded_config = sharded
        self.publish_sharded: bool | None = sharded
        self.subscribe_sharded: bool | None = sharded
        # Called in subscription order for every transaction, local or remote.
        self._handlers: list[Callable[[Tx], None]] = []
        # Remote copies waiting for the sender: (offset, payload), oldest first.
        self._queue: deque[tuple[int, bytes]] = deque(maxlen=max_queue)
        # Set when the queue gains something, or on close.
        self._wakeup = asyncio.Event()
        # True while the receiving subscription is live.
        self._connected = False
        # True while the sender holds a working connection.
        self._sender_connected = False
        # Set after the receiver's first attempt (success or failure), for `start`.
        self._first_attempt = asyncio.Event()
        # True once the queue overflowed during the current outage (log once per outage).
        self._dropping = False
        self._sender: asyncio.Task[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self.published = 0
        self.dropped = 0
        self.received = 0
        self.reconnects = 0
        self.frames_published = 0
        self.frames_received = 0
        self.bad_frames = 0

    # -- the Broker port ---------------------------------------------------------------------

    def subscribe(self, handler: Callable[[Tx], None]) -> None:
        """Call `handler` for every transaction published here or by another instance.

        Handlers run on the event loop, one at a time, in the order transactions were
        published here or received; never concurrently.
        """
        self._handlers.append(handler)

    async def start(self) -> None:
        """Start the sender and receiver tasks.

        Waits for the first subscription attempt (at most about `timeout` seconds), so that
        when Redis is up the subscription is live on return; when it is down, returns anyway
        and keeps retrying in the background. Calling it again does nothing.
        """
        if self._receiver is not None or self._closing:
            return
        loop = asyncio.get_running_loop()
        self._receiver = loop.create_task(self._receive_loop(), name=f"redis-rx-{self.instance}")
        self._sender = loop.create_task(self._send_loop(), name=f"redis-tx-{self.instance}")
        waiter = loop.create_task(self._first_attempt.wait())
        await asyncio.wait([waiter], timeout=self._timeout + 1.0)
        waiter.cancel()

    async def publish(self, txs: list[Tx], payloads: list[bytes]) -> None:
        """Deliver `txs` to the local handlers now, and queue their payloads for Redis.

        Never waits on the network and never raises for network errors: the remote copy goes
        to the sender task, which writes it in the next batch, or drops it (oldest first) if
        the queue is full while Redis is down. Exceptions of local handlers propagate, as
        with `MemoryBroker`; the remote copies are queued regardless.

        Raises:
            ValueError: `txs` and `payloads` differ in length.
        """
        if len(txs) != len(payloads):
            raise ValueError(f"{len(txs)} transactions but {len(payloads)} payloads")
        try:
            for tx in txs:
                for handler in self._handlers:
                    handler(tx)
        finally:
            if not self._closing:
                self._enqueue(txs, payloads)

    @property
    def connected(self) -> bool:
        """Whether the receiving subscription is live (False while Redis is down or hung)."""
        return self._connected

    async def aclose(self) -> None:
        """Write what is still queued (at most `flush_timeout` seconds, and only if Redis is
        reachable), then stop both tasks and close the connections. Idempotent; concurrent
        calls all return once closed."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._close_task)

    async def __aenter__(self) -> RedisBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- operator view -------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Transactions waiting for the sender."""
        return len(self._queue)

    # -- internals -----------------------------------------------------------------------

    def _enqueue(self, txs: list[Tx], payloads: list[bytes]) -> None:
        queue = self._queue
        maxlen = queue.maxlen
        assert maxlen is not None
        overflow = len(queue) + len(txs) - maxlen
        if overflow > 0:
            # The deque drops the oldest itself; count them.
            self.dropped += overflow
            if not self._dropping:
                self._dropping = True
                logger.warning(
                    "redis broker %s: queue full (%d), dropping the oldest transactions; "
                    "replicas will read them from the journal",
                    self.instance,
                    maxlen,
                )
        queue.extend(zip([tx.offset for tx in txs], payloads, strict=True))
        self._wakeup.set()

    def _new_connection(self) -> AbstractConnection:
        # redis-py leaves these two untyped.
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        return conn

    async def _close(self) -> None:
        self._closing = True
        self._wakeup.set()
        sender, receiver = self._sender, self._receiver
        if sender is not None and not sender.done():
            if self._sender_connected and self._queue:
                await asyncio.wait([sender], timeout=self._flush_timeout)
            sender.cancel()
        if receiver is not None:
            receiver.cancel()
        tasks = [t for t in (sender, receiver) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._connected = False
        self._handlers.clear()
        if self._queue:
            self.dropped += len(self._queue)
            self._queue.clear()

    # -- sending ---------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        backoff = Backoff(self._backoff_base, self._backoff_cap)
        conn: AbstractConnection | None = None
        ever_connected = False
        loop = asyncio.get_running_loop()
        last_reply = 0.0  # when Redis last answered on `conn`
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if conn is None:
                    if self._closing:
                        return
                    conn = self._new_connection()
                    try:
                        await conn.connect()  # type: ignore[no-untyped-call]
                    except _NETWORK_ERRORS as exc:
                        await conn.disconnect(nowait=True)
                        conn = None
                        delay = backoff.next_delay()
                        log = logger.warning if backoff.attempt == 1 else logger.debug
                        log(
                            "redis broker %s: cannot connect to publish (%s); retry in %.2fs",
                            self.instance,
                            exc,
                            delay,
                        )
                        await asyncio.sleep(delay)
                        continue
                    if ever_connected:
                        self.reconnects += 1
                        logger.info("redis broker %s: publishing again", self.instance)
                    ever_connected = True
                    backoff.reset()
                    self._sender_connected = True
                    last_reply = loop.time()
                idle = loop.time() - last_reply > self._health_interval
                if idle and not await _answers_ping(conn):
                    # Idle long enough for Redis to have gone away unnoticed (a restart):
                    # find out before writing, so this batch goes to the new connection
                    # instead of being lost with the old one.
                    logger.info("redis broker %s: publishing connection went stale", self.instance)
                    self._sender_connected = False
                    await conn.disconnect(nowait=True)
                    conn = None
                    continue
                entries = list(self._queue)
                self._queue.clear()
                try:
                    await self._publish_frames(conn, entries)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.dropped += len(entries)
                    self._sender_connected = False
                    await conn.disconnect(nowait=True)
                    conn = None
                    if not isinstance(exc, _NETWORK_ERRORS):  # a bug: log it, keep sending
                        logger.exception("redis broker %s: publishing failed", self.instance)
                        await asyncio.sleep(backoff.next_delay())
                        continue
                    logger.warning(
                        "redis broker %s: publish failed (%s); %d transactions dropped, "
                        "replicas will read them from the journal",
                        self.instance,
                        exc,
                        len(entries),
                    )
                    continue
                self.published += len(entries)
                self._dropping = False
                last_reply = loop.time()
        finally:
            self._sender_connected = False
            if conn is not None:
                await conn.disconnect(nowait=True)

    def _frames(self, entries: list[tuple[int, bytes]]) -> list[bytes]:
        frames: list[bytes] = []
        start = size = 0
        for i, (_, payload) in enumerate(entries):
            if size and size + len(payload) > self._max_frame_bytes:
                frames.append(_encoder.encode((self.instance, entries[start:i])))
                start, size = i, 0
            size += len(payload)
        frames.append(_encoder.encode((self.instance, entries[start:])))
        return frames

    async def _publish_frames(
        self, conn: AbstractConnection, entries: list[tuple[int, bytes]]
    ) -> None:
        frames = self._frames(entries)
        sharded = self.publish_sharded
        command = "PUBLISH" if sharded is False else "SPUBLISH"
        await self._write_frames(conn, command, frames)
        replies = await self._read_replies(conn, len(frames))
        errors = [r for r in replies if isinstance(r, ResponseError)]
        if errors and sharded is None and _is_unknown_command(errors[0]):
            # An older server: fall back to classic pub/sub, and send these again with it.
            self.publish_sharded = False
            logger.info("redis broker %s: no SPUBLISH on this server, using PUBLISH", self.instance)
            await self._write_frames(conn, "PUBLISH", frames)
            replies = await self._read_replies(conn, len(frames))
            errors = [r for r in replies if isinstance(r, ResponseError)]
        if errors:
            raise errors[0]
        if sharded is None:
            self.publish_sharded = command == "SPUBLISH"
        self.frames_published += len(frames)

    async def _write_frames(
        self, conn: AbstractConnection, command: str, frames: list[bytes]
    ) -> None:
        packed = conn.pack_commands([(command, self.channel, frame) for frame in frames])
        await conn.send_packed_command(packed, check_health=False)

    async def _read_replies(self, conn: AbstractConnection, n: int) -> list[Any]:
        replies: list[Any] = []
        for _ in range(n):
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    # -- receiving -------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        backoff = Backoff(self._backoff_base, self._backoff_cap)
        ever_connected = False
        while True:
            conn = self._new_connection()
            try:
                try:
                    await conn.connect()  # type: ignore[no-untyped-call]
                    await self._subscribe(conn)
                except _NETWORK_ERRORS as exc:
                    self._first_attempt.set()
                    delay = backoff.next_delay()
                    log = logger.warning if backoff.attempt == 1 else logger.debug
                    log(
                        "redis broker %s: cannot subscribe (%s); retry in %.2fs",
                        self.instance,
                        exc,
                        delay,
                    )
                    await conn.disconnect(nowait=True)
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                self._connected = True
                self._first_attempt.set()
                if ever_connected:
                    self.reconnects += 1
                    logger.info("redis broker %s: subscribed again", self.instance)
                ever_connected = True
                try:
                    await self._read_frames(conn)
                except _NETWORK_ERRORS as exc:
                    logger.warning(
                        "redis broker %s: subscription lost (%s); transactions published "
                        "meanwhile will be read from the journal",
                        self.instance,
                        exc,
                    )
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: log it, then start over like after a network error
                logger.exception("redis broker %s: receiver crashed; restarting", self.instance)
                await asyncio.sleep(backoff.next_delay())
            finally:
                self._connected = False
                await conn.disconnect(nowait=True)

    async def _subscribe(self, conn: AbstractConnection) -> None:
        if self.subscribe_sharded is not False:
            await conn.send_command("SSUBSCRIBE", self.channel, check_health=False)
            try:
                reply = await conn.read_response()
            except ResponseError as exc:
                if self._sharded_config is not None or not _is_unknown_command(exc):
                    raise
                logger.info(
                    "redis broker %s: no SSUBSCRIBE on this server, using SUBSCRIBE",
                    self.instance,
                )
                self.subscribe_sharded = False
            else:
                _check_subscribed(reply, b"ssubscribe", self.channel)
                self.subscribe_sharded = True
                return
        await conn.send_command("SUBSCRIBE", self.channel, check_health=False)
        _check_subscribed(await conn.read_response(), b"subscribe", self.channel)

    async def _read_frames(self, conn: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        ping_sent: float | None = None  # when the health PING went out, if unanswered
        while True:
            message = await conn.read_response(timeout=self._health_interval)
            if message is None:  # silence for health_interval seconds
                now = loop.time()
                if ping_sent is None:
                    await conn.send_command("PING", check_health=False)
                    ping_sent = now
                elif now - ping_sent >= self._health_timeout:
                    raise RedisError(f"no answer to PING within {self._health_timeout:.1f}s")
                continue
            ping_sent = None
            if not isinstance(message, list) or not message:
                continue  # b"PONG" outside subscribed mode: alive, nothing to do
            kind = message[0]
            if kind in (b"smessage", b"message") and len(message) == 3:
                if message[1] == self._channel_bytes:
                    self._on_frame(message[2])
            elif kind in (b"sunsubscribe", b"unsubscribe"):
                # Redis took the subscription away (e.g. the slot moved): subscribe afresh.
                raise RedisError(f"redis ended the subscription ({kind.decode()})")

    def _on_frame(self, data: bytes) -> None:
        try:
            instance, raw = _head_decoder.decode(data)
            if instance == self.instance:
                return  # ours: the local handlers had these inside publish
            entries = _entries_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            self.bad_frames += 1
            logger.warning("redis broker %s: skipping a malformed frame: %s", self.instance, exc)
            return
        self.frames_received += 1
        for offset, payload in entries:
            try:
                tx = self._decode(payload)
            except Exception as exc:  # the replica sees the gap and reads the journal
                self.bad_frames += 1
                logger.warning(
                    "redis broker %s: skipping offset %d, its payload does not decode: %s",
                    self.instance,
                    offset,
                    exc,
                )
                continue
            self.received += 1
            for handler in self._handlers:
                try:
                    handler(tx)
                except Exception:  # one handler's bug must not stop delivery to the others
                    logger.exception(
                        "redis broker %s: handler %r failed on offset %d",
                        self.instance,
                        handler,
                        offset,
                    )


async def _answers_ping(conn: AbstractConnection) -> bool:
    try:
        await conn.send_command("PING", check_health=False)
        await conn.read_response()
    except _NETWORK_ERRORS:
        return False
    return True


def _is_unknown_command(exc: ResponseError) -> bool:
    return "unknown command" in str(exc).lower()


def _check_subscribed(reply: Any, kind: bytes, channel: str) -> None:
    if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == kind):
        raise RedisError(f"unexpected reply to {kind.decode().upper()} {channel}: {reply!r}")
