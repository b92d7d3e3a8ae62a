"""Hypothesis profiles for the fuzz tests: `PFNBD_FUZZ_PROFILE=quick` (the default, what
CI runs) or `long` (see README.md).

The profile is loaded for the whole session, so a long run also lengthens every other
hypothesis test collected with it (the schema round trips of test_protocol.py
included); `quick` keeps hypothesis's default of 100 examples for them.  The fuzz
tests take their example counts from the profile alone, so one knob scales them all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

PROFILES = {
    "quick": settings(
        max_examples=100,  # hypothesis's default
        stateful_step_count=40,
        deadline=None,  # socket round trips vary with machine load; the tests bound time themselves
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    ),
    "long": settings(
        max_examples=5000,
        stateful_step_count=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    ),
}
for name, profile in PROFILES.items():
    settings.register_profile(name, profile)

PROFILE = os.environ.get("PFNBD_FUZZ_PROFILE", "quick")
if PROFILE not in PROFILES:
    raise ValueError(f"PFNBD_FUZZ_PROFILE={PROFILE!r}: use one of {sorted(PROFILES)}")
settings.load_profile(PROFILE)

# Per-test limits (pytest-timeout) for the fuzz tests: room for hypothesis to shrink a
# failure (it gives up shrinking after 5 minutes) in the quick profile, and for the
# whole run in the long one.  Every socket operation has its own 10 s limit besides.
TIMEOUTS = {"quick": 600, "long": 6 * 3600}
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.timeout(TIMEOUTS[PROFILE]))
