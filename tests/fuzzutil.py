"""The fuzzers of fuzz/ (their seeds, properties and CURVE client), for the tests that replay
their corpora and use their peers: ``fuzzer("zmtp")`` is fuzz/fuzz_zmtp.py, loaded by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def fuzzer(target: str) -> ModuleType:
    """fuzz/fuzz_<target>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"fuzz_{target}", FUZZ / f"fuzz_{target}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
