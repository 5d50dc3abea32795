"""Small builders shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

from kemi_o365.policy.load import parse_policy
from kemi_o365.policy.model import Policy

LAB_POLICY = Path(__file__).resolve().parent.parent / "kemi_o365" / "data" / "lab.yaml"
# A frozen copy of an earlier lab policy: the loader's exact-message tests cite its line numbers, so
# they must not move when the shipped lab policy gains a key.
REFERENCE_POLICY = Path(__file__).resolve().parent / "fixtures" / "policies" / "reference.yaml"


def lab_policy_text(pki: Path, source: Path = LAB_POLICY) -> str:
    """A lab policy (the shipped one by default) with its certificate paths pointing into `pki`."""
    return source.read_text().replace("pki/", f"{pki}/")


def make_pki_files(directory: Path) -> Path:
    """Empty placeholder files: the loader checks they are readable, not what they hold."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("sbc.crt", "sbc.key", "ca.crt"):
        (directory / name).write_text("placeholder\n")
    return directory


def lab_policy(tmp: Path, edit: dict[str, str] | None = None) -> Policy:
    text = lab_policy_text(make_pki_files(tmp / "pki"))
    for old, new in (edit or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    return parse_policy(text, tmp / "policy.yaml")
