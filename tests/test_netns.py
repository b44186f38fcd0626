"""Groups in other network namespaces: nflogd.netns, GroupReader(netns=...), the daemon with ``netns:``.

The layout of the daemon tests: namespace A is where the traffic (and the log rule) is, the daemon
runs in namespace B and captures A's group through ``netns: A``; B itself binds nothing for it.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from daemonutil import NflogdProcess, packet_count, receive
from nsutil import NetNS

from nflogd import netns as nsmod
from nflogd.capture import GroupReader
from nflogd.config import GroupConfig
from nflogd.errors import GroupBusy, NamespaceError, NflogdError

pytestmark = pytest.mark.timeout(60)


def own_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def bound_groups(ns) -> set[int]:
    out = ns.run("cat", "/proc/net/netfilter/nfnetlink_log").stdout
    return {int(line.split()[0]) for line in out.splitlines() if line.strip()}


@pytest.fixture
def other():
    """A second namespace, for the daemon to run in."""
    ns = NetNS("nflb")
    try:
        yield ns
    finally:
        ns.close()


# -- nflogd.netns -----------------------------------------------------------------


@pytest.mark.kernel
def test_entered_by_name_and_by_path_and_back(netns):
    home = own_netns()
    target = os.stat(netns.path)
    with netns.entered():  # the test helper's way in agrees on what "inside" is
        inside = own_netns()
    for spec in (netns.name, netns.path):
        with nsmod.entered(spec) as ident:
            assert own_netns() == inside == target.st_ino
            assert ident == (target.st_dev, target.st_ino) == nsmod.identity(spec)
        assert own_netns() == home
    with nsmod.entered(None) as ident:
        assert ident is None and own_netns() == home


@pytest.mark.kernel
def test_body_raising_still_returns(netns):
    home = own_netns()
    with pytest.raises(KeyError):
        with nsmod.entered(netns.name):
            raise KeyError("x")
    assert own_netns() == home


@pytest.mark.parametrize(
    ("spec", "err", "text"),
    [
        ("nflt-no-such-ns", errno.ENOENT,
         "netns 'nflt-no-such-ns' (/run/netns/nflt-no-such-ns): no such network namespace"),
        ("/proc/self/ns/uts", errno.EINVAL, "netns '/proc/self/ns/uts': not a network namespace"),
        ("/etc/hostname", errno.EINVAL, "netns '/etc/hostname': not a network namespace"),
    ],
)  # fmt: skip
def test_errors_name_the_namespace(spec, err, text):
    home = own_netns()
    with pytest.raises(NamespaceError) as info:
        with nsmod.entered(spec):
            pytest.fail("entered")
    assert (info.value.errno, str(info.value), info.value.netns) == (err, text, spec)
    assert isinstance(info.value, NflogdError) and isinstance(info.value, OSError)
    assert own_netns() == home


@pytest.mark.kernel
def test_entering_needs_cap_sys_admin(netns):
    """Without CAP_SYS_ADMIN (here: root with only CAP_NET_ADMIN), the error says what is missing."""
    code = (
        "from nflogd import netns\n"
        "try:\n"
        f"    netns.entered({netns.name!r}).__enter__()\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    res = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all,+net_admin", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert res.stdout.strip() == (
        f"NamespaceError netns {netns.name!r} ({netns.path}): "
        "entering a network namespace needs CAP_SYS_ADMIN"
    ), res.stderr


# -- GroupReader ------------------------------------------------------------------


@pytest.mark.kernel
def test_reader_opens_in_the_namespace_and_the_thread_comes_back(netns):
    netns.log_rule(7, match="udp dport 9999")
    home = own_netns()
    with GroupReader(GroupConfig(group=7, netns=netns.name)) as reader:
        assert own_netns() == home
        assert reader.netns_id == nsmod.identity(netns.name)
        assert bound_groups(netns) == {7}
        netns.send_udp([b"over there"])
        batch = reader.read(5.0)
        assert batch is not None and batch.packets()[0].data[28:] == b"over there"
    assert bound_groups(netns) == set()


@pytest.mark.kernel
def test_busy_group_in_the_namespace_comes_back_too(netns):
    home = own_netns()
    with GroupReader(GroupConfig(group=8, netns=netns.path)):
        with pytest.raises(GroupBusy, match="group 8 is already bound by netlink port"):
            GroupReader(GroupConfig(group=8, netns=netns.path))
        assert own_netns() == home


# -- the daemon -------------------------------------------------------------------


@pytest.mark.kernel
def test_daemon_captures_a_group_of_another_namespace(netns, other, tmp_path, ctx):
    """Daemon in B; group 3 in A through ``netns``, group 4 in B. A's packets arrive, B binds only 4."""
    netns.log_rule(3, match="udp dport 9999")
    other.log_rule(4, match="udp dport 9999")
    groups = [{"group": 3, "netns": netns.name}, 4]
    with NflogdProcess(other, tmp_path, groups=groups) as d:
        assert d.ready_msg["STATUS"] == f"capturing groups 3 (netns {netns.name}), 4"
        assert (bound_groups(netns), bound_groups(other)) == ({3}, {4})
        sub = d.subscribe(ctx)
        netns.send_udp([b"in A"])
        other.send_udp([b"in B"])
        batches = receive(sub, lambda bs: packet_count(bs) >= 2)
        got = {b.group: b.packets[0].data[28:] for b in batches}
        assert got == {3: b"in A", 4: b"in B"}
        assert d.metric("nflogd_packets_total", group="3") == 1

        # The container restarts: the same name, a new namespace. Once running, the daemon holds
        # CAP_NET_ADMIN at most even as root (docs/security.md), so it cannot follow: a reload
        # still applies the rest, warns, and keeps group 3 where it was; a restart follows.
        subprocess.run(["ip", "netns", "del", netns.name], check=True)
        subprocess.run(["ip", "netns", "add", netns.name], check=True)
        netns.run("ip", "link", "set", "lo", "up")
        netns.log_rule(3, match="udp dport 9999")
        d.write_config(d.make_config(groups=[*groups, 5]))
        assert "failed" not in d.reload()["STATUS"]
        assert f"group 3: netns {netns.name!r} now names another namespace" in d.stderr
        assert (bound_groups(netns), bound_groups(other)) == (set(), {4, 5})
        # Asking for another namespace in the config is refused as a whole, saying why.
        d.write_config(d.make_config(groups=[{"group": 3, "netns": other.path}, 4]))
        assert d.reload()["STATUS"].endswith(
            f"last reload failed: group 3: netns {other.path!r}: entering a network namespace needs "
            "CAP_SYS_ADMIN (not held after start: restart nflogd to open this group)"
        )
        assert bound_groups(other) == {4, 5}
        sub.close(linger=0)
        d.write_config(d.make_config(groups=groups))
        d.stop()
        d.start()
        assert bound_groups(netns) == {3}
        sub = d.subscribe(ctx)
        netns.send_udp([b"in the new A"])
        batches = receive(sub, lambda bs: packet_count(bs) >= 1)
        assert [b.packets[0].data[28:] for b in batches] == [b"in the new A"]
        sub.close(linger=0)
    assert d.returncode == 0
    assert (bound_groups(netns), bound_groups(other)) == (set(), set())


