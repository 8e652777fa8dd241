"""MemoryBroker: fan-out inside one process. The single-replica default, not a mock.

It keeps the Broker guarantees trivially: delivery is synchronous, in publish order, exactly
once, to every subscriber in this process.
"""

from __future__ import annotations

from collections.abc import Callable

from syncd.core.tx import Tx


class MemoryBroker:
    """Delivers each published transaction to every handler, in order, before `publish` returns."""

    def __init__(self) -> None:
        # Handlers in subscription order; each is called once per transaction.
        self._handlers: list[Callable[[Tx], None]] = []
        self.closed = False

    def subscribe(self, handler: Callable[[Tx], None]) -> None:
        self._handlers.append(handler)

    async def start(self) -> None:
        return None

    @property
    def connected(self) -> bool:
        return True

    async def publish(self, txs: list[Tx], payloads: list[bytes]) -> None:
        """Deliver durable transactions (in offset order) to every subscriber."""
        for tx in txs:
            for handler in self._handlers:
                handler(tx)

    async def aclose(self) -> None:
        self.closed = True
        self._handlers.clear()
