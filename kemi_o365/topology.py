"""Topology hiding toward Microsoft: nothing that names CUCM or the SBC's internal side leaves it.

Rule: pure. Functions of header text and policy; the adapter reads the headers and applies edits.

What would leak, and what happens to it (the e2e test scans every byte Microsoft receives):
- Via: CUCM's Via headers are taken off requests toward Microsoft and put back on the replies
  (the SBC's own Via is the only one Microsoft sees).
- Call-ID: CUCM's (`...@192.0.2.1`) is replaced by a deterministic authenticated token (Masker),
  restored both ways.
- Contact: CUCM's URI travels inside the SBC's own Contact, encrypted the same way.
- Record-Route: the SBC's internal entry is kept off messages toward Microsoft and added back on
  the replies that go to CUCM.
- From and the headers the policy lists (default P-Asserted-Identity, Diversion, Referred-By): the
  host becomes the SBC FQDN; headers the policy drops (default Cisco's) are removed.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import ClassVar

from kemi_o365.decision import HeaderEdits
from kemi_o365.policy.model import Policy, TopologyHiding

# Token prefix: tells a masked value from a peer's own at a glance in logs.
_PREFIX = "kx1-"
_KEY_BYTES = 32  # each of the MAC and the stream key
_TAG_BYTES = 16  # the synthetic IV: a 128-bit MAC of the plaintext

Header = tuple[str, str]

# RFC 3261 §7.3.3 compact forms of the headers this module touches.
_COMPACT = {"v": "via", "i": "call-id", "m": "contact", "f": "from"}


@lru_cache(maxsize=512)
def canonical(name: str) -> str:
    """Lower-case long form of a header name (the set of names seen is small: cached)."""
    low = name.strip().lower()
    return _COMPACT.get(low, low)


class Masker:
    """Reversible, authenticated masking of Call-IDs and Contact URIs: a deterministic SIV scheme
    (RFC 5297's construction) built on keyed BLAKE2b.

    Deterministic on purpose: every message of a dialog must carry the same token, and any worker
    (or the same SBC after a restart) must map it back without shared state. BLAKE2b is CPython's
    own code (module _blake2), not OpenSSL: Kamailio's tls module owns the process's OpenSSL, and a
    second user in its workers corrupts the error queue both share (kamailio#3791 territory; the
    fuzz test caught `cryptography` failing exactly so).
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != 2 * _KEY_BYTES:
            raise ValueError(f"masking key must be {2 * _KEY_BYTES} bytes")
        self._mac_key = key[:_KEY_BYTES]
        self._enc_key = key[_KEY_BYTES:]
        # Every message of a dialog carries the same values: a worker masks each once, not per message.
        self.mask = lru_cache(maxsize=4096)(self._mask)  # type: ignore[method-assign]
        self.unmask = lru_cache(maxsize=4096)(self._unmask)  # type: ignore[method-assign]

    def _tag(self, plain: bytes) -> bytes:
        return hashlib.blake2b(
            plain, key=self._mac_key, digest_size=_TAG_BYTES, person=b"kemi-o365 siv"
        ).digest()

    def _stream(self, tag: bytes, length: int) -> bytes:
        blocks = []
        for counter in range((length + 63) // 64):
            blocks.append(
                hashlib.blake2b(
                    tag + counter.to_bytes(4, "big"), key=self._enc_key, person=b"kemi-o365 ctr"
                ).digest()
            )
        return b"".join(blocks)[:length]

    def mask(self, value: str) -> str:
        return self._mask(value)

    def unmask(self, token: str) -> str | None:
        """The original value, or None when `token` is not one of ours (a peer's own value)."""
        return self._unmask(token)

    def _mask(self, value: str) -> str:
        plain = value.encode("utf-8", "surrogateescape")
        tag = self._tag(plain)
        sealed = tag + _xor(plain, self._stream(tag, len(plain)))
        return _PREFIX + base64.urlsafe_b64encode(sealed).decode("ascii").rstrip("=")

    def _unmask(self, token: str) -> str | None:
        if not token.startswith(_PREFIX):
            return None
        body = token[len(_PREFIX) :]
        try:
            sealed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (ValueError, binascii.Error):
            return None
        if len(sealed) < _TAG_BYTES:
            return None
        tag, cipher = sealed[:_TAG_BYTES], sealed[_TAG_BYTES:]
        plain = _xor(cipher, self._stream(tag, len(cipher)))
        if not hmac.compare_digest(self._tag(plain), tag):
            return None
        return plain.decode("utf-8", "surrogateescape")


def _xor(data: bytes, stream: bytes) -> bytes:
    # One big-integer XOR instead of a Python loop over the bytes.
    n = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream[:n], "big")).to_bytes(n, "big")


