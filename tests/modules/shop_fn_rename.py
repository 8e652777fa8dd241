"""`shop_fn.py` after its row function ran, with the table renamed to `goods`; the function is
still declared (recorded as applied: it does not run again)."""

from __future__ import annotations

from typing import Any

import syncd


@syncd.table(public=True, renamed_from="item")
class Goods:
    id: int = syncd.primary_key()
    name: str
    price: str = syncd.index()
    sku: str


@syncd.migration("goods", name="price_as_text")
def price_as_text(row: dict[str, Any]) -> dict[str, Any] | None:
    raise AssertionError("recorded as applied: never runs again")
