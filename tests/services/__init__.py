"""Throwaway Postgres and Redis servers for tests, started from the installed binaries on free
ports in temporary directories, so fault tests can stop, kill and pause them. Tests never touch
the machine's shared services."""
