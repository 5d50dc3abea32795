"""Call records, Microsoft's diagnostics in words, what a reload may change, status's version count."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kemi_o365 import calls, metrics
from kemi_o365.policy.model import Policy
from kemi_o365.policy.reload import restart_needed
from kemi_o365.status import policy_versions
from tests.helpers import lab_policy


@pytest.mark.parametrize(
    ("reason", "ms_diagnostics", "words"),
    [
        ('Q.850;cause=16;text="Normal call clearing"', "", "Q.850 cause 16: Normal call clearing"),
        ("Q.850;cause=17", "", "Q.850 cause 17: user busy"),
        (
            "",
            '10500;reason="Internal server error";source="sip.pstnhub.microsoft.com"',
            "ms-diagnostics 10500: Internal server error",
        ),
        ('SIP;cause=200;text="Call completed elsewhere"', "", "SIP cause 200: Call completed elsewhere"),
        ("", "", None),
    ],
)
def test_diagnostics_in_words(reason: str, ms_diagnostics: str, words: str | None) -> None:
    assert calls.diagnostic(reason, ms_diagnostics) == words


@pytest.mark.parametrize(
    ("warning", "ms_diagnostics", "rule"),
    [
        ('399 sip.example.net "srtp-required: m=audio is RTP/AVP"', "", "srtp-required"),
        ("", '560;reason="Wildcard certificate"', "ms-diagnostics-560"),
        ('399 x "no rule here, just words"', "", "unnamed"),
        ("", "", "unnamed"),
    ],
)
def test_rejection_rule(warning: str, ms_diagnostics: str, rule: str) -> None:
    assert calls.rejection_rule(warning, ms_diagnostics) == rule


def test_a_record_has_times_parties_code_and_media() -> None:
    state = calls.start_state(
        "c1@192.0.2.5", "sip:10048@192.0.2.5", "sip:87000@pstn.example", "to_microsoft", 100.0
    )
    state = calls.with_answer(state, 101.5)
    assert calls.with_answer(state, 150.0) == state  # only the first 2xx counts
    line = calls.record(
        state,
        ended=161.5,
        code=200,
        hung_up_by="microsoft",
        diagnostic="Q.850 cause 16: x",
        media={"lost": 0},
    )
    rec = json.loads(line)
    assert rec == {
        "call_id": "c1@192.0.2.5",
        "from": "sip:10048@192.0.2.5",
        "to": "sip:87000@pstn.example",
        "direction": "to_microsoft",
        "start": 100.0,
        "answer": 101.5,
        "end": 161.5,
        "duration_s": 60.0,
        "final_code": 200,
        "hung_up_by": "microsoft",
        "diagnostic": "Q.850 cause 16: x",
        "media": {"lost": 0},
    }
    assert "\n" not in line


def test_media_summary_counts_each_party_and_rtcp_apart() -> None:
    stream = {"stats": {"packets": 90, "errors": 1}, "flags": ["RTP"]}
    rtcp = {"stats": {"packets": 2}, "flags": ["RTCP"]}
    query = {
        "tags": {
            "caller-tag": {"medias": [{"streams": [stream, rtcp]}]},
            "callee-tag": {"medias": [{"streams": [{"stats": {"packets": 88}, "flags": ["RTP"]}]}]},
        },
        "SSRC": {"1": {"lowest MOS": {"packet loss": 3}}},
    }
    assert calls.media_summary(query, "caller-tag") == {
        "rtp_from_caller": 90,
        "rtp_from_callee": 88,
        "rtp_errors": 1,
        "rtcp_packets": 2,
        "lost": 3,
    }


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return lab_policy(tmp_path_factory.mktemp("policy"))


def test_a_reload_may_change_what_is_decided_per_message_only(policy: Policy) -> None:
    numbers = dataclasses.replace(policy.microsoft, to_uri="sip:87001@um.example.net", codecs=("PCMU",))
    assert restart_needed(policy, dataclasses.replace(policy, microsoft=numbers)) == []
    port = dataclasses.replace(policy.sbc.external, port=5062)
    moved = dataclasses.replace(policy, sbc=dataclasses.replace(policy.sbc, external=port))
    assert restart_needed(policy, moved) == ["sbc"]
    rtp = dataclasses.replace(policy.rtpengine, port_max=policy.rtpengine.port_max + 10)
    assert restart_needed(policy, dataclasses.replace(policy, rtpengine=rtp)) == ["rtpengine"]


def test_status_counts_processes_per_policy_version() -> None:
    dump = [
        {
            "entry": 1,
            "size": 2,
            "slot": [
                {"name": "policy:101", "value": "aaa111 /etc/kemi-o365/policy.yaml", "type": "str"},
                {"name": "policy:102", "value": "bbb222 /etc/kemi-o365/policy.yaml", "type": "str"},
            ],
        },
        {"entry": 3, "size": 1, "slot": [{"name": "policy:103", "value": "bbb222 /etc/x", "type": "str"}]},
    ]
    assert policy_versions(dump) == {"aaa111": 1, "bbb222": 2}


def test_the_policy_version_is_a_digest_of_the_file(tmp_path: Path, policy: Policy) -> None:
    assert len(policy.version) == 12 and int(policy.version, 16) >= 0
    other = lab_policy(tmp_path, {"children: 2": "children: 3"})
    assert other.version != policy.version


def test_exposition_names_every_metric_the_readme_lists() -> None:
    metrics.CALLS_ATTEMPTED.labels("to_microsoft").inc()
    text = metrics.exposition().decode()
    for name in (
        "kemi_o365_calls_attempted_total",
        "kemi_o365_calls_answered",
        "kemi_o365_calls_failed",
        "kemi_o365_microsoft_rejections",
        "kemi_o365_active_calls",
        "kemi_o365_microsoft_proxy_up",
        "kemi_o365_rtpengine_errors",
        "kemi_o365_policy_reloads",
        "kemi_o365_handler_exceptions",
        "kemi_o365_handler_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
