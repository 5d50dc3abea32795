"""Drift check: every KSR call in our code and every function in the KSR stub exists in Kamailio 5.6.3.

The reference is tests/fixtures/kemi-api-5.6.3.json, the `app_python.api_list` of the installed
Kamailio (an end-to-end test proves the fixture equals the live list). A KEMI function called with
the wrong number of arguments raises inside Kamailio only when that line first runs, so this is
checked statically here for every call, including those on error paths no other test reaches.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ksr_double import load_api

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kemi_o365"
STUBS = ROOT / "stubs" / "KSR"


@pytest.fixture(scope="module")
def api() -> dict[str, dict[str, Any]]:
    return load_api()


@dataclass(frozen=True)
class KsrCall:
    qualified: str
    """`fn` for core functions, `module.fn` for module functions."""
    positional: int
    has_star_or_keywords: bool
    where: str
    """file:line, for the failure message."""
    text: str


def _ksr_path(node: ast.expr) -> list[str] | None:
    """['tm', 't_relay'] for `KSR.tm.t_relay`, ['err'] for `KSR.err`, None for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "KSR" and parts:
        return parts[::-1]
    return None


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def ksr_calls(path: Path) -> list[KsrCall]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[KsrCall] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts = _ksr_path(node.func)
        if parts is None:
            continue
        out.append(
            KsrCall(
                qualified=".".join(parts),
                positional=len(node.args),
                has_star_or_keywords=bool(node.keywords)
                or any(isinstance(a, ast.Starred) for a in node.args),
                where=f"{_shown(path)}:{node.lineno}",
                text=ast.unparse(node),
            )
        )
    return out


def all_calls() -> list[KsrCall]:
    return [call for path in sorted(PACKAGE.rglob("*.py")) for call in ksr_calls(path)]


def test_the_scan_finds_our_ksr_calls() -> None:
    found = {c.qualified for c in all_calls()}
    # A broken scan would pass vacuously: a few calls we know the adapter makes must be seen.
    assert {"tm.t_relay", "rtpengine.rtpengine_offer", "pv.gete", "sl.sl_send_reply", "err"} <= found


