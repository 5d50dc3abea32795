"""TLS soak of the Microsoft-side listener on the real stack (KAMAILIO-NOTES P7, kamailio#3791).

Kamailio 5.6.3 + OpenSSL 3 is reported to crash with a double free when several workers run OpenSSL
at once, most of all on failing handshakes; this churns thousands of mutual-TLS connections of every
kind (good, reset, no certificate, wrong name, half a ClientHello, plaintext, resumed; TLS 1.2 and 1.3)
from several threads, with calls and requests Microsoft starts in between, and asserts Kamailio
survived all of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kemi_o365.lab.tls_soak import Mode, SoakConfig, crash_lines, run_soak
from tests.e2e.conftest import lab_policy_data, running_lab
from tests.summary import report

pytestmark = pytest.mark.e2e

CONNECTIONS = 3000
MAX_SECONDS = 75.0


def test_tls_soak_keeps_kamailio_alive_and_serving(tmp_path: Path) -> None:
    config = SoakConfig(connections=CONNECTIONS, max_seconds=MAX_SECONDS, threads=8, sip_every=300)
    with running_lab(tmp_path, lab_policy_data()) as lab:
        result = run_soak(lab.policy, lab.peer, lab.stack, lab.root / "soak", config, pki=lab.root / "pki")
        alive = {name: proc.poll() is None for name, proc in lab.stack.procs.items()}
        log = lab.stack.run.kamailio_log
        crashes = crash_lines(log)
        tail = lab.stack.log_tail("kamailio")
    report(result.summary_line())
    evidence = "\n".join(result.crash_evidence + result.failures) + f"\n--- Kamailio log ---\n{tail}"
    assert alive == {"rtpengine": True, "kamailio": True}, evidence
    assert result.crashes == 0 and not crashes, evidence
    assert result.kamailio_processes >= 5, result  # main, tcp main, tcp readers, udp workers, timers
    # The whole budget went to connections: the count, not the clock, ended the run.
    assert result.stopped_by == "count", result
    assert result.connections_attempted == CONNECTIONS, result
    assert result.connections_failed == 0, evidence
    refused_modes = (Mode.NO_CERT, Mode.WRONG_NAME, Mode.PLAINTEXT)
    for mode in refused_modes:
        assert set(result.by_mode[mode]) == {"refused"}, (mode, result.by_mode)
    assert result.connections_refused == sum(result.by_mode[m]["refused"] for m in refused_modes)
    assert set(result.tls_versions) == {"TLSv1_2", "TLSv1_3"}, result.tls_versions
    # Calls and Microsoft's own requests kept working all through the churn.
    assert result.calls >= CONNECTIONS // config.sip_every - 1, result
    assert result.calls_failed == 0 and result.ms_requests_failed == 0, evidence
    assert result.ms_requests == result.calls, result
    assert set(result.ms_by_kind) == {"mwi", "play-on-phone", "reinvite"}, result.ms_by_kind
