"""One line per category of hostile input, shown together at the end of `make test`.

Tests call `report(line)`; tests/conftest.py prints the lines in a terminal-summary section, so they
appear in CI output without `-s`.
"""

from __future__ import annotations

LINES: list[str] = []


def report(line: str) -> None:
    LINES.append(line)
    print(f"\n{line}")
