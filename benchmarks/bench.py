"""Calls per second, latency, CPU per call, the OPTIONS ceiling, memory per call and media capacity:
kemi-o365 (Python KEMI) against Kamailio's native configuration doing the same seed call
(benchmarks/native/kamailio.cfg).

    .venv/bin/python benchmarks/bench.py                 # the full run (about 25 minutes)
    .venv/bin/python benchmarks/bench.py --smoke --output-dir DIR --no-plots   # a minute, for make test

Everything runs on this machine on loopback: for each contender a fresh lab (rtpengine, Kamailio from
kemi_o365.launch with the same -A defines and policy, the Python mutual-TLS Microsoft peer), SIPp as
CUCM. The contenders alternate at every step (kemi first at even steps, native first at odd ones), so
drift of the machine falls on both.

  calls     SIPp seed call (INVITE with SDP through rtpengine offer/answer, 200, ACK, --hold-ms, BYE) at
            rising rates, each step --step-seconds long, first over one CUCM TCP connection, then over
            several (--connections; one SIPp per connection, an equal share of the rate each), from the
            highest rate one connection sustained. A rate is sustained when under 0.1% of the calls
            failed and SIPp created them at 95% of the rate or more (a backlog stretches its run).
            Kamailio CPU is utime+stime of every Kamailio process (its process group, /proc) before
            and after the step; rtpengine's the same; the peer's is this process's (it runs here, in
            threads); SIPp's from its rusage.
  latency   INVITE -> 200 as CUCM's socket sees it, from a tshark capture on lo (SIPp 3.6.1's own
            response times are quantised to about 4 ms), at a rate both contenders sustain; the
            peer's own time (INVITE received -> 200 sent, its timestamps) is subtracted per call to
            give what the SBC adds.
  options   a closed-loop UDP driver in this process (a window of requests in flight) sends
            OPTIONS from CUCM's address; answered per second and Kamailio CPU per OPTIONS.
  memory    calls placed and held; once all are up and tm's wait timer has removed their INVITE
            transactions, Kamailio's shared memory (RPC core.shmmem) and rtpengine's RSS above idle,
            per call rtpengine holds.
  profile   py-spy samples the busiest Kamailio process (the one reading CUCM's connection) of the
            kemi contender at the latency rate: the share of Python of ours, of KSR calls (Kamailio's
            C code: tm, rtpengine module...), of Kamailio outside the handler, and the top lines.
            Samples are wall-clock: a KSR call or socket read waiting for rtpengine counts.
  media     benchmarks/media.py: rtpengine alone relaying RTP <-> SRTP both ways for rising counts
            of simultaneous calls (its docstring says how).

Writes DIR/latest.json (the keys below, null with a note under "limits" for what was not measured)
and DIR/report.md with PNG plots when matplotlib is installed (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import media as media_bench  # benchmarks/media.py: rtpengine's RTP <-> SRTP relay capacity
from host import cpu_seconds, group_pids, machine, machine_busy, rss_bytes

REPO = Path(__file__).resolve().parent.parent
NATIVE_CFG = REPO / "benchmarks" / "native" / "kamailio.cfg"
RESULTS = REPO / "benchmarks" / "results"
SCENARIO = REPO / "sipp-scenarios" / "seed-call" / "uac.xml"
CONTENDERS: dict[str, Path | None] = {"kemi": None, "native": NATIVE_CFG}
# Not a contender: the native cfg's routing as a Python KEMI script (benchmarks/floor), the cost of
# app_python3 itself; its cfg includes the native one's all but routing and finds the script by the
# environment.
FLOOR_SCRIPT = REPO / "benchmarks" / "floor" / "floor.py"
LABS: dict[str, Path | None] = {**CONTENDERS, "floor": REPO / "benchmarks" / "floor" / "kamailio.cfg"}
MAX_FAILED_PCT = 0.1
MIN_RATE_SHARE = 0.95
TAIL_S = 0.5  # SIPp's start-up and the last BYE's round trip, taken out of a step's elapsed time
CUCM_IP = "127.0.0.4"


# --- the machine and its processes ------------------------------------------------------------------


def handler_seconds_by_process(metrics_dir: Path) -> dict[str, float]:
    """kemi-o365's own handler histogram (kemi_o365_handler_seconds: wall time inside each KEMI
    callback, rtpengine round trips included), summed per Kamailio process from its
    prometheus_client file; empty for the native contender, which has none."""
    from prometheus_client.mmap_dict import MmapedDict

    out: dict[str, float] = {}
    for path in metrics_dir.glob("histogram_*.db"):
        total = 0.0
        with contextlib.suppress(OSError, ValueError):
            values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
            for key, value, _ts, _pos in values:
                if json.loads(key)[1] == "kemi_o365_handler_seconds_sum":
                    total += value
        out[path.stem.removeprefix("histogram_")] = total
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# --- one lab per contender and step ----------------------------------------------------------------


@dataclass
class Lab:
    name: str
    policy: Any
    peer: Any
    stack: Any
    root: Path

    @property
    def kamailio_pids(self) -> list[int]:
        return group_pids(self.stack.procs["kamailio"].pid)

    @property
    def rtpengine_pid(self) -> int:
        pid: int = self.stack.procs["rtpengine"].pid
        return pid

    @property
    def sbc_cucm_port(self) -> int:
        port: int = self.policy.sbc.internal.port
        return port

    def shm_used(self) -> int:
        from kemi_o365 import rpc

        result = rpc.call(self.stack.run.rpc_sock, "core.shmmem")
        if not isinstance(result, dict):
            return 0
        return int(result.get("real_used") or result.get("used") or 0)

    def rtpengine_calls(self) -> int:
        from kemi_o365 import rtpengine_ng

        rtp = self.policy.rtpengine
        return len(rtpengine_ng.list_calls(rtp.control_address, rtp.control_port))


@contextlib.contextmanager
def lab(name: str, root: Path, media_ports: tuple[int, int], children: int) -> Iterator[Lab]:
    import yaml

    from kemi_o365.lab.demo import lab_policy_on_fresh_ports, microsoft_peer, prepare_lab
    from kemi_o365.launch import RunDir, Stack

    root.mkdir(parents=True, exist_ok=True)
    data = lab_policy_on_fresh_ports(media_ports)
    data["kamailio"]["children"] = children
    policy = prepare_lab(root, yaml.safe_dump(data, sort_keys=False))
    if name == "floor":
        os.environ["KEMI_O365_FLOOR_SCRIPT"] = str(FLOOR_SCRIPT)
    else:
        os.environ.pop("KEMI_O365_FLOOR_SCRIPT", None)
    with (
        microsoft_peer(policy, root / "pki") as peer,
        Stack(policy, RunDir(root / "run"), kamailio_cfg=LABS[name]) as stack,
    ):
        yield Lab(name, policy, peer, stack, root)


def warm_up(lb: Lab) -> None:
    """One traced seed call: opens the TLS connection to the peer and proves the contender works."""
    from kemi_o365.lab.demo import place_seed_call

    outcome = place_seed_call(lb.policy, lb.peer, lb.root / "warmup")
    if outcome.problems:
        raise RuntimeError(f"{lb.name}: the warm-up seed call failed: {'; '.join(outcome.problems)}")


# --- SIPp at a rate --------------------------------------------------------------------------------


@dataclass
class SippRun:
    exit_code: int
    created: int
    successful: int
    failed: int
    elapsed_s: float
    cpu_s: float
    complaint: str


def run_sipp_load(
    lb: Lab, rate: float, seconds: float, hold_ms: int, workdir: Path, *, connections: int = 1
) -> SippRun:
    """SIPp as CUCM: `rate` seed calls per second for `seconds` over `connections` TCP connections (one
    SIPp each, an equal share of the rate), no traces but the statistics files and the errors;
    bounded by SIPp's own -timeout and ours."""
    from kemi_o365.lab.sipp import exit_meaning, free_port

    workdir.mkdir(parents=True, exist_ok=True)
    share = rate / connections
    calls = max(1, round(share * seconds))
    limit_s = seconds + 30 + hold_ms / 1000
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        for n in range(connections):
            leg = workdir / f"sipp-{n}"
            leg.mkdir(exist_ok=True)
            cmd = ["sipp", f"127.0.0.1:{lb.sbc_cucm_port}", "-sf", str(SCENARIO), "-t", "t1"]
            cmd += ["-i", CUCM_IP, "-p", str(free_port(CUCM_IP)), "-s", "87000", "-m", str(calls)]
            cmd += ["-r", f"{share:g}", "-l", str(max(100, int(share * (10 + hold_ms / 1000))))]
            cmd += ["-nostdin", "-timeout", f"{limit_s:.0f}s", "-timeout_error", "-recv_timeout", "10000"]
            cmd += ["-mi", CUCM_IP, "-mp", str(free_port(CUCM_IP, socket.SOCK_DGRAM))]
            cmd += ["-key", "ruri_host", "pstn-o365.example.com", "-key", "hold_ms", str(hold_ms)]
            cmd += ["-key", "rtp_port", "6000", "-trace_stat", "-stf", str(leg / "stat.csv"), "-fd", "1"]
            cmd += ["-trace_err", "-error_file", str(leg / "errors.log")]
            with open(leg / "sipp.out", "wb") as out:
                proc = subprocess.Popen(cmd, cwd=leg, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                        start_new_session=True)  # fmt: skip
            procs.append((proc, leg))
        for proc, _ in procs:
            try:
                proc.wait(max(1.0, limit_s + 15 - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rows = [_last_stat_row(leg / "stat.csv") for _, leg in procs]
    complaints = []
    for (proc, leg), _row in zip(procs, rows, strict=True):
        if proc.returncode != 0:
            errors = (leg / "errors.log").read_text(errors="replace") if (leg / "errors.log").exists() else ""
            complaints.append(f"{exit_meaning(proc.returncode)}: {errors[-300:].strip()}")
    return SippRun(
        exit_code=max((abs(proc.returncode or 0) for proc, _ in procs), default=0),
        created=sum(int(r.get("TotalCallCreated", 0) or 0) for r in rows),
        successful=sum(int(r.get("SuccessfulCall(C)", 0) or 0) for r in rows),
        failed=sum(int(r.get("FailedCall(C)", 0) or 0) for r in rows),
        elapsed_s=elapsed,
        cpu_s=cpu,
        complaint=complaints[0] if complaints else "",
    )


def _last_stat_row(path: Path) -> dict[str, str]:
    try:
        rows = list(csv.reader(path.read_text(errors="replace").splitlines(), delimiter=";"))
    except OSError:
        return {}
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


# --- calls step ------------------------------------------------------------------------------------


@dataclass
class CallStep:
    contender: str
    connections: int
    rate: float
    seconds: float
    created: int
    successful: int
    failed: int
    failed_pct: float
    achieved_cps: float
    sustained: bool
    kamailio_cpu_s: float
    rtpengine_cpu_s: float
    peer_cpu_s: float
    sipp_cpu_s: float
    machine_busy_pct: float
    elapsed_s: float
    kamailio_busiest_pct: float
    """CPU of the busiest Kamailio process (% of one core): how close the SBC itself was to its limit."""
    handler_busiest_pct: float | None
    """kemi only: the share of wall-clock time the busiest Kamailio process spent inside the Python
    handler, waits for rtpengine included (a process near 100% takes no more calls)."""
    concurrent_calls: int
    kamailio_shm_per_call_bytes: float | None
    rtpengine_rss_per_call_bytes: float | None
    sipp_exit: int
    complaint: str = ""

    @property
    def kamailio_us_per_call(self) -> float | None:
        return self.kamailio_cpu_s / self.successful * 1e6 if self.successful else None

    @property
    def rtpengine_us_per_call(self) -> float | None:
        return self.rtpengine_cpu_s / self.successful * 1e6 if self.successful else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["kamailio_cpu_us_per_call"] = self.kamailio_us_per_call
        out["rtpengine_cpu_us_per_call"] = self.rtpengine_us_per_call
        return out


def call_step(
    lb: Lab, rate: float, seconds: float, hold_ms: int, workdir: Path, *, connections: int = 1
) -> CallStep:
    k_pids = lb.kamailio_pids
    idle_shm, idle_rss = lb.shm_used(), rss_bytes(lb.rtpengine_pid)
    k0, r0, p0 = cpu_seconds(k_pids), cpu_seconds([lb.rtpengine_pid]), cpu_seconds([os.getpid()])
    each0 = {pid: cpu_seconds([pid]) for pid in k_pids}
    metrics_dir = lb.stack.run.metrics_dir
    inside0 = handler_seconds_by_process(metrics_dir)
    b0, t0 = machine_busy()
    sample: dict[str, int] = {}

    def sample_mid() -> None:
        time.sleep(seconds / 2)
        with contextlib.suppress(Exception):
            sample["calls"] = lb.rtpengine_calls()
            sample["shm"] = lb.shm_used()
            sample["rss"] = rss_bytes(lb.rtpengine_pid)

    import threading

    sampler = threading.Thread(target=sample_mid, daemon=True)
    sampler.start()
    run = run_sipp_load(lb, rate, seconds, hold_ms, workdir, connections=connections)
    sampler.join(5)
    k1, r1, p1 = cpu_seconds(k_pids), cpu_seconds([lb.rtpengine_pid]), cpu_seconds([os.getpid()])
    busiest = max((cpu_seconds([pid]) - each0[pid] for pid in k_pids), default=0.0)
    inside1 = handler_seconds_by_process(metrics_dir)
    inside = max((v - inside0.get(pid, 0.0) for pid, v in inside1.items()), default=None)
    b1, t1 = machine_busy()
    asked = max(1, round(rate * seconds))
    done = run.successful + run.failed
    failed_pct = 100.0 * (run.failed + max(0, run.created - done)) / max(1, run.created)
    calls_mid = sample.get("calls", 0)
    per_call_shm = (sample["shm"] - idle_shm) / calls_mid if calls_mid and "shm" in sample else None
    per_call_rss = (sample["rss"] - idle_rss) / calls_mid if calls_mid and "rss" in sample else None
    # SIPp's run ends with the last call's hold and BYE (and its start-up): take those out before
    # judging the rate it created calls at; a backlog stretches the run and lowers this.
    creating_s = max(seconds, run.elapsed_s - hold_ms / 1000 - TAIL_S)
    achieved = run.created / creating_s
    return CallStep(
        contender=lb.name,
        connections=connections,
        rate=rate,
        seconds=seconds,
        created=run.created,
        successful=run.successful,
        failed=run.failed,
        failed_pct=round(failed_pct, 4),
        achieved_cps=round(achieved, 2),
        sustained=failed_pct < MAX_FAILED_PCT
        and run.created >= MIN_RATE_SHARE * asked
        and achieved >= MIN_RATE_SHARE * rate,
        kamailio_cpu_s=round(k1 - k0, 3),
        rtpengine_cpu_s=round(r1 - r0, 3),
        peer_cpu_s=round(p1 - p0, 3),
        sipp_cpu_s=round(run.cpu_s, 3),
        machine_busy_pct=round(100.0 * (b1 - b0) / max(1.0, t1 - t0), 1),
        elapsed_s=round(run.elapsed_s, 2),
        kamailio_busiest_pct=round(100.0 * busiest / max(seconds, run.elapsed_s), 1),
        handler_busiest_pct=round(100.0 * inside / max(seconds, run.elapsed_s), 1) if inside else None,
        concurrent_calls=calls_mid,
        kamailio_shm_per_call_bytes=per_call_shm,
        rtpengine_rss_per_call_bytes=per_call_rss,
        sipp_exit=run.exit_code,
        complaint=run.complaint,
    )


# --- memory per concurrent call ---------------------------------------------------------------------


@dataclass
class MemoryRun:
    contender: str
    calls_up: int
    """Calls rtpengine held when sampled (all of them in their hold, no transaction left)."""
    kamailio_shm_bytes: int
    rtpengine_rss_bytes: int
    kamailio_shm_per_call_bytes: float | None
    rtpengine_rss_per_call_bytes: float | None
    failed: int


def memory_run(
    lb: Lab, calls: int, rate: float, workdir: Path, *, hold_s: float, settle_s: float
) -> MemoryRun:
    """`calls` seed calls placed at `rate` and held `hold_s`; sampled once all are up and their INVITE
    transactions are gone (tm keeps one `settle_s` after its final reply: wait timer 5 s), so what
    remains is what a call costs while it lasts."""
    import threading

    idle_shm, idle_rss = lb.shm_used(), rss_bytes(lb.rtpengine_pid)
    sample: dict[str, int] = {}
    creating_s = calls / rate

    def sample_when_settled() -> None:
        time.sleep(creating_s + settle_s)
        with contextlib.suppress(Exception):
            sample["calls"] = lb.rtpengine_calls()
            sample["shm"] = lb.shm_used()
            sample["rss"] = rss_bytes(lb.rtpengine_pid)

    sampler = threading.Thread(target=sample_when_settled, daemon=True)
    sampler.start()
    run = run_sipp_load(lb, rate, creating_s, int(hold_s * 1000), workdir)
    sampler.join(5)
    up = sample.get("calls", 0)
    shm = sample.get("shm", idle_shm) - idle_shm
    rss = sample.get("rss", idle_rss) - idle_rss
    return MemoryRun(
        contender=lb.name,
        calls_up=up,
        kamailio_shm_bytes=shm,
        rtpengine_rss_bytes=rss,
        kamailio_shm_per_call_bytes=round(shm / up) if up else None,
        rtpengine_rss_per_call_bytes=round(rss / up) if up else None,
        failed=run.failed + max(0, run.created - run.successful - run.failed),
    )


# --- where the Python time goes -------------------------------------------------------------------


def profile_run(lb: Lab, rate: float, seconds: float, workdir: Path) -> dict[str, Any]:
    """py-spy samples the busiest Kamailio process (the one serving CUCM's connection) while SIPp
    places calls at `rate`; the raw stacks are summed into where the time went."""
    import threading

    from kemi_o365.launch import REPO as repo

    spy = Path(sys.prefix) / "bin" / "py-spy"
    if not spy.exists():
        raise RuntimeError(f"py-spy is not installed in {sys.prefix} (pip install -e '.[dev]')")
    workdir.mkdir(parents=True, exist_ok=True)
    pids = lb.kamailio_pids
    c0 = {p: cpu_seconds([p]) for p in pids}
    load = threading.Thread(
        target=run_sipp_load, args=(lb, rate, seconds + 2, 100, workdir / "sipp"), daemon=True
    )
    load.start()
    time.sleep(1.0)
    c1 = {p: cpu_seconds([p]) for p in pids}
    busiest = max(pids, key=lambda p: c1[p] - c0[p])
    raw = workdir / "py-spy.txt"
    cmd = [str(spy), "record", "-p", str(busiest), "-d", f"{max(1, int(seconds))}", "-r", "250", "--native"]
    cmd += ["-f", "raw", "-o", str(raw)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    load.join(seconds + 60)
    if not raw.exists():
        raise RuntimeError(f"py-spy recorded nothing: {(done.stderr or done.stdout).strip()[-300:]}")
    return summarise_profile(raw.read_text(), str(repo))


def summarise_profile(raw: str, repo: str) -> dict[str, Any]:
    """py-spy's raw stacks ("frame;frame;... count" per line): how much of the samples ran Python of
    ours or of libraries (not inside a KSR call), KSR calls, and Kamailio outside the handler; the
    Python lines and KSR functions with the most samples."""
    total = python_own = in_ksr = 0
    by_function: dict[str, int] = {}
    by_ksr: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        python = [i for i, f in enumerate(frames) if ".py:" in f]
        if not python:
            continue
        below = frames[python[-1] + 1 :]
        if any("sr_apy_kemi_exec_func" in f for f in below):
            in_ksr += n
            caller = frames[python[-1]].split(" (")[0]
            by_ksr[caller] = by_ksr.get(caller, 0) + n
            continue
        python_own += n
        leaf = frames[python[-1]].replace(repo + "/", "")
        by_function[leaf] = by_function.get(leaf, 0) + n

    def top(counts: dict[str, int]) -> list[dict[str, Any]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:15]
        return [{"where": k, "pct": round(100 * v / total, 1)} for k, v in best]

    def pct(n: int) -> float | None:
        return round(100 * n / total, 1) if total else None

    return {
        "samples": total,
        "python_own_pct": pct(python_own),
        "in_ksr_calls_pct": pct(in_ksr),
        "kamailio_outside_python_pct": pct(total - python_own - in_ksr),
        "top_python_lines": top(by_function),
        "top_ksr_callers": top(by_ksr),
    }


# --- latency from a capture ------------------------------------------------------------------------


@dataclass
class Latency:
    contender: str
    rate: float
    calls: int
    at_cucm_ms: list[float] = field(default_factory=list)
    sbc_added_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def q(values: list[float], p: float) -> float | None:
            v = percentile(values, p)
            return None if v is None else round(v, 3)

        return {
            "contender": self.contender,
            "rate": self.rate,
            "calls_measured": len(self.at_cucm_ms),
            "invite_to_200_at_cucm_ms": {"p50": q(self.at_cucm_ms, 50), "p99": q(self.at_cucm_ms, 99)},
            "sbc_added_ms": {"p50": q(self.sbc_added_ms, 50), "p99": q(self.sbc_added_ms, 99)},
        }


@contextlib.contextmanager
def capture(pcap: Path, port: int, max_s: float) -> Iterator[None]:
    """tshark on lo for CUCM's TCP leg, bounded by -a duration; stopped by its PID (SIGINT)."""
    cmd = ["tshark", "-i", "lo", "-w", str(pcap), "-f", f"tcp port {port}", "-a", f"duration:{max_s:.0f}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    started = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            line = proc.stderr.readline()
            if "Capturing on" in line:
                started = True
                break
            if not line and proc.poll() is not None:
                break
    if not started:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)
        raise RuntimeError("tshark did not start capturing on lo (is it installed, may this user capture?)")
    time.sleep(0.3)
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(2)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        proc.stderr.close()


def invite_to_200_at_cucm(pcap: Path, sbc_port: int) -> dict[str, float]:
    """From tag -> seconds from CUCM's INVITE to the 200 OK for it, as captured on CUCM's leg. Frames
    toward the SBC carry only SIPp's requests and frames from it only responses, so the per-frame
    field lists of several SIP messages in one segment stay aligned."""
    cmd = ["tshark", "-r", str(pcap), "-d", f"tcp.port=={sbc_port},sip", "-Y", "sip", "-T", "fields"]
    cmd += ["-e", "frame.time_epoch", "-e", "tcp.srcport", "-e", "sip.from.tag", "-e", "sip.CSeq.method"]
    cmd += ["-e", "sip.Status-Code", "-E", "occurrence=a", "-E", "aggregator=|", "-E", "separator=;"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False).stdout
    invites: dict[str, float] = {}
    answers: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split(";")
        if len(parts) < 5:
            continue
        at, src = float(parts[0]), int(parts[1] or 0)
        tags, methods, codes = parts[2].split("|"), parts[3].split("|"), parts[4].split("|")
        if src != sbc_port:
            for tag, method in zip(tags, methods, strict=False):
                if method == "INVITE":
                    invites.setdefault(tag, at)
        else:
            for tag, method, code in zip(tags, methods, codes, strict=False):
                if method == "INVITE" and code == "200":
                    answers.setdefault(tag, at)
    return {tag: answers[tag] - invites[tag] for tag in invites if tag in answers}


def peer_times(peer: Any) -> dict[str, float]:
    """From tag -> seconds the Microsoft peer took from the INVITE it received to the 200 it sent."""
    from kemi_o365.sipmsg import header_param

    received: dict[str, float] = {}
    for r in list(peer.received):
        if r.msg.is_request and r.msg.method == "INVITE":
            tag = header_param(r.msg.get("From"), "tag")
            if tag:
                received.setdefault(tag, r.wall)
    out: dict[str, float] = {}
    for s in list(peer.sent):
        if not s.msg.is_request and s.msg.status == 200 and s.msg.method == "INVITE":
            tag = header_param(s.msg.get("From"), "tag")
            if tag and tag in received:
                out.setdefault(tag, s.wall - received[tag])
    return out


def latency_run(lb: Lab, rate: float, seconds: float, hold_ms: int, workdir: Path) -> Latency:
    workdir.mkdir(parents=True, exist_ok=True)
    pcap = workdir / "cucm-leg.pcap"
    with capture(pcap, lb.sbc_cucm_port, seconds + 40):
        run_sipp_load(lb, rate, seconds, hold_ms, workdir)
    at_cucm = invite_to_200_at_cucm(pcap, lb.sbc_cucm_port)
    at_peer = peer_times(lb.peer)
    result = Latency(lb.name, rate, len(at_cucm))
    for tag, total in at_cucm.items():
        result.at_cucm_ms.append(total * 1000)
        if tag in at_peer:
            result.sbc_added_ms.append((total - at_peer[tag]) * 1000)
    return result


# --- OPTIONS ceiling -------------------------------------------------------------------------------


@dataclass
class OptionsRun:
    contender: str
    seconds: float
    window: int
    sent: int
    answered: int
    answered_per_s: float
    kamailio_cpu_s: float
    driver_cpu_s: float
    machine_busy_pct: float

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["kamailio_cpu_us_per_options"] = (
            self.kamailio_cpu_s / self.answered * 1e6 if self.answered else None
        )
        return out


def options_run(lb: Lab, seconds: float, window: int) -> OptionsRun:
    """Closed loop: `window` OPTIONS in flight over UDP from CUCM's address, for `seconds`."""
    target = ("127.0.0.1", lb.sbc_cucm_port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((CUCM_IP, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    port = sock.getsockname()[1]
    head = (
        f"OPTIONS sip:ping@127.0.0.1:{lb.sbc_cucm_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {CUCM_IP}:{port};branch=z9hG4bK-b"
    ).encode()
    tail = (
        f"\r\nFrom: <sip:ping@{CUCM_IP}>;tag=bench\r\nTo: <sip:ping@127.0.0.1>\r\n"
        "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\nCall-ID: b"
    ).encode()
    k_pids = lb.kamailio_pids
    k0, d0 = cpu_seconds(k_pids), cpu_seconds([os.getpid()])
    b0, t0 = machine_busy()
    sent = answered = in_flight = 0
    sock.setblocking(False)
    end = time.monotonic() + seconds
    last_answer = time.monotonic()
    try:
        while time.monotonic() < end:
            while in_flight < window:
                n = str(sent).encode()
                sock.sendto(head + n + tail + n + b"\r\n\r\n", target)
                sent += 1
                in_flight += 1
            ready, _, _ = select.select([sock], [], [], 0.05)
            if not ready:
                if time.monotonic() - last_answer > 0.2:
                    in_flight = 0  # lost (dropped by a full socket buffer): refill the window
                continue
            while True:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                in_flight = max(0, in_flight - 1)
                last_answer = time.monotonic()
                if data.startswith(b"SIP/2.0 200"):
                    answered += 1
    finally:
        sock.close()
    k1, d1 = cpu_seconds(k_pids), cpu_seconds([os.getpid()])
    b1, t1 = machine_busy()
    return OptionsRun(
        contender=lb.name,
        seconds=seconds,
        window=window,
        sent=sent,
        answered=answered,
        answered_per_s=round(answered / seconds, 1),
        kamailio_cpu_s=round(k1 - k0, 3),
        driver_cpu_s=round(d1 - d0, 3),
        machine_busy_pct=round(100.0 * (b1 - b0) / max(1.0, t1 - t0), 1),
    )


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Config:
    rates: list[float]
    step_seconds: float
    hold_ms: int
    latency_rate: float
    latency_seconds: float
    options_seconds: float
    options_window: int
    options_rounds: int
    children: int
    smoke: bool
    connections: list[int]
    """CUCM TCP connections per ramp: 1 first, then more (CUCM trunks can use several)."""
    memory_calls: int
    memory_rate: float
    memory_hold_s: float
    memory_settle_s: float
    profile_seconds: float
    profile_rate: float | None
    """Calls/s while py-spy samples (None: the latency rate); the smoke run needs enough calls to
    catch Python at work at all."""
    media_counts: list[int]
    media_seconds: float


def order(step: int) -> list[str]:
    names = list(CONTENDERS)
    return names if step % 2 == 0 else names[::-1]


def ramp_rates(cfg: Config, connections: int, single: dict[str, float], name: str) -> list[float]:
    """Rates for one contender's ramp: all of them over one connection; over several, from the
    highest rate one connection sustained (confirmed again) upward."""
    if connections == cfg.connections[0]:
        return cfg.rates
    return [r for r in cfg.rates if r >= single.get(name, 0.0)]


def run_bench(cfg: Config, work: Path, log: Any) -> dict[str, Any]:
    # Below the kernel's ephemeral ports (32768+) and apart from the e2e tests' windows (21000-29039):
    # rtpengine takes 2 ports per call from each local address's pool, so 10000 hold 5000 calls.
    smoke_base = 29100 + (os.getpid() % 4) * 200
    media_ports = (10000, 19999) if not cfg.smoke else (smoke_base, smoke_base + 199)
    steps: list[CallStep] = []
    max_cps: dict[int, dict[str, float]] = {}
    for connections in cfg.connections:
        stopped: set[str] = set()
        single = max_cps.get(cfg.connections[0], {})
        for i, rate in enumerate(cfg.rates):
            for name in order(i):
                if name in stopped or rate not in ramp_rates(cfg, connections, single, name):
                    continue
                root = work / f"calls-{name}-{connections}c-{rate:g}"
                with lab(name, root, media_ports, cfg.children) as lb:
                    warm_up(lb)
                    step = call_step(
                        lb,
                        rate,
                        cfg.step_seconds,
                        cfg.hold_ms,
                        lb.root / "sipp-load",
                        connections=connections,
                    )
                steps.append(step)
                log(
                    f"calls {name:6} {connections} conn {rate:6g}/s: {step.successful}/{step.created} ok, "
                    f"failed {step.failed_pct}%, achieved {step.achieved_cps}/s, "
                    f"Kamailio {step.kamailio_us_per_call or 0:.0f} us/call, rtpengine "
                    f"{step.rtpengine_us_per_call or 0:.0f} us/call, peer {step.peer_cpu_s:.1f} s, "
                    f"SIPp {step.sipp_cpu_s:.1f} s CPU, machine {step.machine_busy_pct}% busy, busiest "
                    f"Kamailio process {step.kamailio_busiest_pct}% of a core, in the handler "
                    f"{step.handler_busiest_pct}% of the time"
                )
                if not step.sustained:
                    stopped.add(name)
            if stopped == set(CONTENDERS):
                break
        max_cps[connections] = {
            n: max(
                (s.rate for s in steps if s.contender == n and s.connections == connections and s.sustained),
                default=0.0,
            )
            for n in CONTENDERS
        }
    one = max_cps[cfg.connections[0]]
    common = min(one.values())
    # The floor carries the same calls at the rate where the contenders' CPU per call is compared.
    with lab("floor", work / "calls-floor", media_ports, cfg.children) as lb:
        warm_up(lb)
        floor_rate = common or cfg.rates[0]
        floor_step = call_step(lb, floor_rate, cfg.step_seconds, cfg.hold_ms, lb.root / "sipp-load")
    log(
        f"calls floor  1 conn {floor_step.rate:6g}/s: {floor_step.successful}/{floor_step.created} ok, "
        f"Kamailio {floor_step.kamailio_us_per_call or 0:.0f} us/call"
    )
    latency_rate = min(cfg.latency_rate, common) if common else cfg.rates[0]
    latencies: dict[str, Latency] = {}
    for name in order(len(cfg.rates)):
        with lab(name, work / f"latency-{name}", media_ports, cfg.children) as lb:
            warm_up(lb)
            latencies[name] = latency_run(
                lb, latency_rate, cfg.latency_seconds, cfg.hold_ms, lb.root / "sipp"
            )
        log(f"latency {name}: {latencies[name].summary()}")
    options: list[OptionsRun] = []
    for r in range(cfg.options_rounds):
        for name in [*order(r), "floor"]:
            with lab(name, work / f"options-{name}-{r}", media_ports, cfg.children) as lb:
                run = options_run(lb, cfg.options_seconds, cfg.options_window)
            options.append(run)
            log(
                f"options {name}: {run.answered_per_s:.0f}/s answered, Kamailio "
                f"{run.kamailio_cpu_s / max(1, run.answered) * 1e6:.1f} us/OPTIONS, driver "
                f"{run.driver_cpu_s:.1f} s CPU in {run.seconds:g} s, machine {run.machine_busy_pct}% busy"
            )
    memory: dict[str, MemoryRun] = {}
    for name in order(0):
        with lab(name, work / f"memory-{name}", media_ports, cfg.children) as lb:
            warm_up(lb)
            memory[name] = memory_run(
                lb,
                cfg.memory_calls,
                cfg.memory_rate,
                lb.root / "sipp",
                hold_s=cfg.memory_hold_s,
                settle_s=cfg.memory_settle_s,
            )
        log(f"memory {name}: {asdict(memory[name])}")
    with lab("kemi", work / "profile", media_ports, cfg.children) as lb:
        warm_up(lb)
        profile_rate = cfg.profile_rate or latency_rate
        profile = profile_run(lb, profile_rate, cfg.profile_seconds, lb.root / "profile")
        profile["rate_cps"] = profile_rate
    log(
        f"profile kemi at {profile_rate:g}/s: {profile['samples']} samples, Python "
        f"{profile['python_own_pct']}%, KSR calls {profile['in_ksr_calls_pct']}%, Kamailio outside "
        f"Python {profile['kamailio_outside_python_pct']}%"
    )
    media = media_bench.run_media_bench(cfg.media_counts, cfg.media_seconds, media_ports, work / "media", log)
    return summarise(
        cfg,
        steps,
        max_cps,
        latency_rate=latency_rate,
        latencies=latencies,
        options=options,
        memory=memory,
        profile=profile,
        media=media,
        floor_step=floor_step,
    )


def _at_rate(steps: list[CallStep], name: str, rate: float, connections: int) -> CallStep | None:
    return next(
        (s for s in steps if s.contender == name and s.rate == rate and s.connections == connections), None
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarise(
    cfg: Config,
    steps: list[CallStep],
    max_cps: dict[int, dict[str, float]],
    *,
    latency_rate: float,
    latencies: dict[str, Latency],
    options: list[OptionsRun],
    memory: dict[str, MemoryRun],
    profile: dict[str, Any],
    media: dict[str, Any],
    floor_step: CallStep | None = None,
) -> dict[str, Any]:
    single, several = cfg.connections[0], cfg.connections[-1]
    one = max_cps[single]
    common = min(one.values())
    cpu_rate = common or cfg.rates[0]
    at = {n: _at_rate(steps, n, cpu_rate, single) for n in CONTENDERS}
    lat = {n: latencies[n].summary() for n in latencies}
    opt_best = {
        n: max((o.answered_per_s for o in options if o.contender == n), default=0.0) for n in CONTENDERS
    }
    opt_cpu = {
        n: statistics.median(
            [o.kamailio_cpu_s / o.answered * 1e6 for o in options if o.contender == n and o.answered]
        )
        if any(o.contender == n and o.answered for o in options)
        else None
        for n in CONTENDERS
    }

    floor_runs = [
        o.kamailio_cpu_s / o.answered * 1e6 for o in options if o.contender == "floor" and o.answered
    ]
    floor_cpu = statistics.median(floor_runs) if floor_runs else None

    floor_raw = floor_step.kamailio_us_per_call if floor_step is not None and floor_step.sustained else None
    floor_us = round(floor_raw, 1) if floor_raw is not None else None

    def us(n: str) -> float | None:
        s = at[n]
        v = s.kamailio_us_per_call if s else None
        return round(v, 1) if v is not None else None

    def rtp_us(n: str) -> float | None:
        s = at[n]
        v = s.rtpengine_us_per_call if s else None
        return round(v, 1) if v is not None else None

    def p99(n: str) -> float | None:
        value = lat.get(n, {}).get("sbc_added_ms", {}).get("p99")
        return float(value) if value is not None else None

    limits = limits_notes(steps, options, one, cfg) + [f"media: {n}" for n in media.get("limits", [])]
    return {
        "benchmark": "kemi-vs-native",
        "smoke": cfg.smoke,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "parameters": asdict(cfg),
        "kemi_max_cps": one["kemi"],
        "native_max_cps": one["native"],
        "cucm_connections": several,
        "kemi_max_cps_several_connections": max_cps[several]["kemi"],
        "native_max_cps_several_connections": max_cps[several]["native"],
        "cpu_rate_cps": cpu_rate,
        "kemi_cpu_us_per_call": us("kemi"),
        "native_cpu_us_per_call": us("native"),
        "floor_cpu_us_per_call": floor_us,
        "kemi_rtpengine_cpu_us_per_call": rtp_us("kemi"),
        "native_rtpengine_cpu_us_per_call": rtp_us("native"),
        "latency_rate_cps": latency_rate,
        "kemi_p50_ms": lat.get("kemi", {}).get("sbc_added_ms", {}).get("p50"),
        "native_p50_ms": lat.get("native", {}).get("sbc_added_ms", {}).get("p50"),
        "kemi_p99_ms": p99("kemi"),
        "native_p99_ms": p99("native"),
        "options_max_rps_kemi": opt_best["kemi"],
        "options_max_rps_native": opt_best["native"],
        "kemi_cpu_us_per_options": round(opt_cpu["kemi"], 2) if opt_cpu["kemi"] is not None else None,
        "native_cpu_us_per_options": round(opt_cpu["native"], 2) if opt_cpu["native"] is not None else None,
        "floor_cpu_us_per_options": round(floor_cpu, 2) if floor_cpu is not None else None,
        "media_max_calls": media.get("media_max_calls"),
        "media_loss_pct": media.get("media_loss_pct"),
        "media_rtpengine_cpu_pct_of_core": media.get("media_rtpengine_cpu_pct_of_core"),
        "media_limited_by": media.get("media_limited_by"),
        "rtpengine_rss_bytes_per_media_call": media.get("media_rss_bytes_per_call"),
        "kamailio_shm_bytes_per_call": {n: m.kamailio_shm_per_call_bytes for n, m in memory.items()},
        "rtpengine_rss_bytes_per_call": {n: m.rtpengine_rss_per_call_bytes for n, m in memory.items()},
        "ratios": {
            "cpu_per_call_kemi_over_native": _ratio(us("kemi"), us("native")),
            "cpu_per_call_floor_over_native": _ratio(floor_us, us("native")),
            "cpu_per_options_kemi_over_native": _ratio(opt_cpu["kemi"], opt_cpu["native"]),
            "cpu_per_options_floor_over_native": _ratio(floor_cpu, opt_cpu["native"]),
            "max_cps_kemi_over_native": _ratio(one["kemi"], one["native"]),
            "max_cps_several_connections_kemi_over_native": _ratio(
                max_cps[several]["kemi"], max_cps[several]["native"]
            ),
            "options_rps_kemi_over_native": _ratio(opt_best["kemi"], opt_best["native"]),
            "p99_kemi_over_native": _ratio(p99("kemi"), p99("native")),
        },
        "limits": limits,
        "profile": profile,
        "memory": {n: asdict(m) for n, m in memory.items()},
        "media": media,
        "steps": [s.to_json() for s in steps],
        "floor_step": floor_step.to_json() if floor_step is not None else None,
        "latency": lat,
        "latency_samples_ms": {n: sorted(latencies[n].sbc_added_ms) for n in latencies},
        "options": [o.to_json() for o in options],
    }


def _step_hints(s: CallStep) -> list[str]:
    """What was busy in a step that was not sustained: the load generator's parts, the machine, the
    SBC's busiest process."""
    hints = []
    span = max(s.seconds, s.elapsed_s)
    if s.peer_cpu_s >= 0.75 * span:
        hints.append(
            f"the Python Microsoft peer (the load generator's TLS side: one process, one core at most "
            f"under the GIL) used {100 * s.peer_cpu_s / span:.0f}% of a core"
        )
    if s.sipp_cpu_s >= 0.85 * span:
        hints.append(f"SIPp used {100 * s.sipp_cpu_s / span:.0f}% of a core")
    if s.machine_busy_pct >= 90:
        hints.append(f"the machine was {s.machine_busy_pct}% busy (every core)")
    hints.append(f"the busiest Kamailio process used {s.kamailio_busiest_pct}% of a core")
    if s.handler_busiest_pct is not None:
        hints.append(
            f"one Kamailio process was inside the Python handler {s.handler_busiest_pct}% of the time "
            "(its CPU plus blocking waits for rtpengine: what it can take is bounded by this, not by "
            "its CPU alone)"
        )
    return hints


def limits_notes(
    steps: list[CallStep], options: list[OptionsRun], max_cps: dict[str, float], cfg: Config
) -> list[str]:
    notes: list[str] = []
    top = max(cfg.rates)
    for n, cps in max_cps.items():
        if cps >= top:
            notes.append(f"{n}: sustained the highest rate tried ({top:g}/s); its ceiling is above that")
    for s in steps:
        if s.sustained:
            continue
        where = "; ".join(_step_hints(s))
        if s.failed_pct < MAX_FAILED_PCT:
            what = f"created calls at {s.achieved_cps:g}/s only (a backlog: it could not keep up)"
        else:
            what = f"{s.failed_pct}% failed"
        notes.append(
            f"{s.contender} over {s.connections} connection(s) stopped at {s.rate:g}/s ({what}): {where}"
        )
    for o in options:
        if o.driver_cpu_s >= 0.85 * o.seconds:
            notes.append(
                f"OPTIONS {o.contender}: the Python UDP driver used {o.driver_cpu_s:.1f} s CPU in "
                f"{o.seconds:g} s: the load generator, not Kamailio, is the limit of "
                f"{o.answered_per_s:.0f}/s; compare Kamailio CPU per OPTIONS instead"
            )
        elif o.machine_busy_pct >= 90:
            notes.append(
                f"OPTIONS {o.contender}: the machine was {o.machine_busy_pct}% busy (Kamailio and the "
                f"driver share its {os.cpu_count()} cores; driver {o.driver_cpu_s:.1f} s CPU in "
                f"{o.seconds:g} s): {o.answered_per_s:.0f}/s is what this machine does with both on it"
            )
    floor = [o.kamailio_cpu_s / o.answered * 1e6 for o in options if o.contender == "floor" and o.answered]
    native = [o.kamailio_cpu_s / o.answered * 1e6 for o in options if o.contender == "native" and o.answered]
    if floor and native:
        ratio = statistics.median(floor) / statistics.median(native)
        notes.append(
            f"OPTIONS: a Python KEMI handler that does nothing but answer (benchmarks/floor) costs "
            f"{ratio:.1f}x native's Kamailio CPU per OPTIONS: with a KEMI engine set, Kamailio 5.6's sl "
            "parses every reply it sends back into a message (for its local-response event) and the "
            "interpreter is entered for the request; no Python KEMI script answers for less here"
        )
    return notes


# --- report ----------------------------------------------------------------------------------------


def plots(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in CONTENDERS:
        pts = [(s["rate"], s["failed_pct"]) for s in result["steps"] if s["contender"] == n]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
    ax.axhline(MAX_FAILED_PCT, color="grey", linestyle="--", linewidth=0.8, label="0.1% limit")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("calls per second offered (SIPp)")
    ax.set_ylabel("failed calls (%)")
    ax.set_title("Seed call through the SBC: failed calls vs rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cps-vs-failed.png", dpi=110)
    plt.close(fig)
    made.append("cps-vs-failed.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, samples in result["latency_samples_ms"].items():
        if samples:
            ys = [(i + 1) / len(samples) for i in range(len(samples))]
            ax.plot(samples, ys, label=f"{n} (n={len(samples)})")
    ax.set_xscale("log")
    ax.set_xlabel("INVITE -> 200 added by the SBC (ms, capture minus peer time)")
    ax.set_ylabel("fraction of calls")
    ax.set_title(f"Response-time distribution at {result['latency_rate_cps']:g} calls/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency-cdf.png", dpi=110)
    plt.close(fig)
    made.append("latency-cdf.png")
    return made


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def report(result: dict[str, Any], images: list[str]) -> str:
    m, r = result["machine"], result["ratios"]
    lines = [
        "# kemi-o365 against native kamailio.cfg: seed-call benchmark",
        "",
        f"Measured {result['started']}{' (smoke run: figures mean nothing)' if result['smoke'] else ''} on "
        f"{m['cpu_model']}, {m['cores']} cores, {m['memory_mb']} MB, {m['os']}, kernel {m['kernel']}; "
        f"{m['kamailio']}; {m['rtpengine']}; {m['sipp']}. Absolute numbers vary between machines; the "
        "ratios are the result. Both contenders ran on this machine in one run, alternating at every step.",
        "",
        "| figure | kemi (Python KEMI) | native kamailio.cfg | kemi / native |",
        "| --- | --- | --- | --- |",
        f"| highest calls/s sustained, one CUCM connection (<{MAX_FAILED_PCT}% failed) | "
        f"{_fmt(result['kemi_max_cps'])} | {_fmt(result['native_max_cps'])} | "
        f"{_fmt(r['max_cps_kemi_over_native'])} |",
        f"| same, {result['cucm_connections']} CUCM connections | "
        f"{_fmt(result['kemi_max_cps_several_connections'])} | "
        f"{_fmt(result['native_max_cps_several_connections'])} | "
        f"{_fmt(r['max_cps_several_connections_kemi_over_native'])} |",
        f"| Kamailio CPU per call at {_fmt(result['cpu_rate_cps'])}/s (us) | "
        f"{_fmt(result['kemi_cpu_us_per_call'])} | {_fmt(result['native_cpu_us_per_call'])} | "
        f"{_fmt(r['cpu_per_call_kemi_over_native'])} |",
        f"| same, native's routing as a minimal Python KEMI script (benchmarks/floor/floor.py) | "
        f"{_fmt(result.get('floor_cpu_us_per_call'))} | | {_fmt(r.get('cpu_per_call_floor_over_native'))} |",
        f"| rtpengine CPU per call at {_fmt(result['cpu_rate_cps'])}/s (us) | "
        f"{_fmt(result['kemi_rtpengine_cpu_us_per_call'])} | "
        f"{_fmt(result['native_rtpengine_cpu_us_per_call'])} | |",
        f"| INVITE->200 added by the SBC at {_fmt(result['latency_rate_cps'])}/s, p50 (ms) | "
        f"{_fmt(result['kemi_p50_ms'])} | {_fmt(result['native_p50_ms'])} | |",
        f"| same, p99 (ms) | {_fmt(result['kemi_p99_ms'])} | {_fmt(result['native_p99_ms'])} | "
        f"{_fmt(r['p99_kemi_over_native'])} |",
        f"| OPTIONS answered per second | {_fmt(result['options_max_rps_kemi'])} | "
        f"{_fmt(result['options_max_rps_native'])} | {_fmt(r['options_rps_kemi_over_native'])} |",
        f"| Kamailio CPU per OPTIONS (us) | {_fmt(result['kemi_cpu_us_per_options'])} | "
        f"{_fmt(result['native_cpu_us_per_options'])} | {_fmt(r['cpu_per_options_kemi_over_native'])} |",
        f"| same, a KEMI handler doing nothing but answer (benchmarks/floor: one KSR test, the reply) | "
        f"{_fmt(result.get('floor_cpu_us_per_options'))} | | "
        f"{_fmt(r.get('cpu_per_options_floor_over_native'))} |",
        f"| Kamailio shared memory per call in progress (bytes) | "
        f"{_fmt(result['kamailio_shm_bytes_per_call'].get('kemi'))} | "
        f"{_fmt(result['kamailio_shm_bytes_per_call'].get('native'))} | |",
        f"| rtpengine RSS per call in progress, signalled by the contender (bytes) | "
        f"{_fmt(result['rtpengine_rss_bytes_per_call'].get('kemi'))} | "
        f"{_fmt(result['rtpengine_rss_bytes_per_call'].get('native'))} | |",
        "",
        "## Media: rtpengine relaying RTP <-> SRTP in user space",
        "",
        f"Highest count of simultaneous PCMU calls (20 ms, both ways) relayed with under "
        f"{media_bench.MAX_LOSS_PCT}% loss: **{_fmt(result['media_max_calls'])}** (loss "
        f"{_fmt(result['media_loss_pct'])}%, rtpengine {_fmt(result['media_rtpengine_cpu_pct_of_core'])}% of "
        f"one core, {_fmt(result['rtpengine_rss_bytes_per_media_call'])} bytes RSS per call; limited by: "
        f"{result['media_limited_by']}). `benchmarks/media.py` says how (its docstring).",
        "",
        "| calls | loss RTP->SRTP % | loss SRTP->RTP % | rtpengine % of a core | generator % of a core | "
        "machine busy % |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m_step in result["media"].get("steps", []):
        lines.append(
            f"| {m_step.get('calls')} | {_fmt(m_step.get('loss_rtp_to_srtp_pct'))} | "
            f"{_fmt(m_step.get('loss_srtp_to_rtp_pct'))} | {_fmt(m_step.get('rtpengine_cpu_pct_of_core'))} | "
            f"{_fmt(m_step.get('generator_cpu_pct_of_core'))} | {_fmt(m_step.get('machine_busy_pct'))} |"
        )
    prof = result["profile"]
    lines += [
        "",
        f"## Where the KEMI path spends its time (py-spy in the busiest Kamailio process, "
        f"{_fmt(prof.get('rate_cps'))} calls/s)",
        "",
        f"{prof['samples']} samples: Python of ours and its libraries {_fmt(prof['python_own_pct'])}%, "
        f"inside KSR calls (Kamailio's C: tm, rtpengine, ...) {_fmt(prof['in_ksr_calls_pct'])}%, "
        f"Kamailio outside the Python handler (reading, parsing, sending) "
        f"{_fmt(prof['kamailio_outside_python_pct'])}%.",
        "",
        "| Python line (own samples) | % | | KSR call made from | % |",
        "| --- | --- | --- | --- | --- |",
    ]
    py_top, ksr_top = prof["top_python_lines"], prof["top_ksr_callers"]
    for i in range(max(len(py_top), len(ksr_top))):
        a = py_top[i] if i < len(py_top) else {"where": "", "pct": ""}
        b = ksr_top[i] if i < len(ksr_top) else {"where": "", "pct": ""}
        lines.append(f"| `{a['where']}` | {a['pct']} | | `{b['where']}` | {b['pct']} |")
    lines += [
        "",
        "## Steps",
        "",
        "| contender | CUCM connections | rate/s | created | achieved/s | failed % | Kamailio us/call | "
        "rtpengine us/call | peer CPU s | SIPp CPU s | machine busy % | busiest Kamailio process % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {s['contender']} | {s['connections']} | {s['rate']:g} | {s['created']} | "
            f"{s['achieved_cps']} | {s['failed_pct']} | "
            f"{_fmt(round(s['kamailio_cpu_us_per_call'], 1) if s['kamailio_cpu_us_per_call'] else None)} | "
            f"{_fmt(round(s['rtpengine_cpu_us_per_call'], 1) if s['rtpengine_cpu_us_per_call'] else None)} | "
            f"{s['peer_cpu_s']} | {s['sipp_cpu_s']} | {s['machine_busy_pct']} | {s['kamailio_busiest_pct']} |"
        )
    lines += ["", "## Limits of this run", ""] + [f"- {n}" for n in result["limits"]]
    lines += [
        "",
        "## How it was measured",
        "",
        "`benchmarks/bench.py` (see its docstring); the yardstick is `benchmarks/native/kamailio.cfg`, whose "
        "header lists what it does and what kemi-o365 does beyond it (topology hiding, metrics, call "
        "records, failover, ...).",
    ]
    lines += [""] + [f"![{i}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few seconds per contender (make test)")
    p.add_argument("--rates", default="", help=f"comma-separated call rates (default {_csv(FULL_RATES)})")
    p.add_argument("--connections", default="", help="CUCM TCP connections per ramp (default 1,4)")
    p.add_argument("--step-seconds", type=float, default=None, help="seconds per rate step (default 20)")
    p.add_argument("--hold-ms", type=int, default=100, help="time between ACK and BYE (default 100)")
    p.add_argument(
        "--latency-rate", type=float, default=200.0, help="calls/s of the latency run (default 200)"
    )
    p.add_argument("--media-counts", default="", help=f"media calls per step (default {_csv(FULL_MEDIA)})")
    p.add_argument("--output-dir", type=Path, default=RESULTS, help=f"where results go (default {RESULTS})")
    p.add_argument("--no-plots", action="store_true", help="no matplotlib PNGs")
    p.add_argument("--keep", action="store_true", help="keep the work directory (captures, logs)")
    return p.parse_args(argv)


FULL_RATES = (50, 100, 200, 300, 400, 500, 600, 700, 800, 1000)
FULL_MEDIA = (100, 200, 400, 600, 800, 1000, 1200, 1600, 2000)


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def _numbers(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def config(args: argparse.Namespace) -> Config:
    connections = [int(c) for c in _numbers(args.connections)]
    media = [int(c) for c in _numbers(args.media_counts)]
    if args.smoke:
        return Config(
            rates=_numbers(args.rates) or [5.0, 10.0],
            step_seconds=args.step_seconds or 2.0,
            hold_ms=args.hold_ms,
            latency_rate=min(args.latency_rate, 5.0),
            latency_seconds=2.0,
            options_seconds=1.0,
            options_window=20,
            options_rounds=1,
            children=2,
            smoke=True,
            connections=connections or [1, 2],
            memory_calls=10,
            memory_rate=10.0,
            memory_hold_s=3.0,
            memory_settle_s=1.0,  # not the 5 s wait timer: figures of a smoke run mean nothing
            profile_seconds=3.0,
            profile_rate=50.0,
            media_counts=media or [5, 10],
            media_seconds=1.0,
        )
    return Config(
        rates=_numbers(args.rates) or [float(r) for r in FULL_RATES],
        step_seconds=args.step_seconds or 20.0,
        hold_ms=args.hold_ms,
        latency_rate=args.latency_rate,
        latency_seconds=15.0,
        options_seconds=10.0,
        options_window=64,
        options_rounds=2,
        children=2,
        smoke=False,
        connections=connections or [1, 4],
        memory_calls=1000,
        memory_rate=100.0,
        memory_hold_s=25.0,
        memory_settle_s=6.5,  # tm's wait timer (5 s) after the last INVITE's final reply, and margin
        profile_seconds=10.0,
        profile_rate=None,
        media_counts=media or list(FULL_MEDIA),
        media_seconds=10.0,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    cfg = config(args)
    work = Path(tempfile.mkdtemp(prefix="kemi-o365-bench-"))

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        result = run_bench(cfg, work, log)
        out: Path = args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        images = [] if args.no_plots else plots(result, out)
        (out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "report.md").write_text(report(result, images))
        log(f"kemi/native: {json.dumps(result['ratios'])}")
        log(f"results written to {out / 'latest.json'} and {out / 'report.md'}")
        return 0
    finally:
        if args.keep:
            print(f"(work directory kept: {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
