"""A line on pytest's terminal even while output is captured: how many fuzz sessions
ran, how much memory the server peaked at.  These numbers go in issue notes."""

from __future__ import annotations

import pytest


def report(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():  # what capsys.disabled() does
        reporter.write_line(f"\n{line}")
