"""contrib/: the Prometheus alert rules and the Grafana dashboard.

Checked three ways: promtool parses the rules, the example config and (as recording rules) the
dashboard's queries, and runs the alerts against made-up series (skipped without promtool;
``make deps`` puts it in the venv); every metric and label the queries name is one a real
nflogd exports, scraped from a daemon rather than listed here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from daemonutil import REPO, NflogdProcess

pytestmark = pytest.mark.timeout(60)

RULES = REPO / "contrib" / "prometheus" / "nflogd.rules.yml"
PROM_CONFIG = REPO / "contrib" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "nflogd.json"

#: Series Prometheus makes itself for every scrape target, and the labels it adds.
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"job", "instance"}


def promtool() -> str:
    exe = REPO / ".venv" / "bin" / "promtool"
    found = str(exe) if exe.exists() else shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (make deps unpacks it from Debian's prometheus package)")
    return found


def run_promtool(*args: str) -> str:
    res = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


# -- reading the files ------------------------------------------------------------


def rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus would get it: Grafana's variables filled in."""
    return expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$instance", ".*")


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan"}  # fmt: skip


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses."""
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    labels: set[str] = set()

    def matchers(m: re.Match) -> str:
        labels.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(1)))
        return " "

    def grouping(m: re.Match) -> str:
        labels.update(re.findall(r"[A-Za-z_]\w*", m.group(2)))
        return " "

    e = re.sub(r"\{([^}]*)\}", matchers, e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", grouping, e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\boffset\s+\w+", " ", e)
    names = set(re.findall(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", e)) - _KEYWORDS
    return names, labels


def test_promql_names_reads_what_it_should():
    names, labels = promql_names(
        'sum by (instance, group) (rate(nflogd_packets_total{job="nflogd", x=~"a{b}"}[5m] offset 1m)) '
        "/ on(group) group_left(version) nflogd_build_info > 1e3 and up == 0.5"
    )
    assert names == {"nflogd_packets_total", "nflogd_build_info", "up"}
    assert labels == {"instance", "group", "job", "x", "version"}


# -- against a real daemon ----------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(sample names, label names) of a real daemon's /metrics with one group bound."""
    from nsutil import NetNS

    ns = NetNS()
    try:
        with NflogdProcess(ns, tmp_path_factory.mktemp("daemon"), groups=[1]) as d:
            samples = d.scrape()
    finally:
        ns.close()
    names = {name for name, _ in samples}
    labels = {k for _, lbls in samples for k, _ in lbls}
    assert "nflogd_packets_total" in names and "group" in labels  # the scrape did see a group
    return names, labels


def used_names() -> dict[str, tuple[set[str], set[str]]]:
    out = {f"rule {r['alert']}": promql_names(r["expr"]) for r in rules()}
    for p in dashboard()["panels"]:
        for t in p.get("targets", []):
            out[f"panel {p['title']!r} {t['refId']}"] = promql_names(grafana_to_promql(t["expr"]))
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["definition"])
            assert m, v["definition"]
            names, labels = promql_names(m.group(1))
            out[f"variable {v['name']}"] = (names, labels | {m.group(2)})
    return out


@pytest.mark.kernel
def test_every_metric_and_label_used_is_exported(exported):
    names, labels = exported
    for where, (used, used_labels) in used_names().items():
        assert used, f"{where}: no metric found in its query"
        assert used <= names | PROMETHEUS_SERIES, f"{where}: not exported: {used - names - PROMETHEUS_SERIES}"
        unknown = used_labels - labels - TARGET_LABELS
        assert not unknown, f"{where}: no such label: {unknown}"


@pytest.mark.kernel
def test_alert_annotations_name_labels_the_alert_has(exported):
    _, labels = exported
    for r in rules():
        kept = labels | TARGET_LABELS  # a plain selector keeps every label of its series
        grouped = re.findall(r"\bby\s*\(([^)]*)\)", r["expr"])
        for by in grouped:  # an aggregation keeps only its "by" labels
            kept = kept & set(re.findall(r"\w+", by))
        text = " ".join(r.get("annotations", {}).values())
        for label in re.findall(r"\$labels\.(\w+)", text):
            assert label in kept, f"{r['alert']}: $labels.{label} is not a label of its alerts"


# -- the rules and the dashboard as files -------------------------------------------


