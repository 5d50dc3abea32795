"""The media bench in a few seconds, so it cannot rot: benchmarks/media.py --smoke relays a few calls
RTP <-> SRTP through rtpengine and must report a ceiling, its loss, and packets that really went both
ways (and were checked: SRTP toward Microsoft, the original payload back in clear toward CUCM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kemi_o365.launch import REPO

pytestmark = pytest.mark.e2e

STEP_KEYS = (
    "calls",
    "seconds",
    "sent",
    "received_srtp",
    "echoed",
    "received_rtp",
    "loss_rtp_to_srtp_pct",
    "loss_srtp_to_rtp_pct",
    "rtpengine_cpu_s",
    "rtpengine_cpu_pct_of_core",
    "generator_cpu_s",
    "machine_busy_pct",
    "rss_before",
    "rss_after",
    "rss_bytes_per_call",
)


def test_media_bench_smoke_relays_both_ways(tmp_path: Path) -> None:
    out = tmp_path / "media.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "media.py"), "--smoke", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    assert result["media_max_calls"] > 0, result["steps"]
    assert result["media_loss_pct"] is not None and result["media_loss_pct"] < 0.5, result["steps"]
    assert result["limits"], "the limits of the run are spelled out"
    steps = result["steps"]
    assert steps
    for step in steps:
        missing = [k for k in STEP_KEYS if k not in step]
        assert not missing, missing
        assert step["sent"] > 0 and step["received_srtp"] > 0 and step["received_rtp"] > 0, step
        assert step["loss_rtp_to_srtp_pct"] is not None and step["loss_srtp_to_rtp_pct"] is not None
        assert step["checked_srtp"] > 0 and step["checked_rtp"] > 0, step
        assert not step["check_failures"], step["check_failures"]
        assert step["rtpengine_cpu_s"] >= 0 and step["rss_after"] > 0, step
