"""RedisBroker and RedisRateLimiter against a real, throwaway redis-server.

Each test owns its server (`redis_server`), so it can stop, kill, restart and pause it.
Transactions are real `Tx` objects of a tiny schema, encoded and decoded with the journal
codec (`encode_tx`/`decode_tx`), as the server does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import pytest
from redis.asyncio import Redis

import syncd
from syncd.core.ids import Offset, Timestamp
from syncd.core.schema import Schema, load_schema
from syncd.core.store import ChangeSet
from syncd.core.tx import Tx, decode_tx, encode_tx
from syncd.fanout.redis import Backoff, RedisBroker
from syncd.fanout.redis_limits import RedisRateLimiter
from tests.services.redis import RedisServer
from tests.transport.wire import eventually
from tests.utils import MS

pytestmark = pytest.mark.integration


@syncd.table(public=True)
class Note:
    key: str = syncd.primary_key()
    text: str = ""


SCHEMA: Schema = load_schema({"Note": Note})
decode = partial(decode_tx, SCHEMA)


def make_tx(offset: int, text: str = "") -> Tx:
    """One insert into Note, recognisable by its offset."""
    row = (f"k{offset}", text or f"note {offset}")
    return Tx(
        offset=Offset(offset),
        timestamp=Timestamp(1_700_000_000_000_000 + offset),
        changes=ChangeSet({"note": {row[0]: (None, row)}}),
        reducer="put",
    )


async def publish(broker: RedisBroker, offsets: range | list[int], text: str = "") -> list[Tx]:
    """Publish one batch; return its transactions."""
    txs = [make_tx(o, text) for o in offsets]
    await broker.publish(txs, [encode_tx(SCHEMA, tx) for tx in txs])
    return txs


class Node:
    """A broker plus the offsets its handler saw, in order."""

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.txs: list[Tx] = []
        broker.subscribe(self.txs.append)

    @property
    def offsets(self) -> list[int]:
        return [tx.offset for tx in self.txs]


MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node(redis_server: RedisServer) -> AsyncIterator[MakeNode]:
    """Start brokers on the test's Redis with fast health checks and reconnects."""
    nodes: list[Node] = []

    async def make(instance: str, **options: object) -> Node:
        settings: dict[str, object] = dict(
            timeout=500 * MS,
            health_interval=50 * MS,
            health_timeout=200 * MS,
            backoff_base=10 * MS,
            backoff_cap=100 * MS,
        )
        settings.update(options)
        node = Node(RedisBroker(redis_server.url, decode=decode, instance=instance, **settings))  # type: ignore[arg-type]
        nodes.append(node)
        await node.broker.start()
        return node

    yield make
    for node in nodes:
        await node.broker.aclose()


# -- delivery --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
async def test_every_broker_gets_each_transaction_once_in_order(
    make_node: MakeNode, n: int
) -> None:
    """What one broker publishes reaches every other broker's handlers once, in order, and its
    own handlers once (synchronously, never again from Redis); a second publisher too."""
    nodes = [await make_node(f"replica-{i}") for i in range(n)]
    assert all(node.broker.connected for node in nodes)
    first, last = nodes[0], nodes[-1]

    sent: list[Tx] = []
    for start in range(1, 31, 10):  # three batches, with the loop running in between
        batch = await publish(first.broker, range(start, start + 10))
        sent += batch
        assert first.txs == sent  # local delivery happened inside publish
        await asyncio.sleep(0)
    for node in nodes[1:]:
        await eventually(lambda node=node: len(node.txs) >= 30, what=f"{node.broker.instance}")
        assert node.txs == sent  # equal Tx objects, decoded from the journal payloads

    # Another publisher (a new leader). Its frame is published after all of the first one's
    # had been delivered, so when it arrives everywhere nothing of the first can still come.
    sent += await publish(last.broker, [31, 32])
    for node in nodes:
        await eventually(lambda node=node: len(node.txs) >= 32, what=f"{node.broker.instance}")
    for node in nodes:
        assert node.offsets == list(range(1, 33)), node.broker.instance
        assert node.txs == sent
    assert first.broker.published == 30 and last.broker.published == 2
    assert 1 <= first.broker.frames_published <= 3  # batches queued meanwhile share a frame
    assert first.broker.publish_sharded and first.broker.subscribe_sharded  # Redis 7
    assert last.broker.received == 30 and first.broker.received == 2


