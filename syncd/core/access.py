"""Write authorization for client merges: who may merge into which CRDT cell.

Clients write through reducers (which check what they like) and through `MergeCrdt` into CRDT
cells. A merge is allowed only when the module says so, next to the column
(`column(merge=...)`) or for the whole table (`table(merge=...)`):

* an SQL rule in the language of visibility rules, over the row, with `:sender`, `:role` and
  `:email` (a semijoin `JOIN u ON t.a = u.b WHERE ...` may look at another table), or
* a Python check, `fn(ctx: MergeContext) -> bool`, run by the writer just before the merge.

No rule: only reducers write the cell. The writer (leader) evaluates, on its own state, the
table's visibility rule AND the merge rule, then the check; `service`/`service_role` bypass the
rules and checks (as they bypass visibility) but not a column that has none.

No existence oracle: a merge into a missing row, a row the caller cannot see, and a row it may
not merge get the same error (`ConstraintError(NO_ROW)`, the same text whatever the pk), after
the same work (both rules are bound and evaluated whether or not the row exists).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from syncd.core.hlc import Stamp
from syncd.core.ids import Identity
from syncd.core.query import BoundQuery, Query, StoreView, compile_rule
from syncd.core.reducers import (
    SERVICE_ROLES,
    AuthInfo,
    Database,
    Interrupted,
    RunUser,
    merge_cell,
    row_to_instance,
)
from syncd.core.schema import Schema, TableDef
from syncd.core.store import ChangeSet, Row, Store
from syncd.errors import (
    ConstraintError,
    Forbidden,
    ReducerError,
    ReducerTimeout,
    SubscriptionError,
    SyncdError,
)

__all__ = ["NO_ROW", "MergeContext", "MergePolicy", "rule_params"]

# Rules bound per caller kept by MergePolicy (most recently used).
BOUND_CACHE = 4096

#: The one answer for a missing row, a row the caller cannot see and one it may not merge.
NO_ROW = "no such row to merge into (or it is not yours to merge)"


def rule_params(identity: Identity, auth: AuthInfo) -> dict[str, object]:
    """The parameters visibility and merge rules are bound with for one caller.

    A role or email the caller does not have is NULL (never ''), so `email = :email` and
    `NOT (email = :email)` are unknown for them and let nothing through.
    """
    return {"sender": identity, "role": auth.role, "email": auth.email}


@dataclass(frozen=True, slots=True)
class MergeContext:
    """What a Python merge check gets.

    Attributes:
        sender: who merges.
        auth: their verified role and claims.
        table: the table's name.
        column: the CRDT column merged into.
        row: the current row (an instance of the table's class, python-form values).
        db: the tables, to read (`find`, `filter`); anything written is rolled back.
    """

    sender: Identity
    auth: AuthInfo
    table: str
    column: str
    row: Any
    db: Database


@dataclass(frozen=True, slots=True)
class _Rules:
    visible: Query | None  # the table's visibility rule
    merge: Query | None  # the column's SQL merge rule
    check: Callable[[Any], bool] | None  # the column's Python check


class MergePolicy:
    """The module's merge rules, compiled once; `authorize` is called by the writer per merge.

    Pure: it reads the store it is given and never writes it.
    """

    def __init__(self, schema: Schema) -> None:
        """Compile every visibility and merge rule.

        Raises:
            SubscriptionError: a rule does not compile (`check_rules` reports it at start-up).
        """
        self.schema = schema
        # (table, column) -> its rules; absent: the column is not mergeable by clients
        self._rules: dict[tuple[str, str], _Rules] = {}
        # (rule key, parameter values) -> the rule bound for that caller (LRU): binding a
        # semijoin rule costs more than evaluating it, and a caller merges again and again.
        # A hit depends only on the caller's own past merges, never on which rows exist.
        self._bound: OrderedDict[tuple[str, tuple[object, ...]], BoundQuery | None] = OrderedDict()
        for tdef in schema.tables.values():
            visible = compile_rule(tdef.name, tdef.visible, schema) if tdef.visible else None
            for col in tdef.columns:
                if col.merge is None:
                    continue
                if isinstance(col.merge, str):
                    rules = _Rules(visible, compile_rule(tdef.name, col.merge, schema), None)
                else:
                    rules = _Rules(visible, None, col.merge)
                self._rules[(tdef.name, col.name)] = rules

    def merge(
        self,
        store: Store,
        table: str,
        pk: Any,
        column: str,
        op: Any,
        *,
        sender: Identity,
        auth: AuthInfo,
        stamp: Stamp,
        now_ms: int | None = None,
        run_user: RunUser | None = None,
    ) -> ChangeSet:
        """A client's merge: `authorize`, then `merge_cell`, as one step on the writer's store.

        `now_ms`: the writer's physical clock, which bounds LWW stamps (see `merge_cell`).
        `run_user`: runs a Python merge check (the leader's time budget, see `run_reducer`).

        Raises:
            Everything `authorize` and `merge_cell` raise; the store is then unchanged.
        """
        self.authorize(
            store, table, pk, column, sender=sender, auth=auth, stamp=stamp, run_user=run_user
        )
        return merge_cell(store, self.schema, table, pk, column, op, stamp, now_ms=now_ms)

    def authorize(
        self,
        store: Store,
        table: str,
        pk: Any,
        column: str,
        *,
        sender: Identity,
        auth: AuthInfo,
        stamp: Stamp,
        run_user: RunUser | None = None,
    ) -> None:
        """Allow the merge, or raise. Call it on the writer's store, just before the merge,
        with no await in between (the writer runs one write at a time).

        Args:
            stamp: the merge's stamp (a Python check reads inside a transaction of its own).
            run_user: runs a Python check's code (a time budget may interrupt it).

        Raises:
            ConstraintError: unknown or private table, or not a CRDT column (the schema is
                public: no oracle); `NO_ROW` for a missing, invisible or unmergeable row.
            Forbidden: the column is never mergeable by clients (no rule: reducers only).
            SyncdError: the Python check raised one (its message is the module's choice);
                any other exception from it becomes a ReducerError, and an interruption by
                `run_user` (over the time budget) a ReducerTimeout.
        """
        tdef = self.schema.tables.get(table)
        if tdef is None or not tdef.public:
            raise ConstraintError(f"no public table {table!r}")
        col = tdef.column(column)
        if col is None or not col.type.is_crdt:
            raise ConstraintError(f"{table}.{column} is not a CRDT column")
        rules = self._rules.get((table, column))
        if rules is None:
            raise Forbidden(f"{table}.{column} is not mergeable by clients: only reducers write it")
        if auth.role in SERVICE_ROLES:
            return
        # Same work whatever the row: bind both rules, look the row up, evaluate both rules
        # (on a stand-in when it is missing), and only then decide.
        params = rule_params(sender, auth)
        visible, visible_ok = self._bind(rules.visible, params)
        merge, merge_ok = self._bind(rules.merge, params)
        row = _row(tdef, pk, store)
        view = StoreView(store)
        probe = row if row is not None else _stand_in(tdef, store)
        seen = probe is not None and visible_ok and _passes(visible, probe, view)
        allowed = probe is not None and merge_ok and _passes(merge, probe, view)
        if row is None or not seen or not allowed:
            raise ConstraintError(NO_ROW)
        if rules.check is not None:
            ctx = (sender, auth, tdef, column, row)
            if not self._check(rules.check, store, stamp, run_user, *ctx):
                raise ConstraintError(NO_ROW)

    def _bind(
        self, rule: Query | None, params: dict[str, object]
    ) -> tuple[BoundQuery | None, bool]:
        # A rule this caller's parameters do not fit (say `:email` against an int column)
        # lets nothing through for them: refused like any row they may not merge, alike for
        # every row. Returns (the bound rule, whether it bound).
        if rule is None:
            return None, True
        key = (rule.key, tuple(params.values()))
        cache = self._bound
        if key in cache:
            cache.move_to_end(key)
            bound = cache[key]
        else:
            try:
                bound = rule.bind(params)
            except SubscriptionError:
                bound = None
            cache[key] = bound
            if len(cache) > BOUND_CACHE:
                cache.popitem(last=False)
        return bound, bound is not None

    def _check(
        self,
        check: Callable[[Any], bool],
        store: Store,
        stamp: Stamp,
        run_user: RunUser | None,
        sender: Identity,
        auth: AuthInfo,
        tdef: TableDef,
        column: str,
        row: Row,
    ) -> bool:
        # A transaction of its own, always rolled back: a check reads, it never writes.
        tx = store.begin(stamp)
        try:
            instance = row_to_instance(tdef, row)
            mctx = MergeContext(sender, auth, tdef.name, column, instance, Database(tx))
            verdict = check(mctx) if run_user is None else run_user(check, mctx)
            return verdict is True
        except SyncdError:
            raise
        except Interrupted as exc:
            raise ReducerTimeout(
                f"merge check {tdef.name}.{column} ran past its time budget of "
                f"{exc.budget_ms} ms: it was interrupted"
            ) from None
        except BaseException as exc:  # SystemExit and the like too (see `run_reducer`)
            name = f"{tdef.name}.{column}"
            raise ReducerError(f"merge check {name}: {type(exc).__name__}: {exc}") from exc
        finally:
            tx.rollback()


def _row(tdef: TableDef, pk: Any, store: Store) -> Row | None:
    try:
        key = tdef.pk_column.type.check(pk)
    except (ValueError, TypeError):
        return None  # a pk of the wrong type names no row: the same answer as a missing one
    return store.tables[tdef.name].get(key)


def _stand_in(tdef: TableDef, store: Store) -> Row | None:
    # Any row of the table, so a missing pk costs the same evaluation as an existing one.
    for row in store.tables[tdef.name].rows.values():
        return row
    return None


def _passes(rule: BoundQuery | None, row: Row, view: StoreView) -> bool:
    return rule is None or rule.contains(row, view)
