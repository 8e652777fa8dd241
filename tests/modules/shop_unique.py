"""`shop_v1.py` with `name` made unique: automatic when no two stored items share a name."""

from __future__ import annotations

import syncd


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str = syncd.unique()
    price: int = syncd.index()
