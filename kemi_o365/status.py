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
    versions = policy_versions(rpc.call(run.rpc_sock, "htable.dump", "kemi_state"))
    running = ", ".join(f"{v} in {n} process{'es' if n > 1 else ''}" for v, n in sorted(versions.items()))
    lines.append(f"policy version {policy.version} on disk; running: {running or 'unknown'}")
    if policy.metrics is not None:
        m = policy.metrics
        lines.append(f"metrics: http://{m.address}:{m.port}/metrics")
        if m.rtpengine_port:
            lines.append(f"         http://{m.address}:{m.rtpengine_port}/metrics (rtpengine)")
    return "\n".join(lines)


def policy_versions(dump: Any) -> dict[str, int]:
    """How many Kamailio processes run each policy version (htable kemi_state, key policy:<pid>)."""
    counts: dict[str, int] = {}
    for slot in dump if isinstance(dump, list) else []:
        for entry in slot.get("slot", []):
            if str(entry.get("name", "")).startswith("policy:"):
                version = str(entry.get("value", "")).split(" ", 1)[0]
                counts[version] = counts.get(version, 0) + 1
    return counts
