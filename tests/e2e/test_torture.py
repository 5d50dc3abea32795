"""The RFC 4475 and RFC 5118 SIP torture messages against the real SBC, on each of its listeners.

Every message (tests/fixtures/sip/rfc4475, rfc5118; expectations in tests/sip_torture.py) goes to
the CUCM-side listener over UDP and TCP (from 127.0.0.4, the lab's CUCM) and to the Microsoft-side
listener over mutual TLS (the Microsoft peer's certificate). On the CUCM side each request is sent a
second time with only its Request-URI host changed to one the SBC routes to Microsoft, so "never
forwarded" is tested where forwarding would really happen; on the Microsoft side every INVITE is
routed to CUCM whatever its Request-URI, so the message as it is already takes that path.

After every message: Kamailio's main process and every worker it started are still there, a valid
OPTIONS on the same listener is answered 200, nothing the RFC calls malformed reached Microsoft (the
lab peer's recording) or CUCM (a recording sink on CUCM's address). After each listener's pass a
full seed call (SIPp INVITE/200/ACK/BYE, media through rtpengine) still works.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kemi_o365.lab.demo import place_seed_call
from tests.e2e.conftest import Lab, lab_policy_data, running_lab
from tests.e2e.sbc_probe import (
    TRANSPORTS,
    CucmSink,
    Exchange,
    KamailioWatch,
    Sender,
    TerminalSummary,
    cucm_sink,
)
from tests.sip_torture import Case, Expect, cases, corpus_files, liberal_problems, rewrite_ruri_host
from tests.summary import report

pytestmark = pytest.mark.e2e

MS_HOST = "pstn-o365.example.com"  # matches the lab's microsoft.match.request_uri_host
REPLY_BOUND = 0.5  # s: answers come in ms; silence this long is a drop
_CALL_ID = re.compile(rb"^(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE | re.MULTILINE)


@dataclass
class Sent:
    case: Case
    transport: str
    variant: str  # "as-is" or "to-ms" (Request-URI host rewritten)
    exchange: Exchange
    probe: Exchange
    forwarded: list[tuple[str, bytes]] = field(default_factory=list)  # (where, raw request)
    failures: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.case.label} over {self.transport} ({self.variant})"

    def cell(self) -> str:
        text = self.exchange.outcome()
        if self.forwarded:
            text += ">" + "+".join(sorted({w for w, _ in self.forwarded}))
        return text + ("!" if self.failures else "")


def _call_id(raw: bytes) -> bytes | None:
    m = _CALL_ID.search(raw.split(b"\r\n\r\n", 1)[0])
    return m.group(1).strip() if m else None


class Forwarding:
    """Requests that reached Microsoft (the peer) or CUCM (the sink) since the last look, minus the
    SBC's own OPTIONS pings and in-dialog follow-ups (ACK) of requests already seen."""

    def __init__(self, lab: Lab, sink: CucmSink) -> None:
        self.lab = lab
        self.sink = sink
        self.peer_index = len(lab.peer.received)
        self.sink_index = sink.count()
        self.seen: set[bytes] = set()

    def new(self) -> list[tuple[str, bytes]]:
        got: list[tuple[str, bytes]] = []
        received = self.lab.peer.received[self.peer_index :]
        self.peer_index += len(received)
        fqdn = self.lab.policy.sbc.fqdn
        for rec in received:
            if not rec.msg.is_request:
                continue
            if rec.msg.method == "OPTIONS" and fqdn in rec.msg.get("From"):
                continue  # the dispatcher's keep-alive ping
            got.append(("MS", rec.raw))
        arrivals = self.sink.since(self.sink_index)
        self.sink_index += len(arrivals)
        got += [("CUCM", a.raw) for a in arrivals if not a.raw.startswith(b"SIP/2.0 ")]
        fresh = []
        for where, raw in got:
            cid = _call_id(raw)
            if cid is not None and cid in self.seen and raw.startswith((b"ACK ", b"CANCEL ")):
                continue
            if cid is not None:
                self.seen.add(cid)
            fresh.append((where, raw))
        return fresh

    def everything(self) -> list[tuple[str, bytes]]:
        peer = [("MS", r.raw) for r in self.lab.peer.received]
        return peer + [("CUCM", a.raw) for a in self.sink.since(0)]


