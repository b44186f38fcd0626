"""The classic API, NFLOG().generator(), against the real kernel."""

import select
import time

import pytest
from scapy.layers.inet import IP, UDP

from nflogd import NFLOG, NFWouldBlock
from nflogd.errors import GroupBusy

pytestmark = pytest.mark.timeout(60)


@pytest.mark.kernel
def test_readme_example(netns):
    netns.log_rule(0, match="udp dport 9999")
    with netns.entered():
        nflog = NFLOG().generator(0, extra_attrs=["len", "ts"], nlbufsiz=2 * 2**20)
    fd = next(nflog)  # netlink fd, for select/poll
    assert isinstance(fd, int)
    netns.send_udp([b"hello", b"world" * 100])
    assert select.select([fd], [], [], 5)[0] == [fd]
    pkt, pkt_len, pkt_ts = next(nflog)
    assert bytes(IP(pkt)[UDP].payload) == b"hello" and pkt_len == 33
    assert abs(pkt_ts - time.time()) < 5
    for pkt, pkt_len, _pkt_ts in nflog:
        assert bytes(IP(pkt)[UDP].payload) == b"world" * 100 and pkt_len == 528
        break
    nflog.close()


@pytest.mark.kernel
def test_payload_only_without_extra_attrs_and_every_attr(netns):
    netns.log_rule(3, hook="input", match="udp dport 9999", extra='prefix "in"')
    with netns.entered():
        gen = NFLOG().generator(
            [3], extra_attrs=["prefix", "indev", "outdev", "hwproto", "seq", "uid", "mark"]
        )
        plain = NFLOG().generator(4)
    next(gen), next(plain)
    netns.send_udp([b"x"], addr="::1")
    payload, prefix, indev, outdev, hwproto, seq, uid, mark = next(gen)
    assert (prefix, indev, outdev, hwproto, seq, uid, mark) == ("in", 1, None, 0x86DD, 0, None, None)
    assert payload[0] >> 4 == 6
    gen.close()
    plain.close()


@pytest.mark.kernel
def test_unknown_attr_is_refused_before_binding(netns):
    with netns.entered(), pytest.raises(ValueError, match="unknown extra_attrs name 'bogus'"):
        NFLOG().generator(0, extra_attrs=["bogus"])


@pytest.mark.kernel
def test_send_true_never_blocks(netns):
    netns.log_rule(6, match="udp dport 9999")
    with netns.entered():
        gen = NFLOG().generator(6)
    next(gen)
    assert gen.send(True) is NFWouldBlock
    netns.send_udp([b"late"])
    end = time.monotonic() + 5
    got = NFWouldBlock
    while got is NFWouldBlock and time.monotonic() < end:
        time.sleep(0.01)
        got = gen.send(True)
    assert bytes(IP(got)[UDP].payload) == b"late"
    gen.close()


@pytest.mark.kernel
def test_several_instances_and_generators(netns):
    netns.log_rule(1, match="udp dport 1111")
    netns.log_rule(2, match="udp dport 2222")
    with netns.entered():
        a, b = NFLOG(), NFLOG()
        ga = a.generator(1)
        gb = b.generator([2])
    next(ga), next(gb)
    netns.send_udp([b"A"], port=1111)
    netns.send_udp([b"B"], port=2222)
    assert bytes(IP(next(ga))[UDP].payload) == b"A"
    assert bytes(IP(next(gb))[UDP].payload) == b"B"
    assert a.packets == 1 and b.packets == 1
    ga.close()
    gb.close()


@pytest.mark.kernel
def test_closing_the_generator_releases_its_groups(netns):
    with netns.entered():
        nflog = NFLOG()
        gen = nflog.generator([7, 8])
        next(gen)
        with pytest.raises(GroupBusy):
            NFLOG().generator(8)
        gen.close()
        again = NFLOG().generator(8)  # free again
        next(again)
        again.close()


