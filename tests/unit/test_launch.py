"""What `kemi-o365 run` hands Kamailio and rtpengine, rendered from the policy."""

from __future__ import annotations

from pathlib import Path

from kemi_o365.launch import RunDir, kamailio_command, render_tls_cfg, rtpengine_command, tls_method
from tests.helpers import lab_policy


def _sections(text: str) -> list[list[str]]:
    out: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("["):
            out.append([line])
        elif out and line:
            out[-1].append(line)
    return out


def test_tls_profiles_verify_both_ways_and_give_each_proxy_its_sni(tmp_path: Path) -> None:
    policy = lab_policy(tmp_path)
    sections = _sections(render_tls_cfg(policy))
    names = [s[0] for s in sections]
    assert names == ["[server:default]", "[client:default]", "[client:any]"]
    for section in sections:
        assert "verify_certificate = yes" in section and "require_certificate = yes" in section
    server, _, proxy = sections
    assert "method = TLSv1.2+" in server
    fqdn = policy.microsoft.proxies[0].fqdn
    assert f"server_name = {fqdn}" in proxy and f"server_id = {fqdn}" in proxy
    assert any(ln.startswith("cipher_list = ECDHE-RSA-AES256-GCM-SHA384:") for ln in proxy)


def test_tls_method_follows_the_policy_versions() -> None:
    assert tls_method(("TLSv1.2", "TLSv1.3")) == "TLSv1.2+"
    assert tls_method(("TLSv1.2",)) == "TLSv1.2"
    assert tls_method(("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")) == "TLSv1+"


def test_command_lines_carry_the_policy_addresses(tmp_path: Path) -> None:
    policy = lab_policy(tmp_path)
    run = RunDir(tmp_path / "run")
    kam = kamailio_command(policy, run)
    assert kam[kam.index("CUCM_ADDR=127.0.0.1") - 1 : kam.index("CUCM_ADDR=127.0.0.1") + 1] == [
        "-A",
        "CUCM_ADDR=127.0.0.1",
    ]
    assert "SBC_FQDN=sbc-o365.example.com" in kam and "WITH_CUCM_TCP" in kam and "WITH_CUCM_UDP" in kam
    # Memory from the policy (defaults here): shared pool, then each process's private one.
    assert kam[kam.index("-m") + 1] == "256" and kam[kam.index("-M") + 1] == "16"
    rtp = rtpengine_command(policy, run)
    assert "--interface=internal/127.0.0.1" in rtp
    assert "--interface=external/127.0.0.2!198.51.100.10" in rtp
    assert "--table=-1" in rtp and "--listen-ng=127.0.0.1:22230" in rtp
