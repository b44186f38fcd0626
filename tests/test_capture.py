"""capture.GroupReader / GroupSet against the real kernel, one namespace per test."""

import os
import socket
import struct
import threading
import time

import pytest
from nflogd_client import wire
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from nflogd.capture import GroupReader, GroupSet
from nflogd.config import GroupConfig
from nflogd.errors import GroupBusy, NoPermission
from nflogd.ffi import NflogSocket

pytestmark = [pytest.mark.timeout(60), pytest.mark.kernel]


def read_n(reader, n, deadline=5.0):
    """Packets from reader until n arrived or the deadline passed."""
    got = []
    end = time.monotonic() + deadline
    while len(got) < n and time.monotonic() < end:
        batch = reader.read(0.2)
        if batch:
            got.extend(batch.packets())
    return got


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("hook", ["output", "input"])
def test_payload_byte_exact(netns, addr, hook):
    netns.log_rule(7, hook=hook, match="udp dport 9999", extra='prefix "t7"')
    with netns.entered():
        reader = GroupReader(GroupConfig(group=7))
    payloads = [os.urandom(n) for n in (0, 1, 100, 1400)]
    with reader:
        netns.send_udp(payloads, addr=addr)
        got = read_n(reader, len(payloads))
    assert len(got) == len(payloads)
    for pkt, payload in zip(got, payloads):
        layer = IPv6 if ":" in addr else IP
        assert pkt.hw_protocol == (0x86DD if ":" in addr else 0x0800)
        ip = layer(pkt.data)
        assert bytes(ip[UDP].payload) == payload
        assert pkt.len == pkt.caplen == len(pkt.data) == len(ip)
        assert pkt.prefix == "t7"
        assert pkt.group == 7
        # The kernel stamps packets only from PREROUTING/INPUT on; OUTPUT gets the receive time.
        assert pkt.ts_kernel is (hook == "input")
        assert abs(pkt.ts - time.time()) < 5
        if hook == "output":
            assert pkt.outdev == 1 and pkt.indev is None and pkt.uid == os.getuid()
        else:
            assert pkt.indev == 1 and pkt.outdev is None and pkt.uid is None
    assert reader.counters.packets == len(payloads)
    assert reader.counters.kernel_dropped == 0


def test_copy_range_truncates_and_len_is_real(netns):
    netns.log_rule(3, match="udp dport 9999")
    with netns.entered():
        reader = GroupReader(GroupConfig(group=3, copy_range=64))
    with reader:
        netns.send_udp([b"x" * 1000], addr="127.0.0.1")
        netns.send_udp([b"y" * 500], addr="::1")
        v4, v6 = read_n(reader, 2)
    assert (v4.caplen, v4.len, v4.truncated) == (64, 1028, True)
    assert (v6.caplen, v6.len, v6.truncated) == (64, 548, True)
    assert v4.data[:20] == bytes(IP(v4.data))[:20]
    assert reader.counters.truncated == 2
    assert reader.counters.bytes == 1028 + 548


def test_copy_range_zero_sends_metadata_only(netns):
    netns.log_rule(4, match="udp dport 9999")
    with netns.entered():
        reader = GroupReader(GroupConfig(group=4, copy_range=0))
    with reader:
        netns.send_udp([b"z" * 10])
        (pkt,) = read_n(reader, 1)
    assert pkt.data == b"" and pkt.caplen == 0 and pkt.hw_protocol == 0x0800


def test_metadata_only_groups_know_the_real_length(netns):
    """copy_range 0: no payload published, but each packet's real length, counted in bytes."""
    netns.log_rule(4, match="udp dport 9999")
    with netns.entered():
        reader = GroupReader(GroupConfig(group=4, copy_range=0))
    with reader:
        netns.send_udp([b"z" * 10, b"w" * 1000])
        netns.send_udp([b"v" * 300], addr="::1")
        got = read_n(reader, 3)
    assert [(p.caplen, p.len, p.data) for p in got] == [(0, 38, b""), (0, 1028, b""), (0, 348, b"")]
    assert all(p.present & wire.F_LEN_FROM_HEADER and not p.present & wire.F_PAYLOAD for p in got)
    assert all(p.truncated for p in got)
    assert reader.counters.bytes == 38 + 1028 + 348
    assert reader.counters.truncated == 3


