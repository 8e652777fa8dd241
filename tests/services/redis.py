"""Placeholder: filled in with the redis test server and its fixtures."""
