"""What a live reload may change: everything decided per message. Listeners, TLS files, rtpengine,
Microsoft's proxy list and timers, metrics and Kamailio's own settings are read once at start-up
(kamailio.cfg defines, tls.cfg, the dispatcher list): changing them needs a restart.
"""

from __future__ import annotations

from kemi_o365.policy.model import Policy


def restart_needed(running: Policy, new: Policy) -> list[str]:
    """The policy keys whose change a reload cannot apply (empty: the reload may go ahead)."""
    old_ms, new_ms = running.microsoft, new.microsoft
    checks = {
        "sbc": (running.sbc, new.sbc),
        "rtpengine": (running.rtpengine, new.rtpengine),
        "kamailio": (running.kamailio, new.kamailio),
        "metrics": (running.metrics, new.metrics),
        "microsoft.proxies": (old_ms.proxies, new_ms.proxies),
        "microsoft.options_interval": (old_ms.options_interval, new_ms.options_interval),
        "microsoft.keepalive_interval": (old_ms.keepalive_interval, new_ms.keepalive_interval),
        "topology key (sbc.tls.private_key's content)": (running.topology.key, new.topology.key),
    }
    return [key for key, (old, now) in checks.items() if old != now]
