"""What a module says to do for a change that is not automatic, planned without a process:
rename hints, explicit drops, row functions, data-conditional changes, and their refusals."""

from __future__ import annotations

import pytest

from syncd.core.ids import Offset, Timestamp
from syncd.core.store import ChangeSet, Store
from syncd.core.stored_schema import StoredSchema, encode_history, plan
from syncd.core.tx import Tx, decode_tx, encode_tx
from syncd.errors import SchemaError, SchemaMismatch
from syncd.persist.memory import MemoryJournal, MemoryLog
from syncd.server.schema_check import SCHEMA_KEY, SchemaCheck, check_schema, record_migration
from tests.core.test_stored_schema import BASE, module


def planned(before: str, after: str, *more: str) -> tuple[str, str]:
    versions = [StoredSchema.from_schema(module(before))]
    for step in (after, *more):
        result = plan(versions[-1], module(step), history=versions)
        if result.target is None:
            return result.kind, result.diff()
        if result.target is not versions[-1]:
            versions.append(result.target)
    return result.kind, result.diff()


RENAMED = BASE.replace("    name: str\n", "    title: str = syncd.column(renamed_from='name')\n")


def test_a_renamed_column_keeps_its_id_and_the_hint_is_harmless_once_recorded() -> None:
    v1 = StoredSchema.from_schema(module(BASE))
    result = plan(v1, module(RENAMED))
    assert (
        result.kind == "automatic" and "column name renamed to title (values kept)" in result.diff()
    )
    assert result.target is not None
    t1, t2 = v1.table("item"), result.target.table("item")
    assert t1 is not None and t2 is not None
    assert [(c.name, c.id) for c in t2.columns] == [("id", 1), ("title", 2), ("price", 3)]
    assert plan(result.target, module(RENAMED), history=[v1, result.target]).kind == "identical"


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (
            BASE.replace("    name: str\n", "    title: str = syncd.column(renamed_from='nmae')\n"),
            "column title renamed_from 'nmae': refused, table item has no stored column 'nmae'",
        ),
        (
            BASE.replace(
                "    name: str\n",
                "    name: str\n    title: str = syncd.column(renamed_from='name')\n",
            ),
            "refused, the module still declares column name too",
        ),
        (
            BASE.replace(
                "@syncd.table(public=True)", "@syncd.table(public=True, renamed_from='itm')"
            ).replace("class Item", "class Product"),
            "table product: renamed_from 'itm': refused, the stored schema has no table 'itm'",
        ),
        (
            BASE.replace(
                "@syncd.table(public=True)", "@syncd.table(public=True, dropped=('nmae',))"
            ),
            "dropped='nmae': refused, table item never had a stored column 'nmae'",
        ),
        (
            BASE + "\nGONE = syncd.drop_table('nothing')\n",
            "drop_table('nothing'): refused, no table of that name was ever stored",
        ),
        (
            BASE.replace("price: int = syncd.index()", "price: str = syncd.index()"),
            "; declare a @syncd.migration for the table to write it",
        ),
    ],
    ids=[
        "no-such-column",
        "rename-clash",
        "no-such-table",
        "drop-typo",
        "drop-table-typo",
        "no-fn",
    ],
)
def test_hints_that_name_nothing_or_clash_are_refused(after: str, expected: str) -> None:
    kind, diff = planned(BASE, after)
    assert kind == "refused" and expected in diff, diff


@pytest.mark.parametrize(
    "source",
    [
        BASE.replace(
            "    name: str\n",
            "    a: str = syncd.column(renamed_from='name')\n"
            "    b: str = syncd.column(renamed_from='name')\n",
        ),
        BASE.replace("@syncd.table(public=True)", "@syncd.table(public=True, dropped=('name',))"),
        BASE + "\nGONE = syncd.drop_table('item')\n",
        BASE + "\n@syncd.migration('nope')\ndef fix(row):\n    return row\n",
        BASE + "\n@syncd.migration('item')\nasync def fix(row):\n    return row\n",
        BASE.replace("@syncd.table(public=True)", "@syncd.table(public=True, dropped='name')"),
    ],
    ids=[
        "two-renamed-from-one",
        "declared-and-dropped",
        "table-declared-and-dropped",
        "fn-no-table",
        "fn-async",
        "dropped-str",
    ],
)
def test_contradictory_hints_are_schema_errors(source: str) -> None:
    with pytest.raises(SchemaError):
        module(source)


