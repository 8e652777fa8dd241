"""Contract tests: each port's behaviour written once, run against every implementation."""
