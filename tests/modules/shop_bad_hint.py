"""`shop_v1.py` with a rename hint naming no stored column: refused."""

from __future__ import annotations

import syncd


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    title: str = syncd.column(renamed_from="nmae")
    price: int = syncd.index()
