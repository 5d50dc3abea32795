"""Number translation (Teams E.164 <-> CUCM dial plan) and its policy rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kemi_o365.numbers import is_e164, translate
from kemi_o365.policy.errors import PolicyError
from kemi_o365.policy.load import load_policy
from kemi_o365.policy.model import NumberRule
from tests.helpers import lab_policy_text, make_pki_files

RULES = (
    NumberRule(re.compile(r"(\d{5})"), r"+442079460\1"),
    NumberRule(re.compile(r"0(\d{10})"), r"+44\1"),
    NumberRule(re.compile(r"\d+"), r"+1\g<0>"),
)


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("10048", "+44207946010048"),  # an extension -> its DID
        ("02079460123", "+442079460123"),  # national -> E.164
        ("5550100", "+15550100"),  # the first full match wins, in order
        ("+15550100", "+15550100"),  # already E.164: no rule matches the '+'
        ("1004", "+11004"),  # partial matches do not count (four digits are not five)
    ],
)
def test_first_rule_matching_the_whole_number_rewrites_it(number: str, expected: str) -> None:
    assert translate(number, RULES) == expected


@pytest.mark.parametrize(
    ("number", "ok"), [("+442079460123", True), ("+1", False), ("442079460123", False), ("+0123", False)]
)
def test_e164(number: str, ok: bool) -> None:
    assert is_e164(number) is ok


def test_a_replacement_naming_a_missing_group_is_refused_at_load(tmp_path: Path) -> None:
    text = lab_policy_text(make_pki_files(tmp_path / "pki")).replace(
        "  allowed_media: [audio]",
        "  allowed_media: [audio]\n  numbers:\n    to_microsoft:\n"
        "      - {match: '\\d{5}', replace: '+44\\2'}",
    )
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "replace:" in ln)
    assert str(err.value) == (
        f"{path}:{line}: microsoft.numbers.to_microsoft[0].replace: "
        "does not fit the pattern: invalid group reference 2 (the pattern has 0)"
    )
