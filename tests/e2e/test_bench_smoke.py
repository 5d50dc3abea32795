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
        timeout=150,
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
    # The limits say what was not measured (media) rather than leaving it silently null.
    assert any("media_max_calls" in note for note in result["limits"]), result["limits"]
    report = (out / "report.md").read_text()
    assert "kemi / native" in report and "Limits of this run" in report
