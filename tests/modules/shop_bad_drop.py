"""`shop_v1.py` with the column `Item.name` dropped: a refused migration."""

from __future__ import annotations

import syncd


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    price: int = syncd.index()
