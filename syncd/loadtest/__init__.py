"""`syncd loadtest`: load a running syncd deployment and report what it delivered, how fast.

* `scenario`: scenario files (TOML), validated strictly; ready ones in `scenarios/`.
* `worker`: one generator process: its share of the connections, speaking the wire protocol.
* `run`: the coordinator: probe the target, start and drive the workers, gather a `Report`.
* `report`: the terminal table, JSON lines, PNG plots (matplotlib, optional).

docs/loadtest.md is the user's guide.
"""
