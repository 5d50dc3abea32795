"""Start-up behaviour a user sees: the CLI, refusal of a bad policy, clean stop, the KEMI API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kemi_o365 import rpc
from kemi_o365.launch import (
    RunDir,
    Stack,
    StartError,
    kamailio_answers,
    kamailio_command,
    kamailio_env,
    render_dispatcher_list,
    render_tls_cfg,
)
from tests.e2e.conftest import Lab, lab_policy_data, start_lab

pytestmark = pytest.mark.e2e

KEMI_O365 = Path(sys.prefix) / "bin" / "kemi-o365"
API_FIXTURE = Path(__file__).parent.parent / "fixtures" / "kemi-api-5.6.3.json"


def test_live_kemi_api_matches_the_double_fixture(lab: Lab) -> None:
    """The KSR double is built from this fixture; the installed Kamailio must still agree with it."""
    live = rpc.call(lab.stack.run.rpc_sock, "app_python.api_list")
    functions = {}
    for method in live["methods"]:
        f = method["func"]
        name = (f["module"] + "." if f["module"] else "") + f["name"]
        params = [p.strip() for p in f["params"].split(",")] if f["params"] not in ("", "none") else []
        functions[name] = {"ret": f["ret"], "params": params}
    assert functions == json.loads(API_FIXTURE.read_text())["functions"]


def test_kamailio_refuses_to_start_on_an_invalid_policy(tmp_path: Path) -> None:
    policy, _ = start_lab(tmp_path, lab_policy_data())
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.tls_cfg.write_text(render_tls_cfg(policy))
    run.dispatcher_list.write_text(render_dispatcher_list(policy))
    # The policy Kamailio reads at start-up turns bad after the CLI checked it: Kamailio itself must refuse.
    text = policy.source.read_text().replace("port_min:", "port_minimum:")
    policy.source.write_text(text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "port_minimum" in ln)
    proc = subprocess.run(
        kamailio_command(policy, run),
        env=kamailio_env(policy),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "kemi-o365: refusing to start, the policy is invalid" in log
    assert f"{policy.source}:{line}: rtpengine.port_minimum: unknown key; did you mean 'port_min'?" in log
    assert not run.rpc_sock.exists() or not kamailio_answers(run)


def test_stack_start_reports_why_kamailio_failed(tmp_path: Path) -> None:
    data = lab_policy_data()
    policy, _ = start_lab(tmp_path, data)
    # Occupy the TLS port so Kamailio cannot bind it.
    ext = policy.sbc.external
    with socket.socket() as busy:
        busy.bind((ext.address, ext.port))
        busy.listen()
        stack = Stack(policy, RunDir(tmp_path / "run"))
        # Past the checks before the start (a race), Kamailio's own log is read for the sentence.
        with pytest.raises(StartError, match=r"Microsoft-side SIP \(TLS\) port, .* is already in use"):
            stack.start(precheck=False)
    assert not stack.procs


def test_run_command_serves_until_sigterm_then_leaves_nothing(tmp_path: Path) -> None:
    data = lab_policy_data()
    policy, _ = start_lab(tmp_path, data)
    rundir = tmp_path / "run"
    proc = subprocess.Popen(
        [str(KEMI_O365), "run", "--policy", str(policy.source), "--rundir", str(rundir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "kemi-o365 running" in first, first + proc.stdout.read()
        assert rpc.call(rundir / "kamailio_rpc.sock", "core.uptime")["uptime"] >= 0
        rtpengine_pid = int((rundir / "rtpengine.pid").read_text())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert "stopped" in out
    assert not Path(f"/proc/{rtpengine_pid}").exists()
    assert not _processes_using(rundir)
    for ip, port, kind in [
        (policy.sbc.internal.address, policy.sbc.internal.port, socket.SOCK_STREAM),
        (policy.sbc.internal.address, policy.sbc.internal.port, socket.SOCK_DGRAM),
        (policy.sbc.external.address, policy.sbc.external.port, socket.SOCK_STREAM),
        (policy.rtpengine.control_address, policy.rtpengine.control_port, socket.SOCK_DGRAM),
    ]:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((ip, port))  # raises if anything still holds the port


def _processes_using(rundir: Path) -> list[int]:
    """PIDs whose command line names this run directory (Kamailio gets it via -Y)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(rundir).encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_policy_check_and_demo_commands(tmp_path: Path) -> None:
    policy, _ = start_lab(tmp_path, lab_policy_data())
    ok = subprocess.run(
        [str(KEMI_O365), "policy", "check", str(policy.source)], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0
    assert "OK (exchange-um profile" in ok.stdout
    data = yaml.safe_load(policy.source.read_text())
    data["sbc"]["internal"]["port"] = "fifty"
    policy.source.write_text(yaml.safe_dump(data, sort_keys=False))
    bad = subprocess.run(
        [str(KEMI_O365), "policy", "check", str(policy.source)], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2
    assert "sbc.internal.port: expected an integer, got 'fifty'" in bad.stderr


def test_demo_prints_a_ladder_and_a_passing_verdict() -> None:
    started = time.monotonic()
    proc = subprocess.run([str(KEMI_O365), "demo"], capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "CUCM (SIPp, TCP)" in out and "Microsoft (TLS peer)" in out
    assert out.count("|----------------------------->|") >= 3  # INVITE, ACK, BYE left to right
    assert "INVITE sip:87000@pstn-o365.example.com (SDP RTP/AVP" in out
    assert "200 OK (SDP RTP/SAVP, crypto" in out
    media = [ln.strip() for ln in out.splitlines() if " -> " in ln and "sent " in ln]
    assert [ln.split(":")[0] for ln in media] == ["CUCM -> Microsoft", "Microsoft -> CUCM"]
    assert all(", lost 0," in ln and "authenticated" in ln for ln in media), media
    assert "tone 1000.0 Hz" in media[0] and "tone 1800.0 Hz" in media[1]
    assert out.strip().splitlines()[-1].startswith("VERDICT: PASS")
    assert time.monotonic() - started < 60
