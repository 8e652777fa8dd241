"""`shop_v1.py` with `Item.price` changed from int to str: a refused migration."""

from __future__ import annotations

import syncd


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str
    price: str = syncd.index()
