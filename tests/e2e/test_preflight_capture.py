"""`kemi-o365 preflight` on a packet capture of the demo call: the CUCM leg breaks Microsoft's SRTP
rule (CUCM offers plain RTP), the Microsoft leg (TLS, decrypted with the peer's key log) breaks none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kemi_o365.lab.demo import place_seed_call
from tests.e2e.conftest import lab_policy_data, running_lab
from tests.tshark import LoopbackCapture

pytestmark = pytest.mark.e2e

KEMI_O365 = Path(sys.prefix) / "bin" / "kemi-o365"


def _preflight(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KEMI_O365), "preflight", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_preflight_flags_the_cucm_leg_and_passes_the_microsoft_leg(tmp_path: Path) -> None:
    keylog = tmp_path / "tls-keys.log"
    pcap = tmp_path / "demo-call.pcapng"
    with running_lab(tmp_path / "lab", lab_policy_data(), keylog=keylog) as lab:
        proxy = lab.policy.microsoft.proxies[0]
        capture = LoopbackCapture(pcap, [lab.policy.sbc.internal.port, lab.peer.port])
        try:
            outcome = place_seed_call(lab.policy, lab.peer, lab.root / "sipp")
        finally:
            capture.stop()
        assert not outcome.problems, outcome.problems
        sbc_internal = lab.policy.sbc.internal.address
        assert proxy.address is not None

    cucm_leg = _preflight(str(pcap), "--to", sbc_internal)
    assert cucm_leg.returncode == 1, cucm_leg.stdout + cucm_leg.stderr
    fails = [ln.strip() for ln in cucm_leg.stdout.splitlines() if ln.strip().startswith("FAIL")]
    assert len(fails) == 1, cucm_leg.stdout
    assert fails[0].startswith("FAIL srtp-required (488 Not Acceptable Here): ")

    microsoft_leg = _preflight(str(pcap), "--tls-keylog", str(keylog), "--to", proxy.address)
    assert microsoft_leg.returncode == 0, microsoft_leg.stdout + microsoft_leg.stderr
    assert "ok: passes all 7 exchange-um rules" in microsoft_leg.stdout
    assert "FAIL" not in microsoft_leg.stdout