def test_a_drop_is_harmless_once_recorded_and_ids_are_never_reused() -> None:
    dropped = BASE.replace(
        "@syncd.table(public=True)", "@syncd.table(public=True, dropped=('name',))"
    ).replace("    name: str\n", "")
    v1 = StoredSchema.from_schema(module(BASE))
    v2 = plan(v1, module(dropped)).target
    assert v2 is not None
    assert plan(v2, module(dropped), history=[v1, v2]).kind == "identical"
    readded = dropped.replace("dropped=('name',)", "").replace(
        "    price: int", "    name: str = 'n'\n    price: int"
    )
    v3 = plan(v2, module(readded), history=[v1, v2]).target
    assert v3 is not None
    item = v3.table("item")
    assert item is not None and item.column("name") is not None
    assert item.column("name").id == 4  # type: ignore[union-attr]  # not 2: a new column


def test_a_row_function_covers_a_type_change_and_a_column_without_default() -> None:
    after = BASE.replace(
        "price: int = syncd.index()", "price: str = syncd.index()\n    sku: str"
    ) + ("\n@syncd.migration('item')\ndef fix(row):\n    return row\n")
    v1 = StoredSchema.from_schema(module(BASE))
    result = plan(v1, module(after))
    assert result.kind == "automatic", result.diff()
    assert result.functions == ("fix",)
    assert result.target is not None and result.target.migrations == ["fix"]
    item = result.target.table("item")
    assert item is not None
    assert [(c.name, c.id, c.fill) for c in item.columns] == [
        ("id", 1, None),
        ("name", 2, None),
        ("price", 4, ""),  # a new id: rows before the migration read "" until it rewrites them
        ("sku", 5, ""),
    ]
    # Once recorded it is not pending: the same module is identical.
    assert plan(result.target, module(after), history=[v1, result.target]).kind == "identical"


def test_a_fresh_directory_counts_its_functions_as_applied() -> None:
    with_fn = BASE + "\n@syncd.migration('item', name='v7-fix')\ndef fix(row):\n    return row\n"
    assert StoredSchema.from_schema(module(with_fn)).migrations == ["v7-fix"]


ENUM_V1 = BASE.replace("    name: str\n", "    name: str\n    color: Color2 = Color2.RED\n")
ENUM_V2 = ENUM_V1.replace("color: Color2 = Color2.RED", "color: Color = Color.RED")


async def test_an_enum_member_removed_is_checked_against_the_rows() -> None:
    """Removing BLUE: automatic while no row holds it; refused naming the rows that do, with
    nothing written."""
    for blue, expected in ((False, "ok"), (True, "refused")):
        log = MemoryLog()
        async with MemoryJournal(log) as journal:
            first = await check_schema(module(ENUM_V1), journal)
            await record_migration(first, journal, Store(first.schema), 1)
            rows = {
                i: (None, (i, f"n{i}", "blue" if blue and i == 3 else "green", i)) for i in range(5)
            }
            journal.append(
                Offset(1),
                encode_tx(first.schema, Tx(Offset(1), Timestamp(1), ChangeSet({"item": rows}))),
            )
            await journal.wait_durable(Offset(1))
            raw = await journal.get_meta(SCHEMA_KEY)
            check = await check_schema(module(ENUM_V2), journal)
            assert check.plan is not None and check.plan.kind == "automatic"
            store = Store(check.schema)
            for offset, payload in await journal.read(Offset(0)):
                store.apply(decode_tx(check.schema, payload).changes, offset)
            if expected == "ok":
                assert await record_migration(check, journal, store, 2) == 2
            else:
                with pytest.raises(
                    SchemaMismatch, match=r"1 stored rows hold a value outside .* keys 3\)"
                ):
                    await record_migration(check, journal, store, 2)
                assert await journal.get_meta(SCHEMA_KEY) == raw
                assert await journal.latest_offset() == 1


