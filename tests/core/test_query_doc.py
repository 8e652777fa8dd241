"""The query language examples of docs/protocol.md §12 run as they say: each `sql` block's
first line says whether it is a subscription, a one-off query, or refused (and why)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from syncd.core.hlc import Stamp
from syncd.core.ids import Identity
from syncd.core.oneoff import compile_one_off
from syncd.core.query import compile_query, prescan
from syncd.core.schema import Index, Schema, index, load_schema, primary_key, table
from syncd.core.store import Store
from syncd.errors import SubscriptionError


@table(public=True, indexes=[Index("title", kind="ordered")])
class Task:
    id: int = primary_key()
    owner: Identity = index()
    title: str
    done: bool
    priority: int | None = None


SCHEMA: Schema = load_schema({"Task": Task})
DOC = Path(__file__).parents[2] / "docs" / "protocol.md"


def examples() -> list[tuple[str, str]]:
    text = DOC.read_text()
    section = text[text.index("## 12. The query language") :]
    found = re.findall(r"```sql\n-- (.*?)\n(.*?)```", section, re.DOTALL)
    assert len(found) >= 10
    return [(kind, sql.strip()) for kind, sql in found]


@pytest.mark.parametrize(("kind", "sql"), examples())
def test_doc_example(kind: str, sql: str) -> None:
    """The example compiles (and runs on a small table) as its first line says."""
    prescan(sql, max_bytes=16384, max_terms=64)
    if kind.startswith("refused: "):
        want = kind.removeprefix("refused: ")
        compile_it = compile_query if "subscription" in want else compile_one_off
        with pytest.raises(SubscriptionError, match=re.escape(want)):
            compile_it(sql, SCHEMA)
        return
    assert kind in ("subscription", "one-off"), kind
    if kind == "subscription":
        compile_query(sql, SCHEMA)
    plan = compile_one_off(sql, SCHEMA)
    store = Store(SCHEMA)
    tx = store.begin(Stamp(1, 0, "w"))
    for i, title in enumerate(["ship it", "ship docs", "100% done", "urgent fix", "later"]):
        tx.insert("task", (i, f"u{i % 2}", title, i % 2 == 0, None if i == 4 else i))
    tx.commit()
    query = plan.base.bind()
    if plan.explain:
        assert plan.explain_rows(query, store, show_sizes=True).rows
        return
    tdef = SCHEMA.tables["task"]
    result = plan.run([tdef.visible_row(r) for r in query.initial_rows(store)], tdef)
    assert all(len(row) == len(result.columns) for row in result.rows)
