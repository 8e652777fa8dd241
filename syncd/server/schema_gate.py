"""Replicas on a shared Postgres journal: may this replica's module serve, and lead, over the
stored schema? (issue 11, rolling upgrades; docs/operations.md "Changing a module").

Every replica compares its module with the stored history (`schema_check`'s meta key, one for
all replicas) at start, and again whenever it changes (a migration transaction in the log, a
payload it cannot read, or the lease poll):

- **serving**: the stored history is the one this replica runs with;
- **waiting**: its module is *newer*: the stored history plus one automatic step. It follows
  the log (older rows convert on read, so its store is in the new layout) but serves no client
  until the migration is recorded, and it campaigns: as leader it records the migration
  (`lead`, through its fenced writer journal) before leading. A fresh database (nothing
  stored) waits the same way for its first leader to record version 1;
- **stopped**: its module is *older* (it equals an earlier stored version) or does not match a
  history that changed while it ran, or its migration failed when it took the lease (a row
  function raised or returned a bad row, the stored rows refuse a change: `lead`; nothing was
  written, and the lease is given back to the replicas of the previous module). It serves
  nothing (readyz 503 with the reason), stops following the log and never campaigns: it
  would write under a schema that is not the data's. Only a restart (with the right module)
  leaves this state.

At start, a module that is neither (a refused plan against the latest stored version) is a
start failure, as for the embedded server (`check_schema` raises `SchemaMismatch`): no rolling
upgrade makes such a module fit, so the operator learns at once rather than from a replica
that stays unready.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from syncd.core import snapshot
from syncd.core.ids import Offset
from syncd.core.schema import Schema
from syncd.core.store import Store
from syncd.core.stored_schema import (
    StoredSchema,
    attach,
    changes_between,
    decode_history,
    encode_history,
    plan,
)
from syncd.errors import SchemaMismatch
from syncd.ports import Journal
from syncd.server.schema_check import SCHEMA_KEY, SchemaCheck, check_schema, record_migration

__all__ = ["GateState", "SchemaGate", "open_gate", "standing"]

logger = logging.getLogger("syncd")

GateState = Literal["serving", "waiting", "stopped"]


def _older_index(stored: list[StoredSchema], module: Schema) -> int | None:
    """The index of the latest stored version, before the last, that the module is."""
    for k in range(len(stored) - 2, -1, -1):
        if plan(stored[k], module, history=stored[: k + 1]).kind == "identical":
            return k
    return None


def standing(
    module: Schema, running: list[StoredSchema], stored: list[StoredSchema] | None
) -> tuple[GateState, str]:
    """Where a replica running `running` (its module's history) stands against `stored`.

    Returns:
        The state and, unless serving, the reason (what readyz and the log say).
    """
    mine = running[-1].version
    if stored is None:
        return "waiting", "no schema is stored yet: waiting for the first leader to record it"
    latest = stored[-1].version
    if stored == running:
        return "serving", ""
    if stored == running[:-1]:
        return "waiting", (
            f"this replica runs schema version {mine}; the stored schema is version {latest}: "
            "waiting to lead to migrate (the leader runs the previous module)"
        )
    older = _older_index(stored, module)
    if older is not None:
        what = "; ".join(c.what for c in changes_between(stored[older], stored[-1]))
        return "stopped", (
            f"this replica runs schema version {older + 1}; the stored schema is version "
            f"{latest}: {what or 'changed'}; restart it with the new module"
        )
    diff = plan(stored[-1], module, history=stored).diff().replace("\n", ";")
    return "stopped", (
        f"the stored schema is version {latest}, which this replica's module (version {mine}) "
        f"does not follow: {diff}; restart it with the module of version {latest}"
    )


class SchemaGate:
    """One replica's standing against the stored schema (see the module docstring).

    Attributes:
        module: the module's schema, without a history.
        check: what this replica runs with: `check.schema` has the history attached (the new
            version last when it is newer); `check.history` is the history to record.
        state, reason: as `standing` says.
        on_change: called with the new state whenever it changes.
    """

    def __init__(
        self,
        module: Schema,
        check: SchemaCheck,
        stored: list[StoredSchema] | None,
        raw: bytes | None,
    ) -> None:
        self.module = module
        self.check = check
        history = check.schema.history
        assert history is not None
        # The history this replica reads and writes with (its module's version last).
        self.running: list[StoredSchema] = list(history.versions)
        # The stored history as last read, and its bytes (a changed value means re-judge).
        self.stored = stored
        self._raw = raw
        # The stored schema version of the data this replica has applied (its recovered head,
        # then each migration transaction it applies); None: none read yet (no data, or not
        # known). A history that says "serving" is not enough: the leader records it before it
        # journals the migration transaction, and until that transaction is applied here the
        # rows a row function rewrites would be served with their placeholder values.
        self.data_version: int | None = None
        self.state, self.reason = standing(module, self.running, stored)
        self.on_change: Callable[[GateState], None] = lambda _: None

    @property
    def schema(self) -> Schema:
        return self.check.schema

    @property
    def version(self) -> int:
        """The stored schema version this replica's module is (or would be, when newer)."""
        return self.running[-1].version

    @property
    def may_serve(self) -> bool:
        return self.state == "serving"

    @property
    def may_lead(self) -> bool:
        return self.state != "stopped"

    def stop(self, reason: str) -> None:
        """Stop for a reason found elsewhere (a journal entry this replica cannot read)."""
        if self.state != "stopped":
            self._set("stopped", reason)

    def _set(self, state: GateState, reason: str) -> None:
        before, self.state, self.reason = self.state, state, reason
        if state == before:
            return
        if state == "stopped":
            logger.error("this replica stops serving: %s", reason)
        elif state == "serving":
            logger.warning("stored schema version %d is this replica's: serving", self.version)
        self.on_change(state)

    async def refresh(self, journal: Journal) -> GateState:
        """Re-read the stored history and re-judge (a stopped gate stays stopped).

        Raises:
            JournalError: the journal failed (the state is unchanged).
        """
        raw = await journal.get_meta(SCHEMA_KEY)
        if raw == self._raw or self.state == "stopped":
            return self.state
        self._raw = raw
        try:
            self.stored = None if raw is None else decode_history(raw)
        except ValueError as exc:
            self._set("stopped", f"the stored schema is unreadable: {exc}")
            return self.state
        self._judge()
        return self.state

    def applied(self, version: int) -> None:
        """The replica applied data written under `version` (a migration transaction from the
        log): a gate waiting for it serves now."""
        if self.data_version is None or version > self.data_version:
            self.data_version = version
        if self.state != "stopped":
            self._judge()

    def _judge(self) -> None:
        state, reason = standing(self.module, self.running, self.stored)
        if (
            state == "serving"
            and self.data_version is not None
            and (self.data_version < self.version)
        ):
            state, reason = (
                "waiting",
                (
                    f"the stored schema is version {self.version}, this replica's: waiting to "
                    "apply its migration transaction from the log"
                ),
            )
        self._set(state, reason)

    async def lead(self, writer: Journal, store: Store, now_us: int) -> Offset | None:
        """Before leading, with the lease held: re-read the stored history through the fenced
        `writer` and record this replica's version (and journal the migration transaction
        after `store`'s offset, the journal head) when it is newer or nothing is stored.

        Returns:
            The migration transaction's offset, or None when none was written.

        Raises:
            SchemaMismatch: this replica may not lead (stopped), or its migration failed (a
                row function, a check of the stored rows): it is stopped then, with the
                reason; nothing was written.
            JournalError: the journal failed (or another leader fenced this one).
        """
        await self.refresh(writer)
        if self.state == "stopped":
            raise SchemaMismatch(self.reason)
        check = self.check
        if self.state == "serving":
            check = SchemaCheck(check.schema, check.plan, None)  # stored already
        # The one place a replica records a migration (the embedded server's entry point). On
        # a copy: row functions change it, and the replica applies the migration transaction
        # from the log like any other (its subscribers see the rows change).
        try:
            migrated = await record_migration(check, writer, snapshot.copy(store), now_us)
        except SchemaMismatch as exc:
            # A row function failed or the stored rows refuse a change: nothing was written,
            # and the same data would refuse it at every take-over. Never campaign again (the
            # replicas of the previous module keep leading and serving).
            self.stop(
                f"this replica cannot migrate to schema version {self.version}, so it may not "
                f"lead: {exc}; restart it with a fixed module (or the previous one)"
            )
            raise
        self.stored = list(self.running)
        self._raw = encode_history(self.running)
        # Serving once the replica has applied the migration transaction (`applied`, from the
        # log, which the leader reads next), never on the rows before it.
        self._judge()
        return migrated


async def open_gate(module: Schema, journal: Journal, *, adopt: bool = False) -> SchemaGate:
    """Judge the module against the journal's stored schema at start. Writes nothing.

    Raises:
        SchemaMismatch: the plan is refused (and the module is no earlier stored version),
            or the stored history is unreadable.
        JournalError: the journal failed.
    """
    raw = await journal.get_meta(SCHEMA_KEY)
    stored = None
    if raw is not None:
        try:
            stored = decode_history(raw)
        except ValueError as exc:
            raise SchemaMismatch(f"the journal's stored schema is unreadable: {exc}") from None
        if plan(stored[-1], module, history=stored).kind != "identical":
            older = _older_index(stored, module)
            if older is not None:
                # Not through check_schema: an older module can look like an automatic change
                # of the latest (re-adding a dropped index) and would migrate back and forth.
                running = stored[: older + 1]
                return SchemaGate(
                    module, SchemaCheck(attach(module, running), None, None), stored, raw
                )
    check = await check_schema(module, journal, adopt=adopt)
    return SchemaGate(module, check, stored, raw)
