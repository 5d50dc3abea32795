"""A KSR test double built from the installed Kamailio's own API list (tests/fixtures/kemi-api-*.json).

It records every call in order, refuses functions the real KSR does not have or calls with the wrong
number or type of arguments (so it cannot let our code drift from Kamailio), and returns scripted
values: `vars` for $-variables (read through KSR.pv.*), `headers` for KSR.hdr.*, `returns` per
function name, else a neutral success value.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

API_FILE = Path(__file__).parent / "fixtures" / "kemi-api-5.6.3.json"


def load_api(path: Path = API_FILE) -> dict[str, dict[str, Any]]:
    functions: dict[str, dict[str, Any]] = json.loads(path.read_text())["functions"]
    return functions


_DEFAULTS = {"int": 1, "bool": True, "xval": None, "none": None}


class KsrDouble(types.ModuleType):
    """Stands in for the `KSR` module inside unit tests."""

    def __init__(self, api: dict[str, dict[str, Any]]) -> None:
        super().__init__("KSR")
        self._api = api
        self.reset()
        for module in {name.split(".")[0] for name in api if "." in name}:
            setattr(self, module, _Submodule(self, module))

    def reset(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.vars: dict[str, Any] = {}
        self.headers: dict[str, str] = {}
        self.returns: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_") or name not in self._api:
            raise AttributeError(f"KSR has no function {name!r} in Kamailio 5.6.3")
        return self._function(name)

    def _function(self, qualified: str) -> Callable[..., Any]:
        spec = self._api[qualified]

        def call(*args: Any) -> Any:
            params: list[str] = spec["params"]
            if len(args) != len(params):
                raise TypeError(f"KSR.{qualified} takes {len(params)} argument(s) {params}, got {len(args)}")
            for value, kind in zip(args, params, strict=True):
                want = int if kind == "int" else str
                if not isinstance(value, want) or isinstance(value, bool):
                    raise TypeError(f"KSR.{qualified}: expected {kind}, got {value!r}")
            self.calls.append((qualified, args))
            return self._result(qualified, args, spec["ret"])

        return call

    def _result(self, qualified: str, args: tuple[Any, ...], ret: str) -> Any:
        if qualified in self.returns:
            value = self.returns[qualified]
            return value(*args) if callable(value) else value
        if qualified.startswith("is_") and qualified[3:].isupper():
            # KSR.is_INVITE() and friends: the scripted request's method.
            return self.vars.get("$rm") == qualified[3:]
        if qualified in ("pv.get", "pv.gete", "pv.geti"):
            value = self.vars.get(args[0])
            if qualified == "pv.gete":
                return "" if value is None else str(value)
            if qualified == "pv.geti":
                return int(value or 0)
            return value
        if qualified == "pv.sets":
            self.vars[args[0]] = args[1]
            return True
        if qualified == "hdr.gete":
            return self.headers.get(args[0], "")
        return _DEFAULTS.get(ret)

    def names(self) -> list[str]:
        """Qualified names of the calls made so far, in order."""
        return [name for name, _ in self.calls]


class _Submodule:
    def __init__(self, root: KsrDouble, module: str) -> None:
        self._root = root
        self._module = module

    def __getattr__(self, name: str) -> Callable[..., Any]:
        qualified = f"{self._module}.{name}"
        if qualified not in self._root._api:
            raise AttributeError(f"KSR.{self._module} has no function {name!r} in Kamailio 5.6.3")
        return self._root._function(qualified)


def install() -> KsrDouble:
    """Put one double in sys.modules['KSR'] (modules bind KSR at import, so it is installed once)."""
    existing = sys.modules.get("KSR")
    if isinstance(existing, KsrDouble):
        return existing
    double = KsrDouble(load_api())
    sys.modules["KSR"] = double
    return double
