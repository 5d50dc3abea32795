"""A seeded, bounded mutation fuzz of the seed exchange against the real SBC.

Mutated seed INVITEs go to the CUCM-side listener over UDP and TCP (from 127.0.0.4); mutated
Microsoft INVITEs and mutated copies of the seed's 200 OK (as stray responses whose top Via names
the SBC) go to the Microsoft-side listener over mutual TLS. The mutator (tests/fuzz_sip.py) is pure
and seeded, so a failure replays with the same seed. Four streams run side by side, each paced (at
most 40 messages/s from one stream, so the CUCM source stays under ~100/s even with a flood limiter).

After every batch: a valid OPTIONS on that listener is answered 200 and Kamailio's main process and
all its workers are alive. At the end: no "internal error in" (an exception that escaped our Python
handlers into the guard) in Kamailio's log, and each Kamailio process grew by less than 8 MB of
resident memory since a warm-up batch.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kemi_o365 import rpc
from kemi_o365.lab.demo import wait_rtpengine_empty
from tests.e2e.conftest import Lab, lab_policy_data, running_lab
from tests.e2e.sbc_probe import (
    CUCM_SOURCE,
    MICROSOFT_SOURCE,
    CucmSink,
    Exchange,
    KamailioWatch,
    Sender,
    TerminalSummary,
    cucm_sink,
)
from tests.fuzz_sip import Mutator, microsoft_invite, seed_invite, seed_ok
from tests.summary import report

pytestmark = pytest.mark.e2e

SEED = 20251125
MS_HOST = "pstn-o365.example.com"
UDP_VIA_PORT = 5998  # the CUCM-UDP stream's source port (its Via says so: replies come back there)
BATCH = 25
REPLY_BOUND = 0.3  # s
PACE = 0.025  # s between two sends of one stream
RSS_LIMIT_KB = 8 * 1024
TIME_LIMIT = 90.0  # s, the whole fuzz run


@dataclass
class Stream:
    name: str
    transport: str
    count: int
    base: Callable[[int], bytes]
    mutator: Mutator
    outcomes: Counter[str] = field(default_factory=Counter)
    operators: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    sent: int = 0


def _klass(ex: Exchange) -> str:
    if ex.error:
        return "error"
    if ex.final is not None:
        return f"{ex.final // 100}xx"
    if ex.provisional_only:
        return "1xx-only"
    return "closed" if ex.closed else "dropped"


def _streams(lab: Lab) -> list[Stream]:
    sbc = lab.policy.sbc
    fqdn, ext_port = sbc.fqdn, sbc.external.port
    cucm_port = lab.policy.cucm.port

    def cucm_udp(i: int) -> bytes:
        return seed_invite(
            ruri_host=MS_HOST,
            local_ip=CUCM_SOURCE,
            local_port=UDP_VIA_PORT,
            transport="udp",
            call_id=f"fuzz-{SEED}-u{i}@{CUCM_SOURCE}",
            branch=f"fu{SEED}x{i}",
        )

    def cucm_tcp(i: int) -> bytes:
        return seed_invite(
            ruri_host=MS_HOST,
            local_ip=CUCM_SOURCE,
            local_port=5997,
            transport="tcp",
            call_id=f"fuzz-{SEED}-t{i}@{CUCM_SOURCE}",
            branch=f"ft{SEED}x{i}",
        )

    def ms_invite(i: int) -> bytes:
        return microsoft_invite(
            sbc_host=fqdn,
            local_ip=MICROSOFT_SOURCE,
            local_port=5061,
            call_id=f"fuzz-{SEED}-m{i}@um.example.net",
            branch=f"fm{SEED}x{i}",
        )

    def ms_ok(i: int) -> bytes:
        return seed_ok(
            sbc_host=fqdn,
            sbc_port=ext_port,
            cucm_ip=CUCM_SOURCE,
            cucm_port=cucm_port,
            call_id=f"fuzz-{SEED}-o{i}@{CUCM_SOURCE}",
            branch=f"fo{SEED}x{i}",
        )

    return [
        Stream("INVITE CUCM-UDP", "udp", 150, cucm_udp, Mutator(SEED + 1)),
        Stream("INVITE CUCM-TCP", "tcp", 150, cucm_tcp, Mutator(SEED + 2)),
        Stream("INVITE MS-TLS", "tls", 100, ms_invite, Mutator(SEED + 3)),
        Stream("200 OK MS-TLS", "tls", 100, ms_ok, Mutator(SEED + 4)),
    ]


def _run_batches(stream: Stream, sender: Sender, watch: KamailioWatch, batches: range) -> None:
    for batch in batches:
        for i in range(batch * BATCH, min(stream.count, (batch + 1) * BATCH)):
            began = time.monotonic()
            mutation = stream.mutator.mutate(stream.base(i))
            exchange = sender.send(stream.transport, mutation.data)
            stream.sent += 1
            stream.operators[mutation.operator] += 1
            stream.outcomes[_klass(exchange)] += 1
            if exchange.error or exchange.provisional_only:
                stream.failures.append(
                    f"{stream.name} #{i} {mutation.operator} ({mutation.detail}): {exchange.outcome()}"
                )
            time.sleep(max(0.0, PACE - (time.monotonic() - began)))
        tag = stream.name.replace(" ", "-")
        probe = sender.options(stream.transport, f"{tag}-{batch}")
        if probe.final != 200:
            stream.failures.append(f"{stream.name} after batch {batch}: OPTIONS got {probe.outcome()}")
        stream.failures += [f"{stream.name} after batch {batch}: {p}" for p in watch.problems()]


def _parallel(streams: list[Stream], sender: Sender, watch: KamailioWatch, first: int, last: int) -> None:
    threads = [
        threading.Thread(
            target=_run_batches,
            args=(s, sender, watch, range(first, min(last, -(-s.count // BATCH)))),
            name=f"fuzz-{s.name}",
        )
        for s in streams
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIME_LIMIT)
        assert not thread.is_alive(), f"{thread.name} did not finish within {TIME_LIMIT}s"


def _pkg_used(lab: Lab) -> dict[int, int]:
    """Kamailio's private (pkg) memory in use, per process, from the pkg.stats RPC."""
    try:
        stats = rpc.call(lab.stack.run.rpc_sock, "pkg.stats")
    except rpc.RpcError:
        return {}
    entries = stats if isinstance(stats, list) else [stats]
    return {int(e["pid"]): int(e["used"]) for e in entries if isinstance(e, dict) and "pid" in e}


