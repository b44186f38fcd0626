"""nflogd's Debian packages under a real systemd 252: install, run, reload, watchdog, remove.

Each test builds on the one before (one container, file order): install starts the daemon,
the middle tests use it, the last ones remove and purge it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

CAP_NET_ADMIN = 1 << 12
FEED = "ipc:///run/nflogd/feed.sock"
RELAY_FEED = "ipc:///run/nflogd-relay/feed.sock"
HELPERS = "/usr/local/lib/nflogd-system-test"

# Run inside the container as a user: subscribe to ENDPOINT's GROUP, send UDP to 127.0.0.1:PORT
# (an nft rule logs it to the group) until a packet arrives: exit 0 and print it, or 3 after 8 s.
READ_FEED = """\
import socket, sys, time
from nflogd_client import Subscriber

endpoint, group, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with Subscriber(endpoint, groups=[group]) as sub:
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        out.sendto(b"system test", ("127.0.0.1", port))
        pkt = sub.recv(timeout=0.2)
        if pkt is not None:
            print(pkt.node, pkt.group, pkt.prefix, pkt.len)
            sys.exit(0)
sys.exit(3)
"""

SCRAPE = """\
import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode())
"""

RULES = """\
table inet systemtest {
    chain out {
        type filter hook output priority 0;
        udp dport 9005 log prefix "t5 " group 5
        udp dport 9007 log prefix "t7 " group 7
    }
}
"""


def wait_for(predicate, timeout: float, what: str, step: float = 0.2, machine=None):
    """predicate()'s first true value; on time-out, the failure shows the journal's end."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            journal = ""
            if machine is not None:
                journal = machine.run("journalctl", "-n", "30", "--no-pager", check=False).stdout
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{journal}")
        time.sleep(step)


def show(m, unit: str, prop: str) -> str:
    return m.run("systemctl", "show", "-P", prop, unit).stdout.strip()


def main_pid(m, unit: str) -> str:
    pid = show(m, unit, "MainPID")
    assert pid.isdigit() and pid != "0", f"{unit} has no main process"
    return pid


def status_word(m, unit: str) -> str:
    return m.run("systemctl", "is-active", unit, check=False).stdout.strip()


def proc_status(m, pid: str) -> dict[str, str]:
    text = m.run("cat", f"/proc/{pid}/status").stdout
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def metrics(m, port: int = 9477) -> str:
    return m.run("python3", f"{HELPERS}/scrape.py", str(port)).stdout


def sample(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def read_feed(m, user: str, endpoint: str, group: int, port: int):
    return m.run(
        "python3", f"{HELPERS}/read_feed.py", endpoint, str(group), str(port), user=user, check=False
    )


def write_config(m, groups_yaml: str) -> None:
    text = m.run("cat", "/etc/nflogd.yaml").stdout
    head, rest = text.split("\ngroups:\n", 1)
    tail = rest[re.search(r"^\S", rest, re.M).start() :]
    m.write("/etc/nflogd.yaml", f"{head}\ngroups:\n{groups_yaml}{tail}")


def test_install_enables_and_starts_nflogd_not_the_relay(machine, debs):
    m = machine
    res = m.run(
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        *[f"/debs/{d}" for d in debs],
        timeout=300,
    )
    assert "python3-prometheus-client" in res.stdout  # a Depends, resolved from Debian
    deps = ("python3-prometheus-client", "python3-zmq", "python3-scapy", "python3-yaml")
    versions = m.run("dpkg-query", "-W", "-f", "${Package} ${Version}\n", *deps).stdout
    assert "python3-prometheus-client 0.16" in versions and "python3-zmq 24." in versions, versions
    assert m.run("systemctl", "is-enabled", "nflogd").stdout.strip() == "enabled"
    wait_for(lambda: status_word(m, "nflogd") == "active", 30, "nflogd active", machine=m)
    assert show(m, "nflogd", "StatusText") == "capturing groups 0, 5"
    assert m.run("systemctl", "is-enabled", "nflogd-relay", check=False).stdout.strip() == "disabled"
    assert status_word(m, "nflogd-relay") == "inactive"
    conffiles = m.run("dpkg-query", "-W", "-f", "${Conffiles}", "nflogd").stdout
    assert "/etc/nflogd.yaml" in conffiles and "/etc/nflogd-relay.yaml" in conffiles
    for page in ("nflogd", "nflogd-relay", "nflogd-keygen", "nflog-tap", "nflogd-extcap"):
        m.run("test", "-s", f"/usr/share/man/man1/{page}.1.gz")
    for f in ("grafana/nflogd.json", "prometheus/nflogd.rules.yml"):
        m.run("test", "-s", f"/usr/share/nflogd/{f}")
    m.write(f"{HELPERS}/read_feed.py", READ_FEED)
    m.write(f"{HELPERS}/scrape.py", SCRAPE)
    m.write("/etc/nftables.d-test.nft", RULES)
    m.run("nft", "-f", "/etc/nftables.d-test.nft")
    m.run("useradd", "-m", "-G", "nflog", "alice")
    m.run("useradd", "-m", "mallory")


def test_main_process_is_nflogd_with_cap_net_admin_only(machine):
    m = machine
    st = proc_status(m, main_pid(m, "nflogd"))
    uid = m.run("id", "-u", "nflogd").stdout.strip()
    gid = m.run("getent", "group", "nflog").stdout.split(":")[2]
    assert st["Uid"].split() == [uid] * 4 and st["Gid"].split() == [gid] * 4
    for caps in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(st[caps], 16) == CAP_NET_ADMIN, (caps, st[caps])
    assert st["NoNewPrivs"] == "1"


def test_feed_reaches_group_nflog_only(machine):
    m = machine
    res = read_feed(m, "alice", FEED, 5, 9005)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:3] == ["router1", "5", "t5"]
    res = read_feed(m, "mallory", FEED, 5, 9005)
    assert res.returncode == 3, (res.stdout, res.stderr)  # connects to nothing: /run/nflogd is 0750
    assert m.run("test", "-r", "/run/nflogd/feed.sock", user="mallory", check=False).returncode != 0


