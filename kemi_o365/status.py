"""`kemi-o365 status`: what a running SBC is doing, read from Kamailio's RPC and rtpengine's ng socket."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kemi_o365 import rpc, rtpengine_ng
from kemi_o365.launch import RunDir
from kemi_o365.policy.load import load_policy

_STATE = {"A": "active", "I": "inactive", "D": "disabled", "T": "trying"}


@dataclass(frozen=True)
class ProxyState:
    uri: str
    state: str
    probing: bool


def proxy_states(dispatcher_list: Any) -> list[ProxyState]:
    """Each Microsoft proxy's state from the dispatcher.list RPC (flags: state letter, then P/X)."""
    out = []
    for record in dispatcher_list.get("RECORDS", []):
        for target in record["SET"]["TARGETS"]:
            dest = target["DEST"]
            flags = str(dest["FLAGS"])
            out.append(ProxyState(dest["URI"], _STATE.get(flags[:1], flags), flags[1:2] == "P"))
    return out


def report(rundir: Path) -> str:
    run = RunDir(rundir)
    policy = load_policy(run.policy_record.read_text().strip())
    uptime = rpc.call(run.rpc_sock, "core.uptime")
    lines = [
        f"kemi-o365 up {uptime['uptime']} s (since {uptime['up_since']}), policy {policy.source} "
        f"({policy.microsoft.profile} profile), SBC {policy.sbc.fqdn}",
        f"  CUCM side   {policy.sbc.internal.address}:{policy.sbc.internal.port} "
        f"({'/'.join(policy.sbc.internal.transports)})",
        f"  Microsoft   tls:{policy.sbc.external.address}:{policy.sbc.external.port} "
        f"(TLS {', '.join(policy.sbc.external.tls_versions)})",
        f"Microsoft proxies (OPTIONS every {policy.microsoft.options_interval} s):",
    ]
    for proxy in proxy_states(rpc.call(run.rpc_sock, "dispatcher.list")):
        probing = ", probed by OPTIONS" if proxy.probing else ""
        lines.append(f"  {proxy.uri:60} {proxy.state}{probing}")
    rtp = policy.rtpengine
    calls = rtpengine_ng.list_calls(rtp.control_address, rtp.control_port)
    lines.append(f"active calls (rtpengine sessions): {len(calls)}")
    return "\n".join(lines)
