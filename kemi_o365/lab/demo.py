"""`kemi-o365 demo`: the built-in lab, one seed call through real Kamailio and rtpengine.

CUCM is SIPp over TCP replaying the seed INVITE; Microsoft is our mutual-TLS Python peer answering
with the seed's 200 OK. Prints a ladder of what each side saw and one verdict line.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kemi_o365 import rtpengine_ng
from kemi_o365.lab.certs import make_pki_for_policy
from kemi_o365.lab.checks import answer_to_cucm_problems, invite_to_microsoft_problems
from kemi_o365.lab.ladder import LadderEvent, describe, render_ladder
from kemi_o365.lab.ms_peer import MicrosoftPeer
from kemi_o365.lab.sipp import SippProcess, SippResult, free_both, free_port, run_sipp, start_sipp
from kemi_o365.launch import REPO, RunDir, Stack
from kemi_o365.policy.load import load_policy
from kemi_o365.policy.model import Policy
from kemi_o365.sipmsg import SipMessage

LAB_POLICY = Path(__file__).resolve().parent.parent / "data" / "lab.yaml"
SCENARIOS = REPO / "sipp-scenarios"
COLUMNS = ("CUCM (SIPp, TCP)", "SBC (Kamailio+rtpengine)", "Microsoft (TLS peer)")


@dataclass
class CallOutcome:
    """Everything the lab saw of one call, for the ladder, the verdict and the tests."""

    policy: Policy
    sipp: SippResult
    at_microsoft: list[tuple[float, SipMessage]]
    from_microsoft: list[tuple[float, SipMessage]]
    rtpengine_left: list[str]
    tls_client_cn: str | None
    problems: list[str] = field(default_factory=list)

    def invite_at_microsoft(self) -> SipMessage | None:
        return next((m for _, m in self.at_microsoft if m.is_request and m.method == "INVITE"), None)

    def answer_at_cucm(self) -> SipMessage | None:
        return next(
            (
                m
                for m in self.sipp.received()
                if not m.is_request and m.status == 200 and m.method == "INVITE"
            ),
            None,
        )


def prepare_lab(root: Path, policy_text: str | None = None) -> Policy:
    """Write the lab policy and its throwaway PKI into `root`; return the loaded policy."""
    root.mkdir(parents=True, exist_ok=True)
    policy_file = root / "policy.yaml"
    policy_file.write_text(policy_text if policy_text is not None else LAB_POLICY.read_text())
    make_pki_for_policy(policy_file)
    return load_policy(policy_file)


@contextmanager
def microsoft_peer(policy: Policy, pki: Path, *, keylog_file: Path | None = None) -> Iterator[MicrosoftPeer]:
    """The Microsoft peer at the pinned proxy address, enforcing the policy profile's rules."""
    proxy = policy.microsoft.proxies[0]
    assert proxy.address, "the lab needs a pinned Microsoft proxy address"
    peer = MicrosoftPeer(
        host=proxy.address,
        port=proxy.port,
        cert=pki / "ms.crt",
        key=pki / "ms.key",
        ca=pki / "ca.crt",
        media_ip=proxy.address,
        contact_host=proxy.fqdn,
        profile=policy.microsoft.profile,
        expected_sbc_fqdn=policy.sbc.fqdn,
        keylog_file=keylog_file,
    )
    with peer:
        yield peer


def lab_policy_on_fresh_ports(media_ports: tuple[int, int]) -> dict[str, Any]:
    """The shipped lab policy as data, every SIP and control port one the OS says is free now,
    rtpengine on `media_ports` (so parallel labs never share a port)."""
    data: dict[str, Any] = yaml.safe_load(LAB_POLICY.read_text())
    data["sbc"]["internal"]["port"] = free_both("127.0.0.1")
    data["sbc"]["external"]["port"] = free_port("127.0.0.2")
    data["microsoft"]["proxies"][0]["port"] = free_port("127.0.0.3")
    data["rtpengine"]["control"]["port"] = free_port("127.0.0.1", socket.SOCK_DGRAM)
    data["cucm"]["port"] = free_both(data["cucm"]["address"])
    data["rtpengine"]["port_min"], data["rtpengine"]["port_max"] = media_ports
    data["metrics"]["port"] = free_port("127.0.0.1")
    data["metrics"]["rtpengine_port"] = free_port("127.0.0.1")
    return data


