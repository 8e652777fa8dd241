"""MemoryJournal: the journal contract, plus what is particular to keeping the log in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from syncd.core.ids import Offset
from syncd.persist.memory import Entry, MemoryJournal, MemoryLog
from tests.contracts.journal import CountingJournal, JournalContract, OpenJournal, append_range


class TestMemoryJournal(JournalContract):
    @pytest.fixture
    async def open_journal(self) -> AsyncIterator[OpenJournal]:
        log = MemoryLog()
        opened: list[MemoryJournal] = []

        async def open_journal() -> CountingJournal:
            journal = MemoryJournal(log)
            await journal.open()
            opened.append(journal)
            return journal

        yield open_journal
        for journal in opened:
            await journal.aclose()

    async def break_storage(self, journal: CountingJournal) -> None:
        assert isinstance(journal, MemoryJournal)
        log = journal.log

        def broken(batch: list[Entry]) -> None:
            del log.commit  # one failure, like a disk that filled up once
            raise OSError(28, "No space left on device")

        log.commit = broken  # type: ignore[method-assign]


async def test_reads_never_see_uncommitted_entries() -> None:
    """An entry appended but not yet committed is invisible to read()."""
    async with MemoryJournal() as journal:
        journal.append(Offset(1), b"a")
        assert await journal.read(Offset(0)) == []
        await journal.wait_durable(Offset(1))
        assert await journal.read(Offset(0)) == [(1, b"a")]


async def test_a_crash_loses_exactly_what_was_not_committed() -> None:
    """Dropping a journal without aclose() (a crash) keeps the committed prefix only."""
    log = MemoryLog()
    journal = MemoryJournal(log)
    await journal.open()
    append_range(journal, 1, 3)
    await journal.wait_durable(Offset(3))
    append_range(journal, 4, 5)
    # Crash before the flusher runs: cancel it, and free the log as the OS frees a file lock.
    flusher = journal._flusher
    assert flusher is not None
    flusher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flusher
    log.in_use = False
    assert log.latest == 3

    async with MemoryJournal(log) as reopened:
        assert await reopened.latest_offset() == 3
        assert [o for o, _ in await reopened.read(Offset(0))] == [1, 2, 3]