def test_seeded_mutation_fuzz_of_the_seed_exchange(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    started = time.monotonic()
    with running_lab(tmp_path, lab_policy_data()) as lab, cucm_sink(lab) as sink:
        lab.peer.answer_code = (486, "Busy Here")  # relayed INVITEs end at once: no dialog, no media
        watch = KamailioWatch(lab)
        sender = Sender(lab, REPLY_BOUND)
        streams = _streams(lab)
        _parallel(streams, sender, watch, 0, 1)  # warm-up batch: first connections, caches, imports
        rss_warm, pkg_warm = watch.rss(), _pkg_used(lab)
        _parallel(streams, sender, watch, 1, 1000)
        time.sleep(0.5)  # let the last transactions finish before measuring
        rss_end, pkg_end = watch.rss(), _pkg_used(lab)
        internal = watch.internal_errors()
        excerpt = watch.log_excerpt("internal error in") if internal else ""
        final_problems = watch.problems()
        stray_to_cucm, stray_with_key = _responses_at(sink)
        media_left = wait_rtpengine_empty(lab.policy)
    elapsed = time.monotonic() - started

    growth = {pid: rss_end.get(pid, 0) - kb for pid, kb in rss_warm.items()}
    pkg_growth = {pid: pkg_end.get(pid, 0) - used for pid, used in pkg_warm.items()}
    replies: Counter[str] = Counter()
    for s in streams:
        replies.update(s.outcomes)
    total = sum(s.sent for s in streams)
    crashes = len(final_problems) + sum(1 for s in streams for f in s.failures if "Kamailio" in f)
    per_stream = ", ".join(f"{s.sent} {s.name}" for s in streams)
    summary = (
        f"fuzz: seed {SEED}, {total} mutations ({per_stream}), replies by class "
        f"{dict(sorted(replies.items()))}, {len(internal)} exceptions, {crashes} crashes, RSS growth max "
        f"{max(growth.values(), default=0)} kB, pkg growth max {max(pkg_growth.values(), default=0)} B, "
        f"{stray_to_cucm} stray 200s relayed to CUCM ({stray_with_key} with Microsoft's a=crypto), "
        f"{len(media_left)} rtpengine sessions left, {elapsed:.0f}s"
    )
    lines = [
        *(
            f"{s.name:16} {s.sent:4} sent  {dict(sorted(s.outcomes.items()))}  operators "
            f"{dict(sorted(s.operators.items()))}"
            for s in streams
        ),
        "RSS kB per Kamailio process after warm-up -> end: "
        + ", ".join(f"{pid}: {rss_warm[pid]}->{rss_end.get(pid, 0)}" for pid in sorted(rss_warm)),
        summary,
    ]
    request.config.pluginmanager.register(
        TerminalSummary("SIP mutation fuzz (seed exchange)", lines), name=f"fuzz-summary-{id(lines)}"
    )
    print("\n" + "\n".join(lines[:-1]))
    report(summary)

    failures = [f for s in streams for f in s.failures] + final_problems
    failures += [f"Kamailio log: {x}" for x in internal]
    failures += [
        f"Kamailio process {pid} grew {kb} kB of RSS after warm-up (limit {RSS_LIMIT_KB} kB)"
        for pid, kb in growth.items()
        if kb >= RSS_LIMIT_KB
    ]
    if media_left:
        failures.append(f"rtpengine still holds {len(media_left)} session(s): {media_left[:5]}")
    if stray_to_cucm:
        # A reply no transaction knows must be dropped (tm's on_sl_reply), not forwarded by its Via.
        failures.append(f"{stray_to_cucm} stray 200s reached CUCM ({stray_with_key} with an SRTP key)")
    assert total == sum(s.count for s in streams)
    assert elapsed < TIME_LIMIT + 30, f"fuzz run took {elapsed:.0f}s"
    assert not failures, "\n".join([*failures[:40], excerpt])


def _responses_at(sink: CucmSink) -> tuple[int, int]:
    """Stray 200s the SBC relayed to CUCM statelessly, and how many still carry an SRTP key."""
    stray = [a.raw for a in sink.since(0) if a.raw.startswith(b"SIP/2.0 200")]
    return len(stray), sum(1 for raw in stray if b"a=crypto" in raw)
