"""The system suite: the built .debs installed with apt in a booted Debian 12 container.

``make test-system`` builds the packages (``make deb``) and runs this directory, which
``make test`` never collects. One container serves the whole session; the tests run in file
order, install first and purge last, and the container is powered off and removed whatever
happens.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from machine import Machine, bookworm_root

REPO = Path(__file__).resolve().parents[1]
DEBS = Path(os.environ.get("NFLOGD_DEB_DIR", REPO / "build" / "deb"))
CACHE = Path(os.environ.get("NFLOGD_SYSTEM_CACHE", REPO / "build" / "system"))


def _debs() -> list[str]:
    names = sorted(p.name for p in DEBS.glob("*.deb") if "-dbgsym_" not in p.name)
    if not any(n.startswith("nflogd_") for n in names) or not any(
        n.startswith("python3-nflogd-client_") for n in names
    ):
        pytest.fail(f"no nflogd .debs in {DEBS}: run make deb (make test-system does)")  # fmt: skip
    return names


@pytest.fixture(scope="session")
def debs() -> list[str]:
    return _debs()


@pytest.fixture(scope="session")
def machine(debs):
    m = Machine(bookworm_root(CACHE), DEBS, CACHE / "run")
    try:
        m.prepare(debs)
        m.boot()
        yield m
    finally:
        m.close()