@lru_cache(maxsize=4)
def _masker(key: bytes) -> Masker:
    return Masker(key)


def masker(policy: Policy) -> Masker:
    """The policy's masker, built once per key (AES key schedule) and reused for every message."""
    return _masker(policy.topology.key)


# RFC 3261 §7.3.1: a line starting with whitespace continues the header before it (one space).
_FOLD = re.compile(r"[ \t]*\r?\n[ \t]+")


def parse_headers(block: str) -> tuple[Header, ...]:
    """The header section (start line excluded or not) as (name, value) pairs; folded lines joined."""
    if "\n " in block or "\n\t" in block:
        block = _FOLD.sub(" ", block)
    out: list[Header] = []
    for line in block.split("\n"):
        name, sep, value = line.partition(":")
        if sep:
            name = name.rstrip()
            # A start line ("INVITE sip:...") has a space before its first colon; so has junk the
            # SIP parser tolerated.
            if name and " " not in name and name[0] != "\t":
                out.append((name, value.strip()))
    return tuple(out)


def values(headers: Iterable[Header], name: str) -> list[str]:
    want = canonical(name)
    if type(headers) is tuple:
        return list(_by_name(headers).get(want, ()))
    return [v for n, v in headers if canonical(n) == want]


@lru_cache(maxsize=8)
def _by_name(headers: tuple[Header, ...]) -> dict[str, tuple[str, ...]]:
    """The values of each header name: one pass per message however many names are looked up."""
    index: dict[str, list[str]] = {}
    for n, v in headers:
        index.setdefault(canonical(n), []).append(v)
    return {n: tuple(vs) for n, vs in index.items()}


# sip:/sips: URI host (and port) inside a header value; user part and parameters kept.
_URI_HOST = re.compile(
    r"(?P<scheme>sips?:)(?P<user>[^@<>;,\s]*@)?(?P<host>\[[^\]]*\]|[^;>:,?\s]+)(?::\d+)?", re.I
)


def rewrite_host(value: str, fqdn: str) -> str:
    """Every sip/sips URI in `value` names `fqdn` instead of its own host (tel: URIs are left alone)."""
    return _URI_HOST.sub(lambda m: f"{m['scheme']}{m['user'] or ''}{fqdn}", value)


class _Rule(enum.Enum):
    KEEP = "keep"
    DROP = "drop"
    REWRITE_HOST = "rewrite host"


class _Plan:
    """What hiding does to the header names of a message, decided once per list of names (CUCM
    sends the same few lists) and per policy's hiding rules (kept by identity: hashing the frozen
    rules on every lookup cost more than the decision)."""

    rules: ClassVar[TopologyHiding | None] = None
    plans: ClassVar[dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...]]]] = {}


def _rule(th: TopologyHiding, low: str) -> _Rule:
    if th.drop.fullmatch(low):
        return _Rule.DROP
    if low in th.rewrite_host:
        return _Rule.REWRITE_HOST
    if low in ("user-agent", "server") and th.user_agent is not None:
        return _Rule.DROP
    return _Rule.KEEP