def _judge(sent: Sent, watch_problems: list[str]) -> None:
    case, ex, out = sent.case, sent.exchange, sent.failures
    out += watch_problems
    if ex.error:
        out.append(f"could not talk to the SBC: {ex.error}")
    if sent.probe.final != 200:
        out.append(f"valid OPTIONS after it got {sent.probe.outcome()}, not 200")
    if ex.provisional_only:
        out.append(f"transaction hung: {ex.statuses} and no final answer within {REPLY_BOUND}s")
    forbidden = case.forbidden_call_ids(sent.transport)
    leaked = [w for w, raw in sent.forwarded if _call_id(raw) in forbidden]
    if case.expect in (Expect.REJECT, Expect.NOT_FORWARDED, Expect.DISCARD) and sent.forwarded:
        leaked = [w for w, _ in sent.forwarded]
    if leaked:
        out.append(f"forwarded to {'+'.join(sorted(set(leaked)))} although the RFC calls it malformed")
    if case.expect is Expect.REJECT and ex.final is not None and ex.final < 400:
        out.append(f"answered {ex.final}; RFC 4475/5118 expects a rejection ({case.rfc_says})")
    if case.expect is Expect.DISCARD and ex.replies:
        out.append(f"a response must be discarded, the SBC answered {ex.statuses}")
    if case.expect is Expect.LIBERAL:
        for where, raw in sent.forwarded:
            out += [f"to {where}: {p}" for p in liberal_problems(case.name, raw)]


def _own_call_ids(case: Case, transport: str, corpus: list[Case]) -> set[bytes]:
    """Forbidden Call-IDs no forwardable file shares (RFC 5118's files reuse two Call-IDs)."""
    shared = {
        cid
        for other in corpus
        if other is not case and not other.must_not_forward(transport)
        for cid in other.call_ids()
    }
    return set(case.forbidden_call_ids(transport)) - shared


def _seed_call(lab: Lab, workdir: Path) -> list[str]:
    lab.peer.answer_code = (200, "OK")
    try:
        outcome = place_seed_call(lab.policy, lab.peer, workdir)
    finally:
        lab.peer.answer_code = (486, "Busy Here")
    return outcome.problems


def _variants(case: Case, transport: str) -> list[tuple[str, bytes]]:
    wire = case.wire()
    out = [("as-is", wire)]
    rewritten = rewrite_ruri_host(wire, MS_HOST) if transport != "tls" else None
    if rewritten is not None and rewritten != wire:
        out.append(("to-ms", rewritten))
    return out


def _table(results: list[Sent]) -> list[str]:
    columns = ["udp", "udp to-ms", "tcp", "tcp to-ms", "tls"]
    rows: dict[str, dict[str, str]] = {}
    expect: dict[str, str] = {}
    for sent in results:
        key = sent.case.label
        expect[key] = f"{sent.case.section} {sent.case.expect}"
        column = sent.transport if sent.variant == "as-is" else f"{sent.transport} to-ms"
        rows.setdefault(key, {})[column] = sent.cell()
    lines = [
        f"{'file':38} {'RFC § expectation':24} " + " ".join(f"{c:11}" for c in columns),
    ]
    for key, cells in rows.items():
        lines.append(f"{key:38} {expect[key]:24} " + " ".join(f"{cells.get(c, '-'):11}" for c in columns))
    lines.append(
        "cells: final status | dropped (no answer in "
        f"{REPLY_BOUND}s) | closed (connection closed) ; >MS / >CUCM: forwarded there ; !: check failed"
    )
    return lines


