"""The metrics collector on a fresh registry, and its HTTP server."""

from __future__ import annotations

import http.client
import socket
import time

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from nflogd import __version__
from nflogd.capture import GroupCounters
from nflogd.errors import NflogdError
from nflogd.metrics import DaemonCollector, MetricsServer, version

pytestmark = pytest.mark.timeout(30)


def counters(**values) -> GroupCounters:
    c = GroupCounters()
    for k, v in values.items():
        setattr(c, k, v)
    return c


@pytest.fixture
def registry():
    return CollectorRegistry()


def test_values_come_from_live_counters(registry):
    groups = {1: counters(packets=10, bytes=1500, truncated=2, kernel_dropped=3, overflows=1), 7: counters()}
    subs = [2]
    DaemonCollector(lambda: groups.items(), lambda: subs[0], build_version="9.9", registry=registry)
    get = registry.get_sample_value
    assert get("nflogd_packets_total", {"group": "1"}) == 10
    assert get("nflogd_bytes_total", {"group": "1"}) == 1500
    assert get("nflogd_truncated_packets_total", {"group": "1"}) == 2
    assert get("nflogd_kernel_dropped_packets_total", {"group": "1"}) == 3
    assert get("nflogd_overflows_total", {"group": "1"}) == 1
    assert get("nflogd_packets_total", {"group": "7"}) == 0
    assert get("nflogd_subscribers") == 2
    assert get("nflogd_build_info", {"version": "9.9"}) == 1
    groups[1].packets += 5  # read at scrape time, not copied at registration
    groups[3] = counters(packets=1)
    subs[0] = 0
    assert get("nflogd_packets_total", {"group": "1"}) == 15
    assert get("nflogd_packets_total", {"group": "3"}) == 1
    assert get("nflogd_subscribers") == 0


def test_own_registry_only(registry):
    DaemonCollector(lambda: [(1, counters(packets=4))], lambda: 0, registry=registry)
    assert REGISTRY.get_sample_value("nflogd_packets_total", {"group": "1"}) is None
    with pytest.raises(ValueError):  # describe() names the metrics: a duplicate is caught
        DaemonCollector(lambda: [], lambda: 0, registry=registry)


def test_collect_never_fails(registry, caplog):
    def broken():
        raise RuntimeError("counters gone")

    def no_subscribers():
        raise OSError("monitor closed")

    DaemonCollector(broken, no_subscribers, build_version="1", registry=registry)
    text = generate_latest(registry).decode()
    assert 'nflogd_build_info{version="1"} 1.0' in text
    assert "# TYPE nflogd_packets_total counter" in text
    assert registry.get_sample_value("nflogd_subscribers") is None
    assert "counters gone" in caplog.text


def test_odd_counter_objects_read_as_zero(registry):
    class Partial:
        packets = 3

    DaemonCollector(lambda: [(2, Partial())], lambda: 1, registry=registry)
    assert registry.get_sample_value("nflogd_packets_total", {"group": "2"}) == 3
    assert registry.get_sample_value("nflogd_bytes_total", {"group": "2"}) == 0


def test_version_label_defaults_to_package_version(registry):
    DaemonCollector(lambda: [], lambda: 0, registry=registry)
    assert version() == __version__  # the installed metadata agrees with the package
    assert registry.get_sample_value("nflogd_build_info", {"version": version()}) == 1


def get_metrics(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_server_serves_and_closes_quickly(registry):
    DaemonCollector(lambda: [(4, counters(packets=8))], lambda: 1, registry=registry)
    server = MetricsServer("127.0.0.1", 0, registry)
    port = server.port
    assert 'nflogd_packets_total{group="4"} 8.0' in get_metrics(port)
    thread = server.thread
    t0 = time.monotonic()
    server.close()
    assert time.monotonic() - t0 < 0.3
    assert not thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    server.close()  # idempotent


def test_server_port_in_use_names_the_address(registry):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(NflogdError) as err:
            MetricsServer("127.0.0.1", port, registry)
    assert str(err.value) == f"metrics: 127.0.0.1:{port}: Address already in use"
