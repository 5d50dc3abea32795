"""The four start-up failures a deployment meets, each told as one sentence by `kemi-o365 run`.

Each cause is made for real (a certificate file removed, a port bound by this test, a module directory
without tls.so, no rtpengine binary or its port taken); the sentence is checked word for word, once as
the check before the start finds it and, where Kamailio or rtpengine can be let fail, as the log says it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kemi_o365 import launch
from kemi_o365.launch import RunDir, Stack, StartError
from kemi_o365.policy.model import Policy
from kemi_o365.startup import MODULE_DIR
from tests.e2e.conftest import lab_policy_data, start_lab

pytestmark = pytest.mark.e2e

KEMI_O365 = Path(sys.prefix) / "bin" / "kemi-o365"


def run_cli(policy: Policy, rundir: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        [str(KEMI_O365), "run", "--policy", str(policy.source), "--rundir", str(rundir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def failure_from_the_log(policy: Policy, rundir: Path) -> StartError:
    """Start without the checks, so Kamailio or rtpengine meets the cause and its log is read."""
    stack = Stack(policy, RunDir(rundir))
    with pytest.raises(StartError) as failed:
        stack.start(precheck=False)
    assert not stack.procs
    return failed.value


def in_use_by_this_test(role: str, where: str, key: str, policy: Policy) -> str:
    me = f"PID {os.getpid()}, {Path('/proc/self/comm').read_text().strip()}"
    fix = f"stop that program or change {key} in {policy.source}"
    return f"{role} port, {where}, is already in use (by {me}): {fix}"


def _line_of(policy: Policy, key: str) -> int:
    return next(i for i, ln in enumerate(policy.source.read_text().splitlines(), 1) if f"{key}:" in ln)


def test_missing_certificate(tmp_path: Path) -> None:
    policy, pki = start_lab(tmp_path, lab_policy_data())
    (pki / "sbc.crt").unlink()
    code, out = run_cli(policy, tmp_path / "run")
    line = _line_of(policy, "certificate")
    assert code == 1, out
    assert out == (
        f"could not start: the SBC's TLS certificate {pki}/sbc.crt does not exist: put the file there or "
        f"correct sbc.tls.certificate in {policy.source} line {line}\n"
    )


def test_port_in_use(tmp_path: Path) -> None:
    policy, _ = start_lab(tmp_path, lab_policy_data())
    ext = policy.sbc.external
    with socket.socket() as busy:
        busy.bind((ext.address, ext.port))
        busy.listen()
        sentence = in_use_by_this_test("the Microsoft-side SIP (TLS)", f"tcp {ext.address}:{ext.port}",
                                       "sbc.external.port", policy)  # fmt: skip
        assert run_cli(policy, tmp_path / "run") == (1, f"could not start: {sentence}\n")
        # The same sentence when Kamailio itself meets the port taken (read from its log).
        failed = failure_from_the_log(policy, tmp_path / "run2")
        assert str(failed) == sentence
        assert "Address already in use" in failed.details


def _kamailio_dir_without(tmp_path: Path, module: str) -> tuple[Path, Path]:
    """A copy of kamailio/ whose kamailio.cfg loads its modules from a directory lacking `module`:
    what Kamailio sees on a host where that module's Debian package is not installed."""
    kdir, mods = tmp_path / "kamailio", tmp_path / "modules"
    shutil.copytree(launch.KAMAILIO_DIR, kdir)
    mods.mkdir()
    for so in MODULE_DIR.iterdir():
        if so.name != module:
            (mods / so.name).symlink_to(so)
    cfg = kdir / "kamailio.cfg"
    text = cfg.read_text()
    assert text.count('loadmodule "jsonrpcs.so"') == 1
    cfg.write_text(text.replace('loadmodule "jsonrpcs.so"', f'mpath="{mods}/"\nloadmodule "jsonrpcs.so"'))
    return kdir, mods


def test_missing_module_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy, _ = start_lab(tmp_path, lab_policy_data())
    kdir, mods = _kamailio_dir_without(tmp_path, "tls.so")
    sentence = (
        f"Kamailio module tls.so is missing from {mods}: install the Debian package that ships it "
        "(apt-get install kamailio-tls-modules)"
    )
    code, out = run_cli(policy, tmp_path / "run", {"KEMI_O365_KAMAILIO_DIR": str(kdir)})
    assert code == 1, out
    assert out == f"could not start: {sentence}\n"
    # Kamailio's own refusal (its log: "could not find module <tls>") reads the same.
    monkeypatch.setattr(launch, "KAMAILIO_DIR", kdir)
    failed = failure_from_the_log(policy, tmp_path / "run2")
    assert str(failed) == sentence
    assert "could not find module <tls>" in failed.details


def test_rtpengine_not_installed_or_its_port_taken(tmp_path: Path) -> None:
    policy, _ = start_lab(tmp_path, lab_policy_data())
    code, out = run_cli(policy, tmp_path / "run", {"KEMI_O365_RTPENGINE": str(tmp_path / "no-rtpengine")})
    assert code == 1, out
    assert out == (
        f"could not start: rtpengine is not installed ({tmp_path}/no-rtpengine does not exist): install it "
        "with apt-get install rtpengine-daemon (or point KEMI_O365_RTPENGINE at the binary)\n"
    )
    rtp = policy.rtpengine
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind((rtp.control_address, rtp.control_port))
        sentence = in_use_by_this_test("rtpengine's control", f"udp {rtp.control_address}:{rtp.control_port}",
                                       "rtpengine.control.port", policy)  # fmt: skip
        assert run_cli(policy, tmp_path / "run") == (1, f"could not start: {sentence}\n")
        failed = failure_from_the_log(policy, tmp_path / "run2")  # rtpengine really starts and exits
        assert str(failed) == sentence
        assert "Failed to open UDP NG control connection port" in failed.details