async def test_publishes_in_one_tick_go_out_as_one_frame(make_node: MakeNode) -> None:
    """Everything published in one tick of the event loop is one Redis message."""
    a = await make_node("a")
    b = await make_node("b")
    await publish(a.broker, [1])
    await eventually(lambda: len(b.txs) >= 1)
    frames = a.broker.frames_published
    for offset in range(2, 12):  # ten publishes, no yield to the loop in between
        await publish(a.broker, [offset])
    await eventually(lambda: len(b.txs) >= 11)
    assert b.offsets == list(range(1, 12))
    assert a.broker.frames_published == frames + 1
    assert b.broker.frames_received == frames + 1


async def test_big_batches_are_split_into_pipelined_frames(make_node: MakeNode) -> None:
    """A tick's batch larger than max_frame_bytes goes out as several frames, still in order."""
    a = await make_node("a", max_frame_bytes=1000)
    b = await make_node("b")
    sent = await publish(a.broker, range(1, 201), text="x" * 100)
    await eventually(lambda: len(b.txs) >= 200)
    assert b.txs == sent
    assert a.broker.frames_published > 10
    assert b.broker.frames_received == a.broker.frames_published


async def test_classic_pub_sub_when_asked(make_node: MakeNode) -> None:
    """sharded=False uses PUBLISH/SUBSCRIBE, for servers without sharded pub/sub."""
    a = await make_node("a", sharded=False)
    b = await make_node("b", sharded=False)
    sent = await publish(a.broker, range(1, 6))
    await eventually(lambda: len(b.txs) >= 5)
    assert b.txs == sent
    assert a.broker.publish_sharded is False and b.broker.subscribe_sharded is False