def _plan(th: TopologyHiding, names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names to remove, names whose values are re-added with the host rewritten), first spelling."""
    if _Plan.rules is not th:
        _Plan.rules, _Plan.plans = th, {}
    plan = _Plan.plans.get(names)
    if plan is None:
        remove: list[str] = []
        rewrite: list[str] = []
        seen: set[str] = set()
        for name in names:
            low = canonical(name)
            if low in seen:
                continue
            rule = _rule(th, low)
            if rule is _Rule.KEEP:
                continue
            seen.add(low)
            remove.append(name)
            if rule is _Rule.REWRITE_HOST:
                rewrite.append(name)
        if len(_Plan.plans) > 256:
            _Plan.plans.clear()
        plan = _Plan.plans[names] = (tuple(remove), tuple(rewrite))
    return plan


def toward_microsoft(headers: Sequence[Header], policy: Policy, *, user_agent_header: str) -> HeaderEdits:
    """Header edits for a request or reply from CUCM's side before it reaches Microsoft.

    Via, Call-ID, Contact and Record-Route are handled by their own functions: they need state
    carried across the transaction.
    """
    th = policy.topology
    fqdn = policy.sbc.fqdn
    remove, rewrite = _plan(th, tuple([n for n, _ in headers]))
    add = [f"{name}: {rewrite_host(v, fqdn)}" for name in rewrite for v in values(headers, name)]
    if th.user_agent is not None:
        add.append(f"{user_agent_header}: {th.user_agent}")
    return HeaderEdits(remove, tuple(add))


def contact_uri(value: str) -> str:
    """The URI of a Contact value (name-addr or addr-spec, RFC 3261 §20.10)."""
    value = value.strip()
    if "<" in value:
        return value.split("<", 1)[1].split(">", 1)[0].strip()
    return value.split(";", 1)[0].strip()


_VIA = re.compile(
    r"SIP\s*/\s*2\.0\s*/\s*[A-Za-z]+\s+(?P<host>\[[^\]]+\]|[^\s:;,]+)(?::\d+)?\s*(?P<params>[^,]*)"
)


def via_hides_cleanly(headers: Sequence[Header], source_ip: str) -> bool:
    """Whether CUCM's top Via can be taken off whole.

    Kamailio adds `received` (and `rport`) to the top Via as it forwards when the Via does not name
    the source address, or carries rport/received (RFC 3261 §18.2.1, RFC 3581); that insertion
    lands inside the removed header and would both corrupt the request and show CUCM's address.
    CUCM always names the address it sends from, so anything else is refused."""
    vias = values(headers, "via")
    if not vias:
        return False
    m = _VIA.match(vias[0])
    if m is None:
        return False
    host = m["host"].strip("[]").lower()
    params = [p.strip().split("=", 1)[0].lower() for p in m["params"].split(";")]
    return host == source_ip.lower() and "rport" not in params and "received" not in params


def hidden_vias(headers: Sequence[Header]) -> str:
    """CUCM's Via headers as lines, stashed with the transaction and put back on its replies."""
    return "".join(f"Via: {v}\r\n" for v in values(headers, "via"))


def _rr_host(entry: str) -> str:
    m = _URI_HOST.search(entry)
    return m["host"].lower() if m else ""


# Name-addr entries as rr writes them: "<uri>;params" with no quoted display name.
_PLAIN_ENTRY = re.compile(r"(?:[^,<]|<[^>]*>)+")


def split_entries(value: str) -> list[str]:
    """A Record-Route value's comma-separated entries (commas inside <...> or quotes kept)."""
    if '"' not in value and value.count("<") == value.count(">"):
        # Every 2xx carries the SBC's own entries: one regex pass instead of a loop per character.
        return [e for e in (m.strip() for m in _PLAIN_ENTRY.findall(value)) if e]
    out, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(value):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            out.append(value[start:i].strip())
            start = i + 1
    out.append(value[start:].strip())
    return [e for e in out if e]


def route_has_param(headers: Sequence[Header], name: str) -> bool:
    """Whether the first Route entry (the one a proxy consumes) carries URI parameter `name`."""
    routes = values(headers, "route")
    if not routes:
        return False
    uri = routes[0].split(">", 1)[0]
    return any(p.split("=", 1)[0].strip().lower() == name for p in uri.split(";")[1:])


def internal_hosts(policy: Policy) -> frozenset[str]:
    internal = policy.sbc.internal
    return frozenset(h.lower() for h in (internal.address, internal.name) if h)


def record_routes_toward_microsoft(headers: Sequence[Header], policy: Policy) -> tuple[str, ...] | None:
    """The Record-Route entries Microsoft may see (the SBC's internal entry and anything from CUCM's
    network gone), or None when nothing needs to change."""
    entries = [e for v in values(headers, "record-route") for e in split_entries(v)]
    hidden = internal_hosts(policy) | frozenset(str(n.network_address) for n in policy.cucm.sources)
    kept = [e for e in entries if _rr_host(e) not in hidden]
    return None if len(kept) == len(entries) else tuple(kept)


def internal_record_route(headers: Sequence[Header], policy: Policy, *, transport_tcp: bool) -> str | None:
    """For a reply going to CUCM: the SBC's internal Record-Route entry, with the same parameters as
    its external one (rr and uac keep ftag/vst there), or None when the reply carries no entry of ours."""
    fqdn = policy.sbc.fqdn.lower()
    for value in values(headers, "record-route"):
        for entry in split_entries(value):
            if _rr_host(entry) != fqdn:
                continue
            inner = entry.strip().lstrip("<").rstrip(">")
            params = inner.split(";", 1)[1] if ";" in inner else ""
            params = ";".join(p for p in params.split(";") if p and not p.lower().startswith("transport="))
            internal = policy.sbc.internal
            host = internal.name or internal.address
            suffix = ";transport=tcp" if transport_tcp else ""
            return f"<sip:{host}:{internal.port}{suffix};{params}>"
    return None
