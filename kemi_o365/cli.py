"""`kemi-o365`: check a policy, run the SBC, run the lab demo.

Rule: this is the one place that turns exceptions into exit codes and messages for people.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from kemi_o365 import launch
from kemi_o365.launch import RunDir, Stack, StartError
from kemi_o365.policy.errors import PolicyError
from kemi_o365.policy.load import load_policy
from kemi_o365.policy.model import Policy

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _policy_check(args: argparse.Namespace) -> int:
    from kemi_o365.preflight import policy_errors

    policy = load_policy(args.file)
    # A certificate Microsoft would refuse (403 under Exchange UM for a wildcard or a subject that is
    # not exactly the FQDN) makes the policy unusable, not just risky.
    errors = policy_errors(policy)
    if errors:
        print("policy refused: Microsoft would reject this SBC's TLS identity:", file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    proxies = ", ".join(
        f"{p.fqdn}:{p.port}" + (f" (pinned {p.address})" if p.address else "")
        for p in policy.microsoft.proxies
    )
    for warning in policy.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.file}: OK ({policy.microsoft.profile} profile, SBC {policy.sbc.fqdn}, Microsoft {proxies})")
    return EXIT_OK


def _load_for_start(path: str) -> Policy:
    """The policy, or a StartError with one sentence when only a TLS file is missing or unreadable."""
    from kemi_o365.startup import explain_policy_error

    try:
        return load_policy(path)
    except PolicyError as exc:
        sentence = explain_policy_error(exc)
        if sentence is None:
            raise
        raise StartError(sentence) from exc


def _run(args: argparse.Namespace) -> int:
    policy = _load_for_start(args.policy)
    rundir = Path(args.rundir) if args.rundir else Path(tempfile.mkdtemp(prefix="kemi-o365-run-"))
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with Stack(policy, RunDir(rundir)) as stack:
        sbc = policy.sbc
        print(
            f"kemi-o365 running: CUCM side {sbc.internal.address}:{sbc.internal.port} "
            f"({'/'.join(sbc.internal.transports)}), "
            f"Microsoft side tls:{sbc.external.address}:{sbc.external.port} "
            f"as {sbc.fqdn}; logs in {rundir}. Ctrl-C stops.",
            flush=True,
        )
        while not stop:
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    print(
                        f"{name} exited unexpectedly (code {proc.returncode}):\n{stack.log_tail(name)}",
                        file=sys.stderr,
                    )
                    return EXIT_FAILED
            time.sleep(0.2)
    print("kemi-o365 stopped: Kamailio and rtpengine are down.")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from kemi_o365 import rpc
    from kemi_o365.status import report

    try:
        print(report(Path(args.rundir)))
    except (OSError, rpc.RpcError) as exc:
        print(f"no running kemi-o365 in {args.rundir}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _reload(args: argparse.Namespace) -> int:
    from kemi_o365 import rpc
    from kemi_o365.reloading import reload

    try:
        result = reload(Path(args.rundir))
    except (OSError, rpc.RpcError) as exc:
        print(f"no running kemi-o365 in {args.rundir}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(result.message, file=sys.stdout if result.ok else sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAILED


def _exec(args: argparse.Namespace) -> int:
    """What a systemd unit runs: one component in the foreground, as the process systemd supervises.

    The command line is the one `kemi-o365 run` uses (launch.kamailio_command / rtpengine_command);
    `--print` shows it instead of executing it.
    """
    if not args.policy:
        print("no policy: give --policy FILE or set KEMI_O365_POLICY", file=sys.stderr)
        return EXIT_BAD_INPUT
    policy = _load_for_start(args.policy)
    run = RunDir(Path(args.rundir))
    if args.component == "ready":
        return _ready(policy, run, args.timeout)
    if not args.print:
        launch.check_before_start(
            policy, kamailio=args.component == "kamailio", rtpengine=args.component == "rtpengine"
        )
    env: dict[str, str] | None = None
    if args.component == "kamailio":
        launch.prepare_rundir(policy, run)
        argv, env = launch.kamailio_command(policy, run), launch.kamailio_env(policy, run.metrics_dir)
        if not args.print:
            _warn_if_rtpengine_silent(policy, args.timeout)
    else:
        run.root.mkdir(parents=True, exist_ok=True)
        argv = launch.rtpengine_command(policy, run)
    if args.print:
        print(shlex.join(argv))
        return EXIT_OK
    sys.stdout.flush()
    os.execve(argv[0], argv, env if env is not None else dict(os.environ))  # replaces this process


def _warn_if_rtpengine_silent(policy: Policy, timeout: float) -> None:
    """Kamailio runs without rtpengine (calls get 503), so a silent rtpengine is said, not fatal."""
    from kemi_o365 import rtpengine_ng
    from kemi_o365.startup import rtpengine_unreachable

    rtp = policy.rtpengine
    deadline = time.monotonic() + timeout
    while not rtpengine_ng.ping(rtp.control_address, rtp.control_port, 0.3):
        if time.monotonic() > deadline:
            print(
                f"warning: {rtpengine_unreachable(policy)}; calls get 503 until it answers", file=sys.stderr
            )
            return
        time.sleep(0.2)


def _ready(policy: Policy, run: RunDir, timeout: float) -> int:
    """ExecStartPost: wait until Kamailio answers on its RPC socket, then pin the proxies' addresses."""
    deadline = time.monotonic() + timeout
    while not launch.kamailio_answers(run):
        if time.monotonic() > deadline:
            print(
                f"Kamailio did not answer on {run.rpc_sock} within {timeout:.0f} s: its log says why "
                "(journalctl -u kemi-o365)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        time.sleep(0.2)
    launch.pin_addresses(policy, run)
    print(f"kemi-o365 ready: Kamailio answers on {run.rpc_sock}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from kemi_o365.lab.demo import run_demo

    return run_demo(keep=args.keep)


def load_policy_for_certs(path: Path) -> int:
    """Make the throwaway PKI a lab policy names, so the policy can then be checked and run."""
    from kemi_o365.lab.certs import make_pki_for_policy

    pki = make_pki_for_policy(path)
    print(
        f"lab PKI in {pki.dir}: CA {pki.ca_cert.name}, SBC {pki.sbc_cert.name}, "
        f"Microsoft peer {pki.ms_cert.name}"
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kemi-o365", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    policy = sub.add_parser("policy", help="work with policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate a policy offline")
    check.add_argument("file")
    check.set_defaults(func=_policy_check)

    run = sub.add_parser("run", help="run rtpengine and Kamailio from a policy until SIGINT/SIGTERM")
    run.add_argument("--policy", required=True)
    run.add_argument(
        "--rundir", help="directory for generated files, sockets and logs (default: a new temp dir)"
    )
    run.add_argument("--verbose", action="store_true", help="on a failed start, also print the log tail")
    run.set_defaults(func=_run)

    exe = sub.add_parser(
        "exec",
        help="run one component in the foreground (what the systemd units run), or wait until it is ready",
    )
    exe.add_argument("component", choices=["kamailio", "rtpengine", "ready"])
    exe.add_argument(
        "--policy",
        default=os.environ.get("KEMI_O365_POLICY"),
        help="the policy (default: $KEMI_O365_POLICY)",
    )
    exe.add_argument("--rundir", required=True, help="generated files, sockets, pid file")
    exe.add_argument("--print", action="store_true", help="print the command line instead of running it")
    exe.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        help="seconds to wait for rtpengine (kamailio) or Kamailio (ready)",
    )
    exe.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    exe.set_defaults(func=_exec)

    status = sub.add_parser("status", help="listeners, Microsoft proxies' health, calls of a running SBC")
    status.add_argument("--rundir", required=True, help="the directory given to `kemi-o365 run --rundir`")
    status.set_defaults(func=_status)

    reload = sub.add_parser(
        "reload", help="check the running SBC's policy file again and have every Kamailio process take it up"
    )
    reload.add_argument("--rundir", required=True, help="the directory given to `kemi-o365 run --rundir`")
    reload.set_defaults(func=_reload)

    demo = sub.add_parser(
        "demo", help="the built-in lab: one seed call CUCM -> SBC -> Microsoft, with a ladder"
    )
    demo.add_argument("--keep", action="store_true", help="keep the run directory (logs, traces)")
    demo.set_defaults(func=_demo)

    from kemi_o365 import preflight

    preflight.add_parser(sub)

    lab = sub.add_parser("lab", help="lab helpers")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    certs = lab_sub.add_parser("certs", help="make the throwaway CA and certificates a lab policy names")
    certs.add_argument("--policy", required=True)
    certs.set_defaults(func=lambda a: load_policy_for_certs(Path(a.policy)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except PolicyError as exc:
        print(f"policy invalid:\n{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StartError as exc:
        print(f"could not start: {exc}", file=sys.stderr)
        if exc.log is not None and str(exc.log) not in str(exc):
            more = ":" if getattr(args, "verbose", False) else "; --verbose prints its last lines"
            print(f"(the log: {exc.log}{more})", file=sys.stderr)
            if getattr(args, "verbose", False):
                print(exc.details, file=sys.stderr)
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
