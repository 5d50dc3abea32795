"""Operating the SBC on the real stack: Prometheus metrics, one JSON record per call, live reload."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from kemi_o365 import rpc
from kemi_o365.lab.demo import SCENARIOS, place_seed_call, wait_rtpengine_empty
from kemi_o365.lab.media_call import run_media_call
from kemi_o365.lab.sipp import start_sipp
from kemi_o365.operations import RECORD_PREFIX
from kemi_o365.status import report
from tests.e2e.conftest import Lab

pytestmark = pytest.mark.e2e

KEMI_O365 = Path(sys.prefix) / "bin" / "kemi-o365"
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>[0-9.e+-]+)$")


def scrape(url: str) -> dict[str, float]:
    """Prometheus text format -> {'name{label="v",...}': value} (HELP/TYPE lines skipped)."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        body = answer.read().decode()
    out = {}
    for line in body.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[f"{m['name']}{{{m['labels'] or ''}}}"] = float(m["value"])
    return out


def sbc_metrics(lab: Lab) -> dict[str, float]:
    m = lab.policy.metrics
    assert m is not None
    return scrape(f"http://{m.address}:{m.port}/metrics")


def call_records(lab: Lab) -> list[dict[str, object]]:
    log = lab.stack.run.kamailio_log.read_text(errors="replace")
    return [json.loads(line.split(RECORD_PREFIX, 1)[1]) for line in log.splitlines() if RECORD_PREFIX in line]


def _busy_call(lab: Lab) -> None:
    """A call Microsoft refuses with 486 (the seed scenario, which wants a 200, counts it failed)."""
    lab.peer.answer_code = (486, "Busy Here")
    busy = place_seed_call(lab.policy, lab.peer, lab.root / "busy")
    assert any(not m.is_request and m.status == 486 for m in busy.sipp.received()), busy.sipp.describe()
    lab.peer.answer_code = (200, "OK")


def test_metrics_move_with_calls_and_rtpengine_metrics_are_reachable(lab: Lab) -> None:
    before = sbc_metrics(lab)
    answered = run_media_call(lab.policy, lab.peer, lab.root / "media")
    assert not answered.problems, answered.problems
    _busy_call(lab)
    assert wait_rtpengine_empty(lab.policy) == []
    after = sbc_metrics(lab)

    def moved(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved('kemi_o365_calls_attempted_total{direction="to_microsoft"}') == 2
    assert moved('kemi_o365_calls_answered_total{direction="to_microsoft"}') == 1
    assert moved('kemi_o365_calls_failed_total{code="486",direction="to_microsoft"}') == 1
    assert moved('kemi_o365_microsoft_rejections_total{code="486",rule="unnamed"}') == 1
    assert after["kemi_o365_active_calls{}"] == 0
    fqdn = lab.policy.microsoft.proxies[0].fqdn
    assert after[f'kemi_o365_microsoft_proxy_up{{proxy="{fqdn}"}}'] == 1
    # Every request the two calls made (INVITE, ACK, BYE; INVITE, ACK) went through the handler, timed.
    assert moved('kemi_o365_handler_seconds_count{handler="request"}') == 5
    assert after.get('kemi_o365_handler_exceptions_total{handler="request"}', 0) == 0
    m = lab.policy.metrics
    assert m is not None and m.rtpengine_port
    rtpengine = scrape(f"http://{m.address}:{m.rtpengine_port}/metrics")
    assert any(k.startswith("rtpengine_") for k in rtpengine), sorted(rtpengine)[:5]


def test_each_finished_call_leaves_one_json_record(lab: Lab) -> None:
    media = run_media_call(lab.policy, lab.peer, lab.root / "media")
    assert not media.problems, media.problems
    _busy_call(lab)
    records = call_records(lab)
    assert len(records) == 2, records
    talked, rejected = records
    assert talked["direction"] == "to_microsoft" and talked["final_code"] == 200
    assert talked["hung_up_by"] == "cucm"
    assert isinstance(talked["answer"], float) and isinstance(talked["end"], float)
    assert float(talked["end"]) > float(talked["answer"]) >= float(str(talked["start"]))
    media_counts = talked["media"]
    assert isinstance(media_counts, dict)
    # Two seconds of 20 ms packets each way went through rtpengine (MediaPlan talk_s=2.0).
    assert media_counts["rtp_from_caller"] >= 90 and media_counts["rtp_from_callee"] >= 90, media_counts
    assert rejected["final_code"] == 486 and rejected["answer"] is None
    assert rejected["hung_up_by"] == "microsoft"
    assert str(rejected["from"]).startswith("sip:10048@")


def _reload(lab: Lab) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KEMI_O365), "reload", "--rundir", str(lab.stack.run.root)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_reload_switches_policy_without_dropping_a_call(lab: Lab) -> None:
    policy_file = lab.policy.source
    original = policy_file.read_text()
    with start_sipp(
        SCENARIOS / "ms-hangup" / "uac.xml",
        lab.cucm_target,
        local_ip=lab.cucm_ip,
        media_ip=lab.cucm_ip,
        workdir=lab.root / "sipp-long",
        timeout_s=30,
    ) as cucm:
        ack = lab.peer.wait_for(lambda r: r.msg.is_request and r.msg.method == "ACK", timeout=10)
        # A bad file: refused with its error, the running policy stays.
        policy_file.write_text(original.replace("port_min:", "port_minimum:"))
        bad = _reload(lab)
        assert bad.returncode == 1
        assert f"{policy_file}:" in bad.stderr and "port_minimum: unknown key" in bad.stderr
        # What only a restart can change: refused, named.
        data = yaml.safe_load(original)
        data["sbc"]["external"]["port"] += 1
        policy_file.write_text(yaml.safe_dump(data, sort_keys=False))
        restart = _reload(lab)
        assert restart.returncode == 1 and "sbc changed" in restart.stderr, restart.stderr
        # A good change: taken up by every process at its next message.
        data = yaml.safe_load(original)
        data["topology_hiding"] = {"user_agent": "kemi-o365-reloaded"}
        policy_file.write_text(yaml.safe_dump(data, sort_keys=False))
        good = _reload(lab)
        assert good.returncode == 0, good.stderr
        assert "handed to Kamailio" in good.stdout
        before = len(lab.peer.received)
        second = place_seed_call(lab.policy, lab.peer, lab.root / "after-reload")
        assert second.sipp.ok, second.sipp.describe()
        invite = next(
            r.msg for r in lab.peer.received[before:] if r.msg.is_request and r.msg.method == "INVITE"
        )
        assert invite.get("User-Agent") == "kemi-o365-reloaded"
        # The call set up before the reload still ends cleanly, from Microsoft's side.
        assert lab.peer.hangup(ack.msg.get("Call-ID")).status == 200
        result = cucm.wait(20)
    assert result.ok, result.describe()
    assert wait_rtpengine_empty(lab.policy) == []
    metrics = sbc_metrics(lab)
    assert metrics.get('kemi_o365_policy_reloads_total{result="ok"}', 0) >= 1
    assert metrics.get('kemi_o365_policy_reloads_total{result="refused"}', 0) == 0
    status = report(lab.stack.run.root)
    assert "policy version" in status
    versions = rpc.call(lab.stack.run.rpc_sock, "htable.dump", "kemi_state")
    assert versions  # every process that handled a message since says which version it runs