SNIFF = """\
from scapy.all import sniff
from nflogd_client import ZMQNFLOGSocket

print(len(sniff(L2socket=ZMQNFLOGSocket, iface="nflog:5", timeout=3)))
"""

ANCESTOR = """\
from scapy.config import conf
import scapy_nflog

scapy_nflog.install_nflog_listener()
print(conf.L2listen is scapy_nflog.NFLOGListenSocket)
"""


def test_scapy_on_bookworms_scapy_says_why_and_installs_the_ancestors_listener(machine):
    """With the packages' scapy and pyzmq: sniff() tells a user outside group nflog what to do,
    and scapy_nflog.install_nflog_listener() sets conf.L2listen to NFLOGListenSocket itself."""
    m = machine
    res = m.run("python3", "-c", SNIFF, user="mallory", check=False)
    assert res.returncode == 0 and res.stdout == "0\n", res.stderr
    said = f"nflogd feed {FEED}: permission denied on /run/nflogd: join group nflog; retrying\n"
    assert res.stderr.count(said) == 1, res.stderr
    res = m.run("python3", "-c", ANCESTOR, check=False)
    assert res.returncode == 0 and res.stdout == "True\n", res.stderr


def test_metrics_answer(machine):
    text = metrics(machine)
    assert sample(text, "nflogd_packets_total", group="5") >= 1
    assert sample(text, "nflogd_build_info", version="0.1.0") == 1


def test_reload_adds_a_group_without_restart(machine):
    m = machine
    pid = main_pid(m, "nflogd")
    write_config(m, "  - 0\n  - 5\n  - 7\n")
    m.run("systemctl", "reload", "nflogd")
    wait_for(
        lambda: show(m, "nflogd", "StatusText") == "capturing groups 0, 5, 7", 15, "group 7 in the status"
    )
    assert main_pid(m, "nflogd") == pid and show(m, "nflogd", "NRestarts") == "0"
    res = read_feed(m, "alice", FEED, 7, 9007)
    assert res.returncode == 0 and res.stdout.split()[1:3] == ["7", "t7"], res


def test_bad_config_on_reload_keeps_the_running_one(machine):
    m = machine
    pid = main_pid(m, "nflogd")
    good = m.run("cat", "/etc/nflogd.yaml").stdout
    write_config(m, "  - 0\n  - group: 5\n    copy_range: 70000\n")
    m.run("systemctl", "reload", "nflogd")
    status = wait_for(lambda: "last reload failed" in (s := show(m, "nflogd", "StatusText")) and s, 15,
                      "the failed reload in the status")  # fmt: skip
    assert status.startswith("capturing groups 0, 5, 7; last reload failed: ") and "copy_range" in status
    assert status_word(m, "nflogd") == "active" and main_pid(m, "nflogd") == pid
    assert read_feed(m, "alice", FEED, 7, 9007).returncode == 0
    m.write("/etc/nflogd.yaml", good)


def test_sigstop_leads_to_a_watchdog_restart(machine):
    m = machine
    pid = main_pid(m, "nflogd")
    assert show(m, "nflogd", "WatchdogUSec") == "30s"
    m.run("sh", "-c", f"kill -STOP {pid}")
    wait_for(lambda: show(m, "nflogd", "NRestarts") == "1", 60, "the watchdog restart", step=1, machine=m)
    wait_for(lambda: status_word(m, "nflogd") == "active", 30, "nflogd active again", machine=m)
    assert main_pid(m, "nflogd") != pid
    journal = m.run("journalctl", "-u", "nflogd", "--no-pager", "-o", "cat").stdout
    assert "Watchdog timeout" in journal, journal[-2000:]
    assert read_feed(m, "alice", FEED, 7, 9007).returncode == 0  # the edited config came back


