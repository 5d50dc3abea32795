"""`kemi-o365 reload`: a changed policy file, checked here first, then taken up by every Kamailio
process (RPC app_python.reload; each re-reads the file at its next message, and refuses it again
on its own if it no longer loads). Calls in progress keep going: nothing is restarted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kemi_o365 import rpc
from kemi_o365.launch import RunDir
from kemi_o365.policy.errors import PolicyError
from kemi_o365.policy.load import load_policy, parse_policy
from kemi_o365.policy.reload import restart_needed


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    message: str


def reload(rundir: Path) -> ReloadResult:
    run = RunDir(rundir)
    path = Path(run.policy_record.read_text().strip())
    try:
        new = load_policy(path)
    except PolicyError as exc:
        return ReloadResult(False, f"reload refused, the running policy stays:\n{exc}")
    running = parse_policy(run.policy_snapshot.read_text(), path)
    problems = restart_needed(running, new)
    if problems:
        return ReloadResult(
            False,
            f"reload refused, the running policy stays: {', '.join(problems)} changed in {path}; "
            "these are read at start-up only: restart the SBC (systemctl restart kemi-o365) to apply them",
        )
    if new.version == running.version:
        return ReloadResult(True, f"{path} is unchanged (version {new.version}): nothing to reload")
    rpc.call(run.rpc_sock, "app_python.reload")
    run.policy_snapshot.write_text(path.read_text())
    return ReloadResult(
        True,
        f"policy {path} version {new.version} (was {running.version}) handed to Kamailio: each process "
        "switches at its next message; calls in progress continue. `kemi-o365 status` shows the versions.",
    )