def cucm_uas(
    policy: Policy, workdir: Path, scenario: str, *, udp: bool = False, timeout_s: int = 20
) -> SippProcess:
    """SIPp as CUCM answering on cucm.address:cucm.port (TCP, or UDP), for requests Microsoft starts."""
    cucm, internal = policy.cucm, policy.sbc.internal
    assert cucm.address is not None, "the lab policy names CUCM's address"
    return start_sipp(
        SCENARIOS / scenario / "uas.xml",
        f"{internal.address}:{internal.port}",
        transport="u1" if udp else "t1",
        local_ip=cucm.address,
        local_port=cucm.port,
        media_ip=cucm.address,
        workdir=workdir,
        timeout_s=timeout_s,
    )


def cucm_address(policy: Policy) -> str:
    """The address SIPp plays CUCM from: the lab policy's CUCM, else the first allowed source."""
    return policy.cucm.address or str(policy.cucm.sources[0].network_address)


def wait_rtpengine_empty(policy: Policy, timeout: float = 3.0) -> list[str]:
    """rtpengine deletes asynchronously after BYE; poll its own listing for a bounded time."""
    rtp = policy.rtpengine
    deadline = time.monotonic() + timeout
    calls = rtpengine_ng.list_calls(rtp.control_address, rtp.control_port)
    while calls and time.monotonic() < deadline:
        time.sleep(0.1)
        calls = rtpengine_ng.list_calls(rtp.control_address, rtp.control_port)
    return calls


def place_seed_call(
    policy: Policy, peer: MicrosoftPeer, workdir: Path, scenario: str = "seed-call"
) -> CallOutcome:
    """Run one SIPp call from 'CUCM' through the running SBC to the Microsoft peer."""
    internal = policy.sbc.internal
    cucm_ip = cucm_address(policy)
    before = len(peer.received)
    result = run_sipp(
        SCENARIOS / scenario / "uac.xml",
        f"{internal.address}:{internal.port}",
        transport="t1",
        local_ip=cucm_ip,
        media_ip=cucm_ip,
        media_port=free_port(cucm_ip, kind=socket.SOCK_DGRAM),
        timeout_s=20,
        workdir=workdir,
    )
    return call_outcome(policy, peer, result, before)


def call_outcome(policy: Policy, peer: MicrosoftPeer, result: SippResult, before: int) -> CallOutcome:
    """What both sides saw of the call SIPp just made (peer messages from index `before` on)."""
    left = wait_rtpengine_empty(policy)
    received = peer.received[before:]
    outcome = CallOutcome(
        policy=policy,
        sipp=result,
        at_microsoft=[(r.wall, r.msg) for r in received],
        from_microsoft=[
            (s.wall, s.msg) for s in peer.sent if s.wall >= (received[0].wall if received else 0)
        ],
        rtpengine_left=left,
        tls_client_cn=received[0].conn.cert_cn if received else None,
    )
    outcome.problems = verdict_problems(outcome)
    return outcome


