"""What every command has: --version from one source, --check says ok, log lines with a time
outside the journal, --log-file; and `make run` installs only what running needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nflogd_client
import pytest
from daemonutil import REPO, NflogdProcess
from test_tap import tap_command

import nflogd

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent
VERSION = (REPO / "client" / "nflogd_client" / "VERSION").read_text().strip()


def test_one_version_for_both_packages():
    import importlib.metadata

    assert nflogd.__version__ == nflogd_client.__version__ == VERSION
    assert importlib.metadata.version("nflogd") == importlib.metadata.version("nflogd-client") == VERSION


@pytest.mark.parametrize("command", ["nflogd", "nflogd-relay", "nflogd-keygen", "nflog-tap", "nflogd-extcap"])
def test_every_command_has_version(command):
    cmd = tap_command() if command == "nflog-tap" else [str(BIN / command)]
    r = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{command} {VERSION}\n", "")


@pytest.mark.parametrize(
    "command, config", [("nflogd", "etc/nflogd.yaml"), ("nflogd-relay", "etc/nflogd-relay.yaml")]
)
def test_check_says_ok(command, config):
    r = subprocess.run(
        [str(BIN / command), "--check", "-c", str(REPO / config)], capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", "")


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}"


@pytest.mark.kernel
def test_log_lines_carry_a_time_outside_the_journal(netns, tmp_path):
    with NflogdProcess(netns, tmp_path, groups=[1]) as d:
        pass
    lines = [line for line in d.stderr.splitlines() if line]
    assert lines and all(re.match(rf"^{STAMP} (DEBUG|INFO|WARNING|ERROR): ", line) for line in lines), lines


@pytest.mark.kernel
def test_log_file(netns, tmp_path):
    log = tmp_path / "nflogd.log"
    with NflogdProcess(netns, tmp_path, groups=[1], args=("--log-file", str(log))) as d:
        pass
    assert d.stderr == ""
    text = log.read_text()
    assert re.search(rf"^{STAMP} INFO: stopped$", text, re.M), text


def test_log_file_that_cannot_be_opened_is_one_line():
    r = subprocess.run(
        [
            str(BIN / "nflogd"),
            "--log-file",
            "/nonexistent/dir/x.log",
            "-c",
            str(REPO / "etc" / "nflogd.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr == "nflogd: --log-file: /nonexistent/dir/x.log: No such file or directory\n"


def test_make_run_installs_only_what_running_needs():
    r = subprocess.run(["make", "-n", "-B", "run"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for tool in ("pytest", "ruff", "hypothesis", "prometheus", "tshark", "tcpdump"):
        assert tool not in r.stdout, f"make run installs {tool}:\n{r.stdout}"
    assert "libnetfilter-log-dev" in r.stdout and "-e ./client -e ." in r.stdout
    t = subprocess.run(["make", "-n", "-B", "deps"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert all(tool in t.stdout for tool in ("pytest", "ruff", "hypothesis", "prometheus", "tshark"))


def test_make_extcap_install_installs_only_what_running_needs():
    r = subprocess.run(
        ["make", "-n", "-B", "extcap-install"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    for tool in ("pytest", "ruff", "mypy", "hypothesis", "jetstream", "prometheus", "nats-server"):
        assert tool not in r.stdout, f"make extcap-install installs {tool}:\n{r.stdout}"
    assert "-e ./client -e ." in r.stdout and "nflogd-extcap --install" in r.stdout


@pytest.mark.kernel
def test_make_run_leaves_the_packages_access_model(netns, tmp_path):
    """make run as root without systemd: /run/nflogd root:nflog 0750, the socket 0660, as the
    package has them, so a user in group nflog reads the feed and one outside does not. /run
    and /etc are the test's own (a tmpfs, an overlay): the group is made there."""
    import signal
    import time

    config = tmp_path / "nflogd.yaml"
    config.write_text(
        "groups: [1]\npublish: {bind: ['ipc:///run/nflogd/feed.sock']}\nmetrics: {listen: null}\n"
    )
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    setup = (
        "mount --make-rprivate / && mount -t tmpfs -o mode=755 tmpfs /run && "
        "mount -t overlay overlay -o "
        f"lowerdir=/etc,upperdir={tmp_path}/upper,workdir={tmp_path}/work /etc && "
        'exec "$@"'
    )
    p = netns.popen(
        "unshare", "-m", "sh", "-c", setup, "sh", "make", "-s", "-C", str(REPO), "run", f"CONFIG={config}",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        sock = f"/proc/{p.pid}/root/run/nflogd/feed.sock"
        deadline = time.monotonic() + 60
        while not Path(sock).exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "no feed socket from make run"
            time.sleep(0.1)
        root = Path(f"/proc/{p.pid}/root")
        group = subprocess.run(
            ["chroot", str(root), "getent", "group", "nflog"], capture_output=True, text=True, timeout=10
        ).stdout.split(":")
        assert group[0] == "nflog", group
        run_dir, feed = (root / "run/nflogd").stat(), Path(sock).stat()
        assert (run_dir.st_uid, run_dir.st_gid, oct(run_dir.st_mode & 0o7777)) == (0, int(group[2]), "0o750")
        assert (feed.st_uid, feed.st_gid, oct(feed.st_mode & 0o777)) == (0, int(group[2]), "0o660")
        connect = (
            "import socket; socket.socket(socket.AF_UNIX).connect('/run/nflogd/feed.sock'); print('read')"
        )

        def reader(*groups: str) -> subprocess.CompletedProcess:
            who = ["setpriv", "--reuid=65534", "--regid=65534", *groups, "/usr/bin/python3", "-c", connect]
            return subprocess.run(
                ["nsenter", "-t", str(p.pid), "-m", "-n", "--", *who],
                capture_output=True,
                text=True,
                timeout=30,
            )

        ok = reader("--groups=nflog")
        assert ok.stdout == "read\n", ok.stderr
        assert "PermissionError" in reader("--clear-groups").stderr
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    assert "Traceback" not in err and "ERROR" not in err, err