def test_torture_corpora_on_every_listener(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    started = time.monotonic()
    corpus = cases()
    assert {c.label for c in corpus} == corpus_files(), "every corpus file needs an expectation"
    assert len(corpus) == 62
    results: list[Sent] = []
    seed_calls: list[str] = []
    summary_lines: list[str] = []
    with running_lab(tmp_path, lab_policy_data()) as lab, cucm_sink(lab) as sink:
        assert lab.policy.microsoft.match_request_uri_host.fullmatch(MS_HOST)
        lab.peer.answer_code = (486, "Busy Here")  # forwarded INVITEs end at once, no dialog, no media
        watch = KamailioWatch(lab)
        sender = Sender(lab, REPLY_BOUND)
        forwarding = Forwarding(lab, sink)
        rss_before = watch.rss()
        for transport in TRANSPORTS:
            for case in corpus:
                for variant, data in _variants(case, transport):
                    exchange = sender.send(transport, data)
                    probe = sender.options(transport, f"{transport}-{case.name}-{variant}")
                    sent = Sent(case, transport, variant, exchange, probe, forwarding.new())
                    _judge(sent, watch.problems())
                    results.append(sent)
            problems = _seed_call(lab, tmp_path / f"seed-{transport}")
            seed_calls.append(f"after {transport}: " + ("OK" if not problems else "; ".join(problems)))
            forwarding.new()  # the seed call's own requests belong to no torture message
        # A late forward (after a drop's bound) is caught here: no malformed Call-ID ever arrived.
        everything = forwarding.everything()
        late = sorted(
            {
                f"{c.label} ({t}) reached {where}"
                for c in corpus
                for t in TRANSPORTS
                for where, raw in everything
                if _call_id(raw) in _own_call_ids(c, t, corpus)
            }
        )
        internal = watch.internal_errors()
        rss_after = watch.rss()
        excerpt = watch.log_excerpt("internal error in") if internal else ""

    failures = [f"{s.where}: {f}" for s in results for f in s.failures]
    failures += [f"late forward: {x}" for x in late]
    failures += [f"seed call {x}" for x in seed_calls if not x.endswith(": OK")]
    failures += [f"Kamailio log: {x}" for x in internal]
    crashes = sum(1 for s in results if any("Kamailio" in f for f in s.failures))
    rejected = sum(1 for s in results if s.exchange.final is not None and s.exchange.final >= 400)
    dropped = sum(1 for s in results if s.exchange.final is None)
    malformed_forwarded = sum(
        1 for s in results if any("forwarded to" in f or f.startswith("to ") for f in s.failures)
    ) + len(late)
    probes_ok = sum(1 for s in results if s.probe.final == 200)
    variants = sum(1 for s in results if s.variant == "to-ms")
    growth = max((rss_after.get(p, 0) - kb for p, kb in rss_before.items()), default=0)
    summary = (
        f"torture: {len(corpus)} messages x {len(TRANSPORTS)} transports sent (+{variants} Request-URI "
        f"variants toward Microsoft = {len(results)} sends), {crashes} crashes, {rejected} rejected "
        f"4xx/5xx, {dropped} dropped/closed, {malformed_forwarded} forwarded malformed, "
        f"{len(internal)} internal errors, valid OPTIONS OK after {probes_ok}/{len(results)}, "
        f"seed call OK after {sum(x.endswith(': OK') for x in seed_calls)}/{len(seed_calls)} passes, "
        f"RSS growth max {growth} kB, {time.monotonic() - started:.0f}s"
    )
    summary_lines = [*_table(results), *seed_calls, summary]
    request.config.pluginmanager.register(
        TerminalSummary("SIP torture corpora (RFC 4475, RFC 5118) per listener", summary_lines),
        name=f"torture-summary-{id(results)}",
    )
    print("\n" + "\n".join(summary_lines[:-1]))
    report(summary)
    assert not failures, "\n".join([*failures, excerpt])