FN = BASE.replace("price: int = syncd.index()", "price: str = syncd.index()") + (
    "\n@syncd.migration('item')\ndef as_text(row):\n"
    "    if row['id'] == 13:\n        raise RuntimeError('unlucky')\n"
    "    return {**row, 'price': str(row['price'])}\n"
)


async def recovered(check: SchemaCheck, journal: MemoryJournal) -> Store:
    schema = check.schema
    store = Store(schema)
    for offset, payload in await journal.read(Offset(0)):
        store.apply(decode_tx(schema, payload).changes, offset)
    return store


async def test_a_function_recorded_but_not_journaled_runs_at_the_next_start() -> None:
    """A crash after the history (with the function) was recorded and before its transaction:
    the next start finds the function due (the data is of the older version) and runs it; a
    function failing changes nothing in the store either."""
    log = MemoryLog()
    async with MemoryJournal(log) as journal:
        first = await check_schema(module(BASE), journal)
        await record_migration(first, journal, Store(first.schema), 1)
        rows = {i: (None, (i, f"n{i}", i)) for i in range(5)}
        tx = Tx(Offset(1), Timestamp(1), ChangeSet({"item": rows}))
        journal.append(Offset(1), encode_tx(first.schema, tx))
        await journal.wait_durable(Offset(1))
        second = await check_schema(module(FN), journal)
        assert second.plan is not None and second.plan.functions == ("as_text",)
        assert second.history is not None
        await journal.set_meta(SCHEMA_KEY, encode_history(second.history))  # then "crash"
    async with MemoryJournal(log) as journal:
        third = await check_schema(module(FN), journal)
        assert third.plan is not None and third.plan.kind == "identical"
        store = await recovered(third, journal)
        assert await record_migration(third, journal, store, 2) == 2
        assert store.tables["item"].rows[3] == (3, "n3", "3")
        txs = [decode_tx(third.schema, p) for _, p in await journal.read(Offset(0))]
        assert txs[-1].meta == {"migration": {"from": 1, "to": 2, "functions": ["as_text"]}}
        assert len(txs[-1].changes.tables["item"]) == 5


async def test_a_failing_function_leaves_the_store_and_journal_as_they_were() -> None:
    log = MemoryLog()
    async with MemoryJournal(log) as journal:
        first = await check_schema(module(BASE), journal)
        await record_migration(first, journal, Store(first.schema), 1)
        rows = {i: (None, (i, f"n{i}", i)) for i in range(20)}
        tx = Tx(Offset(1), Timestamp(1), ChangeSet({"item": rows}))
        journal.append(Offset(1), encode_tx(first.schema, tx))
        await journal.wait_durable(Offset(1))
        raw = await journal.get_meta(SCHEMA_KEY)
        check = await check_schema(module(FN), journal)
        store = await recovered(check, journal)
        before = dict(store.tables["item"].rows)
        with pytest.raises(
            SchemaMismatch, match="as_text .* primary key 13: RuntimeError: unlucky"
        ):
            await record_migration(check, journal, store, 2)
        assert store.tables["item"].rows == before and store.offset == 1
        assert await journal.get_meta(SCHEMA_KEY) == raw and await journal.latest_offset() == 1


TWO_TEXTS = BASE.replace("    name: str\n", "    name: str\n    note: str\n")
SWAPPED = TWO_TEXTS.replace(
    "    name: str\n    note: str\n",
    "    name: str = syncd.column(renamed_from='note')\n"
    "    note: str = syncd.column(renamed_from='name')\n",
)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (SWAPPED, "column name renamed_from 'note': refused, the stored schema has a column name"),
        (
            # One hint onto a column the module still declares, both names stored.
            TWO_TEXTS.replace(
                "    name: str\n", "    name: str = syncd.column(renamed_from='note')\n"
            ),
            "column name renamed_from 'note': refused",
        ),
        (
            TWO_TEXTS.replace("    name: str\n    note: str\n", "    name: str\n")
            + "\n@syncd.table(public=True, renamed_from='item')\nclass Other:\n"
            "    id: int = syncd.primary_key()\n"
            + "\n@syncd.table(public=True, renamed_from='other')\nclass ItemX:\n"
            "    id: int = syncd.primary_key()\n",
            "table other: renamed_from 'item': refused, the stored schema has a table other",
        ),
    ],
    ids=["column-swap", "hint-onto-stored-name", "table-swap"],
)
def test_a_hint_matching_by_name_would_ignore_is_refused_not_ignored(
    after: str, expected: str
) -> None:
    """Two hints swapping two names (or one naming a column the module still declares, both names
    stored): matched by name, the hints were skipped in silence and nothing was swapped;
    now refused, saying how to swap."""
    before = TWO_TEXTS
    if "class Other" in after:
        before = (
            TWO_TEXTS
            + "\n@syncd.table(public=True)\nclass Other:\n    id: int = syncd.primary_key()\n"
        )
    kind, diff = planned(before, after)
    assert kind == "refused" and expected in diff, diff


