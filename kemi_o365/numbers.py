"""Number translation between CUCM's dial plan and Microsoft's E.164 (Teams Direct Routing).

Rule: pure. A rule list is tried in order; the first pattern that matches the whole number rewrites
it (`re.Pattern.sub` with the rule's replacement); no match leaves the number as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kemi_o365.policy.model import NumberRule

# ITU-T E.164: '+', a country code not starting with 0, at most 15 digits in all.
E164 = re.compile(r"^\+[1-9]\d{1,14}$")


def translate(number: str, rules: Iterable[NumberRule]) -> str:
    for rule in rules:
        if rule.pattern.fullmatch(number):
            return rule.pattern.sub(rule.replacement, number, count=1)
    return number


def is_e164(number: str) -> bool:
    return bool(E164.match(number))