def call_problems(calls: list[KsrCall], api: dict[str, dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    for call in calls:
        spec = api.get(call.qualified)
        if spec is None:
            problems.append(
                f"{call.where}: {call.text}: KSR.{call.qualified} does not exist in Kamailio 5.6.3"
            )
        elif call.has_star_or_keywords:
            problems.append(f"{call.where}: {call.text}: KEMI functions take positional arguments only")
        elif call.positional != len(spec["params"]):
            problems.append(
                f"{call.where}: {call.text}: {call.positional} argument(s), "
                f"KSR.{call.qualified} takes {len(spec['params'])} {spec['params']}"
            )
    return problems


def test_every_ksr_call_matches_kamailio(api: dict[str, dict[str, Any]]) -> None:
    problems = call_problems(all_calls(), api)
    assert not problems, "\n".join(problems)


def test_the_check_reports_drift(api: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import KSR\n"
        "KSR.tm.t_relay()\n"  # fine
        "KSR.x.exit()\n"  # Lua only (KAMAILIO-NOTES 1.4)
        "KSR.sl.sl_send_reply(200)\n"  # one argument short
        "KSR.pv.sets(*pair)\n"
    )
    problems = call_problems(ksr_calls(bad), api)
    assert [p.split(": ")[0] for p in problems] == [f"{bad}:3", f"{bad}:4", f"{bad}:5"]
    assert "KSR.x.exit does not exist" in problems[0]
    assert "1 argument(s), KSR.sl.sl_send_reply takes 2 ['int', 'str']" in problems[1]


def test_literal_arguments_have_the_right_type(api: dict[str, dict[str, Any]]) -> None:
    # Kamailio parses arguments strictly ("i"/"s"): KSR.sl.sl_send_reply("200", "OK") fails (P3).
    problems: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or (parts := _ksr_path(node.func)) is None:
                continue
            spec = api.get(".".join(parts))
            if spec is None or len(spec["params"]) != len(node.args):
                continue  # reported by the arity test
            for arg, kind in zip(node.args, spec["params"], strict=True):
                if not isinstance(arg, ast.Constant) and not isinstance(arg, ast.JoinedStr):
                    continue
                value = arg.value if isinstance(arg, ast.Constant) else ""
                want = int if kind == "int" else str
                if not isinstance(value, want) or isinstance(value, bool):
                    problems.append(
                        f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}: {kind} expected"
                    )
    assert not problems, "\n".join(problems)


# --- the typed stub used by mypy --------------------------------------------------------------------


@dataclass(frozen=True)
class StubFunction:
    qualified: str
    params: list[tuple[str, str]]
    """(name, annotation) of each parameter."""
    returns: str
    where: str


def stub_functions() -> list[StubFunction]:
    out: list[StubFunction] = []
    for path in sorted(STUBS.glob("*.pyi")):
        module = "" if path.stem == "__init__" else f"{path.stem}."
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            args = node.args
            assert not (args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs), (
                f"{path.name}:{node.lineno}: KSR functions take plain positional parameters"
            )
            out.append(
                StubFunction(
                    qualified=f"{module}{node.name}",
                    params=[(a.arg, ast.unparse(a.annotation) if a.annotation else "") for a in args.args],
                    returns=ast.unparse(node.returns) if node.returns else "",
                    where=f"{path.relative_to(ROOT)}:{node.lineno}",
                )
            )
    return out


# Return annotations that faithfully describe each api_list return kind. `xval` is a string, an int
# or None; the `gete` getters turn None into "" so `str` is exact for them.
RETURNS = {"int": {"int"}, "bool": {"bool"}, "none": {"None"}}
XVAL = {"object", "Any", "str | int | None", "int | str | None", "str | None", "int | None"}


def _return_ok(fixture_ret: str, annotation: str, name: str) -> bool:
    if fixture_ret == "xval":
        return annotation in XVAL or (annotation == "str" and name.endswith("gete"))
    return annotation in RETURNS.get(fixture_ret, set())


def test_the_stub_declares_functions() -> None:
    names = {f.qualified for f in stub_functions()}
    assert {"err", "pv.gete", "tm.t_relay", "rtpengine.rtpengine_offer"} <= names


def test_every_stub_function_matches_kamailio(api: dict[str, dict[str, Any]]) -> None:
    problems: list[str] = []
    for fn in stub_functions():
        spec = api.get(fn.qualified)
        if spec is None:
            problems.append(f"{fn.where}: KSR.{fn.qualified} does not exist in Kamailio 5.6.3")
            continue
        kinds = [annotation for _, annotation in fn.params]
        if kinds != spec["params"]:
            problems.append(f"{fn.where}: KSR.{fn.qualified}{tuple(kinds)}: Kamailio takes {spec['params']}")
        if not _return_ok(spec["ret"], fn.returns, fn.qualified):
            problems.append(
                f"{fn.where}: KSR.{fn.qualified} -> {fn.returns}: Kamailio returns {spec['ret']!r}"
                + (" (a Python bool: True/False, never < 0)" if spec["ret"] == "bool" else "")
            )
    assert not problems, "\n".join(problems)


def test_stub_submodules_exist_in_kamailio(api: dict[str, dict[str, Any]]) -> None:
    modules = {name.split(".")[0] for name in api if "." in name}
    for path in STUBS.glob("*.pyi"):
        if path.stem != "__init__":
            assert path.stem in modules, f"{path.name}: Kamailio 5.6.3 has no KSR.{path.stem}"


def test_every_call_in_our_code_is_in_the_stub() -> None:
    # mypy checks calls against the stub; a call missing from it would only be caught there.
    declared = {f.qualified for f in stub_functions()}
    missing = [f"{c.where}: {c.text}" for c in all_calls() if c.qualified not in declared]
    assert not missing, "\n".join(missing)
