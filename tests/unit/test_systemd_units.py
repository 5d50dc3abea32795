"""packaging/systemd: what the units say, read as systemd reads them (keys may repeat), no systemd needed.

`systemd-analyze verify` runs on the installed units in tests/e2e/test_install.py (it needs the
executables the units name, which only an install provides).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from kemi_o365.cli import build_parser

UNITS = Path(__file__).resolve().parents[2] / "packaging" / "systemd"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of key -> every value in order (systemd allows ExecStartPre= and Environment= again)."""
    out: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def expand(command: str, env: dict[str, str]) -> list[str]:
    """An Exec line as systemd runs it: ${VAR} from Environment=, @PREFIX@ as `make install` fills it."""
    for name, value in env.items():
        command = command.replace("${" + name + "}", value)
    return shlex.split(command.replace("@PREFIX@", "/opt/kemi-o365").lstrip("+-"))


def environment(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    return dict(
        v.replace("@SYSCONFDIR@", "/etc/kemi-o365").split("=", 1) for v in unit["Service"]["Environment"]
    )


def check_commands(unit: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Every Exec command: our CLI's must parse with its own parser, the others must exist here."""
    env = environment(unit)
    commands = []
    for key in ("ExecStartPre", "ExecStart", "ExecStartPost"):
        for line in unit["Service"].get(key, []):
            argv = expand(line, env)
            if argv[0] == "/opt/kemi-o365/venv/bin/kemi-o365":
                build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown subcommand or option
            else:
                assert Path(argv[0]).is_file(), argv
            commands.append(argv)
    return commands


def test_kamailio_unit() -> None:
    unit = parse_unit((UNITS / "kemi-o365.service").read_text())
    service = unit["Service"]
    assert unit["Unit"]["Requires"] == ["kemi-o365-rtpengine.service"]
    assert "kemi-o365-rtpengine.service" in unit["Unit"]["After"][0].split()
    env = environment(unit)
    assert env["KEMI_O365_POLICY"] == "/etc/kemi-o365/policy.yaml"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/run/kemi-o365/metrics"
    assert env["KEMI_O365_VENV"] == "@PREFIX@/venv"
    assert service["RuntimeDirectory"] == ["kemi-o365"]
    assert service["Restart"] == ["on-failure"]
    assert service["AmbientCapabilities"] == service["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert service["User"] == ["kamailio"]
    commands = check_commands(unit)
    assert commands[0][1:] == ["policy", "check", "/etc/kemi-o365/policy.yaml"]
    # The metrics directory is wiped, then made, before Kamailio starts.
    assert commands[1] == ["/bin/rm", "-rf", "/run/kemi-o365/metrics"]
    assert commands[2] == ["/bin/mkdir", "-m", "0750", "/run/kemi-o365/metrics"]
    assert commands[3][1:] == [
        "exec", "kamailio", "--policy", "/etc/kemi-o365/policy.yaml", "--rundir", "/run/kemi-o365",
    ]  # fmt: skip
    assert commands[4][1:3] == ["exec", "ready"]


def test_rtpengine_unit() -> None:
    unit = parse_unit((UNITS / "kemi-o365-rtpengine.service").read_text())
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["Restart"] == ["on-failure"]
    assert service["RuntimeDirectory"] == ["kemi-o365-rtpengine"]
    assert service["CapabilityBoundingSet"] == [""]
    commands = check_commands(unit)
    assert commands[-1][1:] == [
        "exec", "rtpengine", "--policy", "/etc/kemi-o365/policy.yaml", "--rundir", "/run/kemi-o365-rtpengine",
    ]  # fmt: skip
