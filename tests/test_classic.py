"""The classic API, NFLOG().generator(), against the real kernel."""

import select
import time

import pytest
from scapy.layers.inet import IP, UDP

from nflogd import NFLOG, NFWouldBlock
from nflogd.errors import GroupBusy

pytestmark = pytest.mark.timeout(60)


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


def test_unknown_attr_is_refused_before_binding(netns):
    with netns.entered(), pytest.raises(ValueError, match="unknown extra_attrs name 'bogus'"):
        NFLOG().generator(0, extra_attrs=["bogus"])


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