def test_len_from_header_only_when_the_copy_cut_the_packet(netns):
    netns.log_rule(5, match="udp dport 9999")
    with netns.entered():
        whole = GroupReader(GroupConfig(group=5, copy_range=200))
    with whole:
        netns.send_udp([b"a" * 100, b"b" * 400])
        netns.send_udp([b"c" * 100, b"d" * 400], addr="::1")
        got = read_n(whole, 4)
    flags = [(p.caplen, p.len, bool(p.present & wire.F_LEN_FROM_HEADER)) for p in got]
    assert flags == [(128, 128, False), (200, 428, True), (148, 148, False), (200, 448, True)]


def test_a_rule_without_prefix_gives_none(netns):
    """nft sends an empty NFULA_PREFIX for a rule without one: absent, not ''."""
    netns.log_rule(6, match="udp dport 9999")
    netns.log_rule(7, match="udp dport 9999", extra='prefix "p7"')
    with netns.entered():
        plain, named = GroupReader(GroupConfig(group=6)), GroupReader(GroupConfig(group=7))
    with plain, named:
        netns.send_udp([b"x"])
        (a,), (b,) = read_n(plain, 1), read_n(named, 1)
    assert a.prefix is None and not a.present & wire.F_PREFIX
    assert b.prefix == "p7" and b.present & wire.F_PREFIX


@pytest.mark.parametrize("size", [20_000, 60_000])
def test_large_packets_intact(netns, size):
    netns.log_rule(9, match="udp dport 9999")
    payload = os.urandom(size)
    with netns.entered():
        reader = GroupReader(GroupConfig(group=9))
    with reader:
        netns.send_udp([payload], addr="::1")
        (pkt,) = read_n(reader, 1)
    assert bytes(IPv6(pkt.data)[UDP].payload) == payload
    assert pkt.len == size + 48 and not pkt.truncated


def test_two_groups_in_one_process(netns):
    netns.log_rule(1, match="udp dport 1111")
    netns.log_rule(2, match="udp dport 2222")
    with netns.entered():
        a = GroupReader(GroupConfig(group=1))
        b = GroupReader(GroupConfig(group=2))
    with a, b:
        netns.send_udp([b"a%d" % i for i in range(5)], port=1111)
        netns.send_udp([b"b%d" % i for i in range(7)], port=2222)
        got_a, got_b = read_n(a, 5), read_n(b, 7)
    assert [bytes(IP(p.data)[UDP].payload) for p in got_a] == [b"a%d" % i for i in range(5)]
    assert [bytes(IP(p.data)[UDP].payload) for p in got_b] == [b"b%d" % i for i in range(7)]


def test_group_set_one_fd_for_many_groups(netns):
    netns.log_rule(11, match="udp dport 1111")
    netns.log_rule(12, match="udp dport 2222")
    with netns.entered():
        gs = GroupSet([GroupConfig(group=11), GroupConfig(group=12)])
    with gs:
        netns.send_udp([b"one"], port=1111)
        netns.send_udp([b"two"], port=2222)
        got = []
        end = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < end:
            for batch in gs.read(0.5):
                got += [(p.group, bytes(IP(p.data)[UDP].payload)) for p in batch.packets()]
        assert sorted(got) == [(11, b"one"), (12, b"two")]
        assert gs.totals().packets == 2


def test_group_busy_names_group_and_port(netns):
    with netns.entered():
        first = GroupReader(GroupConfig(group=5))
        with first, pytest.raises(GroupBusy) as e:
            GroupReader(GroupConfig(group=5))
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    assert (
        str(e.value) == f"group 5 is already bound by netlink port {first.portid} (pid {os.getpid()}, {comm})"
    )
    assert (e.value.errno, e.value.group, e.value.portid) == (1, 5, first.portid)
    assert e.value.process == (os.getpid(), comm)


