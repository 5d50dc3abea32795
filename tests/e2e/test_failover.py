"""Trunk health and failover toward Microsoft's proxies (Teams Direct Routing, MICROSOFT-NOTES 1.3, 1.8).

Two Microsoft peers play sip.* and sip2.*; the SBC pings both with OPTIONS, sends calls to the first
healthy one in order, and fails over on 408/503/504 and connection failures, never on 603 and never
after a provisional other than 100.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kemi_o365 import rpc
from kemi_o365.lab.certs import make_leaf
from kemi_o365.lab.demo import SCENARIOS, cucm_address, wait_rtpengine_empty
from kemi_o365.lab.ms_peer import MicrosoftPeer
from kemi_o365.lab.sipp import SippResult, run_sipp
from kemi_o365.launch import RunDir, Stack
from kemi_o365.policy.model import Policy, Profile
from tests.e2e.conftest import lab_policy_data, start_lab

pytestmark = pytest.mark.e2e

PRIMARY = "sip.pstnhub.example.net"
SECONDARY = "sip2.pstnhub.example.net"
ADDRESSES = {PRIMARY: "127.0.0.3", SECONDARY: "127.0.0.6"}


def _free(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def teams_two_proxies() -> dict[str, Any]:
    data = lab_policy_data()
    ms = data["microsoft"]
    ms["profile"] = "teams-direct-routing"
    ms.pop("to_uri")
    ms["proxies"] = [{"fqdn": fqdn, "port": _free(ip), "address": ip} for fqdn, ip in ADDRESSES.items()]
    ms["trusted_names"] = ["*.pstnhub.example.net"]
    ms["sources"] = ["127.0.0.3/32", "127.0.0.6/32"]
    ms["options_interval"] = 1
    # Teams sends no media here; nothing may go to the advertised public address on loopback.
    data["sbc"]["external"].pop("advertised_address")
    return data


@dataclass
class TwoProxies:
    root: Path
    policy: Policy
    stack: Stack
    peers: dict[str, MicrosoftPeer]

    def call(self) -> SippResult:
        ip = cucm_address(self.policy)
        internal = self.policy.sbc.internal
        return run_sipp(
            SCENARIOS / "seed-call" / "uac.xml",
            f"{internal.address}:{internal.port}",
            local_ip=ip,
            media_ip=ip,
            workdir=self.root / "sipp",
            timeout_s=20,
        )

    def invites(self, fqdn: str) -> int:
        peer = self.peers.get(fqdn)
        if peer is None:
            return 0
        return sum(1 for r in peer.received if r.msg.is_request and r.msg.method == "INVITE")


@contextmanager
def two_proxies(root: Path, *, start: tuple[str, ...] = (PRIMARY, SECONDARY)) -> Iterator[TwoProxies]:
    policy, pki = start_lab(root, teams_two_proxies())
    with ExitStack() as stack:
        peers = {}
        for proxy in policy.microsoft.proxies:
            if proxy.fqdn not in start:
                continue
            cert, key = make_leaf(pki, (pki / "ca.crt", pki / "ca.key"), proxy.fqdn)
            assert proxy.address is not None
            peer = MicrosoftPeer(
                host=proxy.address,
                port=proxy.port,
                cert=cert,
                key=key,
                ca=pki / "ca.crt",
                media_ip=proxy.address,
                contact_host=proxy.fqdn,
                profile=Profile.TEAMS_DIRECT_ROUTING,
                expected_sbc_fqdn=policy.sbc.fqdn,
            )
            peers[proxy.fqdn] = stack.enter_context(peer)
        sbc = stack.enter_context(Stack(policy, RunDir(root / "run")))
        yield TwoProxies(root, policy, sbc, peers)


def _final(result: SippResult) -> int:
    finals = [
        m.status for m in result.received() if not m.is_request and m.method == "INVITE" and m.status >= 200
    ]
    return finals[0] if finals else 0


def test_a_dead_first_proxy_fails_over_to_the_second(tmp_path: Path) -> None:
    with two_proxies(tmp_path, start=(SECONDARY,)) as lab:
        started = time.monotonic()
        result = lab.call()
        took = time.monotonic() - started
        assert result.ok, result.describe()
        assert lab.invites(SECONDARY) == 1
        invite = next(
            r for r in lab.peers[SECONDARY].received if r.msg.is_request and r.msg.method == "INVITE"
        )
        assert invite.conn.sni == SECONDARY  # the TLS profile follows the proxy failed over to
        assert invite.msg.ruri.startswith("sip:87000@")  # the Request-URI routing built, kept
        assert wait_rtpengine_empty(lab.policy) == []
    assert took < 12, f"failover took {took:.1f} s"


@pytest.mark.parametrize("code", [503, 408, 504])
def test_a_failover_code_from_the_first_proxy_moves_the_call_on(tmp_path: Path, code: int) -> None:
    with two_proxies(tmp_path) as lab:
        lab.peers[PRIMARY].answer_code = (code, "Service Unavailable" if code == 503 else "Timeout")
        result = lab.call()
        assert result.ok, result.describe()
        assert (lab.invites(PRIMARY), lab.invites(SECONDARY)) == (1, 1)
        assert wait_rtpengine_empty(lab.policy) == []


def test_603_declined_is_final(tmp_path: Path) -> None:
    with two_proxies(tmp_path) as lab:
        lab.peers[PRIMARY].answer_code = (603, "Decline")
        result = lab.call()
        assert _final(result) == 603, result.describe()
        assert (lab.invites(PRIMARY), lab.invites(SECONDARY)) == (1, 0)
        assert wait_rtpengine_empty(lab.policy) == []


def test_no_failover_after_the_first_proxy_rang(tmp_path: Path) -> None:
    with two_proxies(tmp_path) as lab:
        lab.peers[PRIMARY].answer_code = (503, "Service Unavailable")
        lab.peers[PRIMARY].answer_delay = 0.5  # 180 Ringing first, then the 503
        result = lab.call()
        # RFC 3261 §16.7 step 6: a proxy turns a 503 into a 500 upstream (CUCM must not take the SBC
        # itself for overloaded).
        assert _final(result) == 500, result.describe()
        assert (lab.invites(PRIMARY), lab.invites(SECONDARY)) == (1, 0)
        assert wait_rtpengine_empty(lab.policy) == []


def test_options_pings_carry_the_sbc_fqdn_and_track_health(tmp_path: Path) -> None:
    with two_proxies(tmp_path, start=(SECONDARY,)) as lab:
        peer = lab.peers[SECONDARY]
        ping = peer.wait_for(lambda r: r.msg.is_request and r.msg.method == "OPTIONS", timeout=8)
        assert ping.msg.ruri.startswith(f"sip:{SECONDARY}:")  # to the FQDN, never a cached IP
        contact = f"<sip:{lab.policy.sbc.fqdn}:{lab.policy.sbc.external.port};transport=tls>"
        assert ping.msg.get("Contact") == contact
        assert ping.conn.cert_cn == lab.policy.sbc.fqdn
        second = peer.wait_for(
            lambda r: r.msg.is_request and r.msg.method == "OPTIONS" and r.at > ping.at, timeout=4
        )
        assert 0.5 < second.at - ping.at < 2.5  # options_interval: 1 s
        assert _states(lab)[SECONDARY].startswith("A")  # answered: active
        # The first call finds the primary dead and fails over; it stays inactive (OPTIONS probe it)...
        assert lab.call().ok
        assert _states(lab)[PRIMARY].startswith("I")
        # ... so the next call goes straight to the secondary.
        started = time.monotonic()
        result = lab.call()
        assert result.ok, result.describe()
        assert time.monotonic() - started < 3
        assert lab.invites(SECONDARY) == 2
        # What an operator sees.
        status = subprocess.run(
            [str(Path(sys.prefix) / "bin" / "kemi-o365"), "status", "--rundir", str(lab.stack.run.root)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        rows = {ln.split()[0]: ln for ln in status.stdout.splitlines() if ln.startswith("  sip:")}
        assert "inactive" in rows[f"sip:{PRIMARY}:{lab.policy.microsoft.proxies[0].port};transport=tls"]
        assert " active" in rows[f"sip:{SECONDARY}:{lab.policy.microsoft.proxies[1].port};transport=tls"]
        assert "active calls (rtpengine sessions): 0" in status.stdout


def _states(lab: TwoProxies) -> dict[str, str]:
    """Each proxy's dispatcher flags (A active, I inactive; P probing), from Kamailio's RPC."""
    targets = rpc.call(lab.stack.run.rpc_sock, "dispatcher.list")["RECORDS"][0]["SET"]["TARGETS"]
    return {t["DEST"]["URI"].split(":")[1]: t["DEST"]["FLAGS"] for t in targets}


def test_retry_after_keeps_the_calls_away_from_that_proxy(tmp_path: Path) -> None:
    with two_proxies(tmp_path) as lab:
        primary = lab.peers[PRIMARY]
        primary.answer_code = (503, "Service Unavailable")
        primary.answer_headers = [("Retry-After", "60")]
        assert lab.call().ok  # failed over to the secondary
        primary.answer_code = (200, "OK")  # healthy again, and answering OPTIONS all along
        time.sleep(2.5)  # OPTIONS every second mark it active again...
        assert _states(lab)[PRIMARY].startswith("A")
        assert lab.call().ok
        # ... but it asked for 60 s: the second call still goes to the secondary.
        assert (lab.invites(PRIMARY), lab.invites(SECONDARY)) == (1, 2)
