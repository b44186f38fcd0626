"""NFLOGListenSocket and install_nflog_listener: scapy reading NFLOG groups in this process."""

import subprocess
import sys
import time

import pytest
from scapy.config import conf
from scapy.error import Scapy_Exception
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.sendrecv import AsyncSniffer, sniff

from nflogd import NFLOGListenSocket, install_nflog_listener

pytestmark = [pytest.mark.timeout(60), pytest.mark.kernel]


def payloads(pkts):
    return [bytes(p[UDP].payload) for p in pkts]


def test_sniff_with_l2socket_ipv4_and_ipv6(netns):
    netns.log_rule(5, match="udp dport 9999")
    with netns.entered():
        sock = NFLOGListenSocket(queues=5)
    with sock:
        netns.send_udp([b"four"], addr="127.0.0.1")
        netns.send_udp([b"six"], addr="::1")
        pkts = sniff(opened_socket=sock, count=2, timeout=5)
    assert [type(p) for p in pkts] == [IP, IPv6]
    assert payloads(pkts) == [b"four", b"six"]
    assert all(abs(p.time - time.time()) < 5 for p in pkts)
    assert [p.wirelen for p in pkts] == [32, 51]


def test_burst_of_hundreds_all_delivered_promptly(netns):
    """Packets read in one batch must not wait behind select(): all 500 arrive at once."""
    netns.log_rule(6, match="udp dport 9999")
    with netns.entered():
        sock = NFLOGListenSocket(queues=[6])
    with sock:
        sent = [b"%d" % i for i in range(500)]
        netns.send_udp(sent)
        t0 = time.monotonic()
        pkts = sniff(opened_socket=sock, count=500, timeout=10)
        took = time.monotonic() - t0
    assert payloads(pkts) == sent
    assert took < 5


def test_sniff_l2socket_class_with_queues(netns):
    netns.log_rule(7, match="udp dport 9999")
    with netns.entered():
        # The sniffer's thread starts in this namespace and binds the group there.
        sniffer = AsyncSniffer(L2socket=NFLOGListenSocket, queues=7, iface="nflog:7", prn=lambda p: None)
        sniffer.start()
        time.sleep(0.3)
        netns.send_udp([b"async"])
        time.sleep(0.5)
        t0 = time.monotonic()
        pkts = sniffer.stop()
        assert time.monotonic() - t0 < 2
    assert payloads(pkts) == [b"async"]


def test_install_nflog_listener_makes_plain_sniff_read_the_group(netns):
    netns.log_rule(8, match="udp dport 9999")
    saved = conf.L2listen
    try:
        with netns.entered():
            listener = install_nflog_listener(queues=8)
            assert conf.L2listen is listener
            sniffer = AsyncSniffer(count=1)
            sniffer.start()
            time.sleep(0.3)
            netns.send_udp([b"installed"])
            sniffer.join(timeout=5)
        assert payloads(sniffer.results) == [b"installed"]
    finally:
        conf.L2listen = saved


def test_send_raises_and_close_releases(netns):
    with netns.entered():
        sock = NFLOGListenSocket(queues=9)
        with pytest.raises(Scapy_Exception, match="only listens"):
            sock.send(IP())
        sock.close()
        sock.close()
        NFLOGListenSocket(queues=9).close()  # the group is free again


def test_a_busy_group_raises_group_busy_and_nothing_else(netns):
    """The second socket on a group gets GroupBusy naming the holder; its collection says nothing."""
    code = (
        "import gc\n"
        "from nflogd import GroupBusy, NFLOGListenSocket\n"
        "held = NFLOGListenSocket(queues=10)\n"
        "try:\n"
        "    NFLOGListenSocket(queues=10)\n"
        "except GroupBusy as e:\n"
        "    print(e)\n"
        "gc.collect()\n"
        "held.close()\n"
    )
    r = netns.run(sys.executable, "-c", code, check=False, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("group 10 is already bound by netlink port "), r.stdout
    assert "python" in r.stdout


def test_install_without_arguments_is_the_class_itself():
    """As scapy-nflog-capture's README says: conf.L2listen = NFLOGListenSocket, nothing else."""
    code = (
        "from scapy.config import conf\n"
        "import scapy_nflog\n"
        "from nflogd import NFLOGListenSocket\n"
        "assert scapy_nflog.install_nflog_listener() is NFLOGListenSocket\n"
        "assert conf.L2listen is NFLOGListenSocket\n"
        "assert conf.L2listen is not scapy_nflog.install_nflog_listener(queues=3)\n"
        "assert conf.L2listen.queues == 3\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
