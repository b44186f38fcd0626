"""The guest suite: tests of tests/ run in a QEMU guest with Debian's own kernel.

``make test-vm`` runs this directory, which ``make test`` never collects. One guest boot serves
the session: it runs every test GUEST_TESTS names (tests/ as they are, through the checkout's
venv) and writes pytest's JUnit report into its out share, read back here.
"""

from __future__ import annotations

import os
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from guest import REPO, Guest, Result, guest_image, have_kvm

CACHE = Path(os.environ.get("NFLOGD_SYSTEM_CACHE", REPO / "build" / "system")).resolve()

# What the host's kernel may not show: NFLOG with conntrack (CONFIG_NETFILTER_NETLINK_GLUE_CT),
# VLAN sub-interfaces (8021q). Each must pass in the guest: a skip there is a failure.
GUEST_TESTS = [
    "tests/test_daemon.py::test_conntrack_shows_the_address_before_dnat",
    "tests/test_daemon.py::test_conntrack_group_where_the_kernel_cannot",
    "tests/test_daemon.py::test_a_vlan_sub_interface_shows_its_tag",
    "tests/test_capture.py::test_vlan_tag_and_link_header_of_a_bridged_frame",
]


def pytest_report_header(config):
    return f"guest accelerator: {'KVM' if have_kvm() else 'TCG (no usable KVM: emulated, slower)'}"


@pytest.fixture(scope="session")
def guest_run() -> tuple[Result, dict[str, str]]:
    """One boot running GUEST_TESTS: its result and each test's outcome (passed, failed,
    skipped: reason)."""
    image = guest_image(CACHE)
    py = REPO / ".venv" / "bin" / "python"
    scale = 1 if have_kvm() else 6  # TCG: the daemon's start takes seconds
    script = (
        f"cd {shlex.quote(str(REPO))}\nexport NFLOGD_TIME_SCALE={scale}\n"
        f"{shlex.quote(str(py))} -m pytest -q -p no:cacheprovider -rA --junitxml=/out/junit.xml "
        + " ".join(shlex.quote(t) for t in GUEST_TESTS)
        + "\n"
    )
    guest = Guest(image, CACHE / "vm-run")
    res = guest.run(script)
    junit = guest.work / "out" / "junit.xml"
    outcomes: dict[str, str] = {}
    if junit.exists():
        for case in ET.parse(junit).iter("testcase"):
            module = case.get("classname", "").replace(".", "/")
            node = f"{module}.py::{case.get('name')}"
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = f"failed: {child.get('message', '')}"
                elif child.tag == "skipped":
                    outcome = f"skipped: {child.get('message', '')}"
            outcomes[node] = outcome
    return res, outcomes