def test_a_recorded_rename_hint_stays_harmless_when_its_old_name_is_reused() -> None:
    """name -> title recorded, then a new column `name`: the kept hint on title names a stored
    column again, but title was once called 'name', so it is the recorded rename (identical)."""
    renamed = BASE.replace(
        "    name: str\n", "    title: str = syncd.column(renamed_from='name')\n"
    )
    reused = renamed.replace("    price: int", "    name: str = 'n'\n    price: int")
    v1 = StoredSchema.from_schema(module(BASE))
    v2 = plan(v1, module(renamed)).target
    assert v2 is not None
    v3 = plan(v2, module(reused), history=[v1, v2]).target
    assert v3 is not None and v3.version == 3
    assert plan(v3, module(reused), history=[v1, v2, v3]).kind == "identical"
    table = BASE.replace(
        "@syncd.table(public=True)", "@syncd.table(public=True, renamed_from='old')"
    )
    t1 = StoredSchema.from_schema(module(BASE.replace("class Item", "class Old")))
    t2 = plan(t1, module(table)).target
    assert t2 is not None
    both = table + "\n@syncd.table(public=True)\nclass Old:\n    id: int = syncd.primary_key()\n"
    t3 = plan(t2, module(both), history=[t1, t2]).target
    assert t3 is not None
    assert plan(t3, module(both), history=[t1, t2, t3]).kind == "identical"


async def test_a_long_row_function_says_how_far_it_is(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No bound on a start-time function (a big table legitimately takes minutes, and nothing
    is written until it ends), but it logs its progress, so slow is told from stuck."""
    import syncd.server.schema_check as schema_check

    monkeypatch.setattr(schema_check, "PROGRESS_EVERY_S", 0.0)
    log = MemoryLog()
    async with MemoryJournal(log) as journal:
        first = await check_schema(module(BASE), journal)
        await record_migration(first, journal, Store(first.schema), 1)
        rows = {i: (None, (i, f"n{i}", i)) for i in range(3)}
        journal.append(
            Offset(1),
            encode_tx(first.schema, Tx(Offset(1), Timestamp(1), ChangeSet({"item": rows}))),
        )
        await journal.wait_durable(Offset(1))
        check = await check_schema(module(FN), journal)
        store = await recovered(check, journal)
        with caplog.at_level("WARNING", logger="syncd"):
            assert await record_migration(check, journal, store, 2) == 2
    progress = [r.getMessage() for r in caplog.records if "rows in" in r.getMessage()]
    assert progress and progress[-1].startswith("migration as_text (table item): 2 of 3 rows")
    assert "stopping the server now is safe" in progress[-1]


def test_a_new_function_under_an_applied_name_is_named_in_the_refusal() -> None:
    """A module declares a row function whose name is recorded as applied (an old function's
    default name reused): it does not run, and the refusal says so instead of only 'declare
    a @syncd.migration' (which the module does)."""
    fn = "\n@syncd.migration('item')\ndef fix(row):\n    return row\n"
    v1 = StoredSchema.from_schema(module(BASE + fn))  # `fix` counts as applied
    retyped = BASE.replace("price: int = syncd.index()", "price: str = syncd.index()") + fn
    result = plan(v1, module(retyped), history=[v1])
    assert result.kind == "refused"
    assert "migration 'fix' of this table is recorded as applied" in result.diff(), result.diff()
    assert "give a new function another name" in result.diff()
