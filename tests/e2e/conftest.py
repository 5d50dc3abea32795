"""The real stack for end-to-end tests: Kamailio + rtpengine + the Microsoft TLS peer, own ports per test.

Every process a test starts is stopped by the fixture (by PID); a missing binary or package makes the
test fail, never skip.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kemi_o365.lab.demo import cucm_address, lab_policy_on_fresh_ports, microsoft_peer, prepare_lab
from kemi_o365.lab.ms_peer import MicrosoftPeer
from kemi_o365.launch import RunDir, Stack
from kemi_o365.policy.model import Policy

_windows = itertools.count()


@dataclass
class Matrix:
    """Results of the conformance matrix, printed after the session (rule -> what happened)."""

    direct: dict[str, str] = field(default_factory=dict)
    through: dict[str, list[str]] = field(default_factory=dict)
    media: list[str] = field(default_factory=list)


MATRIX = Matrix()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MATRIX.media:
        terminalreporter.section("Media through the SBC (per direction)")
        for line in MATRIX.media:
            terminalreporter.line(line)
    if not MATRIX.direct and not MATRIX.through:
        return
    terminalreporter.section("Microsoft rules: straight to Microsoft's peer vs from CUCM through the SBC")
    for rule in sorted({*MATRIX.direct, *MATRIX.through}):
        terminalreporter.line(f"{rule}")
        terminalreporter.line(f"    direct : {MATRIX.direct.get(rule, '-')}")
        for through in MATRIX.through.get(rule, ["-"]):
            terminalreporter.line(f"    via SBC: {through}")


def media_window() -> tuple[int, int]:
    """A 40-port rtpengine range of its own for each start, below the kernel's ephemeral ports."""
    base = 21000 + ((os.getpid() * 7 + next(_windows) * 40 + random.randrange(0, 40) * 40) % 8000)
    return base, base + 39


def lab_policy_data(**overrides: Any) -> dict[str, Any]:
    """The shipped lab policy with fresh ports for one test; `overrides` replace top-level sections."""
    data = lab_policy_on_fresh_ports(media_window())
    data.update(overrides)
    return data


@dataclass
class Lab:
    root: Path
    policy: Policy
    peer: MicrosoftPeer
    stack: Stack

    @property
    def cucm_ip(self) -> str:
        """The address SIPp plays CUCM from (inside cucm.sources)."""
        return cucm_address(self.policy)

    @property
    def microsoft_listener(self) -> tuple[str, int]:
        """The SBC's TLS listener, where Microsoft opens its own connections."""
        return self.policy.sbc.external.address, self.policy.sbc.external.port

    @property
    def cucm_target(self) -> str:
        internal = self.policy.sbc.internal
        return f"{internal.address}:{internal.port}"


def start_lab(root: Path, data: dict[str, Any]) -> tuple[Policy, Path]:
    policy = prepare_lab(root, yaml.safe_dump(data, sort_keys=False))
    return policy, root / "pki"


@contextmanager
def running_lab(root: Path, data: dict[str, Any], *, keylog: Path | None = None) -> Iterator[Lab]:
    """The whole lab for one policy; every process it started is stopped when the block ends."""
    policy, pki = start_lab(root, data)
    with (
        microsoft_peer(policy, pki, keylog_file=keylog) as peer,
        Stack(policy, RunDir(root / "run")) as stack,
    ):
        yield Lab(root, policy, peer, stack)
        procs = dict(stack.procs)
    for name, proc in procs.items():
        assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running after the test"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with running_lab(tmp_path, lab_policy_data()) as running:
        yield running
