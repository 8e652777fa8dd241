"""Placeholder: filled in with the postgres test server and its fixtures."""
