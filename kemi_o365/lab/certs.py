"""A throwaway lab PKI: one CA, the SBC's certificate and the Microsoft peer's, all RSA 2048.

Why RSA 2048 and both EKUs: Microsoft only negotiates ECDHE-RSA suites and, since 2024, refuses an SBC
certificate that lacks either Server or Client Authentication (MICROSOFT-NOTES.md §1.2). The lab must
look like that, so a green test means something. `make_leaf` makes the bad certificates (wildcard,
wrong CN, missing EKU) that conformance tests need, signed by the same CA so only the defect differs.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CN = "kemi-o365 lab CA"
KEY_BITS = 2048
# A PKI about to expire would make a long test run fail half-way; below this margin we start afresh.
MIN_REMAINING = dt.timedelta(days=1)
# Tolerates small clock differences between the processes that check the certificates.
_BACKDATE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class LabPki:
    """Where the lab PKI's PEM files are (keys are mode 0600)."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    sbc_cert: Path
    sbc_key: Path
    ms_cert: Path
    ms_key: Path
    sbc_fqdn: str
    ms_fqdn: str


def make_lab_pki(directory: Path, sbc_fqdn: str, ms_fqdn: str, *, valid_days: int = 365) -> LabPki:
    """Create (or reuse, when still good for more than a day) the CA, SBC and Microsoft-peer certificates."""
    directory = Path(directory)
    pki = LabPki(
        dir=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        sbc_cert=directory / "sbc.crt",
        sbc_key=directory / "sbc.key",
        ms_cert=directory / "ms.crt",
        ms_key=directory / "ms.key",
        sbc_fqdn=sbc_fqdn,
        ms_fqdn=ms_fqdn,
    )
    if _reusable(pki):
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, valid_days)
    _write_pair(pki.ca_cert, pki.ca_key, ca_cert, ca_key)
    for cert_path, key_path, fqdn in (
        (pki.sbc_cert, pki.sbc_key, sbc_fqdn),
        (pki.ms_cert, pki.ms_key, ms_fqdn),
    ):
        key = _new_key()
        cert = _leaf_certificate(ca_cert, ca_key, key, cn=fqdn, san=[fqdn], valid_days=valid_days)
        _write_pair(cert_path, key_path, cert, key)
    return pki


def make_leaf(
    directory: Path,
    ca: LabPki | tuple[Path, Path],
    name: str,
    *,
    wildcard: bool = False,
    eku_server: bool = True,
    eku_client: bool = True,
    cn: str | None = None,
    san: Sequence[str] | None = None,
    stem: str | None = None,
    valid_days: int = 30,
) -> tuple[Path, Path]:
    """Sign a leaf for `name` with the lab CA; returns (cert path, key path).

    `wildcard` turns `host.example.com` into `*.example.com` (what the UM era answered with 403).
    `cn`/`san` override the names; `san=[]` leaves the SAN extension out. With both EKU flags off the
    EKU extension is left out entirely, which OpenSSL reads as "any purpose".
    Files are `<stem>.crt`/`<stem>.key`; the default stem is derived from the name and the options so
    different defects do not overwrite each other.
    """
    ca_cert_path, ca_key_path = (ca.ca_cert, ca.ca_key) if isinstance(ca, LabPki) else ca
    ca_cert = x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes())
    ca_key = _load_rsa_key(Path(ca_key_path))
    label = _wildcard_of(name) if wildcard else name
    names = [label] if san is None else list(san)
    key = _new_key()
    cert = _leaf_certificate(
        ca_cert,
        ca_key,
        key,
        cn=label if cn is None else cn,
        san=names,
        valid_days=valid_days,
        eku_server=eku_server,
        eku_client=eku_client,
    )
    base = stem or _default_stem(
        name, wildcard=wildcard, eku_server=eku_server, eku_client=eku_client, cn=cn, san=san
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{base}.crt", directory / f"{base}.key"
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def cert_cn(cert: x509.Certificate) -> str | None:
    """The subject CN (the name the UM era matched case-sensitively), if any."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


def cert_san_dns(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names of the SAN extension, in certificate order (empty without the extension)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(ext.value.get_values_for_type(x509.DNSName))


def _wildcard_of(name: str) -> str:
    parent = name.split(".", 1)[1] if "." in name else ""
    if not parent:
        raise ValueError(f"{name!r} has no parent domain to put a wildcard on")
    return f"*.{parent}"


def _default_stem(
    name: str,
    *,
    wildcard: bool,
    eku_server: bool,
    eku_client: bool,
    cn: str | None,
    san: Sequence[str] | None,
) -> str:
    parts = [name.replace("*", "star")]
    if wildcard:
        parts.append("wildcard")
    if not eku_server:
        parts.append("no-server-eku")
    if not eku_client:
        parts.append("no-client-eku")
    if cn is not None:
        parts.append("cn-" + cn.replace("*", "star"))
    if san is not None:
        parts.append("san-" + ("+".join(s.replace("*", "star") for s in san) or "none"))
    return "-".join(parts)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ca_certificate(key: rsa.RSAPrivateKey, valid_days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    key: rsa.RSAPrivateKey,
    *,
    cn: str,
    san: Sequence[str],
    valid_days: int,
    eku_server: bool = True,
    eku_client: bool = True,
) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        # A leaf never outlives its CA, or verifiers reject the chain before the leaf expires.
        .not_valid_after(min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if eku_server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if eku_client else []
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # A reader (Kamailio, a parallel test) sees the old file or the new one, never half of one;
    # mkstemp creates the file 0600, so a key is never readable by others even for a moment.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_rsa_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA key")
    return key


def _reusable(pki: LabPki) -> bool:
    """True when every file exists, names the right hosts, chains to the CA and lasts more than a day."""
    try:
        ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        ca_key = _load_rsa_key(pki.ca_key)
        if cert_cn(ca) != CA_CN or not _matches_key(ca, ca_key) or not _lasts(ca):
            return False
        for cert_path, key_path, fqdn in (
            (pki.sbc_cert, pki.sbc_key, pki.sbc_fqdn),
            (pki.ms_cert, pki.ms_key, pki.ms_fqdn),
        ):
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert_cn(cert) != fqdn or cert_san_dns(cert) != (fqdn,) or not _lasts(cert):
                return False
            cert.verify_directly_issued_by(ca)
            if not _matches_key(cert, _load_rsa_key(key_path)):
                return False
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return True


def _lasts(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - _now() > MIN_REMAINING


def _matches_key(cert: x509.Certificate, key: rsa.RSAPrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def make_pki_for_policy(policy_file: Path) -> LabPki:
    """Make the throwaway PKI a lab policy names (in its certificate's folder), so it can then load.

    Only the names are read: the full policy check would fail precisely because the files are missing.
    """
    import yaml

    from kemi_o365.policy.errors import PolicyError, Problem

    try:
        data = yaml.safe_load(policy_file.read_text())
        cert = (policy_file.absolute().parent / data["sbc"]["tls"]["certificate"]).resolve()
        sbc_fqdn = str(data["sbc"]["fqdn"])
        ms_fqdn = str(data["microsoft"]["proxies"][0]["fqdn"])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        why = f"cannot read sbc.fqdn, sbc.tls.certificate and microsoft.proxies: {exc!r}"
        raise PolicyError([Problem(str(policy_file), 0, "", why)]) from exc
    return make_lab_pki(cert.parent, sbc_fqdn, ms_fqdn)