@pytest.mark.kernel
def test_container_by_attached_name_and_by_proc_path(other, tmp_path, ctx):
    """docs/operations.md's container recipe: ``ip netns attach NAME PID``, or /proc/PID/ns/net."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    ctr = NetNS.__new__(NetNS)  # the helper's commands, on a namespace it did not make
    ctr.name = f"nflc-{os.getpid()}-{proc.pid}"
    ctr.path = f"/run/netns/{ctr.name}"
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{proc.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "unshare did not make its namespace"
            time.sleep(0.01)
        subprocess.run(["ip", "netns", "attach", ctr.name, str(proc.pid)], check=True)
        ctr.run("ip", "link", "set", "lo", "up")
        ctr.log_rule(6, match="udp dport 9999")
        ctr.log_rule(7, match="udp dport 9999")
        groups = [{"group": 6, "netns": ctr.name}, {"group": 7, "netns": f"/proc/{proc.pid}/ns/net"}]
        with NflogdProcess(other, tmp_path, groups=groups) as d:
            sub = d.subscribe(ctx)
            ctr.send_udp([b"from the container"])
            batches = receive(sub, lambda bs: packet_count(bs) >= 2)
            assert sorted((b.group, b.packets[0].data[28:]) for b in batches) == [
                (6, b"from the container"),
                (7, b"from the container"),
            ]
            sub.close(linger=0)
        assert bound_groups(other) == set()
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["ip", "netns", "del", ctr.name], check=False, capture_output=True)


@pytest.mark.kernel
def test_missing_namespace_at_start_is_one_line(other, tmp_path):
    d = NflogdProcess(other, tmp_path, groups=[1, {"group": 3, "netns": "nflt-not-there"}])
    assert d.run_to_exit() == 1
    lines = [line for line in d.stderr.splitlines() if line.startswith("nflogd: ")]
    assert lines == [
        "nflogd: group 3: netns 'nflt-not-there' (/run/netns/nflt-not-there): no such network namespace"
    ]
    assert "Traceback" not in d.stderr


@pytest.mark.kernel
def test_service_user_with_cap_sys_admin_at_start(netns, other, monkeypatch):
    """The systemd unit with docs/operations.md's netns drop-in, emulated with setpriv: user
    nobody, ambient CAP_NET_ADMIN and CAP_SYS_ADMIN. The group opens in A; then CAP_NET_ADMIN alone."""
    import daemonutil

    netns.log_rule(3, match="udp dport 9999")
    caps = "+net_admin,+sys_admin"
    setpriv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", f"--inh-caps=-all,{caps}",
               f"--ambient-caps={caps}", f"--bounding-set=-all,{caps}", "--"]  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="nflogd-unit-", dir="/tmp"))
    try:
        # nobody runs a copy: the checkout may be under a directory only root can enter
        runtime, env = daemonutil.readable_runtime(workdir / "runtime")
        monkeypatch.setattr(daemonutil, "nflogd_command", lambda: [*setpriv, *runtime])
        os.chmod(workdir, 0o755)
        os.chown(workdir, 65534, 65534)
        groups = [{"group": 3, "netns": netns.name}]
        with NflogdProcess(other, workdir, groups=groups, env=env, cwd=workdir) as d:
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{d.pid}/status").read_text().splitlines()
            )
            assert status["Uid"].split() == ["65534"] * 4
            assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 1 << 12
            assert int(status["CapAmb"], 16) & ~(1 << 12) == 0
            assert bound_groups(netns) == {3}
        assert d.returncode == 0, d.stderr
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.kernel
def test_dropped_user_keeps_namespace_groups_but_cannot_add_one(netns, other, ctx):
    """user: nobody: groups with netns are opened as root at start; after the drop (CAP_NET_ADMIN
    only) a reload that would enter a namespace fails, saying why, and the rest keeps running."""
    netns.log_rule(3, match="udp dport 9999")
    workdir = Path(tempfile.mkdtemp(prefix="nflogd-netns-", dir="/tmp"))
    try:
        os.chmod(workdir, 0o755)
        groups = [{"group": 3, "netns": netns.name}]
        with NflogdProcess(other, workdir, groups=groups, extra={"user": "nobody"}) as d:
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{d.pid}/status").read_text().splitlines()
            )
            assert int(status["CapEff"], 16) == 1 << 12  # CAP_NET_ADMIN alone
            d.write_config(
                d.make_config(groups=[*groups, {"group": 5, "netns": netns.name}]) | {"user": "nobody"}
            )
            os.chmod(d.config_path, 0o644)
            status = d.reload()["STATUS"]
            assert status.endswith(
                f"last reload failed: group 5: netns {netns.name!r} ({netns.path}): entering a network "
                "namespace needs CAP_SYS_ADMIN (not held after start: restart nflogd to open this group)"
            ), status
            assert bound_groups(netns) == {3}
            # Retuning a namespace group needs no setns: its socket is already there.
            d.write_config(
                d.make_config(groups=[{"group": 3, "netns": netns.name, "copy_range": 30}])
                | {"user": "nobody"}
            )
            assert "failed" not in d.reload()["STATUS"]
            sub = d.subscribe(ctx)
            netns.send_udp([b"still here"])
            (batch,) = receive(sub, lambda bs: packet_count(bs) >= 1)
            (pkt,) = batch.packets
            assert (batch.group, pkt.caplen, pkt.len, pkt.data[28:]) == (3, 30, 38, b"st")
            sub.close(linger=0)
        assert d.returncode == 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
