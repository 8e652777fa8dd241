"""`shop_v1.py` with the table `item` renamed to `product` and its column `name` to `title`, said
with rename hints: an automatic migration that keeps every row and value."""

from __future__ import annotations

import syncd
from syncd import ReducerContext


@syncd.table(public=True, renamed_from="item")
class Product:
    id: int = syncd.primary_key()
    title: str = syncd.column(renamed_from="name")
    price: int = syncd.index()


@syncd.reducer
def put_products(ctx: ReducerContext, start: int, count: int) -> None:
    """Insert products start .. start + count - 1."""
    for i in range(start, start + count):
        ctx.db.product.insert(Product(id=i, title=f"product{i}", price=i % 100))
