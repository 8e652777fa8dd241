"""`shop_v1.py` with `price` made unique: refused while stored items share a price."""

from __future__ import annotations

import syncd


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str
    price: int = syncd.unique()
