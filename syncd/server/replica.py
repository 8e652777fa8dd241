"""The replica role: durable state in memory, subscriptions, and fan-out to connections.

A replica applies committed transactions strictly in offset order (buffering any that arrive
early and reading a gap from the journal), routes each through the subscription index, encodes
each affected query's delta once per wire format, and hands the same bytes to every connection
subscribed to it. Everything a connection is sent in one event-loop tick goes out as one
WebSocket message (`flush`).

Its store only ever holds durable transactions, so initial rows, one-off queries and resumes
read it directly: no client can see a transaction the journal could still lose.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from syncd.auth.principal import Principal
from syncd.config import Limits
from syncd.core import snapshot
from syncd.core.access import rule_params
from syncd.core.held import HeldQueries
from syncd.core.ids import Epoch, Offset, QuerySetId
from syncd.core.oneoff import OneOffPlan, Result, compile_one_off
from syncd.core.protocol.codec import ENCODE_ERRORS, Codec, Format
from syncd.core.protocol.messages import QueryUpdate
from syncd.core.query import (
    VISIBLE_MARK,
    BoundQuery,
    Query,
    QueryKey,
    StoreView,
    compile_query,
    prescan,
    query_cost,
    term_count,
    with_visibility,
)
from syncd.core.reducers import SERVICE_ROLES
from syncd.core.schema import Schema
from syncd.core.store import Change, ChangeSet, Row, Store
from syncd.core.subscriptions import QueryDelta, StateBefore, SubscriptionIndex
from syncd.core.tx import Tx, decode_tx, is_migration
from syncd.errors import CloseCode, ErrorCode, JournalError, LimitExceeded, SubscriptionError
from syncd.ports import Journal
from syncd.server.wire import OP_BINARY, OP_TEXT, ws_frame

if TYPE_CHECKING:
    from syncd.server.connection import Connection

logger = logging.getLogger("syncd.replica")

#: Roles that see every row of public tables, whatever their visibility rules.
BYPASS_ROLES = SERVICE_ROLES

# Compiled queries kept by SQL text (compiling is the slow part of subscribing): at most this
# many, holding at most COMPILED_CACHE_BYTES of text (a client sending unique texts only
# evicts older entries).
COMPILED_CACHE = 4096
COMPILED_CACHE_BYTES = 8 << 20
# Journal entries read per round while filling a gap or resuming.
READ_CHUNK = 2_000

#: Why a query set failed whose rows or update could not be encoded (the log says more).
UNENCODABLE = (
    "a row of this query set could not be encoded for this subprotocol (the server logged "
    "why); its rows are dropped: subscribe again later, or with the other subprotocol"
)

# Largest shared frame built from one tick's updates (a single larger message goes alone).
MAX_FRAME = 1 << 20

CODECS: dict[Format, Codec] = {"msgpack": Codec("msgpack"), "json": Codec("json")}


# Where a connection holds its queries: (query key, query set id, index in the set), sorted.
Places = tuple[tuple[QueryKey, QuerySetId, int], ...]
# One transaction's parts for one group: (query set id, index, encoded delta).
Parts = list[tuple[QuerySetId, int, bytes]]


@dataclass(eq=False, slots=True)
class _Group:
    """Connections that hold the same queries in the same places, in the same format.

    They receive byte-identical updates, so each transaction's update, and each tick's frame,
    is built once per group and shared by its connections.
    """

    fmt: Format
    places: Places
    # query key -> where this group's connections hold it
    by_key: dict[QueryKey, tuple[tuple[QuerySetId, int], ...]]
    conns: set[Connection] = field(default_factory=set)


class Replica:
    """Durable state plus everything needed to serve subscriptions from it."""

    def __init__(
        self,
        schema: Schema,
        store: Store,
        journal: Journal,
        *,
        epoch: Epoch,
        limits: Limits,
    ) -> None:
        self.schema = schema
        # Durable state only: the offsets applied so far, in order.
        self.store = store
        self.journal = journal
        self.epoch = epoch
        self.limits = limits
        # Subscribed queries, filed for routing.
        self.index = SubscriptionIndex()
        # (format, places) -> the group of connections holding exactly those
        self._groups: dict[tuple[Format, Places], _Group] = {}
        # query key -> the groups holding it
        self._key_groups: dict[QueryKey, dict[tuple[Format, Places], _Group]] = {}
        # connection -> its group (connections without queries have none)
        self._conn_group: dict[Connection, _Group] = {}
        # Updates routed in this tick, not yet handed to connections: group -> [(offset, parts)]
        self._pending: dict[_Group, list[tuple[Offset, Parts]]] = {}
        # Recent transactions, for resume without reading the journal.
        self.window: deque[Tx] = deque(maxlen=limits.resume_window)
        # Transactions that arrived before their predecessors: offset -> tx.
        self._early: dict[int, Tx] = {}
        # Set while a task reads a gap from the journal.
        self._filling = False
        # (offset, seq, future): resolved once that offset is applied.
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = 0
        # Connections with messages queued in this tick; flushed by one call_soon.
        self._dirty: set[Connection] = set()
        self._flush_scheduled = False
        # (SQL text, visibility rules applied) -> compiled query (LRU).
        self._compiled: OrderedDict[tuple[str, bool], Query] = OrderedDict()
        # One-off plans by (SQL, restricted), with their base query (visibility applied).
        self._plans: OrderedDict[tuple[str, bool], tuple[OneOffPlan, Query]] = OrderedDict()
        # Characters of SQL text held as keys of `_compiled`.
        self._compiled_bytes = 0
        # Every open connection (welcomed), and how many each identity has.
        self.connections: set[Connection] = set()
        self.per_identity: dict[str, int] = {}
        # Why this replica applies nothing more (a journal entry it cannot read, or a stored
        # schema its module does not follow: `server.schema_gate`); None while it follows.
        self.halted: str | None = None
        # Called after a schema migration transaction is applied, and when an entry does not
        # read (a newer schema version?): the owner re-reads the stored schema.
        self.on_schema_event: Callable[[], None] = lambda: None
        # The distinct query texts connections hold, for `syncd migrate --dry-run` (recorded
        # in the journal's meta by `server.held.HeldRecorder`).
        self.held = HeldQueries()
        # (connection, query set) -> whether the visibility rules applied when it was bound (a
        # Reauth may change the role; the held queries keep their binding).
        self._held_restricted: dict[tuple[Connection, QuerySetId], bool] = {}
        # Called with each migration transaction applied (from the log: a replica's).
        self.on_migration: Callable[[Tx], None] = lambda tx: None

    # -- applying transactions ---------------------------------------------------------------

    @property
    def offset(self) -> Offset:
        return Offset(self.store.offset)

    def on_tx(self, tx: Tx) -> None:
        """Take a committed transaction from the broker (any order, possibly duplicated)."""
        if self.halted is not None or tx.offset <= self.store.offset:
            return
        if tx.offset > self.store.offset + 1:
            self._early[tx.offset] = tx
            self._fill_gap()
            return
        self._apply(tx)
        while self.store.offset + 1 in self._early:
            self._apply(self._early.pop(self.store.offset + 1))
        for stale in [o for o in self._early if o <= self.store.offset]:
            del self._early[stale]

    def _fill_gap(self) -> None:
        if self._filling:
            return
        self._filling = True
        asyncio.get_running_loop().create_task(self._read_gap(), name="fill-gap")

    async def _read_gap(self) -> None:
        try:
            while self._early and min(self._early) > self.store.offset + 1:
                entries = await self.journal.read(self.offset, READ_CHUNK)
                if not entries:
                    await asyncio.sleep(0.01)
                    continue
                for offset, payload in entries:
                    if offset == self.store.offset + 1:
                        tx = self._decode(offset, payload)
                        if tx is None:
                            return
                        self.on_tx(tx)
        except (JournalError, LookupError):
            logger.exception("filling the gap after offset %d failed", self.store.offset)
        finally:
            self._filling = False

    async def catch_up(self) -> None:
        """Apply everything the journal holds beyond our offset."""
        while self.halted is None:
            entries = await self.journal.read(self.offset, READ_CHUNK)
            if not entries:
                return
            for offset, payload in entries:
                tx = self._decode(offset, payload)
                if tx is None:
                    return
                self.on_tx(tx)

    def _decode(self, offset: Offset, payload: bytes) -> Tx | None:
        """The entry at `offset`, or None (and the replica halts) when it does not read under
        this replica's schema: a newer version written by a newer module, most likely. The
        owner re-reads the stored schema to say why; applying past it would corrupt state."""
        try:
            return decode_tx(self.schema, payload)
        except ValueError as exc:
            if self.halted is None:
                self.halted = (
                    f"the journal entry at offset {offset} does not read under this replica's "
                    f"schema (version {self.schema.version}): {exc}"
                )
                logger.error("replica halted: %s", self.halted)
                self.on_schema_event()
            return None

    def halt(self, reason: str) -> None:
        """Apply nothing more (see `halted`)."""
        if self.halted is None:
            self.halted = reason

    def reload(self, snap: snapshot.Snapshot) -> None:
        """Start over from a snapshot (this replica fell behind what the journal retains).

        Every connection is closed with a resumable code first: their cursors may fall
        between the old state and the snapshot, so they resume (with a fresh state if needed).
        """
        for conn in list(self.connections | set(self._conn_group)):
            conn.close(CloseCode.SHUTDOWN, "this replica is reloading its state; resume")
        snapshot.restore(self.store, snap)
        self.window.clear()
        self._early.clear()
        self._release_waiters()

    def _apply(self, tx: Tx) -> None:
        self.store.apply(tx.changes, tx.offset)
        self.window.append(tx)
        if is_migration(tx):
            self.on_schema_event()
            self.on_migration(tx)
        if self._key_groups:
            try:
                index = self.index
                self._fan_out(
                    tx, index.route(tx.changes, self.store, budget=self.limits.max_query_cost)
                )
                if index.last_stats.over_budget:
                    self._fail_over_budget(tx, index.last_stats.over_budget)
            except Exception:
                # The state is right but some subscribers may have missed this delta: close
                # them with a resumable code, so they resume from their cursor and catch up.
                logger.exception("routing offset %d failed", tx.offset)
                for conn in list(self._conn_group):
                    conn.close(CloseCode.INTERNAL_ERROR, "internal error: resume")
        self._release_waiters()

    def _fan_out(self, tx: Tx, deltas: dict[QueryKey, QueryDelta]) -> None:
        # Each query's delta is encoded once per format; each group collects its parts. The
        # messages themselves are built at the end of the tick, once per group (emit_pending).
        touched: dict[_Group, Parts] = {}
        # (query key, format) whose delta did not encode: only their subscribers are told.
        failed: list[tuple[QueryKey, Format]] = []
        for key, delta in deltas.items():
            groups = self._key_groups.get(key)
            if not groups:
                continue
            encoded: dict[Format, bytes | None] = {}
            table = ""
            for group in groups.values():
                fmt = group.fmt
                if fmt in encoded:
                    data = encoded[fmt]
                else:
                    table = table or self.index_table(key)
                    data = encoded[fmt] = self._encode_delta(tx, key, fmt, table, delta)
                    if data is None:
                        failed.append((key, fmt))
                if data is None:
                    continue
                parts = touched.get(group)
                if parts is None:
                    parts = touched[group] = []
                for qs_id, index in group.by_key[key]:
                    parts.append((qs_id, index, data))
        if touched:
            pending = self._pending
            for group, parts in touched.items():
                entry = pending.get(group)
                if entry is None:
                    pending[group] = [(tx.offset, parts)]
                else:
                    entry.append((tx.offset, parts))
            self._schedule_flush()
        for key, fmt in failed:
            self._fail_query(key, fmt)

    def _encode_delta(
        self, tx: Tx, key: QueryKey, fmt: Format, table: str, delta: QueryDelta
    ) -> bytes | None:
        """The delta encoded in `fmt`, or None (logged) when a value in it cannot be."""
        try:
            return CODECS[fmt].encode_query_update(self.query_update(table, delta))
        except ENCODE_ERRORS:
            logger.exception(
                "offset %d: encoding the %s delta of a query on %s failed", tx.offset, fmt, table
            )
            return None

    def _fail_query(self, key: QueryKey, fmt: Format) -> None:
        """End every query set that holds `key` on connections in `fmt`: they missed an update
        (SubscriptionFailed, `INTERNAL`); other sets and connections are not affected."""
        for conn, qs_id in self._holders((key,), fmt):
            conn.fail_query_set(qs_id, UNENCODABLE, ErrorCode.INTERNAL)

    def _holders(
        self, keys: tuple[QueryKey, ...], fmt: Format | None = None
    ) -> list[tuple[Connection, QuerySetId]]:
        """Each (connection, query set) holding one of `keys` (on connections in `fmt`, if
        given), once."""
        found: dict[tuple[Connection, QuerySetId], None] = {}
        for key in keys:
            for group in list(self._key_groups.get(key, {}).values()):
                if fmt is not None and group.fmt != fmt:
                    continue
                qs_ids = sorted({qs_id for qs_id, _ in group.by_key[key]})
                for conn in list(group.conns):
                    for qs_id in qs_ids:
                        found[(conn, qs_id)] = None
        return list(found)

    def _fail_over_budget(self, tx: Tx, keys: tuple[QueryKey, ...]) -> None:
        # Queries whose routing would cost more than max_query_cost for one transaction:
        # their subscriptions fail (SubscriptionFailed, LIMIT_EXCEEDED) rather than making
        # every later write to the tables they read stall the loop.
        limit = self.limits.max_query_cost
        targets = self._holders(keys)
        logger.warning(
            "offset %d: %d queries over the query cost limit (%d); failing %d query sets",
            tx.offset,
            len(keys),
            limit,
            len(targets),
        )
        message = (
            f"a change made this query examine over {limit} rows (counting each join "
            f"partner checked), more than the query cost limit (max_query_cost {limit}); "
            "filter it by an indexed column"
        )
        for conn, qs_id in targets:
            conn.fail_query_set(qs_id, message)

    def index_table(self, key: QueryKey) -> str:
        query = self.index.get(key)
        assert query is not None, f"routed a query the index does not hold: {key}"
        return query.table

    def emit_pending(self) -> None:
        """Hand every update routed so far to its connections, one shared frame per group.

        Called at the end of each tick, and before anything that must follow those updates
        on a connection (a ReducerResult, a change of subscriptions).
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        epoch = self.epoch
        for group, txs in pending.items():
            codec = CODECS[group.fmt]
            messages = [codec.encode_transaction_update(epoch, off, parts) for off, parts in txs]
            frames = codec.pack_batches(messages, MAX_FRAME)
            opcode = OP_TEXT if group.fmt == "json" else OP_BINARY
            wires = [ws_frame(frame, opcode) for frame in frames]
            for conn in group.conns:
                conn.send_shared(frames, wires, messages)

    def query_update(self, table: str, delta: QueryDelta) -> QueryUpdate:
        tdef = self.schema.tables[table]
        visible = tdef.visible_row
        return QueryUpdate(
            table,
            inserts=[visible(r) for r in delta.inserts],
            updates=[visible(r) for r in delta.updates],
            deletes=list(delta.deletes),
        )

    def initial_update(self, query: BoundQuery) -> QueryUpdate:
        """The query's current rows as inserts (a fresh snapshot). Raises LimitExceeded."""
        visible = self.schema.tables[query.table].visible_row
        return QueryUpdate(query.table, inserts=[visible(r) for r in self.initial_rows(query)])

    async def wait_applied(self, offset: int) -> None:
        """Return once the transaction at `offset` is applied here."""
        if offset <= self.store.offset:
            return
        fut = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._waiters, (offset, self._seq, fut))
        await fut

    def _release_waiters(self) -> None:
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.store.offset:
            _, _, fut = heapq.heappop(waiters)
            if not fut.done():
                fut.set_result(None)

    # -- subscriptions -----------------------------------------------------------------------

    def compile(self, sql: str, *, restricted: bool = True) -> Query:
        """Compile (or reuse) a query; `restricted` adds the tables' visibility rules.

        Raises:
            SubscriptionError: the query (or a rule) does not compile.
        """
        key = (sql, restricted)
        query = self._compiled.get(key)
        if query is None:
            limits = self.limits
            # Before parsing: no text can make the parser slow or deep (see `prescan`).
            prescan(sql, max_bytes=limits.max_query_bytes, max_terms=limits.max_query_terms)
            query = compile_query(sql, self.schema)
            if restricted:
                query = with_visibility(query, self.schema)
            terms = term_count(query.where)
            if terms > self.limits.max_query_terms:
                raise LimitExceeded(
                    f"the query has {terms} conditions (IN list items count one each); "
                    f"the limit is {self.limits.max_query_terms}"
                )
            self._compiled[key] = query
            self._compiled_bytes += len(sql)
            while len(self._compiled) > COMPILED_CACHE or (
                self._compiled_bytes > COMPILED_CACHE_BYTES
            ):
                (old_sql, _), _ = self._compiled.popitem(last=False)
                self._compiled_bytes -= len(old_sql)
        else:
            self._compiled.move_to_end(key)
        return query

    def one_off(self, sql: str, principal: Principal) -> Result:
        """Run a one-off query (`syncd.core.oneoff`: column lists, aggregates, ORDER BY,
        LIMIT/OFFSET, EXPLAIN) for a caller, on the state now: the visibility rules restrict
        the rows before they are aggregated, as for a subscription's initial rows.

        Raises:
            SubscriptionError: the query does not compile or bind (BAD_QUERY).
            LimitExceeded: its base rows would cost more than `max_query_cost`, or its result
                has more than `max_initial_rows` rows.
        """
        auth = principal.auth
        restricted = auth.role not in BYPASS_ROLES
        key = (sql, restricted)
        found = self._plans.get(key)
        limits = self.limits
        if found is None:
            prescan(sql, max_bytes=limits.max_query_bytes, max_terms=limits.max_query_terms)
            plan = compile_one_off(sql, self.schema)
            base = with_visibility(plan.base, self.schema) if restricted else plan.base
            terms = term_count(base.where)
            if terms > limits.max_query_terms:
                raise LimitExceeded(
                    f"the query has {terms} conditions (IN list items count one each); "
                    f"the limit is {limits.max_query_terms}"
                )
            found = self._plans[key] = (plan, base)
            while len(self._plans) > COMPILED_CACHE // 4:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        plan, base = found
        query = base.bind(rule_params(principal.identity, auth))
        if plan.explain:
            rules = any(self.schema.tables[t].visible for t in query.tables)
            return plan.explain_rows(query, self.store, show_sizes=not (restricted and rules))
        self.check_cost(query)
        tdef = self.schema.tables[query.table]
        visible = tdef.visible_row
        rows = [visible(r) for r in query.initial_rows(self.store)]
        result = plan.run(rows, tdef)
        if len(result.rows) > limits.max_initial_rows:
            raise LimitExceeded(
                f"the query returns {len(result.rows)} rows, more than the limit of "
                f"{limits.max_initial_rows}; narrow it with a WHERE clause or LIMIT"
            )
        return result

    def bind(self, sqls: list[str], principal: Principal) -> list[BoundQuery]:
        """Compile and bind a query set for a caller: its identity is `:sender`, and unless its
        role bypasses them (service), the visibility rules of the tables apply.

        Raises:
            SubscriptionError: naming the failing query.
        """
        auth = principal.auth
        restricted = auth.role not in BYPASS_ROLES
        params = rule_params(principal.identity, auth)
        bound: list[BoundQuery] = []
        for i, sql in enumerate(sqls):
            try:
                bound.append(self.compile(sql, restricted=restricted).bind(params))
            except (SubscriptionError, LimitExceeded) as exc:
                prefix = f"query {i}: " if len(sqls) > 1 else ""
                raise type(exc)(f"{prefix}{exc}") from None
        return bound

    def initial_rows(self, query: BoundQuery) -> list[Row]:
        """The query's rows now.

        Raises:
            LimitExceeded: computing them would cost more than `max_query_cost` (estimated
                from index sizes first, see `query_cost`), or they are more than
                `max_initial_rows`.
        """
        self.check_cost(query)
        rows = query.initial_rows(self.store)
        if len(rows) > self.limits.max_initial_rows:
            raise LimitExceeded(
                f"the query returns {len(rows)} rows, more than the limit of "
                f"{self.limits.max_initial_rows}; narrow it with a WHERE clause"
            )
        return rows

    def check_cost(self, query: BoundQuery) -> None:
        """Refuse a query whose initial rows would cost more than `max_query_cost` (estimated
        from index sizes, see `query_cost`). Raises LimitExceeded."""
        limit = self.limits.max_query_cost
        if limit and query_cost(query, self.store, limit=limit) > limit:
            raise LimitExceeded(
                f"the query would examine over {limit} rows (counting each join partner "
                f"checked), more than the query cost limit (max_query_cost {limit}); "
                "filter it by an indexed column"
            )

    def subscribe(self, conn: Connection, qs_id: QuerySetId, queries: list[BoundQuery]) -> None:
        """Start routing `queries` to `conn` under `qs_id`. Call it in the same tick as reading
        their initial rows (no transaction can fall between the two), after adding the set to
        `conn.query_sets`."""
        self.emit_pending()
        restricted = self._held_restricted[(conn, qs_id)] = _restricted(conn)
        for query in queries:
            self.index.add(query)
            self.held.add(held_text(query), restricted)
        self._regroup(conn)

    def unsubscribe(self, conn: Connection, qs_id: QuerySetId, queries: list[BoundQuery]) -> None:
        """Stop routing a query set to `conn`, after removing it from `conn.query_sets`."""
        self.emit_pending()
        restricted = self._held_restricted.pop((conn, qs_id), True)
        for query in queries:
            self.index.remove(query.key)
            self.held.remove(held_text(query), restricted)
        self._regroup(conn)

    def _regroup(self, conn: Connection) -> None:
        old = self._conn_group.pop(conn, None)
        if old is not None:
            old.conns.discard(conn)
            if not old.conns:
                gkey = (old.fmt, old.places)
                del self._groups[gkey]
                for key in old.by_key:
                    groups = self._key_groups[key]
                    del groups[gkey]
                    if not groups:
                        del self._key_groups[key]
        places: Places = tuple(
            sorted(
                (query.key, qs_id, index)
                for qs_id, queries in conn.query_sets.items()
                for index, query in enumerate(queries)
            )
        )
        if not places:
            return
        gkey = (conn.fmt, places)
        group = self._groups.get(gkey)
        if group is None:
            by_key: dict[QueryKey, list[tuple[QuerySetId, int]]] = {}
            for key, qs_id, index in places:
                by_key.setdefault(key, []).append((qs_id, index))
            group = self._groups[gkey] = _Group(
                conn.fmt, places, {k: tuple(v) for k, v in by_key.items()}
            )
            for key in group.by_key:
                self._key_groups.setdefault(key, {})[gkey] = group
        group.conns.add(conn)
        self._conn_group[conn] = group

    # -- resume ------------------------------------------------------------------------------

    async def txs_since(self, offset: int) -> list[Tx] | None:
        """Every transaction after `offset` up to now: the journal's, then the in-memory
        window's. None when they are no longer held, or so many that a fresh snapshot is
        cheaper (more than 10 resume windows), or when they include a schema migration: rows
        the client holds have the old layout, so it needs a fresh state."""
        if offset > self.store.offset:
            return None
        if self.store.offset - offset > 10 * self.limits.resume_window:
            return None
        txs: list[Tx] = []
        after = offset
        while not self._window_covers(after):
            try:
                entries = await self.journal.read(Offset(after), READ_CHUNK)
            except LookupError:
                return None
            if not entries:
                return None
            for entry_offset, payload in entries:
                if entry_offset > self.store.offset:
                    break  # durable but not applied here yet: it reaches us by fan-out
                tx = decode_tx(self.schema, payload)
                if is_migration(tx):
                    return None
                txs.append(tx)
                after = entry_offset
                if self._window_covers(after):
                    break
        # No await from here: the window cannot move under us.
        txs.extend(tx for tx in self.window if tx.offset > after)
        if any(is_migration(tx) for tx in txs):
            return None
        return txs

    def _window_covers(self, after: int) -> bool:
        """True when every transaction after `after` is in the window (or there is none)."""
        window = self.window
        return after >= self.store.offset or (bool(window) and window[0].offset <= after + 1)

    def resume_update(self, query: BoundQuery, txs: list[Tx]) -> QueryUpdate:
        """What changed in `query`'s result over `txs` (the transactions after the client's
        cursor): current rows of keys that may have changed, as updates, and deletes for keys
        that left the result.

        A delete is sent only for a key whose row was in the result at the cursor (evaluated
        on the state then, join partners included), so a resuming client learns nothing
        about rows its queries never selected: not even, for a table visible through a
        semijoin (kled's workspaces), which of them changed while it was away.

        For an event table (never stored): its rows in `txs` the query selects, as inserts.
        """
        tdef = self.schema.tables[query.table]
        if tdef.events:
            return QueryUpdate(query.table, inserts=self._resume_events(query, txs))
        state = self.store.tables[query.table]
        join = query.join
        # table -> pk -> (row at the cursor, row now), for the tables the query reads
        merged: dict[str, dict[Any, Change]] = {}
        for tx in txs:
            for table in query.tables:
                changed = tx.changes.tables.get(table)
                if not changed:
                    continue
                into = merged.setdefault(table, {})
                for pk, (old, new) in changed.items():
                    first = into.get(pk)
                    into[pk] = (old if first is None else first[0], new)
        # pk -> the row as it was at the cursor (None: absent), for keys that may have moved
        candidates: dict[Any, Row | None] = {
            pk: old for pk, (old, _new) in merged.get(query.table, {}).items()
        }
        if join is not None:
            # A result row whose own values did not change can only enter or leave the result
            # through a partner that changed; its join value is the partner's, then or now.
            partner_values: dict[Any, None] = {}
            for old, new in merged.get(join.table, {}).values():
                for row in (old, new):
                    if row is not None and row[join.other_position] is not None:
                        partner_values[row[join.other_position]] = None
            for value in partner_values:
                for row in state.lookup(join.column, value):
                    candidates.setdefault(state.pk_of(row), row)
        visible = self.schema.tables[query.table].visible_row
        updates: list[Any] = []
        deletes: list[Any] = []
        now = StoreView(self.store)
        then = StateBefore(self.store, ChangeSet(merged))
        for pk, was in candidates.items():
            row = state.get(pk)
            if row is not None and query.contains(row, now):
                updates.append(visible(row))
            elif was is not None and query.contains(was, then):
                deletes.append(pk)
        return QueryUpdate(query.table, updates=updates, deletes=deletes)

    def _resume_events(self, query: BoundQuery, txs: list[Tx]) -> list[Any]:
        """The event rows of `txs` that `query` selected when they were sent, as live delivery
        saw them: each is evaluated on the state just after its own transaction (the store now,
        patched back with the later transactions' changes), so a viewer who only became
        allowed to see them later (joined the room after the event) is not sent old events.

        Walks `txs` backwards, merging each transaction's changes (first old row, last new row)
        once its own events are judged; the state is rebuilt only when a later transaction
        changed a stored table the query reads."""
        tdef = self.schema.tables[query.table]
        stored = [t for t in query.tables if not self.schema.tables[t].events]
        merged: dict[str, dict[Any, Change]] = {}
        then: StoreView | StateBefore = StoreView(self.store)
        stale = False
        picked: list[list[Any]] = []
        for tx in reversed(txs):
            rows = [
                new
                for _old, new in tx.changes.tables.get(query.table, {}).values()
                if new is not None
            ]
            if rows:
                if stale:
                    then = StateBefore(self.store, ChangeSet(merged))
                    stale = False
                picked.append([tdef.visible_row(r) for r in rows if query.contains(r, then)])
            for table in stored:
                changed = tx.changes.tables.get(table)
                if not changed:
                    continue
                into = merged.setdefault(table, {})
                for pk, (old, new) in changed.items():
                    later = into.get(pk)
                    into[pk] = (old, new if later is None else later[1])
                stale = True
        return [row for rows in reversed(picked) for row in rows]

    # -- coalescing --------------------------------------------------------------------------

    def mark_dirty(self, conn: Connection) -> None:
        """Schedule `conn`'s queued messages to go out at the end of this tick."""
        self._dirty.add(conn)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.emit_pending()
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            conn.flush()

    def admit(self, conn: Connection) -> None:
        """Count a welcomed connection (see `drop`)."""
        assert conn.principal is not None
        self.connections.add(conn)
        identity = conn.principal.identity
        self.per_identity[identity] = self.per_identity.get(identity, 0) + 1

    def drop(self, conn: Connection) -> None:
        """Forget a closed connection and its subscriptions."""
        if conn in self.connections and conn.principal is not None:
            identity = conn.principal.identity
            left = self.per_identity[identity] - 1
            if left:
                self.per_identity[identity] = left
            else:
                del self.per_identity[identity]
        self.emit_pending()
        for qs_id, queries in conn.query_sets.items():
            restricted = self._held_restricted.pop((conn, qs_id), True)
            for query in queries:
                self.index.remove(query.key)
                self.held.remove(held_text(query), restricted)
        conn.query_sets.clear()
        self._regroup(conn)
        self.connections.discard(conn)
        self._dirty.discard(conn)


def held_text(query: BoundQuery) -> str:
    """The text a held query is recorded under: its canonical SQL, parameters unbound and
    without the visibility rules (compiling it again gives the same query)."""
    return query.query.key.removesuffix(VISIBLE_MARK)


def _restricted(conn: Connection) -> bool:
    """Whether the visibility rules apply to `conn`'s queries (as in `Replica.bind`)."""
    principal = conn.principal
    return principal is None or principal.auth.role not in BYPASS_ROLES
