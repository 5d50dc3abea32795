"""Why the SBC would not start, or did not start, as one sentence: what is wrong and how to fix it.

Two halves. Before a start, `check_before_start` looks at what can be looked at without starting
anything: the TLS files (readable, parseable, the key matching the certificate), the listeners (the
address is on this host, the port is free for its protocol), every module kamailio.cfg loads (present
in Kamailio's module directory; the Debian package that ships it is named), and the rtpengine binary.
After a failed start, `explain_failure` reads the Kamailio or rtpengine log and turns the lines it
knows into the same sentences.

Rule: this module starts nothing and prints nothing; it returns sentences. The only side effects are
binding a probe socket for an instant (closed at once) and reading files under /proc.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from kemi_o365.policy.errors import PolicyError
from kemi_o365.policy.model import Policy, Transport

# Where Debian 12's kamailio packages put the modules (a kamailio.cfg `mpath` overrides it).
MODULE_DIR = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")

# Modules not in the `kamailio` package itself, by the Debian 12 package that ships them (dpkg -S on
# Kamailio 5.6.3, plus the per-feature packages `apt-cache search kamailio-` lists for common modules).
MODULE_PACKAGES = {
    "tls.so": "kamailio-tls-modules",
    "crypto.so": "kamailio-tls-modules",
    "auth_identity.so": "kamailio-tls-modules",
    "app_python3.so": "kamailio-python3-modules",
    "acc_json.so": "kamailio-extra-modules",
    "evapi.so": "kamailio-extra-modules",
    "gzcompress.so": "kamailio-extra-modules",
    "jansson.so": "kamailio-extra-modules",
    "janssonrpcc.so": "kamailio-extra-modules",
    "uuid.so": "kamailio-extra-modules",
    "app_lua.so": "kamailio-lua-modules",
    "websocket.so": "kamailio-websocket-modules",
    "outbound.so": "kamailio-outbound-modules",
    "db_mysql.so": "kamailio-mysql-modules",
    "db_postgres.so": "kamailio-postgres-modules",
    "db_sqlite.so": "kamailio-sqlite-modules",
    "db_redis.so": "kamailio-redis-modules",
    "ndb_redis.so": "kamailio-redis-modules",
    "log_systemd.so": "kamailio-systemd-modules",
    "snmpstats.so": "kamailio-snmpstats-modules",
}
BASE_PACKAGE = "kamailio"
RTPENGINE_PACKAGE = "rtpengine-daemon"

_LOADMODULE = re.compile(r'^\s*loadmodule\s+"([^"]+)"', re.MULTILINE)
_MPATH = re.compile(r'^\s*mpath\s*=\s*"([^"]+)"', re.MULTILINE)


@dataclass(frozen=True)
class Listener:
    """One socket the SBC binds, and the policy key that sets its port."""

    component: str  # "Kamailio" or "rtpengine"
    role: str  # what the port is for, in words
    proto: str  # "udp" or "tcp" (TLS listens on TCP)
    address: str
    port: int
    port_key: str
    address_key: str


def listeners(policy: Policy) -> list[Listener]:
    sbc, rtp = policy.sbc, policy.rtpengine
    internal = [
        Listener(
            "Kamailio",
            "the CUCM-side SIP",
            t.value,
            sbc.internal.address,
            sbc.internal.port,
            "sbc.internal.port",
            "sbc.internal.address",
        )
        for t in (Transport.UDP, Transport.TCP)
        if t in sbc.internal.transports
    ]
    return [
        *internal,
        Listener(
            "Kamailio",
            "the Microsoft-side SIP (TLS)",
            "tcp",
            sbc.external.address,
            sbc.external.port,
            "sbc.external.port",
            "sbc.external.address",
        ),
        Listener(
            "rtpengine",
            "rtpengine's control",
            "udp",
            rtp.control_address,
            rtp.control_port,
            "rtpengine.control.port",
            "rtpengine.control.address",
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Sentences (one per cause, so the check and the log reading say the same thing)


def port_in_use(listener: Listener, policy: Policy) -> str:
    holder = who_holds(listener.proto, listener.port)
    by = f" (by PID {holder[0]}, {holder[1]})" if holder else ""
    return (
        f"{listener.role} port, {listener.proto} {listener.address}:{listener.port}, is already in use{by}: "
        f"stop that program or change {listener.port_key} in {policy.source}"
    )


def address_not_here(listener: Listener, policy: Policy) -> str:
    return (
        f"{listener.address} is not an address of this host, so {listener.component} cannot listen on it: "
        f"add it to an interface (ip address add {listener.address}/32 dev IFACE) or correct "
        f"{listener.address_key} in {policy.source}"
    )


def module_missing(name: str, directory: Path) -> str:
    package = MODULE_PACKAGES.get(name, BASE_PACKAGE)
    how = (
        f"apt-get install {package}" if package != BASE_PACKAGE else f"apt-get install --reinstall {package}"
    )
    return (
        f"Kamailio module {name} is missing from {directory}: install the Debian package that ships it "
        f"({how})"
    )


def rtpengine_missing(binary: str) -> str:
    return (
        f"rtpengine is not installed ({binary} does not exist): install it with "
        f"apt-get install {RTPENGINE_PACKAGE} (or point KEMI_O365_RTPENGINE at the binary)"
    )


def rtpengine_unreachable(policy: Policy) -> str:
    rtp = policy.rtpengine
    return (
        f"rtpengine does not answer on udp:{rtp.control_address}:{rtp.control_port}: start it "
        f"(systemctl start kemi-o365-rtpengine) or make rtpengine.control in {policy.source} name "
        "where it listens"
    )


# ---------------------------------------------------------------------------------------------
# Before starting


def check_before_start(policy: Policy, *, kamailio_cfg: Path | None, rtpengine_bin: str | None) -> list[str]:
    """Every problem that would stop the start, as sentences; [] when nothing is known to be wrong.

    `kamailio_cfg` None skips Kamailio's checks (TLS files, SIP listeners, modules), `rtpengine_bin`
    None skips rtpengine's (binary, control port).
    """
    out: list[str] = []
    if rtpengine_bin is not None and not Path(rtpengine_bin).exists():
        out.append(rtpengine_missing(rtpengine_bin))
    if kamailio_cfg is not None:
        out += missing_modules(kamailio_cfg)
        out += tls_file_problems(policy)
    for listener in listeners(policy):
        wanted = kamailio_cfg is not None if listener.component == "Kamailio" else rtpengine_bin is not None
        if wanted:
            problem = bind_problem(listener, policy)
            if problem:
                out.append(problem)
    return out


def loaded_modules(cfg_text: str) -> tuple[Path, list[str]]:
    """The module directory (`mpath`, else Debian's) and every module a kamailio.cfg loads.

    Modules inside `#!ifdef` blocks count too: a site may switch the block on.
    """
    mpath = _MPATH.search(cfg_text)
    directory = Path(mpath.group(1)) if mpath else MODULE_DIR
    return directory, _LOADMODULE.findall(cfg_text)


def missing_modules(cfg: Path) -> list[str]:
    directory, names = loaded_modules(cfg.read_text())
    out = []
    for name in names:
        path = Path(name) if name.startswith("/") else directory / name
        if not path.exists():
            out.append(module_missing(path.name, path.parent))
    return out


def tls_file_problems(policy: Policy) -> list[str]:
    """The TLS files as Kamailio's tls module will read them, as the user this process runs as."""
    from kemi_o365.preflight import check_policy_files

    tls = policy.sbc.tls
    files = (
        (tls.certificate, "sbc.tls.certificate"),
        (tls.private_key, "sbc.tls.private_key"),
        (tls.ca, "sbc.tls.ca"),
    )
    for path, key in files:
        if not os.access(path, os.R_OK):
            return [unreadable_tls_file(path, key, policy.source)]
    # Only what stops Kamailio itself: unparseable files, an encrypted or non-matching key. What only
    # Microsoft would refuse (names, EKU, expiry) is `policy check`'s and `preflight --policy`'s job.
    out = []
    for f in check_policy_files(policy, now=dt.datetime.now(dt.UTC)):
        what = f"the SBC's TLS {_TLS_WHAT.get(f.key, f.key)} {f.file}"
        fix = f"replace the file or correct {f.key} in {policy.source}"
        if f.severity != "error" or not f.key.startswith("sbc.tls."):
            continue
        if f.message.startswith("not a PEM"):
            out.append(f"{what} is {f.message.split(':')[0]}: {fix}")
        elif "encrypted" in f.message:
            out.append(
                f"{what} is encrypted and Kamailio cannot ask for a passphrase: decrypt it "
                f"(openssl pkey -in {f.file} -out {f.file}.plain) or {fix}"
            )
        elif f.message.startswith("does not match"):
            out.append(f"{what} {f.message.split(':')[0]}: {fix}")
    return out


_TLS_WHAT = {
    "sbc.tls.certificate": "certificate",
    "sbc.tls.private_key": "private key",
    "sbc.tls.ca": "CA bundle",
}


def unreadable_tls_file(path: Path, key: str, policy_file: Path | str, why: str = "") -> str:
    if not why:
        why = "does not exist" if not path.exists() else f"is not readable by user {_user()}"
    fix = "put the file there" if "exist" in why else f"make it readable by {_user()}"
    return f"the SBC's TLS {_TLS_WHAT.get(key, key)} {path} {why}: {fix} or correct {key} in {policy_file}"


def explain_policy_error(exc: PolicyError) -> str | None:
    """A policy refused only because a TLS file cannot be read, said as the start-up sentence."""
    tls = [p for p in exc.problems if p.key.startswith("sbc.tls.") and p.message.startswith("cannot read ")]
    if not tls or len(tls) != len(exc.problems):
        return None
    sentences = []
    for p in tls:
        path_text, _, reason = p.message.removeprefix("cannot read ").rpartition(": ")
        why = "does not exist" if reason == "No such file or directory" else f"cannot be read ({reason})"
        where = f"{p.file} line {p.line}" if p.line else p.file
        sentences.append(unreadable_tls_file(Path(path_text), p.key, where, why))
    return "\n".join(sentences)


def bind_problem(listener: Listener, policy: Policy) -> str | None:
    """Bind the listener's address and port for an instant, the way Kamailio or rtpengine will."""
    kind = socket.SOCK_DGRAM if listener.proto == "udp" else socket.SOCK_STREAM
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM:
            # Kamailio sets SO_REUSEADDR on TCP: a port in TIME_WAIT after a restart is not "in use".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((listener.address, listener.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return port_in_use(listener, policy)
            if exc.errno == errno.EADDRNOTAVAIL:
                return address_not_here(listener, policy)
            if exc.errno == errno.EACCES:
                return (
                    f"{listener.component} may not bind port {listener.port} on {listener.address} as user "
                    f"{_user()}: run it with CAP_NET_BIND_SERVICE (the systemd unit does) or as root"
                )
            raise
    return None


def who_holds(proto: str, port: int) -> tuple[int, str] | None:
    """The PID and name of a process with a socket bound to `port` (any address), from /proc."""
    inodes: set[str] = set()
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # TCP: only listeners (state 0A) hold a port against a new listener.
                listening = len(fields) > 9 and (proto == "udp" or fields[3] == "0A")
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: p.name):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        return int(entry.name), (entry / "comm").read_text().strip()
    return None


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# ---------------------------------------------------------------------------------------------
# After a failed start