def test_group_busy_across_processes(netns):
    holder = netns.popen(
        "python3", "-c",
        "import socket,struct,time,sys\n"
        "s=socket.socket(socket.AF_NETLINK,socket.SOCK_RAW,12)\n"
        "s.bind((0,0))\n"
        "cmd=struct.pack('=HHB3x',5,1,1)\n"  # nlattr NFULA_CFG_CMD, BIND
        "body=struct.pack('=BBH',0,0,socket.htons(6))+cmd\n"
        "s.send(struct.pack('=IHHII',16+len(body),(4<<8)|1,5,1,0)+body)\n"
        "print(s.recv(100)[16:20].hex(),flush=True)\n"
        "time.sleep(30)\n",
        stdout=-1, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "00000000"  # the bind was acked without error
        busy = rf"^group 6 is already bound by netlink port \d+ \(pid {holder.pid}, python3\)$"
        with netns.entered(), pytest.raises(GroupBusy, match=busy):
            GroupReader(GroupConfig(group=6))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_no_cap_net_admin_says_so(netns):
    code = (
        "from nflogd.capture import GroupReader\n"
        "from nflogd.config import GroupConfig\n"
        "from nflogd.errors import NoPermission\n"
        "import os; os.setgid(65534); os.setuid(65534)\n"  # nobody: no capabilities left
        "try:\n    GroupReader(GroupConfig(group=8))\n"
        "except NoPermission as e:\n    print(e)\n"
    )
    import sys

    res = netns.run(sys.executable, "-c", code)
    assert res.stdout.strip() == "group 8: binding NFLOG groups needs CAP_NET_ADMIN"
    assert NoPermission(8).errno == 1


def test_paused_reader_counts_loss_exactly(netns):
    """Flood a group whose reader does not read: no exception; lost == sent - read."""
    netns.log_rule(13, match="udp dport 9999")
    with netns.entered():
        reader = GroupReader(GroupConfig(group=13, rcvbuf=65536, queue_threshold=16))
    sent = 0
    with reader:
        sent += netns.send_udp([b"f" * 200] * 20000)  # the reader is "paused": nothing reads

        def drain():
            n = 0
            while batch := reader.read(0.3):
                n += batch.count
            return n

        read = drain()
        # A loss shows once the next packet after it arrives: one more closes the last gap.
        sent += netns.send_udp([b"tail"])
        read += drain()
        assert reader.counters.overflows >= 1
        assert reader.counters.kernel_dropped > 0
        assert read + reader.counters.kernel_dropped == sent
        assert reader.counters.packets == read


def test_blocking_read_releases_the_gil(netns):
    with netns.entered():
        reader = GroupReader(GroupConfig(group=14))
    ticks = 0
    stop = threading.Event()

    def spin():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    with reader:
        t.start()
        t0 = time.monotonic()
        assert reader.read(0.5) is None  # blocks 0.5 s in C, nothing logged
        waited = time.monotonic() - t0
        stop.set()
        t.join()
    assert waited >= 0.45
    assert ticks > 100  # the other thread ran all along


def test_reconfigure_keeps_the_bind(netns):
    netns.log_rule(15, match="udp dport 9999")
    with netns.entered():
        reader = GroupReader(GroupConfig(group=15))
    with reader:
        netns.send_udp([b"a" * 300])
        (before,) = read_n(reader, 1)
        reader.reconfigure(GroupConfig(group=15, copy_range=40, flush_ms=20, rcvbuf=1 << 20))
        netns.send_udp([b"b" * 300])
        (after,) = read_n(reader, 1)
    assert before.caplen == 328 and after.caplen == 40
    assert after.kernel_seq == before.kernel_seq + 1
    assert reader.counters.kernel_dropped == 0


def test_nf_log_settings_unchanged(netns):
    before = netns.nf_log_settings()
    netns.log_rule(16, match="udp dport 9999")
    with netns.entered():
        with GroupReader(GroupConfig(group=16)) as reader:
            netns.send_udp([b"x"])
            assert len(read_n(reader, 1)) == 1
    assert netns.nf_log_settings() == before


def test_close_releases_the_group(netns):
    with netns.entered():
        GroupReader(GroupConfig(group=17)).close()
        GroupReader(GroupConfig(group=17)).close()


# -- the parser on the kernel's attribute layout ------------------------------------------------
# nfnetlink_log.c's __build_packet_message() and nf_conntrack_netlink.c's ctnetlink_glue_build()
# put these; the numbers are nfnetlink_log.h's NFULA_* and nfnetlink_conntrack.h's CTA_*.

NESTED = 0x8000


def nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes (NLA_ALIGN)."""
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def packet_message(group: int, family: int, attrs: bytes) -> bytes:
    """One NFULNL_MSG_PACKET: nlmsghdr, nfgenmsg, the attributes."""
    body = struct.pack("=BBH", family, 0, socket.htons(group)) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x0400, 0, 0, 0) + body


def tuple_attrs(kind: int, src: bytes, dst: bytes, proto: bytes) -> bytes:
    ip = nla(1, src) + nla(2, dst) if len(src) == 4 else nla(3, src) + nla(4, dst)
    return nla(kind | NESTED, nla(1 | NESTED, ip) + nla(2 | NESTED, proto))


def test_parser_reads_conntrack_vlan_and_l2hdr_in_the_kernels_layout():
    v4 = bytes(IP(src="192.0.2.1", dst="198.51.100.7") / UDP(sport=40001, dport=53) / b"q")
    tcp_ports = nla(1, b"\x11") + nla(2, struct.pack(">H", 40001)) + nla(3, struct.pack(">H", 53))
    reply_ports = nla(1, b"\x11") + nla(2, struct.pack(">H", 5353)) + nla(3, struct.pack(">H", 40001))
    ct = (
        tuple_attrs(1, bytes([192, 0, 2, 1]), bytes([203, 0, 113, 9]), tcp_ports)
        + tuple_attrs(2, bytes([10, 0, 0, 5]), bytes([192, 0, 2, 1]), reply_ports)
        + nla(18, struct.pack(">H", 3))  # CTA_ZONE
        + nla(12, struct.pack(">I", 0xDEADBEEF))  # CTA_ID
        + nla(3, struct.pack(">I", 0x1A8))  # CTA_STATUS: CONFIRMED|DST_NAT|SRC_NAT_DONE|DST_NAT_DONE
        + nla(7, struct.pack(">I", 30))  # CTA_TIMEOUT
        + nla(8, struct.pack(">I", 0x42))  # CTA_MARK
        + nla(22, bytes([1] + [0] * 15))  # CTA_LABELS
    )
    l2 = bytes.fromhex("020000000002020000000001810020050800")
    first = packet_message(
        9,
        7,  # NFPROTO_BRIDGE
        nla(1, struct.pack(">HBB", 0x0800, 0, 0))  # NFULA_PACKET_HDR: PREROUTING
        + nla(10, b"br\0")
        + nla(4, struct.pack(">I", 3))
        + nla(6, struct.pack(">I", 5))
        + nla(18 | NESTED, ct)
        + nla(19, struct.pack(">I", 2))  # NFULA_CT_INFO: IP_CT_NEW
        + nla(20 | NESTED, nla(1, struct.pack(">H", 0x8100)) + nla(2, struct.pack(">H", 0x2005)))
        + nla(21, l2)
        + nla(9, v4),
    )
    icmp6 = nla(1, b"\x3a") + nla(7, struct.pack(">H", 77)) + nla(8, b"\x80") + nla(9, b"\x00")
    a6, b6 = (socket.inet_pton(socket.AF_INET6, a) for a in ("2001:db8::1", "2001:db8::2"))
    second = packet_message(
        9,
        10,
        nla(1, struct.pack(">HBB", 0x86DD, 3, 0))
        + nla(18 | NESTED, tuple_attrs(1, a6, b6, icmp6))
        + nla(19, struct.pack(">I", 3)),  # IP_CT_ESTABLISHED_REPLY
    )
    sock = NflogSocket(9)
    try:
        assert sock.parse(first + second) == 2
        msg = wire.frames(9, "r", 0, 0, 0, 2, sock.table(2), sock.data())
    finally:
        sock.close()
    assert len(msg[2]) == 2 * wire.RECORD_X.size
    one, two = wire.decode(msg).packets
    assert one.data == v4 and one.prefix == "br" and (one.indev, one.physindev) == (3, 5)
    assert one.ct == wire.Conntrack(
        state="new", reply_dir=False, info=2, id=0xDEADBEEF, mark=0x42, status=0x1A8, timeout=30,
        zone=3, proto=17,
        orig=wire.CtTuple("192.0.2.1", "203.0.113.9", 40001, 53),
        reply=wire.CtTuple("10.0.0.5", "192.0.2.1", 5353, 40001),
        labels=bytes([1] + [0] * 15),
    )  # fmt: skip
    assert one.vlan == (0x2005, 0x8100) and (one.vlan.id, one.vlan.pcp) == (5, 1)
    assert one.l2hdr == l2
    assert two.ct.orig == wire.CtTuple("2001:db8::1", "2001:db8::2", icmp_id=77, icmp_type=128, icmp_code=0)
    assert (two.ct.state, two.ct.reply_dir, two.ct.id, two.ct.reply) == ("established", True, None, None)
    assert two.vlan is None and two.l2hdr is None and two.data == b""
    # Re-encoded by the Python codec: the same bytes the C parser wrote.
    assert wire.encode(9, "r", 0, 0, [one, two]) == msg


def test_vlan_tag_and_link_header_of_a_bridged_frame(netns):
    """An 802.1Q-tagged frame (VLAN 5, priority 1) enters a bridge port inside the namespace:
    the bridge family's log carries its tag (NFULA_VLAN) and its link-layer header (NFULA_L2HDR).
    The frame is written on a packet socket, as a VLAN sub-interface would send it (this
    works where the kernel has no 8021q module too)."""
    for cmd in (
        "ip link add br0 type bridge",
        "ip link add va type veth peer name vb",
        "ip link set vb master br0",
        "ip link set br0 up",
        "ip link set va up",
        "ip link set vb up",
    ):
        netns.run(*cmd.split())
    netns.nft(
        "table bridge tb {\n  chain c {\n    type filter hook prerouting priority 0;\n"
        '    vlan id 5 log group 13 prefix "br"\n  }\n}\n'
    )  # the tagged frame alone: the ports coming up send IPv6 frames of their own
    with netns.entered():
        reader = GroupReader(GroupConfig(group=13))
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        tx.bind(("va", 0))
    ip = bytes(IP(src="10.99.0.1", dst="10.99.0.2") / UDP(sport=1, dport=9) / b"tagged")
    dst, src = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
    frame = dst + src + struct.pack(">HH", 0x8100, (1 << 13) | 5) + b"\x08\x00" + ip
    with reader, tx:
        tx.send(frame)
        got = [p for p in read_n(reader, 1) if p.prefix == "br"]
    assert got, "the bridge logged nothing"
    pkt = got[0]
    assert pkt.vlan == (0x2005, 0x8100) and pkt.vlan.id == 5 and pkt.vlan.pcp == 1
    assert pkt.l2hdr is not None and pkt.l2hdr[:12] == dst + src
    assert pkt.data == ip and pkt.hw_protocol == 0x0800
    assert pkt.ct is None


def test_batches_end_with_the_names_of_their_interfaces():
    """With a names table, a batch's data ends with the names of the interfaces its records
    name, each once; an index the table lacks has no name (never a guess)."""
    msgs = b"".join(
        packet_message(2, 2, nla(1, struct.pack(">HBB", 0x0800, 1, 0)) + nla(4, struct.pack(">I", dev)))
        for dev in (2, 2, 7, 3)
    ) + packet_message(2, 2, nla(1, struct.pack(">HBB", 0x0800, 3, 0)) + nla(5, struct.pack(">I", 2)))
    sock = NflogSocket(2)
    try:
        sock.set_ifnames({3: "wan", 2: "lan0", 1: "lo"})
        assert sock.parse(msgs) == 5 and sock.batch_flags == wire.FLAG_IFNAMES
        msg = wire.frames(2, "r", 0, 0, 0, 5, sock.table(5), sock.data(), flags=sock.batch_flags)
        assert sock.data().endswith(wire.names_trailer({2: "lan0", 3: "wan"}))
        sock.set_ifnames({})
        assert sock.parse(msgs) == 5 and sock.batch_flags == 0
    finally:
        sock.close()
    pkts = wire.decode(msg).packets
    assert [(p.indev, p.indev_name) for p in pkts[:4]] == [(2, "lan0"), (2, "lan0"), (7, None), (3, "wan")]
    assert (pkts[4].outdev_name, pkts[4].indev_name) == ("lan0", None)