@pytest.mark.kernel
def test_overflow_is_counted_and_the_generator_goes_on(netns, caplog):
    netns.log_rule(9, match="udp dport 9999")
    with netns.entered():
        nflog = NFLOG()
        gen = nflog.generator(9, nlbufsiz=65536, qthresh=16)
    next(gen)
    sent = netns.send_udp([b"o" * 300] * 10000)  # nothing reads meanwhile: overruns

    def drain():
        n, idle_since = 0, time.monotonic()
        while time.monotonic() - idle_since < 0.3:
            got = gen.send(True)
            if got is NFWouldBlock:
                time.sleep(0.01)
            else:
                n, idle_since = n + 1, time.monotonic()
        return n

    read = drain()
    # A loss shows once the next packet after it arrives: one more closes the last gap.
    sent += netns.send_udp([b"tail"])
    read += drain()
    assert nflog.overflows >= 1 and nflog.lost > 0
    assert read + nflog.lost == sent
    warnings = [r for r in caplog.records if "overrun" in r.getMessage()]
    assert len(warnings) == 1  # warned once for the episode
    gen.close()
    assert nflog.lost + read == sent  # the counts outlive the generator


# scapy-nflog-capture's README examples, as its README prints them (the nflog_cffi block without
# its closing `for` line, which has no body there; then one more packet from that loop).
ANCESTOR_NFLOG_CFFI = """\
from nflog_cffi import NFLOG

# without extra_attrs just packet payload (possibly truncated) is returned
nflog = NFLOG().generator(0, extra_attrs=['len', 'ts'], nlbufsiz=2*2**20)
fd = next(nflog) # netlink fd to do select/poll on, if necessary

# pkt_len is the *real* length, before nflog-truncation (if any)
# pkt_ts is the packet timestamp, as reported by kernel/lib
pkt, pkt_len, pkt_ts = next(nflog)
print('Got packet, len: {}, ts: {}'.format(pkt_len, pkt_ts))
"""

ANCESTOR_SCAPY_NFLOG = """\
import scapy_nflog
scapy_nflog.install_nflog_listener()
"""


def _run_in_netns(netns, code: str) -> str:
    import subprocess
    import sys

    p = netns.popen(sys.executable, "-c", code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while p.poll() is None:
            assert time.monotonic() < deadline, "the example did not end"
            netns.send_udp([b"hello"])
            time.sleep(0.1)
        out, err = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    return out


@pytest.mark.kernel
def test_the_ancestors_nflog_cffi_example_runs_unchanged(netns):
    netns.log_rule(0, match="udp dport 9999")
    out = _run_in_netns(netns, ANCESTOR_NFLOG_CFFI)
    assert out.startswith("Got packet, len: 33, ts: ")


@pytest.mark.kernel
def test_the_ancestors_scapy_nflog_example_runs_unchanged(netns):
    netns.log_rule(0, match="udp dport 9999")
    code = ANCESTOR_SCAPY_NFLOG + (
        "from scapy.all import conf, sniff\n"
        "assert conf.L2listen is scapy_nflog.NFLOGListenSocket\n"  # its README: exactly that
        "print(sniff(count=1, timeout=20)[0].summary())\n"
    )
    out = _run_in_netns(netns, code)
    assert "UDP" in out and "9999" in out, out


def test_the_alias_modules_are_the_classic_api():
    import nflog_cffi
    import nflogd.classic
    import nflogd.scapy_listen
    import scapy_nflog

    assert nflog_cffi.NFLOG is nflogd.classic.NFLOG
    assert scapy_nflog.NFLOGListenSocket is nflogd.scapy_listen.NFLOGListenSocket
    assert scapy_nflog.install_nflog_listener is nflogd.scapy_listen.install_nflog_listener


def test_group_settings_need_no_yaml():
    """GroupConfig is capture's settings: the classic API builds them without the YAML layer."""
    import subprocess
    import sys

    code = (
        "import sys, nflogd.classic\n"
        "settings = nflogd.classic.group_settings([1, 2], qthresh=8, timeout=0.05)\n"
        "assert [(g.group, g.queue_threshold, g.flush_ms) for g in settings] == [(1, 8, 50), (2, 8, 50)]\n"
        "print(sorted(m for m in sys.modules if m == 'yaml' or m.startswith(('yaml.', 'nflogd.yamlload'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == "[]\n"
