"""The lab PKI: names, usages, key sizes, reuse, and the bad leaves conformance tests will need."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from kemi_o365.lab.certs import CA_CN, LabPki, cert_cn, cert_san_dns, make_lab_pki, make_leaf

SBC_FQDN = "sbc-o365.example.com"
MS_FQDN = "um.example.net"


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def _snapshot(pki: LabPki) -> dict[Path, tuple[bytes, int]]:
    paths = [pki.ca_cert, pki.ca_key, pki.sbc_cert, pki.sbc_key, pki.ms_cert, pki.ms_key]
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"), SBC_FQDN, MS_FQDN)


def test_ca_is_a_ca(pki: LabPki) -> None:
    ca = _load(pki.ca_cert)
    assert cert_cn(ca) == CA_CN
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


@pytest.mark.parametrize(("which", "fqdn"), [("sbc", SBC_FQDN), ("ms", MS_FQDN)])
def test_leaf_names_usages_and_key(pki: LabPki, which: str, fqdn: str) -> None:
    cert_path: Path = getattr(pki, f"{which}_cert")
    key_path: Path = getattr(pki, f"{which}_key")
    cert = _load(cert_path)
    assert cert_cn(cert) == fqdn
    assert cert_san_dns(cert) == (fqdn,)
    assert _ekus(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    cert.verify_directly_issued_by(_load(pki.ca_cert))
    assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=29)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")


def test_reuses_good_files(tmp_path: Path) -> None:
    first = make_lab_pki(tmp_path, SBC_FQDN, MS_FQDN)
    before = _snapshot(first)
    second = make_lab_pki(tmp_path, SBC_FQDN, MS_FQDN)
    assert second == first
    assert _snapshot(second) == before


def test_regenerates_for_other_names(tmp_path: Path) -> None:
    first = _snapshot(make_lab_pki(tmp_path, SBC_FQDN, MS_FQDN))
    other = make_lab_pki(tmp_path, "SBC-o365.example.com", MS_FQDN)
    assert cert_cn(_load(other.sbc_cert)) == "SBC-o365.example.com"
    # All regenerated, CA included, so nothing mixes generations.
    assert other.ca_cert.read_bytes() != first[other.ca_cert][0]


def test_regenerates_when_expiring(tmp_path: Path) -> None:
    short = make_lab_pki(tmp_path, SBC_FQDN, MS_FQDN, valid_days=1)
    old_leaf = short.sbc_cert.read_bytes()
    renewed = make_lab_pki(tmp_path, SBC_FQDN, MS_FQDN)
    assert renewed.sbc_cert.read_bytes() != old_leaf
    assert _load(renewed.sbc_cert).not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=2)


def test_regenerates_when_a_file_is_missing(tmp_path: Path) -> None:
    pki = make_lab_pki(tmp_path, SBC_FQDN, MS_FQDN)
    pki.ms_key.unlink()
    again = make_lab_pki(tmp_path, SBC_FQDN, MS_FQDN)
    assert again.ms_key.exists()
    _load(again.ms_cert).verify_directly_issued_by(_load(again.ca_cert))


def test_wildcard_leaf(pki: LabPki, tmp_path: Path) -> None:
    cert_path, key_path = make_leaf(tmp_path, pki, SBC_FQDN, wildcard=True)
    cert = _load(cert_path)
    assert cert_cn(cert) == "*.example.com"
    assert cert_san_dns(cert) == ("*.example.com",)
    cert.verify_directly_issued_by(_load(pki.ca_cert))
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_leaf_without_client_eku(pki: LabPki, tmp_path: Path) -> None:
    cert_path, _ = make_leaf(tmp_path, pki, SBC_FQDN, eku_client=False)
    assert _ekus(_load(cert_path)) == {ExtendedKeyUsageOID.SERVER_AUTH}


def test_leaf_without_any_eku_omits_the_extension(pki: LabPki, tmp_path: Path) -> None:
    cert_path, _ = make_leaf(tmp_path, pki, SBC_FQDN, eku_server=False, eku_client=False)
    with pytest.raises(x509.ExtensionNotFound):
        _load(cert_path).extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_leaf_name_overrides_and_distinct_files(pki: LabPki, tmp_path: Path) -> None:
    wrong_cn, _ = make_leaf(tmp_path, pki, SBC_FQDN, cn="other.example.com")
    no_san, _ = make_leaf(tmp_path, (pki.ca_cert, pki.ca_key), SBC_FQDN, san=[])
    plain, _ = make_leaf(tmp_path, pki, SBC_FQDN)
    assert len({wrong_cn, no_san, plain}) == 3
    assert cert_cn(_load(wrong_cn)) == "other.example.com"
    assert cert_san_dns(_load(wrong_cn)) == (SBC_FQDN,)
    assert cert_cn(_load(no_san)) == SBC_FQDN
    assert cert_san_dns(_load(no_san)) == ()


def test_wildcard_needs_a_parent_domain(pki: LabPki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="parent domain"):
        make_leaf(tmp_path, pki, "localhost", wildcard=True)
