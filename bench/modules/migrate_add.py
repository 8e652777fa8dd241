"""`migrate_v1.py` with a column added with a default: an automatic migration (no rewrite)."""

from __future__ import annotations

import syncd


@syncd.table(public=True)
class Item:
    id: int = syncd.primary_key()
    name: str
    color: str = "none"
    price: int = syncd.index()
