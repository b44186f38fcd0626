"""What the feed's fuzzers (fuzz_wire.py, fuzz_zmtp.py, fuzz_curve.py) share: writing a
target's seeds as its corpus, and running its property under atheris."""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path


def make_corpus(corpus: Path, seeds: Iterable[bytes], check: Callable[[bytes], None]) -> None:
    """Write the seeds into ``corpus``, each checked first, named by content as libFuzzer
    names its own."""
    corpus.mkdir(parents=True, exist_ok=True)
    for data in seeds:
        check(data)
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)


def main(
    corpus: Path, seeds: Callable[[], Iterable[bytes]], check: Callable[[bytes], None], *instrumented: str
) -> None:
    """``--make-corpus``: write the seeds; else libFuzzer's arguments: fuzz ``check`` with
    the ``instrumented`` modules imported under atheris for coverage."""
    if sys.argv[1:] == ["--make-corpus"]:
        make_corpus(corpus, seeds(), check)
        return
    import atheris

    with atheris.instrument_imports():
        for name in instrumented:
            importlib.import_module(name)
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
