"""docs/operations.md holds: its rules load and behave as it says, its snippets are valid, its
tables match what the daemon and contrib/ really have."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest
import yaml
from daemonutil import NFLOGD, REPO, NflogdProcess
from nflogd_client import Subscriber

from nflogd import config
from nflogd.capture import GroupReader
from nflogd.config import GroupConfig

pytestmark = pytest.mark.timeout(60)

DOC = (REPO / "docs" / "operations.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, re.S)


def commands(prefixes: tuple[str, ...]) -> list[str]:
    return [line for b in blocks("sh") for line in b.splitlines() if line.startswith(prefixes)]


def table(heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading``, cells stripped, header and rule left out."""
    lines = DOC.split(f"\n## {heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[2:]


def need(exe: str) -> None:
    if shutil.which(exe) is None:
        pytest.skip(f"{exe} is not installed (make debs installs it)")


# -- firewall rules ---------------------------------------------------------------


@pytest.mark.kernel
def test_nft_rules_load(netns):
    lines = commands(("nft ",))
    assert len(lines) >= 9
    for line in lines:
        res = netns.run("sh", "-c", line, check=False)
        assert res.returncode == 0, f"{line}: {res.stderr}"
    ruleset = netns.run("nft", "list", "ruleset").stdout
    for expect in (
        "ct state new log group 1",
        'log prefix "in-drop " group 2 snaplen 128',
        "limit rate 2000/second log group 3 snaplen 64 queue-threshold 64",
        'udp dport 53 log prefix "dns " group 4 snaplen 512',
    ):
        assert expect in ruleset, ruleset


@pytest.mark.kernel
def test_iptables_rules_load(netns):
    need("iptables")
    lines = commands(("iptables ", "ip6tables "))
    assert len(lines) >= 5
    for line in lines:
        res = netns.run("sh", "-c", line, check=False)
        assert res.returncode == 0 and not res.stderr, f"{line}: {res.stderr}"
    v4 = netns.run("iptables", "-S").stdout
    v6 = netns.run("ip6tables", "-S").stdout
    assert v4.count("-j NFLOG") == 4 and v6.count("-j NFLOG") == 1
    assert '-j NFLOG --nflog-prefix "in-drop " --nflog-group 2 --nflog-size 128' in v4, v4
    assert "--nflog-group 3 --nflog-size 64 --nflog-threshold 64" in v4


@pytest.mark.kernel
def test_nflog_range_does_nothing(netns):
    """The doc says to write --nflog-size: iptables warns about --nflog-range and drops it."""
    need("iptables")
    res = netns.run("iptables", "-A", "OUTPUT", "-j", "NFLOG", "--nflog-group", "9", "--nflog-range", "256")
    assert "--nflog-range has never worked" in res.stderr
    rule = [line for line in netns.run("iptables", "-S").stdout.splitlines() if "NFLOG" in line]
    assert rule == ["-A OUTPUT -j NFLOG --nflog-group 9"]


def add_rule(netns, tool: str, group: int, port: int, size: int | None = None, threshold: int | None = None):
    if tool == "nft":
        extra = (f" snaplen {size}" if size else "") + (f" queue-threshold {threshold}" if threshold else "")
        netns.log_rule(group, match=f"udp dport {port}", extra=extra)
    else:
        cmd = ["iptables", "-A", "OUTPUT", "-p", "udp", "--dport", str(port), "-j", "NFLOG",
               "--nflog-group", str(group)]  # fmt: skip
        if size:
            cmd += ["--nflog-size", str(size)]
        if threshold:
            cmd += ["--nflog-threshold", str(threshold)]
        netns.run(*cmd)


@pytest.mark.kernel
@pytest.mark.parametrize("tool", ["nft", "iptables"])
def test_rule_and_group_settings_meet_as_documented(netns, tool):
    """Bytes copied and batch size: the smaller of the rule's and the group's."""
    if tool == "iptables":
        need("iptables")
    add_rule(netns, tool, 1, 9001, size=100)
    add_rule(netns, tool, 2, 9002, size=100)
    add_rule(netns, tool, 3, 9003, threshold=1)
    add_rule(netns, tool, 4, 9004)
    slow = {"queue_threshold": 100, "flush_ms": 60_000}
    readers = {
        1: GroupReader(GroupConfig(1, copy_range=1000, netns=netns.name)),
        2: GroupReader(GroupConfig(2, copy_range=50, netns=netns.name)),
        3: GroupReader(GroupConfig(3, **slow, netns=netns.name)),
        4: GroupReader(GroupConfig(4, **slow, netns=netns.name)),
    }
    try:
        for port in (9001, 9002, 9003, 9004):
            netns.send_udp([b"x" * 500], port=port)
        caplen = {g: [(p.caplen, p.len) for p in readers[g].read(2.0).packets()] for g in (1, 2)}
        assert caplen == {1: [(100, 528)], 2: [(50, 528)]}
        start = time.monotonic()
        assert readers[3].read(2.0).count == 1  # the rule's threshold of 1: sent at once
        assert time.monotonic() - start < 1.0
        assert readers[4].read(0.5) is None  # the group's 100 packets or 60 s: not yet
    finally:
        for r in readers.values():
            r.close()


# -- snippets ---------------------------------------------------------------------


def test_config_snippets_parse():
    snippets = [b for b in blocks("yaml") if b.startswith("groups:")]
    assert len(snippets) == 3
    for text in snippets:
        config.parse(text, source="docs/operations.md")


def test_prometheus_snippet_is_valid(tmp_path):
    from test_contrib import RULES, run_promtool

    (snippet,) = [b for b in blocks("yaml") if "scrape_configs:" in b]
    assert "/etc/prometheus/nflogd.rules.yml" in snippet
    path = tmp_path / "prometheus.yml"
    path.write_text(snippet.replace("/etc/prometheus/nflogd.rules.yml", str(RULES)))
    assert "SUCCESS" in run_promtool("check", "config", str(path))


def test_systemd_dropins_verify(tmp_path):
    """Each ```ini block names its drop-in file; systemd-analyze verify reads them with the unit."""
    need("systemd-analyze")
    if not NFLOGD.exists():
        pytest.skip(f"{NFLOGD} is not installed; verify checks that ExecStart exists")
    dropins = {}
    for b in blocks("ini"):
        first = b.splitlines()[0]
        m = re.fullmatch(r"# /etc/systemd/system/nflogd\.service\.d/([\w-]+\.conf)", first)
        assert m, first
        dropins[m.group(1)] = b
    assert set(dropins) == {"venv.conf", "netns.conf"}
    text = (REPO / "systemd" / "nflogd.service").read_text()
    (tmp_path / "nflogd.service").write_text(text.replace("/usr/bin/nflogd ", f"{NFLOGD} ", 1))
    d = tmp_path / "nflogd.service.d"
    d.mkdir()
    for name, body in dropins.items():
        (d / name).write_text(body.replace("/opt/nflogd/bin/nflogd ", f"{NFLOGD} "))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "nflogd.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [line for line in res.stderr.splitlines() if "nflogd" in line]
    assert res.returncode == 0 and not complaints, res.stderr
    netns_conf = dropins["netns.conf"]
    assert "CAP_SYS_ADMIN" in netns_conf and "RestrictNamespaces=net" in netns_conf


# -- tables -----------------------------------------------------------------------


@pytest.mark.kernel
def test_metrics_table_is_what_the_daemon_exports(netns, tmp_path):
    documented = {}
    for row in table("Metrics"):
        m = re.fullmatch(r"`(\w+)(?:\{([\w, ]*)\})?`", row[0])
        assert m, row[0]
        documented[m.group(1)] = set(filter(None, (x.strip() for x in (m.group(2) or "").split(","))))
    with NflogdProcess(netns, tmp_path, groups=[1]) as d:
        with Subscriber(d.endpoint, groups=[1], filter="udp") as sub:  # a filter's metrics exist while in use
            while sub.filter_state == "pending":
                sub.recv(timeout=0.05)
            samples = d.scrape()
    exported: dict[str, set[str]] = {}
    for name, labels in samples:
        exported.setdefault(name, set()).update(k for k, _ in labels)
    assert documented == exported


def test_alerts_table_is_the_rules_file():
    from test_contrib import rules

    documented = {row[0].strip("`"): row[2] for row in table("Alerts and dashboard")}
    assert documented == {r["alert"]: r["labels"]["severity"] for r in rules()}


def test_links_exist():
    for target in re.findall(r"\]\((\.\./[^)]+)\)", DOC):
        assert (REPO / "docs" / target).resolve().exists(), target


def test_doc_yaml_blocks_are_yaml():
    for b in blocks("yaml"):
        yaml.safe_load(b)
