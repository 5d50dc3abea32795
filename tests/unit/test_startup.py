"""kemi_o365.startup: module lists, the log lines it knows (as Kamailio 5.6.3 and rtpengine 10.5 wrote
them on Debian 12), sockets it probes."""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

import pytest

from kemi_o365.policy.errors import PolicyError, Problem
from kemi_o365.policy.load import load_policy
from kemi_o365.policy.model import Policy
from kemi_o365.startup import (
    MODULE_DIR,
    bind_problem,
    explain_failure,
    explain_policy_error,
    listeners,
    loaded_modules,
    module_missing,
    who_holds,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    from kemi_o365.lab.demo import prepare_lab

    return prepare_lab(tmp_path)


def test_modules_of_the_shipped_cfg_and_their_packages() -> None:
    directory, names = loaded_modules((REPO / "kamailio" / "kamailio.cfg").read_text())
    assert directory == MODULE_DIR
    assert {"tls.so", "app_python3.so", "rtpengine.so", "dispatcher.so"} <= set(names)
    assert loaded_modules('mpath="/x/"\nloadmodule "a.so"\n# loadmodule "b.so"\n') == (Path("/x"), ["a.so"])
    assert module_missing("app_python3.so", MODULE_DIR).endswith("(apt-get install kamailio-python3-modules)")
    assert module_missing("tm.so", MODULE_DIR).endswith("(apt-get install --reinstall kamailio)")


def test_kamailio_log_lines_become_sentences(policy: Policy) -> None:
    ext, internal = policy.sbc.external, policy.sbc.internal
    tls_bind = (
        f" 0(2879) ERROR: <core> [core/tcp_main.c:3158]: tcp_init(): bind(8, 0x7f98970a2800, 16) on "
        f"{ext.address}:{ext.port} : Address already in use\n"
    )
    said = explain_failure("kamailio", tls_bind, policy)
    assert said is not None
    assert said.startswith(
        f"the Microsoft-side SIP (TLS) port, tcp {ext.address}:{ext.port}, is already in use"
    )
    assert said.endswith(f"change sbc.external.port in {policy.source}")
    # Kamailio's UDP bind error names no port: the protocol and address pick the listener.
    udp_bind = (
        f" 0(2905) ERROR: <core> [core/udp_server.c:402]: udp_init(): bind(5, 0x7f1831149e50, 16) on "
        f"{internal.address}: Address already in use\n"
    )
    said = explain_failure("kamailio", udp_bind, policy)
    assert said is not None and said.startswith(
        f"the CUCM-side SIP port, udp {internal.address}:{internal.port}"
    )
    missing = (
        " 0(3280) ERROR: <core> [core/sr_module.c:510]: ksr_locate_module(): "
        "could not find module <tls> in </m/>"
    )
    assert explain_failure("kamailio", missing, policy) == module_missing("tls.so", Path("/m"))
    assert explain_failure("kamailio", " 0(1) ERROR: something new\n", policy) is None


def test_rtpengine_log_line_becomes_a_sentence(policy: Policy) -> None:
    rtp = policy.rtpengine
    line = (
        "[1795629256.497086] CRIT: [core] Fatal error: Failed to open UDP NG control connection port "
        f"({rtp.control_address}:{rtp.control_port}): Address already in use\n"
    )
    said = explain_failure("rtpengine", line, policy)
    assert said is not None and "change rtpengine.control.port in" in said


def test_probe_names_the_holder_and_a_foreign_address(policy: Policy) -> None:
    internal = next(
        ln for ln in listeners(policy) if ln.proto == "tcp" and ln.port_key == "sbc.internal.port"
    )
    with socket.socket() as busy:
        busy.bind((internal.address, 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert who_holds("tcp", port) == (os.getpid(), Path("/proc/self/comm").read_text().strip())
        taken = type(internal)(**{**internal.__dict__, "port": port})
        said = bind_problem(taken, policy)
        assert said is not None and f"(by PID {os.getpid()}," in said
    # 192.0.2.1 (TEST-NET-1) is on no interface here: binding it fails locally, nothing is sent.
    foreign = type(internal)(**{**internal.__dict__, "address": "192.0.2.1"})
    said = bind_problem(foreign, policy)
    assert said == (
        f"192.0.2.1 is not an address of this host, so Kamailio cannot listen on it: add it to an interface "
        f"(ip address add 192.0.2.1/32 dev IFACE) or correct sbc.internal.address in {policy.source}"
    )


def test_policy_error_about_a_tls_file_becomes_a_sentence(policy: Policy) -> None:
    problem = Problem("/p.yaml", 9, "sbc.tls.private_key", "cannot read /k/sbc.key: Permission denied")
    assert explain_policy_error(PolicyError([problem])) == (
        "the SBC's TLS private key /k/sbc.key cannot be read (Permission denied): make it readable by "
        f"{pwd.getpwuid(os.geteuid()).pw_name} or correct sbc.tls.private_key in /p.yaml line 9"
    )
    other = Problem("/p.yaml", 3, "sbc.fqdn", "required")
    assert explain_policy_error(PolicyError([problem, other])) is None
    assert load_policy(policy.source).source == policy.source
