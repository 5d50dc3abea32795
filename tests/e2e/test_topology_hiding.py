"""Topology hiding on the real stack: every byte Microsoft receives, in every kind of exchange the lab
plays, is scanned for CUCM's and the SBC's internal addresses and CUCM's own headers."""

from __future__ import annotations

import re

import pytest

from kemi_o365.lab.demo import SCENARIOS, cucm_uas, place_seed_call, wait_rtpengine_empty
from kemi_o365.lab.sipp import SippProcess, run_sipp, start_sipp
from kemi_o365.lab.variants import VARIANTS, variant_scenario
from tests.e2e.conftest import Lab
from tests.summary import report

pytestmark = pytest.mark.e2e

EXTENSION = "10048"


def _forbidden(lab: Lab) -> re.Pattern[str]:
    """CUCM's address, the SBC's internal address, CUCM's product and the headers only CUCM writes."""
    internal = lab.policy.sbc.internal
    cucm = lab.policy.cucm.address or ""
    names = [re.escape(a) + r"(?![0-9])" for a in {internal.address, cucm, lab.cucm_ip}]
    names += ["Cisco-CUCM", "CiscoSystemsCCM", "Cisco-Guid", "Remote-Party-ID", "Call-Info", r"\bkemi=sip"]
    return re.compile("|".join(names), re.IGNORECASE)


def _uas(lab: Lab, scenario: str) -> SippProcess:
    return cucm_uas(lab.policy, lab.root / f"sipp-{scenario}", scenario)


def _cucm_calls(lab: Lab, scenario: str) -> SippProcess:
    """SIPp as CUCM placing one call of `scenario` (Microsoft's peer answers, then acts)."""
    return start_sipp(
        SCENARIOS / scenario / "uac.xml",
        lab.cucm_target,
        local_ip=lab.cucm_ip,
        media_ip=lab.cucm_ip,
        workdir=lab.root / f"sipp-{scenario}",
        timeout_s=20,
    )


def test_microsoft_never_sees_cucm_or_the_internal_side(lab: Lab) -> None:
    exchanges: list[str] = []
    # 1. The seed call (BYE from CUCM).
    seed = place_seed_call(lab.policy, lab.peer, lab.root / "sipp-seed")
    assert seed.sipp.ok, seed.sipp.describe()
    exchanges.append("seed call")
    # 2. Microsoft hangs up (its BYE to CUCM, CUCM's 200 back) and re-INVITEs.
    before = len(lab.peer.received)
    with _cucm_calls(lab, "ms-reinvite") as cucm:
        ack = lab.peer.wait_for(
            lambda r: r.msg.is_request and r.msg.method == "ACK", timeout=10, start=before
        )
        assert lab.peer.reinvite(ack.msg.get("Call-ID"), target=lab.microsoft_listener).status == 200
        assert cucm.wait(20).ok
    exchanges.append("re-INVITE from Microsoft")
    before = len(lab.peer.received)
    with _cucm_calls(lab, "ms-hangup") as cucm:
        ack = lab.peer.wait_for(
            lambda r: r.msg.is_request and r.msg.method == "ACK", timeout=10, start=before
        )
        assert lab.peer.hangup(ack.msg.get("Call-ID")).status == 200
        assert cucm.wait(20).ok
    exchanges.append("BYE from Microsoft")
    # 3. Requests Microsoft starts: Play on Phone (CUCM answers) and a message-waiting NOTIFY.
    with _uas(lab, "cucm-answers") as cucm:
        outcome = lab.peer.call(lab.microsoft_listener, to_user=EXTENSION, sbc_fqdn=lab.policy.sbc.fqdn)
        assert outcome.final.status == 200, outcome.final
        assert cucm.wait(20).ok
    exchanges.append("Play on Phone")
    with _uas(lab, "cucm-mwi") as cucm:
        notify = lab.peer.notify_mwi(lab.microsoft_listener, to_user=EXTENSION, sbc_fqdn=lab.policy.sbc.fqdn)
        assert notify.status == 200, notify
        assert cucm.wait(20).ok
    exchanges.append("MWI NOTIFY")
    # 4. Every conformance variant of CUCM's INVITE.
    for variant in VARIANTS:
        result = run_sipp(
            variant_scenario(variant, lab.root / "scenarios"),
            lab.cucm_target,
            local_ip=lab.cucm_ip,
            media_ip=lab.cucm_ip,
            workdir=lab.root / "sipp-variants",
            timeout_s=15,
        )
        assert result.ok, result.describe()
        exchanges.append(variant.name)
    assert wait_rtpengine_empty(lab.policy) == []

    forbidden = _forbidden(lab)
    received = list(lab.peer.received)
    leaks = []
    for rec in received:
        text = rec.raw.decode("utf-8", "replace")
        for m in forbidden.finditer(text):
            line = next(ln for ln in text.splitlines() if m.group(0) in ln)
            leaks.append(f"{rec.msg.start_line}: {line}")
    total = sum(len(r.raw) for r in received)
    assert len(received) > 25  # INVITEs, ACKs, BYEs, replies and NOTIFY answers of every exchange
    assert leaks == []
    # The SBC's own Via is the only one, and every Record-Route names the SBC FQDN.
    fqdn = lab.policy.sbc.fqdn
    for rec in received:
        if rec.msg.is_request:
            assert len(rec.msg.get_all("Via")) == 1, rec.msg
        for rr in rec.msg.get_all("Record-Route"):
            assert fqdn in rr and "127.0.0." not in rr, rr
    report(
        f"topology hiding: {len(received)} messages ({total} bytes) Microsoft received in "
        f"{len(exchanges)} exchanges scanned: 0 CUCM or internal addresses, 0 CUCM headers"
    )
