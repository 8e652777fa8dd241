"""JournalContract: the behaviour every `ports.Journal` implementation must have, written once.

A test module subclasses `JournalContract` and provides two things:

* an `open_journal` fixture: an async factory that opens a journal on *the same* storage each
  time it is called (so a test can close and reopen), closing whatever it opened at teardown;
* `break_storage(journal)`: make the journal's next commit fail the way a broken disk would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import pytest

from syncd.core.ids import Offset
from syncd.errors import JournalError
from syncd.ports import Journal
from tests.utils import MS, ROOT


class CountingJournal(Journal, Protocol):
    """A journal that counts its commits, so tests can see group commit batching."""

    commits: int


OpenJournal = Callable[[], Awaitable[CountingJournal]]


def payload(offset: int) -> bytes:
    """A recognisable ~200-byte payload for an offset."""
    return f"tx-{offset:08d}-".encode() * 16


def append_range(journal: Journal, first: int, last: int) -> None:
    for offset in range(first, last + 1):
        journal.append(Offset(offset), payload(offset))


class JournalContract:
    """Contract tests for `ports.Journal`. Subclass it; see the module docstring."""

    @pytest.fixture
    def open_journal(self) -> OpenJournal:
        raise NotImplementedError("subclasses provide an open_journal fixture")

    async def break_storage(self, journal: CountingJournal) -> None:
        raise NotImplementedError("subclasses make the next commit fail")

    @pytest.fixture
    async def journal(self, open_journal: OpenJournal) -> AsyncIterator[CountingJournal]:
        journal = await open_journal()
        yield journal
        await journal.aclose()

    # -- a fresh journal --------------------------------------------------------------------

    async def test_fresh_journal_is_empty_in_epoch_1(self, journal: CountingJournal) -> None:
        """A new journal starts in epoch 1 with nothing durable, no entries and no snapshot."""
        assert journal.epoch == 1
        assert journal.durable_offset == 0
        assert await journal.latest_offset() == 0
        assert await journal.read(Offset(0)) == []
        assert await journal.latest_snapshot() is None
        assert await journal.find_idempotent("nope") is None
        await journal.wait_durable(Offset(0))  # nothing to wait for

    # -- append, wait_durable, read ---------------------------------------------------------

    async def test_entries_come_back_in_order_once_durable(self, journal: CountingJournal) -> None:
        """Appended entries are read back in offset order, with their payloads, once durable."""
        append_range(journal, 1, 5)
        await journal.wait_durable(Offset(5))
        assert journal.durable_offset == 5
        assert await journal.latest_offset() == 5
        assert await journal.read(Offset(0)) == [(o, payload(o)) for o in range(1, 6)]

    async def test_read_after_an_offset_with_a_limit(self, journal: CountingJournal) -> None:
        """read(after, limit) returns at most `limit` consecutive entries starting at after+1."""
        append_range(journal, 1, 6)
        await journal.wait_durable(Offset(6))
        assert [o for o, _ in await journal.read(Offset(2))] == [3, 4, 5, 6]
        assert [o for o, _ in await journal.read(Offset(2), limit=2)] == [3, 4]
        assert await journal.read(Offset(6)) == []
        assert await journal.read(Offset(9)) == []
        assert await journal.read(Offset(0), limit=0) == []

    async def test_append_does_not_wait_for_the_commit(self, journal: CountingJournal) -> None:
        """append only queues: right after it nothing new is durable; wait_durable makes it so."""
        append_range(journal, 1, 50)
        assert journal.durable_offset == 0
        await journal.wait_durable(Offset(50))
        assert journal.durable_offset == 50

    @pytest.mark.parametrize("bad", [0, 2, 5, -1])
    async def test_first_append_must_be_offset_1(self, journal: CountingJournal, bad: int) -> None:
        """On an empty journal only offset 1 may be appended; anything else is a ValueError."""
        with pytest.raises(ValueError, match="expected offset 1"):
            journal.append(Offset(bad), b"x")

    async def test_gap_or_repeat_raises_and_the_journal_stays_usable(
        self, journal: CountingJournal
    ) -> None:
        """A skipped or repeated offset raises ValueError, queues nothing and fails nothing."""
        journal.append(Offset(1), payload(1))
        with pytest.raises(ValueError, match="expected offset 2, got 3"):
            journal.append(Offset(3), payload(3))
        with pytest.raises(ValueError, match="expected offset 2, got 1"):
            journal.append(Offset(1), payload(1))
        journal.append(Offset(2), payload(2))
        await journal.wait_durable(Offset(2))
        assert [o for o, _ in await journal.read(Offset(0))] == [1, 2]

    async def test_waiting_for_an_offset_never_appended_raises(
        self, journal: CountingJournal
    ) -> None:
        """wait_durable(n) for n beyond the last append raises ValueError instead of hanging."""
        journal.append(Offset(1), payload(1))
        with pytest.raises(ValueError, match="never appended"):
            await journal.wait_durable(Offset(2))

    async def test_many_waiters_all_wake(self, journal: CountingJournal) -> None:
        """Every waiter returns once its offset is durable, whatever order they waited in."""
        append_range(journal, 1, 30)
        await asyncio.gather(*(journal.wait_durable(Offset(o)) for o in range(30, 0, -1)))
        assert journal.durable_offset == 30

    async def test_a_cancelled_wait_does_not_cancel_the_commit(
        self, journal: CountingJournal
    ) -> None:
        """Cancelling a waiter leaves the commit and the other waiters alone."""
        append_range(journal, 1, 3)
        waiter = asyncio.ensure_future(journal.wait_durable(Offset(3)))
        await asyncio.sleep(0)
        # A journal that commits on the loop may already be done; one with a thread is not.
        was_waiting = not waiter.done()
        waiter.cancel()
        await journal.wait_durable(Offset(3))
        assert [o for o, _ in await journal.read(Offset(0))] == [1, 2, 3]
        assert waiter.cancelled() == was_waiting

    # -- group commit -----------------------------------------------------------------------

    async def test_appends_made_together_share_a_commit(self, journal: CountingJournal) -> None:
        """Many appends before one wait are committed in one or two commits, not one each."""
        append_range(journal, 1, 200)
        await journal.wait_durable(Offset(200))
        assert 1 <= journal.commits <= 2

    async def test_concurrent_writers_are_batched(self, journal: CountingJournal) -> None:
        """With 32 tasks each appending then waiting, commits carry many transactions each."""
        next_offset = 0
        rounds = 20

        async def writer() -> None:
            nonlocal next_offset
            for _ in range(rounds):
                next_offset += 1
                mine = Offset(next_offset)
                journal.append(mine, payload(mine))
                await journal.wait_durable(mine)

        await asyncio.gather(*(writer() for _ in range(32)))
        total = 32 * rounds
        assert journal.durable_offset == total
        assert journal.commits <= total // 4, f"{journal.commits} commits for {total} appends"
        assert [o for o, _ in await journal.read(Offset(0))] == list(range(1, total + 1))

    # -- reopening --------------------------------------------------------------------------

    async def test_reopen_continues_after_the_latest_offset(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """After reopening, the latest offset is where it was and appends continue from it."""
        append_range(journal, 1, 10)
        await journal.wait_durable(Offset(10))
        await journal.aclose()

        reopened = await open_journal()
        assert reopened.epoch == 1
        assert reopened.durable_offset == 10
        assert await reopened.latest_offset() == 10
        with pytest.raises(ValueError, match="expected offset 11"):
            reopened.append(Offset(1), b"again")
        reopened.append(Offset(11), payload(11))
        await reopened.wait_durable(Offset(11))
        assert [o for o, _ in await reopened.read(Offset(0))] == list(range(1, 12))

    async def test_aclose_commits_what_is_pending(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """aclose() makes every appended entry durable before it returns."""
        append_range(journal, 1, 7)
        await journal.aclose()
        reopened = await open_journal()
        assert [o for o, _ in await reopened.read(Offset(0))] == list(range(1, 8))

    async def test_only_one_open_journal_per_storage(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """A second journal on the same storage is refused while the first is open."""
        with pytest.raises(JournalError, match="open in another"):
            await open_journal()
        journal.append(Offset(1), payload(1))
        await journal.wait_durable(Offset(1))

    # -- lifecycle --------------------------------------------------------------------------

    async def test_aclose_is_idempotent_and_concurrent_calls_wait(
        self, journal: CountingJournal
    ) -> None:
        """aclose() may be called many times, also concurrently; each returns once closed."""
        append_range(journal, 1, 3)
        await asyncio.gather(journal.aclose(), journal.aclose(), journal.aclose())
        await journal.aclose()

    async def test_calls_after_aclose_raise(self, journal: CountingJournal) -> None:
        """Once closed, every call raises JournalError."""
        await journal.aclose()
        with pytest.raises(JournalError, match="closed"):
            journal.append(Offset(1), b"x")
        for call in (
            journal.wait_durable(Offset(0)),
            journal.read(Offset(0)),
            journal.latest_offset(),
            journal.latest_snapshot(),
            journal.find_idempotent("k"),
            journal.get_meta("k"),
            journal.set_meta("k", b"v"),
        ):
            with pytest.raises(JournalError, match="closed"):
                await call

    # -- snapshots --------------------------------------------------------------------------

    async def test_snapshots_round_trip_and_survive_reopen(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """The latest snapshot is the one with the greatest offset, and it survives a reopen."""
        append_range(journal, 1, 4)
        await journal.write_snapshot(Offset(4), b"state@4")
        await journal.write_snapshot(Offset(2), b"state@2")
        assert await journal.latest_snapshot() == (4, b"state@4")
        await journal.write_snapshot(Offset(4), b"state@4 again")
        assert await journal.latest_snapshot() == (4, b"state@4 again")
        await journal.aclose()
        reopened = await open_journal()
        assert await reopened.latest_snapshot() == (4, b"state@4 again")

    async def test_write_snapshot_waits_until_its_offset_is_durable(
        self, journal: CountingJournal
    ) -> None:
        """A snapshot never gets ahead of the log: writing one first waits for its offset."""
        append_range(journal, 1, 3)
        await journal.write_snapshot(Offset(3), b"s")
        assert journal.durable_offset >= 3

    async def test_snapshot_of_an_offset_never_appended_raises(
        self, journal: CountingJournal
    ) -> None:
        """write_snapshot(n) for n beyond the last append raises ValueError."""
        with pytest.raises(ValueError, match="never appended"):
            await journal.write_snapshot(Offset(1), b"s")

    # -- idempotency keys -------------------------------------------------------------------

    async def test_idempotency_keys_are_found_before_and_after_commit_and_reopen(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """A key is found with its offset and result as soon as appended, and after a reopen."""
        journal.append(Offset(1), payload(1), idempotency_key="call-a", result=b"ok-a")
        journal.append(Offset(2), payload(2))
        journal.append(Offset(3), payload(3), idempotency_key="call-b")
        assert await journal.find_idempotent("call-a") == (1, b"ok-a")
        await journal.wait_durable(Offset(3))
        assert await journal.find_idempotent("call-a") == (1, b"ok-a")
        assert await journal.find_idempotent("call-b") == (3, None)
        assert await journal.find_idempotent("call-c") is None
        await journal.aclose()
        reopened = await open_journal()
        assert await reopened.find_idempotent("call-a") == (1, b"ok-a")
        assert await reopened.find_idempotent("call-b") == (3, None)

    async def test_a_key_appended_twice_keeps_its_first_offset(
        self, journal: CountingJournal
    ) -> None:
        """If a key is appended again, the lowest offset wins, pending or committed."""
        journal.append(Offset(1), payload(1), idempotency_key="k", result=b"first")
        await journal.wait_durable(Offset(1))
        journal.append(Offset(2), payload(2), idempotency_key="k", result=b"second")
        assert await journal.find_idempotent("k") == (1, b"first")
        await journal.wait_durable(Offset(2))
        assert await journal.find_idempotent("k") == (1, b"first")

    # -- retention --------------------------------------------------------------------------

    async def test_prune_needs_a_snapshot_at_or_after_it(self, journal: CountingJournal) -> None:
        """Pruning with no snapshot covering the range raises ValueError and removes nothing."""
        append_range(journal, 1, 5)
        await journal.write_snapshot(Offset(2), b"s2")
        with pytest.raises(ValueError, match="no snapshot"):
            await journal.prune(Offset(3))
        assert len(await journal.read(Offset(0))) == 5

    async def test_prune_removes_old_entries_and_their_keys(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """prune(n) drops entries <= n and their keys; reading before n raises LookupError."""
        journal.append(Offset(1), payload(1), idempotency_key="old", result=b"r")
        append_range(journal, 2, 8)
        journal.append(Offset(9), payload(9), idempotency_key="new", result=b"r9")
        await journal.write_snapshot(Offset(2), b"s2")
        await journal.write_snapshot(Offset(5), b"s5")
        assert await journal.prune(Offset(4)) == 4
        assert await journal.prune(Offset(3)) == 0  # already pruned further
        with pytest.raises(LookupError, match="pruned"):
            await journal.read(Offset(0))
        assert [o for o, _ in await journal.read(Offset(4))] == [5, 6, 7, 8, 9]
        assert await journal.find_idempotent("old") is None
        assert await journal.find_idempotent("new") == (9, b"r9")
        assert await journal.latest_snapshot() == (5, b"s5")
        await journal.aclose()

        reopened = await open_journal()
        assert await reopened.latest_offset() == 9
        with pytest.raises(LookupError):
            await reopened.read(Offset(3))
        assert [o for o, _ in await reopened.read(Offset(4))] == [5, 6, 7, 8, 9]

    async def test_pruning_everything_keeps_the_latest_offset(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """With every entry pruned, the latest offset survives a reopen and appends continue."""
        append_range(journal, 1, 6)
        await journal.write_snapshot(Offset(6), b"s6")
        assert await journal.prune(Offset(6)) == 6
        assert await journal.read(Offset(6)) == []
        await journal.aclose()
        reopened = await open_journal()
        assert await reopened.latest_offset() == 6
        reopened.append(Offset(7), payload(7))
        await reopened.wait_durable(Offset(7))
        assert await reopened.read(Offset(6)) == [(7, payload(7))]

    # -- epochs -----------------------------------------------------------------------------

    async def test_start_epoch_restarts_offsets_from_a_snapshot(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """A new epoch commits what was pending, drops the old log, and offsets restart at 1."""
        journal.append(Offset(1), payload(1), idempotency_key="k")
        append_range(journal, 2, 4)
        await journal.write_snapshot(Offset(1), b"s1")
        assert await journal.start_epoch(b"restored@0") == 2
        assert journal.epoch == 2
        assert journal.durable_offset == 0
        assert await journal.latest_offset() == 0
        assert await journal.read(Offset(0)) == []
        assert await journal.latest_snapshot() == (0, b"restored@0")
        assert await journal.find_idempotent("k") is None
        journal.append(Offset(1), b"new epoch")
        await journal.wait_durable(Offset(1))
        await journal.aclose()
        reopened = await open_journal()
        assert reopened.epoch == 2
        assert await reopened.read(Offset(0)) == [(1, b"new epoch")]

    async def test_start_epoch_at_an_offset_continues_from_it(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """A new epoch started at offset N (a restore to N) reports N, appends N + 1 next,
        has nothing to read before N, and still starts at N once reopened."""
        append_range(journal, 1, 6)
        await journal.wait_durable(Offset(6))
        assert await journal.start_epoch(b"restored@4", Offset(4)) == 2
        assert journal.durable_offset == 4
        assert await journal.latest_offset() == 4
        assert await journal.latest_snapshot() == (4, b"restored@4")
        assert await journal.read(Offset(4)) == []
        with pytest.raises(LookupError):
            await journal.read(Offset(3))
        with pytest.raises(ValueError):
            journal.append(Offset(1), b"before the start")
        journal.append(Offset(5), b"new epoch")
        await journal.wait_durable(Offset(5))
        await journal.aclose()
        reopened = await open_journal()
        assert (reopened.epoch, await reopened.latest_offset()) == (2, 5)
        assert await reopened.read(Offset(4)) == [(5, b"new epoch")]
        assert await reopened.latest_snapshot() == (4, b"restored@4")

    # -- server metadata --------------------------------------------------------------------

    async def test_meta_set_get_delete_and_survive_reopen(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """get_meta returns what set_meta stored (None when absent or deleted), across reopens."""
        assert await journal.get_meta("secret") is None
        await journal.set_meta("secret", b"s1")
        await journal.set_meta("secret", b"s2")
        await journal.set_meta("open-connections", b"\x00\x01")
        await journal.set_meta("open-connections", None)
        await journal.set_meta("never-set", None)
        assert await journal.get_meta("secret") == b"s2"
        assert await journal.get_meta("open-connections") is None
        await journal.aclose()
        reopened = await open_journal()
        assert await reopened.get_meta("secret") == b"s2"

    # -- failure ----------------------------------------------------------------------------

    async def test_a_failed_commit_fails_the_journal(
        self, journal: CountingJournal, open_journal: OpenJournal
    ) -> None:
        """Waiters of a failed commit get JournalError; then every call raises; aclose doesn't."""
        append_range(journal, 1, 3)
        await journal.wait_durable(Offset(3))
        await self.break_storage(journal)
        append_range(journal, 4, 6)
        results = await asyncio.gather(
            *(journal.wait_durable(Offset(o)) for o in (4, 5, 6)), return_exceptions=True
        )
        assert all(isinstance(r, JournalError) for r in results), results

        with pytest.raises(JournalError):
            journal.append(Offset(7), payload(7))
        for call in (
            journal.wait_durable(Offset(3)),  # durable, but the journal is failed
            journal.read(Offset(0)),
            journal.latest_offset(),
            journal.write_snapshot(Offset(3), b"s"),
            journal.latest_snapshot(),
            journal.find_idempotent("k"),
            journal.prune(Offset(1)),
            journal.start_epoch(b"s"),
            journal.get_meta("k"),
            journal.set_meta("k", b"v"),
        ):
            with pytest.raises(JournalError, match="failed"):
                await call
        await journal.aclose()
        await journal.aclose()

        # What was durable before the failure is still there; nothing after it is.
        reopened = await open_journal()
        assert [o for o, _ in await reopened.read(Offset(0))] == [1, 2, 3]

    async def test_aclose_raises_when_its_final_commit_fails(
        self, journal: CountingJournal
    ) -> None:
        """If the commit made by aclose() fails, aclose() says so (nobody else was told)."""
        await self.break_storage(journal)
        append_range(journal, 1, 2)
        with pytest.raises(JournalError):
            await journal.aclose()
        await journal.aclose()  # and it stays closed


async def run_and_kill(script: str, arg: str, kill_after: float) -> list[int]:
    """Run a writer child (`python -c script arg`) that prints each offset it knows is durable,
    kill -9 it `kill_after` seconds after its first line, and return every offset it printed.

    The first line says the journal is open and the child is about to append.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        arg,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    printed: list[int] = []

    async def collect() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            printed.append(int(line))

    try:
        printed.append(int(await asyncio.wait_for(proc.stdout.readline(), 10_000 * MS)))
        collector = asyncio.ensure_future(collect())
        await asyncio.sleep(kill_after)  # the random moment of the crash, not a condition
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await collector  # the lines it printed before dying are still in the pipe
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return printed