def test_rules_cover_loss_no_subscribers_and_down():
    by_name = {r["alert"]: r for r in rules()}
    assert {"NflogdDown", "NflogdKernelLoss", "NflogdNoSubscribers"} <= set(by_name)
    for r in by_name.values():
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]


def test_dashboard_panels_and_variables():
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    titles = {p["title"] for p in d["panels"]}
    assert {"Packets/s per group", "Kernel loss per group (packets/s)", "Subscribers"} <= titles
    for p in d["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", t["expr"])) - {"__rate_interval", "__range"}
            assert used <= variables, f"{p['title']}: undefined {used - variables}"
    cells = set()  # no two panels on the same grid cell
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine


# -- promtool ----------------------------------------------------------------------


def test_promtool_checks_rules_and_config():
    assert "SUCCESS: 4 rules found" in run_promtool("check", "rules", str(RULES))
    assert "is valid prometheus config file syntax" in run_promtool("check", "config", str(PROM_CONFIG))


def test_promtool_parses_the_dashboard_queries(tmp_path):
    """promtool has no query linter; recording rules are parsed as PromQL, so they stand in."""
    exprs = [grafana_to_promql(e) for e in dashboard_exprs()]
    doc = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"nflogd:panel_query_{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(doc))
    assert f"SUCCESS: {len(exprs)} rules found" in run_promtool("check", "rules", str(path))


SERIES = """
- series: 'up{job="nflogd", instance="r1:9477"}'
  values: '1 1 0x28'
- series: 'up{job="nflogd", instance="r2:9477"}'
  values: '1x30'
- series: 'nflogd_packets_total{job="nflogd", instance="r2:9477", group="5"}'
  values: '0+1000x30'
- series: 'nflogd_kernel_dropped_packets_total{job="nflogd", instance="r2:9477", group="5"}'
  values: '0x5 50+50x24'
- series: 'nflogd_packets_total{job="nflogd", instance="r2:9477", group="6"}'
  values: '0+1000x30'
- series: 'nflogd_kernel_dropped_packets_total{job="nflogd", instance="r2:9477", group="6"}'
  values: '0x20 1+1x9'
- series: 'nflogd_subscribers{job="nflogd", instance="r2:9477"}'
  values: '1x5 0x25'
"""

R1 = {"job": "nflogd", "instance": "r1:9477"}
R2 = {"job": "nflogd", "instance": "r2:9477"}
EXPECT = [  # (minute, alert, [labels of each firing alert])
    (1, "NflogdDown", []),
    (3, "NflogdDown", []),  # pending for 2m
    (5, "NflogdDown", [R1 | {"severity": "critical"}]),
    (5, "NflogdKernelLoss", []),
    (10, "NflogdKernelLoss", []),  # loss from minute 6, pending for 5m
    (12, "NflogdKernelLoss", [{"instance": "r2:9477", "group": "5", "severity": "warning"}]),
    (12, "NflogdKernelLossHigh", [{"instance": "r2:9477", "group": "5", "severity": "critical"}]),
    # group 6 loses one packet in 1000 from minute 21: an alert, but not the one over 1%
    (
        28,
        "NflogdKernelLoss",
        [{"instance": "r2:9477", "group": g, "severity": "warning"} for g in ("5", "6")],
    ),
    (28, "NflogdKernelLossHigh", [{"instance": "r2:9477", "group": "5", "severity": "critical"}]),
    (15, "NflogdNoSubscribers", []),  # no subscriber from minute 6, pending for 15m
    (22, "NflogdNoSubscribers", [R2 | {"severity": "warning"}]),
]


def test_promtool_alerts_fire_when_they_should(tmp_path):
    """The rules' expressions, ``for`` and labels against made-up series. Annotations are taken out
    of the copy tested: promtool would compare their rendered text too."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_copy = tmp_path / "nflogd.rules.yml"
    rules_copy.write_text(yaml.safe_dump(doc))
    test = {
        "rule_files": [str(rules_copy)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": yaml.safe_load(SERIES),
            "alert_rule_test": [
                {"eval_time": f"{m}m", "alertname": name, "exp_alerts": [{"exp_labels": lb} for lb in firing]}
                for m, name, firing in EXPECT
            ],
        }],
    }  # fmt: skip
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    assert "SUCCESS" in run_promtool("test", "rules", str(path))
