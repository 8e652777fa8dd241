"""`shop_v1.py` with the table `item` renamed to `product`: a refused migration."""

from __future__ import annotations

import syncd


@syncd.table(public=True)
class Product:
    id: int = syncd.primary_key()
    name: str
    price: int = syncd.index()
