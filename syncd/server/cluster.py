"""Replicas sharing one Postgres journal: leadership, following the log, presence.

Every replica serves subscriptions from its own in-memory copy of the log (its `Replica`). At
most one of them, the holder of the `LeaderLease`, also runs a `Leader` that executes reducers
and appends to the journal with its fencing term; the others forward writes to it
(`forward.LeaderLink`). Postgres is the arbiter: nobody votes, nobody guesses.

Background loops, all owned by `Cluster`:

* **election** (every `lease_poll_s`): a follower tries to take the lease. On success it opens
  a journal with the new term (fenced: a deposed leader can no longer append), catches its
  replica up to the journal head, copies the replica's state into a fresh leader store and
  starts leading. A leader checks that it still holds the lease and that its journal has not
  failed; otherwise it steps down (pending callers get a retryable UNAVAILABLE) and follows.
* **follow** (every `journal_poll_s`): compares the journal head with the replica's offset and
  reads what is missing. The broker (Redis) normally delivers first; this loop repairs a
  dropped message at the tail and is the only path while Redis is down.
* **heartbeat** (every `heartbeat_s`): records that this process is alive.
* **presence** (leader only): connections whose replica's heartbeat lapsed are disconnected
  (`client_disconnected` runs once for each, through the leader's usual path).
* **reconcile**: this replica's own rows in the connection table that match no live
  connection (a disconnect that could not reach the leader) are disconnected again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from syncd.config import ClusterConfig
from syncd.core import snapshot
from syncd.core.ids import ConnectionId, Identity
from syncd.core.system import CONNECTION_TABLE
from syncd.errors import BackendError, CloseCode, JournalError
from syncd.ports import Broker, Journal, LeaderLease
from syncd.server.forward import LeaderLink, Writer
from syncd.server.leader import Leader

if TYPE_CHECKING:
    from syncd.server.replica import Replica
    from syncd.server.schema_gate import SchemaGate

logger = logging.getLogger("syncd.cluster")

CLUSTER_SECRET_KEY = "cluster_secret"


def _new_cluster_secret() -> bytes:
    return secrets.token_bytes(32)


class Cluster:
    """One replica's part in a cluster: leads when it holds the lease, follows otherwise."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        instance: str,
        address: str,
        lease: LeaderLease,
        reader: Journal,
        open_writer: Callable[[int], Journal],
        broker: Broker,
        replica: Replica,
        now_us: Callable[[], int],
        server_identity: Identity,
        live_connections: Callable[[], set[str]],
        meta_defaults: dict[str, Callable[[], bytes]] | None = None,
        gate: SchemaGate | None = None,
    ) -> None:
        self.config = config
        self.instance = instance
        self.address = address
        self.lease = lease
        self.reader = reader
        self._open_writer = open_writer
        self.broker = broker
        self.replica = replica
        self._now_us = now_us
        self._server_identity = server_identity
        self._live_connections = live_connections
        # Server values the first leader creates (secrets every replica must share).
        self._meta_defaults: dict[str, Callable[[], bytes]] = {
            CLUSTER_SECRET_KEY: _new_cluster_secret,
            **(meta_defaults or {}),
        }
        # Set while this process leads.
        self.leader: Leader | None = None
        self.writer_journal: Journal | None = None
        self.term: int | None = None
        # The journal head as last read (for lag), and whether Postgres answered lately.
        self.head = replica.offset
        self.journal_reachable = True
        # The leader's address as last read from the lease (for /readyz and operators).
        self.leader_address: str | None = None
        self.link = LeaderLink(
            self._locate,
            self.secret,
            timeout=config.forward_timeout_s,
            hint=lambda: self.leader_address,
        )
        self._secret: bytes | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._became_leader = asyncio.Event()
        self.on_leader_change: Callable[[Leader | None], None] = lambda _: None
        self.stopping = False
        # This replica's module against the stored schema: whether it may lead, and what it
        # records first when it does (`server.schema_gate`). None: not checked.
        self.gate = gate
        # Set when the stored schema may have changed (a migration transaction applied, an
        # entry that does not read): the election loop re-reads it without waiting a poll.
        self._schema_event = asyncio.Event()

    # -- roles ----------------------------------------------------------------------------------

    @property
    def role(self) -> str:
        return "leader" if self.leader is not None else "replica"

    @property
    def lag(self) -> int:
        return max(0, self.head - self.replica.offset)

    async def _locate(self) -> str | None:
        if self.leader is not None:
            return self.address
        info = await self.lease.current()
        return None if info is None else info.address

    async def secret(self) -> bytes | None:
        """The cluster secret (replicas sign their links with it); None until a leader set it."""
        if self._secret is None:
            self._secret = await self.reader.get_meta(CLUSTER_SECRET_KEY)
        return self._secret

    # -- writes: the local leader or the link ---------------------------------------------------

    @property
    def writer(self) -> Writer:
        """Where writes go now: the local leader while this replica leads, else the link."""
        return self.leader if self.leader is not None else self.link

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for name, body in (
            ("election", self._election),
            ("follow", self._follow),
            ("heartbeat", self._heartbeat),
            ("reconcile", self._reconcile),
        ):
            self._tasks.append(loop.create_task(self._forever(name, body), name=name))

    async def wait_for_meta(self, key: str, within_s: float) -> bytes:
        """A value the first leader creates (see `meta_defaults`), waiting while an election
        runs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            with contextlib.suppress(JournalError):
                found = await self.reader.get_meta(key)
                if found is not None:
                    return found
            if loop.time() >= deadline:
                raise BackendError("no leader set the cluster secret; is Postgres reachable?")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.link.aclose()
        await self._step_down("shutting down", quietly=True)
        await self.lease.aclose()

    async def _forever(self, name: str, body: Callable[[], Any]) -> None:
        while True:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the %s loop failed; restarting it", name)
                await asyncio.sleep(1)

    # -- election -------------------------------------------------------------------------------

    def schema_event(self) -> None:
        """The stored schema may have changed: re-read it now (see `_schema_event`)."""
        self._schema_event.set()

    async def _judge_schema(self) -> bool:
        """Re-read the stored schema (a follower's); whether this replica may campaign."""
        gate = self.gate
        if gate is None:
            return True
        with contextlib.suppress(JournalError):
            await gate.refresh(self.reader)
        return gate.may_lead

    async def _election(self) -> None:
        poll = self.config.lease_poll_s
        while True:
            if self.leader is None:
                # A replica whose module is older than the stored schema never campaigns:
                # as leader it would write under a schema that is not the data's.
                if await self._judge_schema():
                    try:
                        term = await self.lease.try_acquire(self.instance, self.address)
                    except JournalError as exc:
                        logger.debug("lease: %s", exc)
                        term = None
                    if term is not None:
                        # Taking over may take long (catching up, a row function over every
                        # row): the lease must hear from this replica meanwhile, or Postgres
                        # ends its session and another replica takes over mid-way.
                        alive = asyncio.get_running_loop().create_task(
                            self._keep_lease(), name="keep-lease"
                        )
                        try:
                            await self._become_leader(term)
                        except Exception as exc:  # whatever failed, give the lease back
                            logger.warning("taking over as leader (term %d) failed: %s", term, exc)
                            await self._step_down(f"take-over failed: {exc}")
                        finally:
                            alive.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await alive
            else:
                reason = None
                if self.leader.failed is not None:
                    reason = f"the journal failed: {self.leader.failed}"
                elif not await self.lease.still_held():
                    reason = "the lease was lost"
                if reason is not None:
                    await self._step_down(reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._schema_event.wait(), poll)
            self._schema_event.clear()

    async def _keep_lease(self) -> None:
        """While taking over: tell the lease this replica lives, every lease poll (a lost
        lease is found then too: the next fenced write fails, and the election steps down)."""
        while True:
            if not await self.lease.still_held():
                return
            await asyncio.sleep(self.config.lease_poll_s)

    async def _become_leader(self, term: int) -> None:
        writer = self._open_writer(term)
        await writer.open()
        self.writer_journal = writer
        self.term = term
        # Everything the previous leader committed is final now (its next commit is fenced):
        # bring the replica up to the head, then lead from exactly that state.
        head = await writer.latest_offset()
        while self.replica.offset < head:
            before = self.replica.offset
            await self.replica.catch_up()
            if self.replica.offset == before:
                raise JournalError(f"cannot read the journal past offset {before} (head {head})")
        if self.gate is not None:
            # Before leading: record this replica's schema version if it is newer (or none is
            # stored), and the migration transaction after the head, fenced by the term.
            migrated = await self.gate.lead(writer, self.replica.store, self._now_us())
            if migrated is not None:
                await self.replica.catch_up()
                if self.replica.offset != migrated:
                    raise JournalError(f"cannot read the migration transaction at {migrated}")
                head = migrated
        self.head = head
        for key, make in self._meta_defaults.items():
            if await writer.get_meta(key) is None:
                await writer.set_meta(key, make())
        self._secret = None
        store = snapshot.copy(self.replica.store)
        leader = Leader(
            self.replica.schema,
            store,
            writer,
            self.broker,
            writer=f"{self.instance}:{term}",
            now_us=self._now_us,
            reducer_budget_ms=self.replica.limits.reducer_budget_ms,
            max_message_size=self.replica.limits.max_message_size,
        )
        leader.start()
        try:
            fresh = head == 0 and await writer.latest_snapshot() is None
            if fresh:
                await leader.run_init(self._server_identity)
            leader.start_scheduler(self._server_identity)
        except BaseException:
            await leader.aclose()  # not leading after all: stop its publisher
            raise
        self.leader = leader
        self.leader_address = self.address
        logger.warning(
            "%s is now the leader (term %d, offset %d)", self.instance, term, self.replica.offset
        )
        self._tasks.append(
            asyncio.get_running_loop().create_task(
                self._forever("presence", self._presence), name="presence"
            )
        )
        self.on_leader_change(leader)
        self._became_leader.set()

    async def _step_down(self, reason: str, *, quietly: bool = False) -> None:
        leader, self.leader = self.leader, None
        writer, self.writer_journal = self.writer_journal, None
        self.term = None
        for task in [t for t in self._tasks if t.get_name() == "presence"]:
            task.cancel()
            self._tasks.remove(task)
        if leader is not None:
            self.leader_address = None  # not us any more; the next heartbeat looks it up
            if not quietly:
                logger.warning("%s steps down: %s", self.instance, reason)
            self.on_leader_change(None)
            await leader.aclose()
        if writer is not None:
            with contextlib.suppress(JournalError):
                await writer.aclose()
        await self.lease.release()

    # -- following the log ----------------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.config.journal_poll_s)
            try:
                self.head = max(self.head, await self.reader.latest_offset())
                self.journal_reachable = True
                following = self.leader is None and self.replica.halted is None
                if self.head > self.replica.offset and following:
                    await self.replica.catch_up()
            except JournalError as exc:
                if self.journal_reachable:
                    logger.warning("reading the journal head failed: %s", exc)
                self.journal_reachable = False
            except LookupError:
                if self.replica.halted is None:
                    await self._reload()

    async def _reload(self) -> None:
        """Fell behind the journal's retention: reload from the latest snapshot."""
        latest = await self.reader.latest_snapshot()
        if latest is None:
            raise JournalError("the journal was pruned but holds no snapshot")
        logger.warning(
            "replica at offset %d fell behind the journal's retention; reloading the snapshot "
            "at offset %d",
            self.replica.offset,
            latest[0],
        )
        snap = await asyncio.to_thread(snapshot.decode, self.replica.schema, latest[1])
        self.replica.reload(snap)
        await self.replica.catch_up()

    async def beat(self) -> None:
        """Record that this replica is alive, and look up who leads."""
        with contextlib.suppress(JournalError):
            await self.lease.heartbeat(self.instance, self.address)
            info = await self.lease.current()
            if self.leader is None:
                self.leader_address = None if info is None else info.address

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            await self.beat()

    async def _presence(self) -> None:
        """Leader only: disconnect the connections of replicas whose heartbeat lapsed."""
        lapse = self.config.heartbeat_lapse_s
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            leader = self.leader
            if leader is None:
                return
            try:
                live = await self.lease.live_instances(lapse)
            except JournalError:
                continue
            live.add(self.instance)
            rows = leader.store.tables[CONNECTION_TABLE].rows
            dead = [cid for cid, row in list(rows.items()) if row[2] not in live]
            if dead:
                logger.warning("removing %d connections of replicas that went silent", len(dead))
            for connection_id in dead:
                outcome = await (await leader.disconnect(ConnectionId(connection_id)))
                if not outcome.ok:
                    logger.warning("disconnecting %s failed: %s", connection_id, outcome.error)

    async def _reconcile(self) -> None:
        """Rows of ours that match no live connection get disconnected (again); live
        connections whose row is gone (the leader took this replica for dead during a long
        pause) are closed with a resumable code, so their clients come back and register."""
        while True:
            await asyncio.sleep(max(2.0, 2 * self.config.heartbeat_s))
            rows = self.replica.store.tables[CONNECTION_TABLE].rows
            for conn in list(self.replica.connections):
                if conn.connection_id not in rows and conn.accepted:
                    conn.close(CloseCode.LEADER_CHANGED, "this connection was dropped; resume")
            mine = [cid for cid, row in list(rows.items()) if row[2] == self.instance]
            if not mine:
                continue
            live = self._live_connections()
            for connection_id in mine:
                if connection_id in live:
                    continue
                # Still present a moment later (not a disconnect already in flight)?
                await asyncio.sleep(0.5)
                if connection_id in rows and connection_id not in self._live_connections():
                    await self.writer.disconnect(ConnectionId(connection_id))
