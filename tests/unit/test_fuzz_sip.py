"""The SIP mutation fuzzer (tests/fuzz_sip.py) is deterministic per seed and every operator mutates."""

from __future__ import annotations

import pytest

from kemi_o365.sipmsg import parse
from tests.fuzz_sip import Mutator, microsoft_invite, seed_invite, seed_ok

INVITE = seed_invite(
    ruri_host="pstn-o365.example.com",
    local_ip="127.0.0.4",
    local_port=5999,
    transport="udp",
    call_id="fuzz-1@127.0.0.4",
    branch="abc1",
)
OK = seed_ok(
    sbc_host="sbc-o365.example.com",
    sbc_port=5061,
    cucm_ip="127.0.0.4",
    cucm_port=5060,
    call_id="fuzz-2@127.0.0.4",
    branch="abc2",
)
MS_INVITE = microsoft_invite(
    sbc_host="sbc-o365.example.com", local_ip="127.0.0.3", local_port=5061, call_id="x@y", branch="b3"
)


@pytest.mark.parametrize("base", [INVITE, OK, MS_INVITE], ids=["invite", "200", "ms-invite"])
def test_base_messages_are_well_formed_sip(base: bytes) -> None:
    msg = parse(base)
    assert int(msg.get("Content-Length")) == len(msg.body.encode())
    assert msg.get("Content-Type").lower() == "application/sdp"
    assert msg.body.startswith("v=0\r\n")


def test_same_seed_same_mutations() -> None:
    first, second = Mutator(4475), Mutator(4475)
    a = [first.mutate(INVITE if i % 2 else OK) for i in range(200)]
    b = [second.mutate(INVITE if i % 2 else OK) for i in range(200)]
    assert a == b
    other = Mutator(5118)
    assert [other.mutate(INVITE if i % 2 else OK) for i in range(200)] != a


def test_every_operator_is_used_by_a_seeded_run() -> None:
    mutator = Mutator(1)
    used = {mutator.mutate(INVITE).operator for _ in range(400)}
    assert used == set(mutator.operators)


@pytest.mark.parametrize("operator", sorted(Mutator(0).operators))
@pytest.mark.parametrize("base", [INVITE, OK], ids=["invite", "200"])
def test_each_operator_changes_the_message(operator: str, base: bytes) -> None:
    mutator = Mutator(7)
    for _ in range(50):
        mutation = mutator.mutate(base, operator)
        assert mutation.operator == operator
        assert mutation.data != base, mutation.detail
        assert mutation.detail


def test_oversized_field_is_about_10_kb() -> None:
    mutation = Mutator(3).mutate(INVITE, "oversized-field")
    assert len(mutation.data) >= len(INVITE) + 10 * 1024
