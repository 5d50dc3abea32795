"""`make install` staged under a DESTDIR: where the files land, the units verified by systemd-analyze,
and the installed CLI giving the same Kamailio command line `kemi-o365 run` uses."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from kemi_o365 import launch
from kemi_o365.launch import RunDir, kamailio_command, rtpengine_command
from tests.e2e.conftest import lab_policy_data, start_lab

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_make_install_into_destdir(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    make = ["make", "-C", str(REPO), "install", f"DESTDIR={dest}"]
    proc = subprocess.run(make, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "systemd is not running here (staged under" in proc.stdout
    prefix = dest / "opt" / "kemi-o365"
    units = dest / "etc" / "systemd" / "system"
    for path in [
        prefix / "venv" / "bin" / "kemi-o365",
        prefix / "kamailio" / "kamailio.cfg",
        prefix / "kamailio" / "sbc.py",
        units / "kemi-o365.service",
        units / "kemi-o365-rtpengine.service",
        dest / "etc" / "kemi-o365" / "policy.yaml",
    ]:
        assert path.is_file(), path
    assert (prefix / "venv" / "bin" / "kemi-o365").read_text().startswith("#!/opt/kemi-o365/venv/bin/python")
    for unit in units.iterdir():
        assert "@" not in unit.read_text().replace("file://", ""), unit
    # A second install keeps the site's policy.
    (dest / "etc" / "kemi-o365" / "policy.yaml").write_text("# mine\n")
    again = subprocess.run(make, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "policy.yaml exists, left as it is" in again.stdout
    assert (dest / "etc" / "kemi-o365" / "policy.yaml").read_text() == "# mine\n"

    # systemd-analyze verify checks syntax, keys and that each Exec path is executable. The units name
    # /opt/kemi-o365, which is staged under DESTDIR here, so they are verified with that root prefixed.
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian package systemd) is needed to verify the units"
    staged = tmp_path / "verify"
    staged.mkdir()
    for unit in units.iterdir():
        (staged / unit.name).write_text(unit.read_text().replace("/opt/kemi-o365", str(prefix)))
    verify = subprocess.run(
        [analyze, "verify", "kemi-o365-rtpengine.service", "kemi-o365.service"],
        cwd=staged,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0 and not verify.stdout + verify.stderr, verify.stdout + verify.stderr

    # The installed CLI prints the very command lines `kemi-o365 run` starts.
    policy, _ = start_lab(tmp_path / "lab", lab_policy_data())
    run = RunDir(tmp_path / "run")
    env = {**os.environ, "KEMI_O365_KAMAILIO_DIR": str(launch.KAMAILIO_DIR)}
    env.pop("PYTHONPATH", None)  # the installed package, not this checkout
    python = str(prefix / "venv" / "bin" / "python")
    for component, expected in [("kamailio", kamailio_command), ("rtpengine", rtpengine_command)]:
        args = ["exec", component, "--print", "--policy", str(policy.source), "--rundir", str(run.root)]
        printed = subprocess.run(
            [python, "-m", "kemi_o365.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert printed.returncode == 0, printed.stderr
        assert shlex.split(printed.stdout) == expected(policy, run)
