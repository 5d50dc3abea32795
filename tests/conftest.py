"""Shared fixtures. The KSR double is installed before any kemi_o365 module that imports KSR."""

from __future__ import annotations

from tests import ksr_double

ksr_double.install()
