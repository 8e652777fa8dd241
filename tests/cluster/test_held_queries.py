"""`syncd migrate --postgres DSN --dry-run` and the queries the clients of live replicas hold:
each replica records its own under `syncd.held_queries:<instance>` (on the lease's pool, never
failing its journal); the dry run reads those of the replicas alive now. Real processes, a
throwaway Postgres and Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import syncd.client
from syncd.server.loader import load_module_schema
from syncd.server.migrate import MigrationReport, migrate_postgres
from tests.client.helpers import eventually, quick_backoff
from tests.cluster.harness import Replicas
from tests.services.redis import RedisServer
from tests.utils import ROOT

pytestmark = pytest.mark.integration

V2 = "tests/modules/shop_v2.py"
V3_PRIVATE = "tests/modules/shop_v3_private.py"


async def dry_run(dsn: str) -> MigrationReport:
    return await migrate_postgres(load_module_schema(ROOT / V3_PRIVATE), dsn, dry_run=True)


async def test_a_dry_run_reads_the_held_queries_of_each_live_replica(
    tmp_path: Path, pg_dsn: str, redis_server: RedisServer
) -> None:
    """Two replicas, a client on each holding a query over `item`: the dry run of the module
    that makes `item` private reports both, from two records, as stopping compiling. The
    replica stopped gracefully removes its record, so the next dry run reads one."""
    group = Replicas(
        tmp_path, pg_dsn, redis_server.url, 2, V2, extra=("--held-queries-every", "0.2")
    ).start()
    try:
        conns = [
            await syncd.client.connect(server.ws_url, backoff=quick_backoff()) for server in group
        ]
        try:
            await conns[0].subscribe("SELECT * FROM item WHERE price > 5")
            await conns[1].subscribe("SELECT * FROM item WHERE id = 1")

            async def both() -> MigrationReport | None:
                report = await dry_run(pg_dsn)
                return report if len([c for c in report.queries if c.held]) == 2 else None

            report = await eventually(both, 30, what="both replicas' records")
            assert len(report.held) == 2
            assert all(s.error is None and s.queries == 1 for s in report.held)
            assert all(s.server.startswith(("r1-", "r2-")) for s in report.held)
            assert all(c.error is not None and not c.given for c in report.queries)
        finally:
            for conn in conns:
                await conn.close()
        await asyncio.to_thread(group[1].stop)

        async def one() -> bool:
            return len((await dry_run(pg_dsn)).held) == 1

        await eventually(one, 30, what="the stopped replica's record gone")
    finally:
        group.kill_all()
