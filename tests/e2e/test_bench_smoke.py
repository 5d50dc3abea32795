"""`make bench` in a few seconds, so the harness cannot rot: benchmarks/bench.py --smoke runs both
contenders (kemi-o365 and benchmarks/native/kamailio.cfg) through calls, latency and OPTIONS at tiny
rates and must write a result with every key the full run promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kemi_o365.launch import REPO

pytestmark = pytest.mark.e2e

KEYS = (
    "machine",
    "kemi_max_cps",
    "native_max_cps",
    "kemi_cpu_us_per_call",
    "native_cpu_us_per_call",
    "kemi_p99_ms",
    "native_p99_ms",
    "options_max_rps_kemi",
    "options_max_rps_native",
    "media_max_calls",
    "media_loss_pct",
)


def test_bench_smoke_writes_results_for_both_contenders(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench.py"),
            "--smoke",
            "--no-plots",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "latest.json").read_text())
    missing = [k for k in KEYS if k not in result]
    assert not missing, missing
    assert result["smoke"] is True
    assert result["machine"]["cores"] >= 1
    for name in ("kemi", "native"):
        assert result[f"{name}_max_cps"] > 0, result["steps"]
        assert result[f"{name}_cpu_us_per_call"] > 0, result["steps"]
        assert result[f"options_max_rps_{name}"] > 0, result["options"]
        assert result[f"{name}_p99_ms"] is not None, result["latency"]
        steps = [s for s in result["steps"] if s["contender"] == name]
        assert steps and all(s["successful"] > 0 for s in steps), steps
        # The ramp over several CUCM connections ran too (its code path cannot rot either).
        assert result[f"{name}_max_cps_several_connections"] > 0, result["steps"]
        # Memory per call in progress, sampled while the calls were up.
        assert result["memory"][name]["calls_up"] > 0, result["memory"]
        assert result["kamailio_shm_bytes_per_call"][name] > 0, result["memory"]
    assert {s["connections"] for s in result["steps"]} == {1, result["cucm_connections"]}
    assert result["cucm_connections"] > 1
    # The floor (native's routing as a minimal Python script) carried calls and answered OPTIONS.
    assert result["floor_step"]["successful"] > 0, result["floor_step"]
    assert result["floor_cpu_us_per_options"] > 0, result["options"]
    assert result["ratios"]["cpu_per_options_floor_over_native"] > 0, result["options"]
    # rtpengine relayed RTP <-> SRTP both ways for the media figure.
    assert result["media_max_calls"] > 0 and result["media_loss_pct"] is not None, result["media"]
    assert all(s["received_rtp"] > 0 and s["received_srtp"] > 0 for s in result["media"]["steps"])
    # py-spy sampled the Kamailio process serving CUCM while calls ran through it.
    assert result["profile"]["samples"] > 0 and result["profile"]["top_python_lines"], result["profile"]
    report = (out / "report.md").read_text()
    for section in ("kemi / native", "Limits of this run", "## Media", "## Where the KEMI path", "## Steps"):
        assert section in report, section
