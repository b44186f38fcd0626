"""The kernel-dependent tests of tests/, in a guest with Debian's kernel: each passes there."""

from __future__ import annotations

import os

import pytest
from conftest import GUEST_TESTS


def test_the_guest_runs_debians_kernel(guest_run):
    res, _ = guest_run
    assert res.rc is not None, (
        f"the guest said nothing in {res.seconds:.0f}s; console:\n{res.console[-3000:]}"
    )
    assert "nflogd-guest: running " in res.console
    release = res.console.split("nflogd-guest: running ", 1)[1].split()[0]
    assert release.endswith("-amd64") and release != os.uname().release


@pytest.mark.parametrize("test", GUEST_TESTS)
def test_passes_in_the_guest(guest_run, test):
    res, outcomes = guest_run
    assert test in outcomes, f"{test} did not run in the guest (exit {res.rc}):\n{res.output[-3000:]}"
    assert outcomes[test] == "passed", f"{test}: {outcomes[test]}\n{res.output[-3000:]}"