async def test_bad_frames_and_payloads_are_skipped(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """A frame that is not ours, or a payload that does not decode, is logged and skipped (a
    gap the replica repairs); delivery goes on with the next one."""
    import msgspec

    b = await make_node("b")
    redis = Redis.from_url(redis_server.url)
    try:
        await redis.spublish("syncd:tx", b"\xc1 not msgpack")
        good = encode_tx(SCHEMA, make_tx(2))
        frame = msgspec.msgpack.encode(("other", [(1, b"garbage"), (2, good)]))
        await redis.spublish("syncd:tx", frame)
    finally:
        await redis.aclose()
    await eventually(lambda: len(b.txs) >= 1)
    assert b.offsets == [2]
    assert b.broker.bad_frames == 2


async def test_a_failing_remote_handler_does_not_stop_delivery(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler raising on a received transaction is logged; later ones still arrive."""
    a = await make_node("a")
    b = await make_node("b")

    def explode(tx: Tx) -> None:
        if tx.offset == 1:
            raise RuntimeError("handler bug")

    b.broker.subscribe(explode)
    await publish(a.broker, [1])
    await publish(a.broker, [2])
    await eventually(lambda: len(b.txs) >= 2)
    assert b.offsets == [1, 2]
    assert "handler" in caplog.text and "offset 1" in caplog.text


# -- Redis down, restarted, hung -------------------------------------------------------------


async def test_publish_stays_local_and_fast_while_redis_is_down(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """With Redis stopped, publish delivers locally and returns without waiting on the network;
    the remote copies beyond max_queue are dropped (oldest first) and counted."""
    a = await make_node("a", max_queue=100)
    redis_server.stop()
    await eventually(lambda: not a.broker.connected, what="connected goes False")

    started = time.monotonic()
    for offset in range(1, 1001):
        await publish(a.broker, [offset])
    elapsed = time.monotonic() - started
    assert a.offsets == list(range(1, 1001))
    assert a.broker.queued <= 100
    assert a.broker.dropped >= 900
    # Not a benchmark: only "it did not wait for connect timeouts" (1,000 of them would be
    # minutes); it takes a few milliseconds.
    assert elapsed < 5.0


async def test_start_returns_while_redis_is_down_and_connects_later(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """start() returns with Redis down; the broker keeps trying and subscribes once it is up."""
    redis_server.stop()
    a = await make_node("a")
    b = await make_node("b")
    assert not a.broker.connected and not b.broker.connected
    redis_server.start()
    await eventually(lambda: a.broker.connected and b.broker.connected)
    sent = await publish(a.broker, [1])
    await eventually(lambda: len(b.txs) >= 1)
    assert b.txs == sent


@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_brokers_reconnect_after_redis_comes_back(
    make_node: MakeNode, redis_server: RedisServer, how: str
) -> None:
    """After Redis restarts (cleanly or after SIGKILL), both brokers reconnect by themselves
    and later publishes arrive again. Frames published while it was away are simply missing:
    at most once; replicas read the gap from the journal."""
    a = await make_node("a")
    b = await make_node("b")
    await publish(a.broker, range(1, 11))
    await eventually(lambda: len(b.txs) >= 10)

    if how == "kill":
        redis_server.kill()
    else:
        redis_server.stop()
    await eventually(lambda: not b.broker.connected, what="b notices")
    await publish(a.broker, range(11, 21))  # into the void (or a's bounded queue)
    redis_server.start()
    await eventually(lambda: a.broker.connected and b.broker.connected, what="reconnected")
    assert a.broker.reconnects >= 1 and b.broker.reconnects >= 1

    # The sender may still be backing off: publish until something gets through, then check
    # that what follows arrives whole and in order.
    next_offset = 21

    async def one_more() -> bool:
        nonlocal next_offset
        await publish(a.broker, [next_offset])
        next_offset += 1
        await asyncio.sleep(20 * MS)
        return b.offsets[-1] > 20

    await eventually(one_more, what="a publish gets through after the restart")
    tail = list(range(next_offset, next_offset + 5))
    await publish(a.broker, tail)
    await eventually(lambda: b.offsets[-1] == tail[-1])
    assert b.offsets[:10] == list(range(1, 11))
    assert b.offsets[-5:] == tail
    assert b.offsets == sorted(set(b.offsets)), "in order, no duplicates"


async def test_a_hung_redis_does_not_block_publish(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """With Redis paused (SIGSTOP: sockets open, no answers), publish still returns at once,
    the subscription is declared lost, and after SIGCONT delivery resumes."""
    a = await make_node("a")
    b = await make_node("b")
    redis_server.pause()
    try:
        for offset in range(1, 101):
            await publish(a.broker, [offset])
            await asyncio.sleep(0)  # let the sender write into the hung connection
        assert a.offsets == list(range(1, 101))
        await eventually(lambda: not b.broker.connected, what="health check notices")
    finally:
        redis_server.resume()
    await eventually(lambda: a.broker.connected and b.broker.connected)
    next_offset = 101

    async def one_more() -> bool:
        nonlocal next_offset
        await publish(a.broker, [next_offset])
        next_offset += 1
        await asyncio.sleep(20 * MS)
        return bool(b.offsets) and b.offsets[-1] > 100

    await eventually(one_more)
    assert b.offsets == sorted(set(b.offsets))


async def test_aclose_is_idempotent_and_publish_after_it_is_harmless(
    make_node: MakeNode,
) -> None:
    """aclose twice (and concurrently) is fine; afterwards publish neither raises nor sends."""
    a = await make_node("a")
    await asyncio.gather(a.broker.aclose(), a.broker.aclose())
    await a.broker.aclose()
    assert not a.broker.connected
    await publish(a.broker, [1])
    assert a.broker.queued == 0


def test_backoff_is_capped_and_jittered() -> None:
    """Delays double up to the cap, each drawn from [d/2, d]; reset starts over."""
    backoff = Backoff(0.1, 1.0)
    delays = [backoff.next_delay() for _ in range(8)]
    for n, delay in enumerate(delays):
        ceiling = min(1.0, 0.1 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 0.1


# -- shared rate limits ----------------------------------------------------------------------


@pytest.fixture
async def limiters(redis_server: RedisServer) -> AsyncIterator[list[RedisRateLimiter]]:
    """Two limiters (two replicas) on one Redis: rate 1/s, burst 3."""
    made = [RedisRateLimiter(redis_server.url, rate=1.0, burst=3) for _ in range(2)]
    yield made
    for limiter in made:
        await limiter.aclose()


async def test_limiters_on_one_redis_share_a_bucket(limiters: list[RedisRateLimiter]) -> None:
    """The burst is shared: two replicas together get 3, not 3 each; other keys are apart."""
    one, two = limiters
    t = 1000.0
    assert [await one.allow("alice", t), await two.allow("alice", t)] == [True, True]
    assert await one.allow("alice", t)
    assert not await two.allow("alice", t)
    assert not await one.allow("alice", t)
    assert await two.allow("bob", t)
    assert one.shared and two.shared and one.fallbacks == 0


async def test_shared_bucket_refills_at_the_rate(limiters: list[RedisRateLimiter]) -> None:
    """One token comes back per 1/rate seconds, never more than the burst."""
    one, two = limiters
    for _ in range(3):
        assert await one.allow("alice", 1000.0)
    assert not await two.allow("alice", 1000.5)
    assert await two.allow("alice", 1001.0)  # 1 s later: one token
    assert not await one.allow("alice", 1001.0)
    results = [await one.allow("alice", 2000.0) for _ in range(5)]  # long idle: full, not more
    assert results == [True, True, True, False, False]


async def test_bucket_keys_expire_once_full(redis_server: RedisServer) -> None:
    """A bucket's key lives only until the bucket would be full again."""
    # Two tokens at 2/s: the key lives 1 s (long enough to observe on a loaded machine).
    limiter = RedisRateLimiter(redis_server.url, rate=2.0, burst=2, prefix="t:")
    redis = Redis.from_url(redis_server.url)
    try:
        assert await limiter.allow("carol")
        assert await limiter.allow("carol")
        ttl_ms = await redis.pttl("t:carol")
        assert 0 < ttl_ms <= 1000
        await eventually(lambda: _gone(redis, "t:carol"), timeout=5000 * MS)
        assert await limiter.allow("carol")  # and a missing key is a full bucket
    finally:
        await redis.aclose()
        await limiter.aclose()


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_limiter_falls_back_in_process_and_returns(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis stopped, allow() answers from in-process buckets (never raises, logs once per
    outage); once Redis is back, the limit is shared again."""
    limiter = RedisRateLimiter(
        redis_server.url, rate=1.0, burst=2, timeout=200 * MS, retry_after=0.0
    )
    try:
        assert await limiter.allow("dave", 1000.0)
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="syncd.redis"):
            answers = [await limiter.allow("dave", 1000.0) for _ in range(3)]
        assert answers == [True, True, False]  # the in-process bucket: burst 2
        assert not limiter.shared and limiter.outages == 1 and limiter.fallbacks == 3
        assert sum("Redis unreachable" in r.getMessage() for r in caplog.records) == 1

        redis_server.start()  # empty: persistence is off
        assert await limiter.allow("dave", 1000.0)
        assert limiter.shared
        other = RedisRateLimiter(redis_server.url, rate=1.0, burst=2)
        try:
            assert await other.allow("dave", 1000.0)  # the second token of the shared bucket
            assert not await limiter.allow("dave", 1000.0)
        finally:
            await other.aclose()
    finally:
        await limiter.aclose()


async def test_limiter_skips_redis_between_retries(redis_server: RedisServer) -> None:
    """After a failure the limiter stays in-process for retry_after seconds (one timeout per
    retry_after, not per call), then tries Redis again."""
    limiter = RedisRateLimiter(redis_server.url, rate=100.0, burst=100, retry_after=3600.0)
    try:
        redis_server.stop()
        assert await limiter.allow("erin")
        redis_server.start()
        assert await limiter.allow("erin")
        assert not limiter.shared and limiter.fallbacks == 2
    finally:
        await limiter.aclose()


async def test_zero_rate_means_no_limit(redis_server: RedisServer) -> None:
    """rate 0 allows everything without asking Redis."""
    limiter = RedisRateLimiter(redis_server.url, rate=0, burst=1)
    try:
        redis_server.stop()
        assert all([await limiter.allow("frank") for _ in range(10)])
        assert limiter.fallbacks == 0
    finally:
        await limiter.aclose()
