"""What changed in the stored schema since a version, said about given tables: the sentence a
client gets when a query it held stops compiling after a migration (`SubscriptionFailed`).

Pure: it reads a `SchemaHistory` (core.stored_schema) and never raises for what it finds.
Columns are matched by their stable id, so a column renamed by a later migration reads as
renamed, not dropped (whichever way the module asked for it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from syncd.core.stored_schema import SchemaHistory, StoredSchema, StoredTable

__all__ = ["changes_since", "explain_failure"]

#: At most this many changes are named in one message (a close reason or an error line).
MAX_NAMED = 3


def _type_text(t: dict[str, Any]) -> str:
    kind = t.get("kind")
    if kind in ("option", "lww") and isinstance(t.get("inner"), dict):
        inner = _type_text(t["inner"])
        return f"{inner} | None" if kind == "option" else f"LWW[{inner}]"
    return str(kind)


def _table_changes(name: str, old: StoredTable, new: StoredTable | None, at: int) -> list[str]:
    """What version `at` changed of a table that was `old` before; nothing unless `old` was
    public (what a private table is, was or became is never told: the client chose the name and
    the cursor), and of a table made private only that."""
    if not old.public:
        return []
    where = f"in schema version {at}"
    if new is None:
        return [f"table {name} was dropped {where}"]
    if not new.public:
        return [f"table {name} was made private {where}"]
    out: list[str] = []
    if old.visible != new.visible:
        out.append(f"the visibility rule of table {name} changed {where}")
    for col in old.columns:
        now = new.column_by_id(col.id)
        if now is None:
            out.append(f"column {name}.{col.name} was dropped {where}")
            continue
        if now.name != col.name:
            out.append(f"column {name}.{col.name} was renamed to {now.name} {where}")
        if now.type != col.type:
            out.append(
                f"column {name}.{now.name} changed type from {_type_text(col.type)} to "
                f"{_type_text(now.type)} {where}"
            )
    return out


def _version(history: SchemaHistory, number: int) -> StoredSchema:
    return history.versions[number - 1]


def changes_since(history: SchemaHistory, version: int, tables: Iterable[str]) -> list[str]:
    """The changes after stored schema `version` up to the current one that concern `tables`
    (by the names they had under `version`), oldest first: a table dropped or made private, its
    visibility rule changed, a column dropped, renamed or retyped. Added tables, columns and
    indexes are not named: they break no query. Only what /v1/schema showed at some time is
    named (a client may forge its cursor and guess names): nothing of a table while it is
    private, of a table made private only that.

    A table is followed through the versions by name; once dropped it is not followed further.
    `version` out of range (older than 1, or not older than the current one) gives [].
    """
    current = history.current.version
    if not 1 <= version < current:
        return []
    out: list[str] = []
    for name in dict.fromkeys(tables):
        table = _version(history, version).table(name)
        for at in range(version + 1, current + 1):
            if table is None:
                break
            following = _version(history, at).table(name)
            out.extend(_table_changes(name, table, following, at))
            table = following
    return out


def explain_failure(
    history: SchemaHistory | None, version: int | None, tables: Iterable[str]
) -> str | None:
    """The clause to add to a compile error for a client whose data is of stored schema
    `version` (None: not known, then every recorded change of `tables` is considered), or None
    when nothing of `tables` changed since.

    E.g. "the schema changed since your cursor (version 2, now 3): table item was made private
    in schema version 3".
    """
    if history is None:
        return None
    current = history.current.version
    since = 1 if version is None else version
    found = changes_since(history, since, tables)
    if not found:
        return None
    named = found[:MAX_NAMED]
    more = len(found) - len(named)
    tail = f" (and {more} more)" if more else ""
    at = f"version {version}, now {current}" if version is not None else f"now version {current}"
    return f"the schema changed since your cursor ({at}): {'; '.join(named)}{tail}"