def verdict_problems(o: CallOutcome) -> list[str]:
    problems = []
    if not o.sipp.ok:
        problems.append(f"CUCM (SIPp) call failed: exit {o.sipp.returncode} ({o.sipp.exit_meaning})")
    invite = o.invite_at_microsoft()
    if invite is None:
        problems.append("no INVITE reached Microsoft")
    else:
        problems += invite_to_microsoft_problems(invite, o.policy, {cucm_address(o.policy)})
    if o.tls_client_cn != o.policy.sbc.fqdn:
        problems.append(f"TLS client certificate CN {o.tls_client_cn!r}, expected {o.policy.sbc.fqdn}")
    answer = o.answer_at_cucm()
    if answer is None:
        problems.append("no 200 OK reached CUCM")
    else:
        problems += answer_to_cucm_problems(answer, o.policy)
    methods_at_ms = [m.method for _, m in o.at_microsoft if m.is_request]
    for method in ("ACK", "BYE"):
        if method not in methods_at_ms:
            problems.append(f"{method} did not reach Microsoft")
    if o.rtpengine_left:
        problems.append(f"rtpengine still holds {len(o.rtpengine_left)} session(s) after BYE")
    return problems


def ladder_events(o: CallOutcome) -> list[LadderEvent]:
    cucm, sbc, ms = COLUMNS
    events = [
        LadderEvent(t.at, cucm, sbc, describe(t.msg))
        if t.direction == "sent"
        else LadderEvent(t.at, sbc, cucm, describe(t.msg))
        for t in o.sipp.messages
    ]
    events += [LadderEvent(at, sbc, ms, describe(m)) for at, m in o.at_microsoft]
    events += [LadderEvent(at, ms, sbc, describe(m)) for at, m in o.from_microsoft]
    return sorted(events, key=lambda e: e.at)


def run_demo(*, keep: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="kemi-o365-demo-"))
    try:
        print("[1/4] lab: policy kemi_o365/data/lab.yaml, throwaway CA and certificates", flush=True)
        policy = prepare_lab(root)
        print(
            "[2/4] starting rtpengine and Kamailio (app_python3 + kemi_o365) and the Microsoft TLS peer",
            flush=True,
        )
        from kemi_o365.lab.media_call import run_media_call

        with microsoft_peer(policy, root / "pki") as peer, Stack(policy, RunDir(root / "run")):
            print(
                "[3/4] placing the seed call: CUCM -> SBC -> Microsoft (INVITE, 200, ACK, BYE), 2 s of "
                "media each way (CUCM: 1000 Hz RTP + DTMF 5; Microsoft: 1800 Hz SRTP + DTMF 1)",
                flush=True,
            )
            media = run_media_call(policy, peer, root / "sipp")
        outcome = media.call
        print("[4/4] stopped Kamailio, rtpengine and the peer\n", flush=True)
        print(render_ladder(COLUMNS, ladder_events(outcome)))
        print()
        _print_facts(outcome)
        print("  media:")
        for line in media.lines():
            print(f"    {line}")
        if media.problems:
            for p in media.problems:
                print(f"  problem: {p}")
            print("VERDICT: FAIL - the seed call did not go through as Microsoft requires")
            return 1
        print(
            "VERDICT: PASS - seed call CUCM -> SBC -> Microsoft answered and released: "
            "RTP/AVP on CUCM's side, SRTP (AES_CM_128_HMAC_SHA1_80) over mutual TLS on Microsoft's, "
            "audio and DTMF both ways, rtpengine holds no session"
        )
        return 0
    finally:
        if keep:
            print(f"(run directory kept: {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _print_facts(o: CallOutcome) -> None:
    invite, answer = o.invite_at_microsoft(), o.answer_at_cucm()
    if invite is not None:
        audio = next((ln for ln in invite.sdp_lines if ln.startswith("m=audio")), "-")
        crypto = next(
            (ln.split(" inline:")[0] for ln in invite.sdp_lines if ln.startswith("a=crypto")), "none"
        )
        print(
            f"  INVITE at Microsoft: To {invite.get('To')}; {audio}; {crypto}; "
            f"TLS client CN {o.tls_client_cn}"
        )
    if answer is not None:
        audio = next((ln for ln in answer.sdp_lines if ln.startswith("m=audio")), "-")
        conn = next((ln for ln in answer.sdp_lines if ln.startswith("c=")), "-")
        print(f"  200 OK at CUCM:      {audio}; {conn}")
    print(f"  rtpengine sessions after BYE: {len(o.rtpengine_left)}")
