"""Shared fixtures and settings.

Hypothesis profiles: "fast" (the default, for every run) and "thorough" (run before resolving
an issue): `HYPOTHESIS_PROFILE=thorough pytest`.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fast", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
