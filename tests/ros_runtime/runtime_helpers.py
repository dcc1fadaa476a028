"""Helpers of the runtime tests (a module of its own: `conftest` is a name every test folder has)."""

from __future__ import annotations

import sys
from pathlib import Path

PROBE = Path(__file__).resolve().with_name("probe.py")


def report(request, name: str, values: dict) -> None:
    """Measurements go to the test report (-rA / junit properties) and to stdout (-s)."""
    for k, v in values.items():
        request.node.user_properties.append((f"{name}.{k}", v))
    print(
        f"\n{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
        file=sys.stderr,
    )
