"""The policy loader: the shipped lab policy's values, and the exact message for each kind of bad file.

Every bad case edits the lab policy text, writes it into a temporary directory and loads it from
there, so each expected message names the real file, line and dotted key, exactly as an operator
sees it. Line numbers refer to tests/fixtures/policies/reference.yaml (after the edit), a frozen copy of an
earlier lab policy; the shipped lab policy itself is checked by test_shipped_lab_policy_loads.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from kemi_o365.media import DEFAULT_ANSWER_TO_CUCM, DEFAULT_OFFER_TO_MICROSOFT
from kemi_o365.policy.errors import PolicyError, Problem
from kemi_o365.policy.load import load_policy
from kemi_o365.policy.model import Policy, Profile, Proxy, Transport
from tests.helpers import LAB_POLICY, REFERENCE_POLICY, lab_policy_text, make_pki_files
from tests.summary import report

MS_FQDN = "2b7c6e1a-5d3f-4a8b-9c0e-7f1d2a3b4c5d.um.example.net"
# Whole lines of lab.yaml (with their trailing comments), to delete or move in an edit.
LAB_LINES = REFERENCE_POLICY.read_text().splitlines(keepends=True)
FQDN_LINE = LAB_LINES[6]  # line 7: sbc.fqdn
ADVERTISED_LINE = LAB_LINES[18]  # line 19: sbc.external.advertised_address
PROXY_ADDRESS_LINE = LAB_LINES[37]  # line 38: microsoft.proxies[0].address
PROXY_ITEM = f"    - fqdn: {MS_FQDN}\n      port: 5061\n{PROXY_ADDRESS_LINE}"
KAMAILIO_SECTION = "kamailio:\n  children: 2\n  log_level: 2\n  rtpengine_timeout_ms: 500\n"
CUCM_SECTION = "cucm:\n  sources: [127.0.0.1/32]\n  transport: tcp\n\n"

Edits = Sequence[tuple[str, str]]


def write_policy(tmp_path: Path, edits: Edits = ()) -> tuple[Path, Path]:
    """The lab policy with `edits` (old -> new; `{pki}` stands for the PKI directory) in tmp_path."""
    pki = make_pki_files(tmp_path / "pki")
    text = lab_policy_text(pki, REFERENCE_POLICY)
    for old_template, new_template in edits:
        old, new = old_template.replace("{pki}", str(pki)), new_template.replace("{pki}", str(pki))
        assert text.count(old) == 1, f"edit must match exactly once: {old!r}"
        text = text.replace(old, new)
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path, pki


def load_error(path: Path) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return str(info.value)


# (id, edits of the lab text, expected str(PolicyError) with {path} and {pki} to fill in)
BAD_CASES: list[tuple[str, Edits, str]] = [
    (
        "yaml-unclosed-flow-list",
        [("    port: 5060\n", "    port: [5060\n")],
        "{path}:15: YAML syntax error: expected ',' or ']', but got ':'"
        " (while parsing a flow sequence started at line 14)",
    ),
    (
        "yaml-tab-indent",
        [("    port: 5060\n", "\tport: 5060\n")],
        "{path}:14: YAML syntax error: found character '\\t' that cannot start any token",
    ),
    (
        "duplicate-nested-key",
        [("    port: 5060\n", "    port: 5060\n    port: 5062\n")],
        "{path}:15: sbc.internal.port: duplicate key (first at line 14)",
    ),
    (
        "duplicate-top-level-section",
        [("kamailio:\n", "rtpengine:\n  port_min: 30000\nkamailio:\n")],
        "{path}:42: rtpengine: duplicate key (first at line 21)",
    ),
    (
        "unknown-top-level-key-did-you-mean",
        [("kamailio:\n", "kamailo:\n")],
        "{path}:42: kamailo: unknown key; did you mean 'kamailio'?",
    ),
    (
        "unknown-top-level-key-no-close-match",
        [("kamailio:\n", "zzz: 1\nkamailio:\n")],
        "{path}:42: zzz: unknown key; known keys: version, sbc, rtpengine, cucm, microsoft, kamailio, "
        "topology_hiding, metrics",
    ),
    (
        "unknown-nested-key",
        [("    port: 5060\n", "    port: 5060\n    prot: udp\n")],
        "{path}:15: sbc.internal.prot: unknown key; did you mean 'port'?",
    ),
    (
        "unknown-key-in-proxy",
        [("      port: 5061\n", "      port: 5061\n      adress: 127.0.0.3\n")],
        "{path}:38: microsoft.proxies[0].adress: unknown key; did you mean 'address'?",
    ),
    (
        "missing-sbc-fqdn",
        [(FQDN_LINE, "")],
        "{path}:6: sbc.fqdn: missing required key",
    ),
    (
        "missing-top-level-section",
        [(CUCM_SECTION, "")],
        "{path}:4: cucm: missing required key",
    ),
    (
        "missing-version",
        [("version: 1\n", "")],
        "{path}:5: version: missing required key",
    ),
    (
        "string-where-integer",
        [("port: 5060", "port: five")],
        "{path}:14: sbc.internal.port: expected an integer, got 'five'",
    ),
    (
        "quoted-number-where-integer",
        [("port: 5060", "port: '5060'")],
        "{path}:14: sbc.internal.port: expected an integer, got '5060'",
    ),
    (
        "boolean-where-integer",
        [("children: 2", "children: yes")],
        "{path}:43: kamailio.children: expected an integer, got True",
    ),
    (
        "kamailio-shared-memory-too-small",
        [("rtpengine_timeout_ms: 500", "rtpengine_timeout_ms: 500\n  shared_memory_mb: 32")],
        "{path}:46: kamailio.shared_memory_mb: must be between 64 and 65536, got 32",
    ),
    (
        "kamailio-private-memory-not-a-number",
        [("rtpengine_timeout_ms: 500", "rtpengine_timeout_ms: 500\n  private_memory_mb: lots")],
        "{path}:46: kamailio.private_memory_mb: expected an integer, got 'lots'",
    ),
    (
        "list-where-mapping",
        [("  control: {address: 127.0.0.1, port: 22230}", "  control: [127.0.0.1, 22230]")],
        "{path}:22: rtpengine.control: expected a mapping, got a list",
    ),
    (
        "mapping-where-list",
        [("sources: [127.0.0.1/32]", "sources: {cucm1: 127.0.0.1/32}")],
        "{path}:27: cucm.sources: expected a list, got a mapping",
    ),
    (
        "mapping-where-single-value",
        [("port: 5060", "port: {udp: 5060}")],
        "{path}:14: sbc.internal.port: expected a single value, got a mapping",
    ),
    (
        "empty-section",
        [(KAMAILIO_SECTION, "kamailio:\nversion2: 1\n")],
        "{path}:42: kamailio: expected a mapping, got an empty value\n"
        "{path}:43: version2: unknown key; did you mean 'version'?",
    ),
    (
        "port-out-of-range",
        [("port: 5060", "port: 70000")],
        "{path}:14: sbc.internal.port: must be between 1 and 65535, got 70000",
    ),
    (
        "port-zero",
        [("port: 22230", "port: 0")],
        "{path}:22: rtpengine.control.port: must be between 1 and 65535, got 0",
    ),
    (
        "bad-ip-address",
        [("address: 127.0.0.2", "address: 127.0.0.300")],
        "{path}:17: sbc.external.address: expected an IP address, got '127.0.0.300'",
    ),
    (
        "hostname-where-ip-address",
        [("address: 127.0.0.3", "address: ms.example.net")],
        "{path}:38: microsoft.proxies[0].address: expected an IP address, got 'ms.example.net'",
    ),
    (
        "bad-cidr-in-cucm-sources",
        [("sources: [127.0.0.1/32]", "sources: [127.0.0.1/32, 192.0.2.0/33]")],
        "{path}:27: cucm.sources[1]: expected an address or network (CIDR), got '192.0.2.0/33'",
    ),
    (
        "empty-cucm-sources",
        [("sources: [127.0.0.1/32]", "sources: []")],
        "{path}:27: cucm.sources: list at least one CUCM address",
    ),
    (
        "bad-fqdn-underscore",
        [("fqdn: sbc-o365.example.com", "fqdn: sbc_o365.example.com")],
        "{path}:7: sbc.fqdn: expected a fully qualified domain name, got 'sbc_o365.example.com'",
    ),
    (
        "bad-fqdn-single-label",
        [(f"fqdn: {MS_FQDN}", "fqdn: localhost")],
        "{path}:36: microsoft.proxies[0].fqdn: expected a fully qualified domain name, got 'localhost'",
    ),
    (
        "bad-regex",
        [(r"'pstn[0-9]?-o365\.example\.com'", r"'pstn[0-9-o365\.example\.com'")],
        r"{path}:33: microsoft.match.request_uri_host: bad regular expression"
        r" 'pstn[0-9-o365\\.example\\.com': unterminated character set at position 4",
    ),
    (
        "bad-to-uri-scheme",
        [(f"to_uri: sip:87000@{MS_FQDN}", "to_uri: tel:+14255550100")],
        "{path}:34: microsoft.to_uri: expected a SIP URI like 'sip:87000@host.example.com',"
        " got 'tel:+14255550100'",
    ),
    (
        "to-uri-without-user",
        [(f"to_uri: sip:87000@{MS_FQDN}", f"to_uri: sip:{MS_FQDN}")],
        "{path}:34: microsoft.to_uri: expected a SIP URI like 'sip:87000@host.example.com',"
        f" got 'sip:{MS_FQDN}'",
    ),
    (
        "unknown-profile",
        [("profile: exchange-um", "profile: teams")],
        "{path}:31: microsoft.profile: expected one of exchange-um, teams-direct-routing, got 'teams'",
    ),
    (
        "unknown-internal-transport",
        [("transports: [udp, tcp]", "transports: [udp, tls]")],
        "{path}:15: sbc.internal.transports[1]: expected one of udp, tcp, got 'tls'",
    ),
    (
        "unknown-cucm-transport",
        [("transport: tcp", "transport: sctp")],
        "{path}:28: cucm.transport: expected one of udp, tcp, got 'sctp'",
    ),
    (
        "missing-certificate-file",
        [("{pki}/sbc.crt", "{pki}/missing.crt")],
        "{path}:9: sbc.tls.certificate: cannot read {pki}/missing.crt: No such file or directory",
    ),
    (
        "unreadable-private-key-is-a-directory",
        [("{pki}/sbc.key", "{pki}")],
        "{path}:10: sbc.tls.private_key: cannot read {pki}: Is a directory",
    ),
    (
        "rtpengine-range-overlaps-internal-sip-port",
        [("port_min: 20000", "port_min: 5000")],
        "{path}:23: rtpengine.port_min: media port range overlaps SIP port 5060",
    ),
    (
        "rtpengine-range-overlaps-external-sip-port",
        [("port_min: 20000", "port_min: 5061"), ("port_max: 20999", "port_max: 6000")],
        "{path}:23: rtpengine.port_min: media port range overlaps SIP port 5061",
    ),
    (
        "rtpengine-port-min-above-port-max",
        [("port_min: 20000", "port_min: 30000")],
        "{path}:23: rtpengine.port_min: greater than port_max (30000 > 20999)",
    ),
    (
        "rtpengine-range-below-four-ports",
        [("port_max: 20999", "port_max: 20002")],
        "{path}:24: rtpengine.port_max: the range must hold at least 4 ports (one call)",
    ),
    (
        "rtpengine-port-below-1024",
        [("port_min: 20000", "port_min: 80")],
        "{path}:23: rtpengine.port_min: must be between 1024 and 65535, got 80",
    ),
    (
        "same-address-and-port-internal-external",
        [("address: 127.0.0.2\n    port: 5061", "address: 127.0.0.1\n    port: 5060")],
        "{path}:18: sbc.external.port: the internal and external listeners use the same address and port",
    ),
    (
        "empty-proxies-list",
        [(f"  proxies:\n{PROXY_ITEM}", "  proxies: []\n")],
        "{path}:35: microsoft.proxies: expected a list of at least one Microsoft proxy",
    ),
    (
        "version-2",
        [("version: 1", "version: 2")],
        "{path}:4: version: unsupported policy version 2; this kemi-o365 reads version 1",
    ),
    (
        "version-as-string",
        [("version: 1", "version: '1'")],
        "{path}:4: version: unsupported policy version '1'; this kemi-o365 reads version 1",
    ),
    (
        # Checked section by section, reported in file order: fqdn (7), cert (9), unknown key (15),
        # then, one line further down after that insertion, address (18), profile (32), a second
        # proxy's port (41).
        "several-problems-in-file-order",
        [
            ("    port: 5060\n", "    port: 5060\n    prot: udp\n"),
            ("fqdn: sbc-o365.example.com", "fqdn: sbc..example.com"),
            ("{pki}/sbc.crt", "{pki}/gone.crt"),
            ("address: 127.0.0.2", "address: nope"),
            ("profile: exchange-um", "profile: teams"),
            (PROXY_ITEM, f"{PROXY_ITEM}    - fqdn: {MS_FQDN}\n      port: 70000\n"),
        ],
        "{path}:7: sbc.fqdn: expected a fully qualified domain name, got 'sbc..example.com'\n"
        "{path}:9: sbc.tls.certificate: cannot read {pki}/gone.crt: No such file or directory\n"
        "{path}:15: sbc.internal.prot: unknown key; did you mean 'port'?\n"
        "{path}:18: sbc.external.address: expected an IP address, got 'nope'\n"
        "{path}:32: microsoft.profile: expected one of exchange-um, teams-direct-routing, got 'teams'\n"
        "{path}:41: microsoft.proxies[1].port: must be between 1 and 65535, got 70000",
    ),
]


@pytest.mark.parametrize(("edits", "expected"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_policy_gives_exact_message(tmp_path: Path, edits: Edits, expected: str) -> None:
    path, pki = write_policy(tmp_path, edits)
    assert load_error(path) == expected.replace("{path}", str(path)).replace("{pki}", str(pki))


def test_each_problem_is_located_and_printed_one_per_line(tmp_path: Path) -> None:
    path, _ = write_policy(tmp_path, [("port: 5060", "port: 70000"), ("profile: exchange-um", "profile: x")])
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.problems == [
        Problem(str(path), 14, "sbc.internal.port", "must be between 1 and 65535, got 70000"),
        Problem(
            str(path), 31, "microsoft.profile", "expected one of exchange-um, teams-direct-routing, got 'x'"
        ),
    ]
    assert str(info.value).splitlines() == [str(p) for p in info.value.problems]


@pytest.mark.parametrize(
    "text", ["", "\n\n", "# only a comment\n", "---\n"], ids=["empty", "blank", "comment", "doc"]
)
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    assert load_error(path) == f"{path}:1: the file is empty"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("- sbc\n", "expected a mapping, got a list"), ("sbc\n", "expected a mapping, got 'sbc'")],
    ids=["list", "scalar"],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    assert load_error(path) == f"{path}:1: {expected}"


def test_missing_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert load_error(path) == f"{path}: cannot read the policy: No such file or directory"


def test_policy_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"version: 1\nsbc: \xff\n")
    assert load_error(path) == f"{path}: not UTF-8 text: invalid start byte"


# --- the shipped lab policy ---------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> Policy:
    """The shipped lab policy (kemi_o365/data/lab.yaml), with placeholder certificate files."""
    path = tmp_path / "policy.yaml"
    path.write_text(lab_policy_text(make_pki_files(tmp_path / "pki")))
    return load_policy(path)


def test_lab_policy_values(tmp_path: Path, lab: Policy) -> None:
    pki = tmp_path / "pki"
    assert lab.source == tmp_path / "policy.yaml"
    sbc = lab.sbc
    assert sbc.fqdn == "sbc-o365.example.com"
    assert (sbc.tls.certificate, sbc.tls.private_key, sbc.tls.ca) == (
        pki / "sbc.crt",
        pki / "sbc.key",
        pki / "ca.crt",
    )
    assert (sbc.internal.address, sbc.internal.port) == ("127.0.0.1", 5060)
    assert sbc.internal.transports == (Transport.UDP, Transport.TCP)
    assert (sbc.external.address, sbc.external.port) == ("127.0.0.2", 5061)
    assert sbc.external.advertised_address == "198.51.100.10"

    rtp = lab.rtpengine
    assert (rtp.control_address, rtp.control_port, rtp.port_min, rtp.port_max) == (
        "127.0.0.1",
        22230,
        20000,
        20999,
    )

    assert lab.cucm.sources == (ipaddress.ip_network("127.0.0.4/32"),)
    assert lab.cucm.transport is Transport.TCP
    assert (lab.cucm.address, lab.cucm.port) == ("127.0.0.4", 5060)
    assert sbc.external.tls_versions == ("TLSv1.2", "TLSv1.3")
    assert lab.warnings == ()

    ms = lab.microsoft
    assert ms.profile is Profile.EXCHANGE_UM
    assert ms.to_uri == f"sip:87000@{MS_FQDN}"
    assert ms.proxies == (Proxy(fqdn=MS_FQDN, port=5061, address="127.0.0.3"),)
    assert ms.strip_answer_prefixes == ("c=IN IP4 127.0.0.25",)
    assert ms.trusted_names == ("*.um.example.net",)
    assert ms.sources == (ipaddress.ip_network("127.0.0.3/32"),)
    assert ms.allowed_media == ("audio",)
    assert ms.accepts_peer_name(MS_FQDN)
    assert not ms.accepts_peer_name("um.example.net")  # a wildcard covers exactly one label
    assert not ms.accepts_peer_name("a.b.um.example.net")

    assert (lab.kamailio.children, lab.kamailio.log_level, lab.kamailio.rtpengine_timeout_ms) == (2, 2, 500)


def test_lab_request_uri_regex_is_compiled_at_load(lab: Policy) -> None:
    pattern = lab.microsoft.match_request_uri_host
    assert isinstance(pattern, re.Pattern)
    assert pattern.pattern == r"pstn[0-9]?-o365\.example\.com"


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        ("pstn-o365.example.com", True),
        ("pstn2-o365.example.com", True),
        ("PSTN-O365.Example.COM", True),  # host names are case-insensitive; compiled with IGNORECASE
        ("pstn22-o365.example.com", False),
        ("evil-pstn-o365.example.com.attacker.net", False),
        ("pstn-o365.example.com.attacker.net", False),
        ("pstn-o365xexample.com", False),
    ],
)
def test_lab_request_uri_host_fullmatch(lab: Policy, host: str, matches: bool) -> None:
    # routing.py uses fullmatch: the pattern must describe the whole host, not a substring of it.
    assert (lab.microsoft.match_request_uri_host.fullmatch(host) is not None) is matches


def test_lab_default_rtpengine_flags(lab: Policy) -> None:
    offer = lab.microsoft.offer_flags
    assert offer == DEFAULT_OFFER_TO_MICROSOFT
    assert {"RTP/SAVP", "ICE=remove", "DTLS=off"} <= set(offer)
    assert len([f for f in offer if f.startswith("SDES-no-")]) == 11
    assert len(set(offer)) == len(offer)
    assert lab.microsoft.answer_flags == DEFAULT_ANSWER_TO_CUCM


def test_configured_flags_replace_the_defaults(tmp_path: Path) -> None:
    path, _ = write_policy(
        tmp_path,
        [("  strip_answer_prefixes", "  offer_flags: [RTP/SAVP, trust-address]\n  strip_answer_prefixes")],
    )
    ms = load_policy(path).microsoft
    assert ms.offer_flags == ("RTP/SAVP", "trust-address")
    assert ms.answer_flags == DEFAULT_ANSWER_TO_CUCM


def test_optional_keys_take_defaults(tmp_path: Path) -> None:
    path, _ = write_policy(
        tmp_path,
        [
            ("    transports: [udp, tcp]\n", ""),
            (ADVERTISED_LINE, ""),
            (KAMAILIO_SECTION, ""),
            (PROXY_ADDRESS_LINE, ""),
        ],
    )
    policy = load_policy(path)
    assert policy.sbc.internal.transports == (Transport.UDP, Transport.TCP)
    assert policy.sbc.external.advertised_address is None
    assert policy.microsoft.proxies == (Proxy(fqdn=MS_FQDN, port=5061, address=None),)
    assert (policy.kamailio.children, policy.kamailio.log_level, policy.kamailio.rtpengine_timeout_ms) == (
        4,
        2,
        500,
    )
    # Kamailio's own 64 MB ran out near 400 calls/s (transactions live 5 s after the call's replies).
    assert (policy.kamailio.shared_memory_mb, policy.kamailio.private_memory_mb) == (256, 16)


def test_values_are_normalised(tmp_path: Path) -> None:
    path, _ = write_policy(
        tmp_path,
        [
            ("fqdn: sbc-o365.example.com", "fqdn: SBC-O365.Example.COM"),
            ("transports: [udp, tcp]", "transports: [TCP]"),
            ("sources: [127.0.0.1/32]", "sources: [192.0.2.3/24, '2001:db8::1']"),
            ("port_max: 20999", "port_max: 20003"),  # exactly 4 ports: one call, the minimum
        ],
    )
    policy = load_policy(path)
    assert policy.sbc.fqdn == "sbc-o365.example.com"
    assert policy.sbc.internal.transports == (Transport.TCP,)
    assert policy.cucm.sources == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::1/128"),
    )
    assert policy.rtpengine.port_max == 20003


def test_relative_paths_resolve_against_the_policy_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    make_pki_files(site / "pki")
    (site / "policy.yaml").write_text(LAB_POLICY.read_text())  # certificate: pki/sbc.crt, relative
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    policy = load_policy(Path("..") / "site" / "policy.yaml")
    assert policy.sbc.tls.certificate.resolve() == site / "pki" / "sbc.crt"
    assert policy.sbc.tls.private_key.resolve() == site / "pki" / "sbc.key"
    assert policy.sbc.tls.ca.resolve() == site / "pki" / "ca.crt"
    assert policy.sbc.tls.certificate.is_absolute()


def test_relative_missing_certificate_names_the_resolved_path(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(LAB_POLICY.read_text())
    path = tmp_path / "policy.yaml"
    make_pki_files(tmp_path / "pki")
    (tmp_path / "pki" / "ca.crt").unlink()
    assert (
        load_error(path)
        == f"{path}:11: sbc.tls.ca: cannot read {tmp_path}/pki/ca.crt: No such file or directory"
    )


def test_policy_objects_are_frozen(lab: Policy) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        lab.sbc.fqdn = "other.example.com"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        lab.sbc.internal.port = 5070  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        lab.microsoft.proxies[0].address = "192.0.2.1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        lab.rtpengine = lab.rtpengine  # type: ignore[misc]
    # Collections are tuples, so nothing inside can be changed in place either.
    for seq in (
        lab.sbc.internal.transports,
        lab.cucm.sources,
        lab.microsoft.proxies,
        lab.microsoft.offer_flags,
        lab.microsoft.answer_flags,
        lab.microsoft.strip_answer_prefixes,
    ):
        assert isinstance(seq, tuple)


@pytest.mark.parametrize(
    ("versions", "accepted"),
    [
        ("[TLSv1.2, TLSv1.3]", ("TLSv1.2", "TLSv1.3")),
        ("[TLSv1.3, TLSv1.2]", ("TLSv1.2", "TLSv1.3")),
        ("[TLSv1.2]", ("TLSv1.2",)),
        ("[TLSv1.2, TLSv1.1]", None),
        ("[TLSv1.3]", None),
        ("[TLSv1.1, TLSv1.3]", None),
    ],
)
def test_tls_versions_must_be_what_kamailio_can_express(
    tmp_path: Path, versions: str, accepted: tuple[str, ...] | None
) -> None:
    path = tmp_path / "policy.yaml"
    text = lab_policy_text(make_pki_files(tmp_path / "pki"))
    path.write_text(text.replace("tls_versions: [TLSv1.2, TLSv1.3]", f"tls_versions: {versions}"))
    if accepted is not None:
        assert load_policy(path).sbc.external.tls_versions == accepted
        return
    message = load_error(path)
    assert ": sbc.external.tls_versions: " in message
    assert "contiguous" in message or "Kamailio 5.6 can accept one version below 1.3" in message


def test_every_broken_policy_is_refused_with_file_line_and_key(tmp_path: Path) -> None:
    refused = 0
    for i, (name, edits, _expected) in enumerate(BAD_CASES):
        path, _pki = write_policy(tmp_path / str(i), edits)
        message = load_error(path)
        assert message.startswith(f"{path}:"), (name, message)
        refused += 1
    report(
        f"bad policy: {len(BAD_CASES)} broken files (YAML syntax, unknown keys, wrong types, unreadable "
        f"certificate files, bad regexes, overlapping ports, ...): {refused} refused naming file, line "
        "and key"
    )
