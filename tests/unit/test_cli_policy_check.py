"""`kemi-o365 policy check FILE`: exit 0 and an OK line if good; exit 2 and file:line: key on stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kemi_o365.cli import EXIT_BAD_INPUT, EXIT_OK, main
from kemi_o365.lab.certs import make_lab_pki, make_leaf
from tests.helpers import LAB_POLICY, REFERENCE_POLICY, lab_policy_text

MS_FQDN = "2b7c6e1a-5d3f-4a8b-9c0e-7f1d2a3b4c5d.um.example.net"
SBC_FQDN = "sbc-o365.example.com"
CONSOLE_SCRIPT = Path(sys.executable).parent / "kemi-o365"


def write_lab_policy(tmp_path: Path, old: str = "", new: str = "", source: Path = REFERENCE_POLICY) -> Path:
    """The reference policy (whose line numbers the messages cite), or the shipped lab one, edited.

    The certificates are a real throwaway PKI: `policy check` also judges the SBC's TLS identity.
    """
    pki = make_lab_pki(tmp_path / "pki", SBC_FQDN, MS_FQDN)
    text = lab_policy_text(pki.dir, source)
    if old:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def ok_line(path: Path) -> str:
    return (
        f"{path}: OK (exchange-um profile, SBC sbc-o365.example.com, "
        f"Microsoft {MS_FQDN}:5061 (pinned 127.0.0.3))\n"
    )


def test_good_policy_exits_0_with_ok_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lab_policy(tmp_path, source=LAB_POLICY)
    assert main(["policy", "check", str(path)]) == EXIT_OK == 0
    out, err = capsys.readouterr()
    assert out == ok_line(path)
    assert err == ""


def test_risky_but_legal_settings_are_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_lab_policy(
        tmp_path,
        "tls_versions: [TLSv1.2, TLSv1.3]",
        "tls_versions: [TLSv1, TLSv1.1, TLSv1.2, TLSv1.3]",
        LAB_POLICY,
    )
    assert main(["policy", "check", str(path)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == ok_line(path)
    assert err == (
        f"warning: {path}: sbc.external.tls_versions: TLSv1, TLSv1.1 accepted; Microsoft enforces TLS 1.2 "
        "since 2022-04-03, keep older versions only for a legacy peer\n"
    )


def test_ok_line_names_the_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lab_policy(tmp_path, "profile: exchange-um", "profile: teams-direct-routing")
    assert main(["policy", "check", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert "(teams-direct-routing profile," in out


def test_bad_policy_exits_2_with_located_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lab_policy(tmp_path, "port: 5060", "port: 70000")
    assert main(["policy", "check", str(path)]) == EXIT_BAD_INPUT == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"policy invalid:\n{path}:14: sbc.internal.port: must be between 1 and 65535, got 70000\n"


def test_every_problem_on_its_own_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lab_policy(tmp_path, "kamailio:\n", "kamailo:\n")
    text = path.read_text().replace("address: 127.0.0.2", "address: nope")
    path.write_text(text)
    assert main(["policy", "check", str(path)]) == 2
    _, err = capsys.readouterr()
    assert err.splitlines() == [
        "policy invalid:",
        f"{path}:17: sbc.external.address: expected an IP address, got 'nope'",
        f"{path}:42: kamailo: unknown key; did you mean 'kamailio'?",
    ]


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.yaml"
    assert main(["policy", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"policy invalid:\n{path}: cannot read the policy: No such file or directory\n"


def test_console_script_entry_point(tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} not installed (pip install -e .)"
    good = write_lab_policy(tmp_path / "good", source=LAB_POLICY)
    bad = write_lab_policy(tmp_path / "bad", "profile: exchange-um", "profile: teams")

    ok = subprocess.run(
        [str(CONSOLE_SCRIPT), "policy", "check", str(good)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, ok_line(good), "")

    failed = subprocess.run(
        [str(CONSOLE_SCRIPT), "policy", "check", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    expected = (
        f"policy invalid:\n{bad}:31: microsoft.profile: "
        "expected one of exchange-um, teams-direct-routing, got 'teams'\n"
    )
    assert (failed.returncode, failed.stdout, failed.stderr) == (2, "", expected)


@pytest.mark.parametrize(
    ("leaf", "why"),
    [
        ({"wildcard": True}, "wildcard"),
        ({"cn": "SBC-O365.example.com", "san": ["SBC-O365.example.com"]}, "sbc-o365.example.com"),
    ],
)
def test_a_certificate_exchange_um_would_refuse_with_403_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], leaf: dict[str, object], why: str
) -> None:
    path = write_lab_policy(tmp_path, source=LAB_POLICY)
    pki = tmp_path / "pki"
    cert, key = make_leaf(pki, (pki / "ca.crt", pki / "ca.key"), SBC_FQDN, **leaf)  # type: ignore[arg-type]
    path.write_text(
        path.read_text().replace(str(pki / "sbc.crt"), str(cert)).replace(str(pki / "sbc.key"), str(key))
    )
    assert main(["policy", "check", str(path)]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("policy refused: Microsoft would reject this SBC's TLS identity:\n")
    assert f"{cert}: sbc.tls.certificate: " in err
    assert why in err