def test_kill_9_leads_to_a_restart(machine):
    m = machine
    pid = main_pid(m, "nflogd")
    m.run("sh", "-c", f"kill -9 {pid}")
    wait_for(lambda: show(m, "nflogd", "NRestarts") == "2", 30, "the restart after kill -9", machine=m)
    wait_for(lambda: status_word(m, "nflogd") == "active", 30, "nflogd active again", machine=m)
    assert main_pid(m, "nflogd") != pid


def test_relay_started_by_hand_relays_the_feed(machine):
    m = machine
    text = m.run("cat", "/etc/nflogd-relay.yaml").stdout
    assert "not enabled" in text  # the config says why the package leaves it off
    m.write(
        "/etc/nflogd-relay.yaml", re.sub(r"(?ms)^upstreams:\n.*?\n(?=\S)", f"upstreams:\n  - {FEED}\n", text)
    )
    m.run("nflogd-relay", "--check", "-c", "/etc/nflogd-relay.yaml")
    m.run("systemctl", "start", "nflogd-relay")
    wait_for(lambda: status_word(m, "nflogd-relay") == "active", 30, "nflogd-relay active", machine=m)
    st = proc_status(m, main_pid(m, "nflogd-relay"))
    assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
    res = read_feed(m, "alice", RELAY_FEED, 5, 9005)
    assert res.returncode == 0 and res.stdout.split()[:2] == ["router1", "5"], res
    assert sample(metrics(m, 9478), "nflogd_relay_build_info", version="0.1.0") == 1


def repack(deb: Path, dest: Path, old: str, new: str) -> str:
    """``deb`` as version ``new`` (the same files) in ``dest``: a real upgrade to install."""
    tree = dest / f"{deb.name}.d"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    text = control.read_text().replace(f"Version: {old}\n", f"Version: {new}\n")
    control.write_text(text.replace(f"(= {old})", f"(= {new})"))
    name = deb.name.replace(f"_{old}_", f"_{new}_")
    subprocess.run(["dpkg-deb", "-b", str(tree), str(dest / name)], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    return name


def test_upgrade_restarts_both_and_keeps_the_edited_config(machine, debs):
    m = machine
    old = debs[0].split("_")[1]
    new = f"{old}+systemtest1"
    dest = m.root / "root" / "upgrade"
    dest.mkdir(parents=True)
    upgrade = [f"/root/upgrade/{repack(m.debs / d, dest, old, new)}" for d in debs]
    pids = {unit: main_pid(m, unit) for unit in ("nflogd", "nflogd-relay")}
    edited = m.run("cat", "/etc/nflogd.yaml").stdout
    m.run("apt-get", "install", "-y", "-q", "--no-install-recommends", *upgrade, timeout=300)
    assert m.run("dpkg-query", "-W", "-f", "${Version}", "nflogd").stdout == new

    def restarted(unit):
        return status_word(m, unit) == "active" and show(m, unit, "MainPID") not in (pids[unit], "0")

    for unit in pids:
        wait_for(lambda u=unit: restarted(u), 30, f"{unit} restarted by the upgrade", machine=m)
    assert m.run("cat", "/etc/nflogd.yaml").stdout == edited
    assert show(m, "nflogd", "StatusText") == "capturing groups 0, 5, 7"
    assert m.run("systemctl", "is-enabled", "nflogd-relay", check=False).stdout.strip() == "disabled"


def test_remove_stops_and_purge_removes_config_and_keys(machine):
    m = machine
    m.run("nflogd-keygen", "/etc/nflogd/curve", "server")
    m.run("test", "-s", "/etc/nflogd/curve/server.key_secret")
    m.run("apt-get", "remove", "-y", "-q", "nflogd", timeout=300)
    assert status_word(m, "nflogd") in ("inactive", "unknown")
    assert status_word(m, "nflogd-relay") in ("inactive", "unknown")
    procs = m.run("sh", "-c", "cat /proc/[0-9]*/comm").stdout.split()
    assert not {"nflogd", "nflogd-relay"} & set(procs), procs
    m.run("test", "-f", "/etc/nflogd.yaml")  # remove keeps the config
    m.run("apt-get", "purge", "-y", "-q", "nflogd", timeout=300)
    for path in ("/etc/nflogd.yaml", "/etc/nflogd-relay.yaml", "/etc/nflogd"):
        assert m.run("test", "-e", path, check=False).returncode != 0, f"{path} left after purge"
    assert m.run("systemctl", "is-enabled", "nflogd", check=False).stdout.strip() != "enabled"
