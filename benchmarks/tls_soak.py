"""Long TLS soak of the SBC's Microsoft-side listener on the real lab (kemi_o365.lab.tls_soak).

    .venv/bin/python benchmarks/tls_soak.py --connections 50000 --minutes 10

Starts the lab (rtpengine, Kamailio, the Microsoft TLS peer) on fresh loopback ports, runs the soak,
stops everything (by PID), and writes benchmarks/results/tls-soak.json: the result, the parameters
and the machine (CPU, cores, kernel, Kamailio and OpenSSL versions). Exit 0 only without a crash and
without a failed connection, call or request.

`--kamailio-dir DIR` runs another copy of kamailio/ (kamailio.cfg + sbc.py), e.g. to compare a
configuration change; `--modes` restricts the connection mix (e.g. `options,abrupt`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "tls-soak.json"


def lab_policy(children: int | None) -> dict[str, Any]:
    """The shipped lab policy on fresh loopback ports (as the e2e tests do)."""
    from kemi_o365.lab.demo import lab_policy_on_fresh_ports

    base = 30000 + (os.getpid() % 200) * 40
    data = lab_policy_on_fresh_ports((base, base + 39))
    if children is not None:
        data["kamailio"]["children"] = children
    return data


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError as exc:
        return f"unavailable ({exc})"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def machine(kamailio_bin: str) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import ssl

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "kamailio": _first_line([kamailio_bin, "-v"]),
        "openssl": _first_line(["openssl", "version"]),
        "python_ssl": ssl.OPENSSL_VERSION,
        "python": platform.python_version(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=50000, help="TLS connections (default 50000)")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-time bound (default 10)")
    p.add_argument("--threads", type=int, default=8, help="concurrent client threads (default 8)")
    p.add_argument("--sip-every", type=int, default=1000, help="a call + a Microsoft request every N")
    p.add_argument("--modes", default="", help="comma-separated connection modes (default: all)")
    p.add_argument("--children", type=int, default=None, help="override the policy's kamailio.children")
    p.add_argument("--kamailio-dir", type=Path, default=None, help="a copy of kamailio/ to run instead")
    p.add_argument("--output", type=Path, default=RESULT, help=f"JSON result (default {RESULT})")
    p.add_argument("--keep", action="store_true", help="keep the lab's run directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kamailio_dir is not None:
        # Read by kemi_o365.launch at import: set before importing it.
        os.environ["KEMI_O365_KAMAILIO_DIR"] = str(args.kamailio_dir.resolve())
    sys.path.insert(0, str(REPO))
    import yaml

    from kemi_o365.lab.demo import microsoft_peer, prepare_lab
    from kemi_o365.lab.tls_soak import DEFAULT_MIX, Mode, SoakConfig, run_soak
    from kemi_o365.launch import KAMAILIO_BIN, KAMAILIO_DIR, RunDir, Stack

    mix = DEFAULT_MIX
    if args.modes:
        wanted = {Mode(m.strip()) for m in args.modes.split(",") if m.strip()}
        mix = tuple((m, w) for m, w in DEFAULT_MIX if m in wanted)
    config = SoakConfig(
        connections=args.connections,
        max_seconds=args.minutes * 60,
        threads=args.threads,
        sip_every=args.sip_every,
        mix=mix,
    )
    root = Path(tempfile.mkdtemp(prefix="kemi-o365-tls-soak-"))
    started = time.time()
    try:
        data = lab_policy(args.children)
        policy = prepare_lab(root, yaml.safe_dump(data, sort_keys=False))
        with (
            microsoft_peer(policy, root / "pki") as peer,
            Stack(policy, RunDir(root / "run")) as stack,
        ):
            result = run_soak(policy, peer, stack, root / "soak", config, pki=root / "pki")
        report = {
            "benchmark": "tls-soak",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "parameters": {
                "connections": config.connections,
                "max_seconds": config.max_seconds,
                "threads": config.threads,
                "sip_every": config.sip_every,
                "mix": {str(m): w for m, w in config.mix},
                "kamailio_children": policy.kamailio.children,
                "kamailio_cfg": str(KAMAILIO_DIR / "kamailio.cfg"),
            },
            "machine": machine(KAMAILIO_BIN),
            "result": result.to_json(),
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(result.summary_line())
        for line in (result.crash_evidence + result.failures)[:15]:
            print(f"  {line}")
        print(f"result written to {args.output}")
        clean = (
            result.crashes == 0
            and result.connections_failed == 0
            and result.calls_failed == 0
            and result.ms_requests_failed == 0
        )
        return 0 if clean else 1
    finally:
        if args.keep:
            print(f"(run directory kept: {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
