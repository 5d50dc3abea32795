"""Shared fixtures. The KSR double is installed before any kemi_o365 module that imports KSR."""

from __future__ import annotations

import pytest

from tests import ksr_double
from tests.summary import LINES

ksr_double.install()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LINES:
        terminalreporter.section("Hostile and broken input: one line per category")
        for line in LINES:
            terminalreporter.line(line)
