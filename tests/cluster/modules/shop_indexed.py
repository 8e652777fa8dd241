"""`tests/modules/shop_v1.py` with an index added on `Item.name`: an automatic change whose
reverse (dropping the index again) is automatic too, so a shop_v1 replica must be told apart
from a newer module by the stored history, not by the plan (tests/server/test_schema_gate.py)."""

from __future__ import annotations

import syncd
from tests.modules.shop_v1 import put_items


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str = syncd.index()
    price: int = syncd.index()


__all__ = ["Item", "put_items"]
