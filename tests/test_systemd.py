"""The systemd files of nflogd and nflogd-relay: systemd-analyze verify, systemd-sysusers.

What each unit must say for its program is tested beside the program (test_daemon.py,
test_relay.py); here, that systemd itself accepts the files.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from daemonutil import NFLOGD, NFLOGD_RELAY, REPO

SERVICES = [("nflogd", NFLOGD), ("nflogd-relay", NFLOGD_RELAY)]


@pytest.mark.parametrize(("name", "script"), SERVICES, ids=[n for n, _ in SERVICES])
def test_systemd_analyze_verify(tmp_path, name, script):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    if not script.exists():
        pytest.skip(f"{script} is not installed; verify checks that ExecStart exists")
    # verify insists the ExecStart binary exists: point it at the checkout's, nothing else changes
    text = (REPO / "systemd" / f"{name}.service").read_text()
    unit = tmp_path / f"{name}.service"
    unit.write_text(text.replace(f"ExecStart=/usr/bin/{name} ", f"ExecStart={script} ", 1))
    res = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in res.stderr.splitlines() if "nflogd" in line]
    assert res.returncode == 0 and not complaints, res.stderr


@pytest.mark.parametrize("name", [n for n, _ in SERVICES])
def test_sysusers_creates_the_user_in_group_nflog(tmp_path, name):
    exe = shutil.which("systemd-sysusers")
    if exe is None:
        pytest.skip("systemd-sysusers is not installed (Debian package systemd)")
    (tmp_path / "etc").mkdir()
    conf = REPO / "systemd" / f"{name}.sysusers"
    res = subprocess.run([exe, f"--root={tmp_path}", str(conf)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr

    def entries(file: str) -> dict[str, list[str]]:
        rows = (line.split(":") for line in (tmp_path / "etc" / file).read_text().splitlines())
        return {row[0]: row for row in rows}

    users, groups = entries("passwd"), entries("group")
    assert users[name][3] == groups["nflog"][2]
    assert users[name][6] in ("/usr/sbin/nologin", "/sbin/nologin")