_BIND = re.compile(r"(udp|tcp)_init\(\): bind\([^)]*\) on ([0-9a-fA-F.:\[\]]+?)(?::(\d+))?\s*: (.+)$", re.M)
_NO_MODULE = re.compile(r"could not find module <([^>]+)> in <([^>]+)>")
_TLS_LOAD = re.compile(r"(load_cert|load_private_key|load_ca_list)\(\).*?'([^']+)'")
_RTP_CONTROL = re.compile(r"Failed to open UDP NG control connection port \(([^)]+)\): (.+)$", re.M)


def explain_failure(component: str, log: str, policy: Policy) -> str | None:
    """The sentence for the first log line this module knows, or None (then the log tail is all)."""
    if component == "kamailio":
        return _explain_kamailio(log, policy)
    return _explain_rtpengine(log, policy)


def _explain_kamailio(log: str, policy: Policy) -> str | None:
    missing = _NO_MODULE.search(log)
    if missing:
        return module_missing(missing.group(1) + ".so", Path(missing.group(2)))
    bind = _BIND.search(log)
    if bind:
        proto, address, port_text, reason = bind.groups()
        candidates = [
            ln
            for ln in listeners(policy)
            if ln.component == "Kamailio"
            and ln.proto == proto
            and ln.address == address
            and (port_text is None or ln.port == int(port_text))
        ]
        if candidates:
            listener = candidates[0]
            if "in use" in reason:
                return port_in_use(listener, policy)
            if "assign requested address" in reason:
                return address_not_here(listener, policy)
    tls = _TLS_LOAD.search(log)
    if tls:
        key = {"load_cert": "sbc.tls.certificate", "load_private_key": "sbc.tls.private_key"}.get(
            tls.group(1), "sbc.tls.ca"
        )
        return unreadable_tls_file(Path(tls.group(2)), key, policy.source, "could not be loaded by Kamailio")
    return None


def _explain_rtpengine(log: str, policy: Policy) -> str | None:
    control = _RTP_CONTROL.search(log)
    if control:
        rtp_listener = next(ln for ln in listeners(policy) if ln.component == "rtpengine")
        if "in use" in control.group(2):
            return port_in_use(rtp_listener, policy)
        if "assign requested address" in control.group(2):
            return address_not_here(rtp_listener, policy)
    return None
