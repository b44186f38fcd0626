"""nflog-tap as a subprocess against an in-process XPUB feed; files read back by tcpdump and scapy."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from feedutil import FakeFeed, msg, rec, topics
from nflogd_client import tap, wire
from scapy.compat import raw
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import RawPcapReader, rdpcap

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0  # seconds: the bound on a subprocess step (it imports scapy first)
TCPDUMP = shutil.which("tcpdump") or "/usr/bin/tcpdump"  # the Makefile installs tcpdump and tshark

V4 = raw(IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=40000, dport=40001) / b"payload-v4")
V6 = raw(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=40000, dport=40002) / b"payload-v6")
V4_BIG = raw(IP(src="192.0.2.1", dst="198.51.100.3") / UDP(sport=40000, dport=40003) / (b"z" * 400))
SEC, USEC = 1_700_000_000, 123_456


def tap_command() -> list[str]:
    script = Path(sys.executable).parent / "nflog-tap"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nflogd_client.tap"]


@pytest.fixture
def procs():
    """Subprocesses a test starts; killed if still running at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(WAIT)
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()


def run_tap(procs, *args: str, **kw) -> subprocess.Popen:
    kw.setdefault("stdout", subprocess.PIPE)
    p = subprocess.Popen([*tap_command(), *args], stderr=subprocess.PIPE, **kw)
    procs.append(p)
    return p


def finish(p: subprocess.Popen) -> tuple[bytes, str]:
    out, err = p.communicate(timeout=WAIT)
    return out, err.decode()


def tcpdump(*args: str, stdin=None) -> list[str]:
    r = subprocess.run([TCPDUMP, "-n", *args], stdin=stdin, capture_output=True, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    assert b"truncated" not in r.stderr, r.stderr  # "truncated dump file": a half-written record
    return r.stdout.decode().splitlines()


def standard_feed(feed: FakeFeed) -> None:
    """Group 7 (not subscribed: never arrives), then 3 packets of groups 5 and 6."""
    feed.publish_when_subscribed(
        topics(5, 6),
        msg(7, rec(7, V4)),
        msg(5, rec(5, V4, prefix="in: ", mark=3, uid=1000, indev=2), rec(5, V4_BIG[:60], len=len(V4_BIG))),
        msg(6, rec(6, V6, outdev=4, gid=100), first_seq=9),
    )


def parse_nflog(record: bytes) -> tuple[tuple[int, int, int], dict[int, bytes]]:
    """The LINKTYPE_NFLOG header and TLVs, read independently of tap.py."""
    header = struct.unpack(">BBH", record[:4])
    tlvs: dict[int, bytes] = {}
    off = 4
    while off < len(record):
        length, kind = struct.unpack("=HH", record[off : off + 4])
        assert length >= 4
        tlvs[kind] = record[off + 4 : off + length]
        off += (length + 3) & ~3
    assert off == len(record)
    return header, tlvs


# -- pcap output -----------------------------------------------------------------------------------


@pytest.mark.needs("tcpdump")
def test_write_linktype_ip(feed, procs, tmp_path):
    out = tmp_path / "ip.pcap"
    standard_feed(feed)
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-g", "6", "-c", "3", "-w", str(out))
    _, err = finish(p)
    assert p.returncode == 0
    assert err == "nflog-tap: 3 packets written, 0 lost\n"
    with RawPcapReader(str(out)) as r:
        assert r.linktype == tap.LINKTYPE_RAW == 101
        records = list(r)
    assert [data for data, _ in records] == [V4, V4_BIG[:60], V6]
    meta = [m for _, m in records]
    assert [(m.sec, m.usec) for m in meta] == [(SEC, USEC)] * 3
    # The original length stays: the truncated packet shows as such.
    assert [(m.caplen, m.wirelen) for m in meta] == [(38, 38), (60, len(V4_BIG)), (58, 58)]
    pkts = rdpcap(str(out))
    assert len(pkts) == 3
    assert type(pkts[0]) is IP and type(pkts[2]) is IPv6 and raw(pkts[2]) == V6
    lines = tcpdump("-r", str(out))
    assert len(lines) == 3
    assert "IP 192.0.2.1.40000 > 198.51.100.2.40001: UDP, length 10" in lines[0]
    assert "IP6 2001:db8::1.40000 > 2001:db8::2.40002: UDP, length 10" in lines[2]


@pytest.mark.needs("tcpdump", "tshark")
def test_write_linktype_nflog(feed, procs, tmp_path):
    out = tmp_path / "nflog.pcap"
    standard_feed(feed)
    p = run_tap(
        procs, "-e", feed.endpoint, "-g", "5", "-g", "6", "-c", "3", "-w", str(out), "--linktype", "nflog"
    )
    _, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 3 packets written, 0 lost\n"
    with RawPcapReader(str(out)) as r:
        assert r.linktype == tap.LINKTYPE_NFLOG == 239
        records = list(r)
    assert len(rdpcap(str(out))) == 3
    (h0, t0), (h1, t1), (h2, t2) = (parse_nflog(data) for data, _ in records)
    assert (h0, h1, h2) == ((2, 0, 5), (2, 0, 5), (10, 0, 6))  # AF_INET, AF_INET6; group = resource id
    assert t0[tap.NFULA_PACKET_HDR] == b"\x08\x00\x00\x00"  # hw_protocol BE, hook 0, pad
    assert t0[tap.NFULA_PREFIX] == b"in: \0"
    assert t0[tap.NFULA_MARK] == struct.pack(">I", 3)
    assert t0[tap.NFULA_UID] == struct.pack(">I", 1000)
    assert t0[tap.NFULA_IFINDEX_INDEV] == struct.pack(">I", 2)
    assert t0[tap.NFULA_TIMESTAMP] == struct.pack(">QQ", SEC, USEC)
    assert t0[tap.NFULA_PAYLOAD] == V4
    assert list(t0)[-1] == tap.NFULA_PAYLOAD
    assert t1[tap.NFULA_PAYLOAD] == V4_BIG[:60] and tap.NFULA_PREFIX not in t1 and tap.NFULA_MARK not in t1
    assert t2[tap.NFULA_PACKET_HDR][:2] == b"\x86\xdd" and t2[tap.NFULA_PAYLOAD] == V6
    assert t2[tap.NFULA_IFINDEX_OUTDEV] == struct.pack(">I", 4)
    assert t2[tap.NFULA_GID] == struct.pack(">I", 100)
    # As libpcap's nflog device: the record's length is its captured length.
    assert all(m.caplen == m.wirelen == len(d) for d, m in records)
    # tcpdump finds the payload TLV (host-order lengths, padding) and prints the packet inside.
    lines = tcpdump("-r", str(out))
    assert len(lines) == 3
    assert "IP 192.0.2.1.40000 > 198.51.100.2.40001: UDP, length 10" in lines[0]
    assert "truncated-ip - 368 bytes missing" in lines[1]
    assert "IP6 2001:db8::1.40000 > 2001:db8::2.40002: UDP, length 10" in lines[2]
    assert all("resource ID" in line for line in tcpdump("-e", "-r", str(out)))
    # The prefix is in the record tcpdump reads (and names in Wireshark's dissector, if installed).
    dump = tcpdump("-XX", "-r", str(out), "-c", "1")
    assert dump[2].split("  ")[-1].startswith("in:.")  # bytes 16..31: the prefix and its NUL
    r = subprocess.run(
        ["tshark", "-r", str(out), "-T", "fields", "-e", "nflog.prefix", "-e", "nflog.uid"],
        capture_output=True,
        timeout=WAIT,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == ["in: \t1000", "\t", "\t"]


def test_nflog_record_layout():
    p = rec(
        5,
        b"\x45" + b"\0" * 19,
        prefix="abc",
        hook=1,
        hwaddr=b"\x02\x00\x00\x00\x00\x01",
        kernel_seq=77,
        physindev=9,
        ts_kernel=False,
    )
    r = tap.nflog_record(p)
    le = sys.byteorder == "little"

    def tlv(length: int, kind: int) -> bytes:
        return struct.pack("<HH" if le else ">HH", length, kind)

    assert r == (
        b"\x02\x00\x00\x05"
        + tlv(8, 1) + b"\x08\x00\x01\x00"
        + tlv(8, 10) + b"abc\0"
        + tlv(8, 6) + b"\0\0\0\x09"
        + tlv(16, 8) + b"\x00\x06\0\0" + b"\x02\x00\x00\x00\x00\x01\0\0"
        + tlv(8, 12) + b"\0\0\0\x4d"
        + tlv(24, 9) + b"\x45" + b"\0" * 19
    )  # fmt: skip
    # Odd lengths are padded to 4 bytes, the length field excluding the padding.
    odd = tap.nflog_record(rec(5, b"\x45" * 21, prefix="ab"))
    _, tlvs = parse_nflog(odd)
    assert tlvs[tap.NFULA_PREFIX] == b"ab\0" and tlvs[tap.NFULA_PAYLOAD] == b"\x45" * 21


@pytest.mark.needs("tcpdump")
def test_stdout_into_tcpdump(feed, procs):
    standard_feed(feed)
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-g", "6", "-c", "3", "-w", "-")
    lines = tcpdump("-r", "-", stdin=p.stdout)
    _, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 3 packets written, 0 lost\n"
    assert len(lines) == 3 and "IP6 2001:db8::1.40000" in lines[2]


@pytest.mark.needs("tcpdump")
def test_stdout_is_live_and_ends_when_the_reader_goes(feed, procs):
    """tcpdump -c 2 ends while the tap still runs: every packet is flushed as it comes."""
    feed.publish_when_subscribed(topics(5), msg(5, rec(5, V4)), msg(5, rec(5, V6), first_seq=1))
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-w", "-")
    lines = tcpdump("-r", "-", "-c", "2", stdin=p.stdout)
    assert len(lines) == 2
    assert p.poll() is None
    # The reader is gone (tcpdump exited, and this process lets go of the pipe): the next
    # packet fails to go out, and the tap ends quietly, counting what did go out.
    p.stdout.close()
    feed.join()
    feed.pub.send_multipart(msg(5, rec(5, V4), first_seq=2))
    _, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 2 packets written, 0 lost\n"


# -- ending ----------------------------------------------------------------------------------------


@pytest.mark.needs("tcpdump")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_under_traffic_leaves_a_complete_file(feed, procs, tmp_path, sig):
    out = tmp_path / "live.pcap"
    feed.stream_when_subscribed(topics(5), lambda seq: msg(5, *[rec(5, V4)] * 8, first_seq=seq), 8)
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-w", str(out))
    deadline = time.monotonic() + WAIT
    while (not out.exists() or out.stat().st_size < 24 + 50 * (16 + len(V4))) and time.monotonic() < deadline:
        assert p.poll() is None
        time.sleep(0.02)
    p.send_signal(sig)  # while packets keep coming
    _, err = finish(p)
    feed.join()
    assert p.returncode == 0
    assert err.count("\n") == 1 and err.startswith("nflog-tap: ") and "Traceback" not in err
    written = int(err.split()[1])
    assert written >= 50
    pkts = rdpcap(str(out))
    assert len(pkts) == written and all(raw(x) == V4 for x in pkts)
    assert len(tcpdump("-r", str(out))) == written


@pytest.mark.needs("tcpdump")
def test_signal_while_idle_leaves_an_empty_valid_file(feed, procs, tmp_path):
    out = tmp_path / "idle.pcap"
    p = run_tap(procs, "-e", feed.endpoint, "-w", str(out), "--linktype", "nflog")
    feed.wait_subscribed(topics())  # running and waiting
    p.send_signal(signal.SIGINT)
    _, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 0 packets written, 0 lost\n"
    assert len(rdpcap(str(out))) == 0
    with RawPcapReader(str(out)) as r:
        assert r.linktype == 239
    assert tcpdump("-r", str(out)) == []


def test_loss_in_summary(feed, procs):
    feed.publish_when_subscribed(topics(5), msg(5, rec(5, V4), rec(5, V4)), msg(5, rec(5, V4), first_seq=5))
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-c", "3", "-w", os.devnull)
    _, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 3 packets written, 3 lost\n"


# -- printing and arguments ------------------------------------------------------------------------


def test_print_lines(feed, procs):
    standard_feed(feed)
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-g", "6", "-c", "3")
    out, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 3 packets printed, 0 lost\n"
    lines = out.decode().splitlines()
    assert len(lines) == 3
    when = time.strftime("%H:%M:%S", time.localtime(SEC)) + f".{USEC:06d}"
    assert lines[0] == (
        f"{when} r1 group 5 seq 0 len 38 prefix 'in: ' IP / UDP 192.0.2.1:40000 > 198.51.100.2:40001 / Raw"
    )
    assert lines[1].startswith(f"{when} r1 group 5 seq 1 len {len(V4_BIG)} (captured 60) IP / UDP")
    assert lines[2].startswith(f"{when} r1 group 6 seq 9 len {len(V6)} IPv6 / UDP 2001:db8::1:40000 >")


@pytest.mark.parametrize(
    "endpoints, culprit",
    [(["bogus://x"], "bogus://x"), (["ipc:///tmp/nflog-tap-ok.sock", "nonsense"], "nonsense")],
)
def test_bad_endpoint_one_line_exit_2(procs, endpoints, culprit):
    args = [a for e in endpoints for a in ("-e", e)]
    p = run_tap(procs, *args, "-c", "1")
    out, err = finish(p)
    assert p.returncode == 2 and out == b""
    assert err.count("\n") == 1 and err.startswith(f"nflog-tap: endpoint '{culprit}': ")
    assert "Traceback" not in err and "addr=" not in err


def test_bad_endpoint_from_environment(procs):
    env = {**os.environ, "NFLOGD_ENDPOINT": "bogus://env"}
    p = run_tap(procs, "-c", "1", env=env)
    _, err = finish(p)
    assert p.returncode == 2 and err == (
        "nflog-tap: endpoint 'bogus://env': unsupported transport 'bogus'; "
        "expected tcp://HOST:PORT, ipc:///absolute/path or ipc://@abstract-name\n"
    )


@pytest.mark.parametrize(
    "args", [["-c", "0"], ["-c", "x"], ["-g", "70000"], ["-g", "five"], ["--linktype", "eth"], ["--bogus"]]
)
def test_bad_arguments(procs, args):
    p = run_tap(procs, "-e", "ipc:///tmp/nflog-tap-unused.sock", *args)
    out, err = finish(p)
    assert p.returncode == 2 and out == b""
    assert err.startswith("usage: nflog-tap") and "Traceback" not in err


def test_unwritable_file(feed, procs, tmp_path):
    p = run_tap(procs, "-e", feed.endpoint, "-w", str(tmp_path / "no" / "such" / "dir.pcap"))
    _, err = finish(p)
    assert p.returncode == 1 and err.startswith("nflog-tap: cannot write ") and err.count("\n") == 1


# -- --stats ---------------------------------------------------------------------------------------


def test_stats_per_group_rates_and_loss(feed, procs):
    """Piped, --stats prints a table a second: group 5 without loss, group 6 losing 2 packets on
    the feed and 1 in the kernel per message, all counted from the tap's start."""

    def body():
        feed.wait_subscribed(topics())
        seq5 = seq6 = 0
        while not feed.stop.is_set():
            feed.pub.send_multipart(msg(5, *[rec(5, V4)] * 8, first_seq=seq5))
            feed.pub.send_multipart(wire.encode(6, "r1", 1, seq6, [rec(6, V6)] * 4, kernel_dropped=seq6 // 6))
            seq5, seq6 = seq5 + 8, seq6 + 6
            time.sleep(0.005)

    feed._start(body)
    p = run_tap(procs, "-e", feed.endpoint, "--stats")
    lines = []
    while lines.count(b"\n") < 3:  # three tables, a second apart: the last has a full second of traffic
        line = p.stdout.readline()
        assert line, "nflog-tap --stats ended early"
        lines.append(line)
    p.send_signal(signal.SIGINT)
    out, err = finish(p)
    feed.join()
    assert p.returncode == 0, err
    tables = [t.splitlines() for t in b"".join(lines).decode().split("\n\n") if t.strip()]
    assert len(tables) == 3, lines
    head = "node             group  packets/s     bytes/s    packets     lost   kernel"
    assert all(t[0].startswith("nflog-tap --stats ") and t[1] == head for t in tables)
    assert tables[-1][-1] == f"endpoint {feed.endpoint}: connected"
    rows = {
        int(r.split()[1]): r.split() for r in tables[-1][2:-1]
    }  # node group pps n unit packets lost kernel
    assert set(rows) == {5, 6}
    assert rows[5][0] == rows[6][0] == "r1"
    pps5, packets5, lost5, kernel5 = float(rows[5][2]), int(rows[5][5]), int(rows[5][6]), int(rows[5][7])
    pps6, packets6, lost6, kernel6 = float(rows[6][2]), int(rows[6][5]), int(rows[6][6]), int(rows[6][7])
    assert pps5 > 100 and packets5 >= pps5 and (lost5, kernel5) == (0, 0)
    assert 0.4 < pps6 / pps5 < 0.6  # 4 packets a message against 8
    assert rows[5][4] == "kB/s" and float(rows[5][3]) == pytest.approx(pps5 * len(V4) / 1000, abs=0.1)
    assert lost6 == pytest.approx(packets6 / 2, abs=2) and kernel6 == pytest.approx(packets6 / 4, abs=2)
    total = re.fullmatch(r"nflog-tap: (\d+) packets counted, (\d+) lost\n", err)
    assert total and int(total.group(1)) >= packets5 + packets6 and int(total.group(2)) >= lost6


def test_stats_excludes_writing(procs):
    p = run_tap(procs, "-e", "ipc:///tmp/nflog-tap-unused.sock", "--stats", "-w", "x.pcap")
    out, err = finish(p)
    assert p.returncode == 2 and "--stats writes and counts no packets" in err


def test_python_dash_m_nflogd_client_is_nflog_tap(feed, procs):
    feed.publish_when_subscribed(topics(5), msg(5, rec(5, V4)))
    p = subprocess.Popen(
        [sys.executable, "-m", "nflogd_client", "-e", feed.endpoint, "-g", "5", "-c", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    procs.append(p)
    out, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 1 packets printed, 0 lost\n"
    assert " r1 group 5 seq 0 len 38 IP / UDP 192.0.2.1:40000 > 198.51.100.2:40001" in out.decode()


@pytest.mark.needs("tshark")
def test_write_pcapng_an_interface_per_node_and_group(feed, procs, tmp_path):
    """-w x.pcapng: an interface per (node, group) named node:group, described by the endpoint;
    real lengths (a metadata-only packet: 0 bytes captured), the direction from the hook, and
    the attributes in each packet's comment; read back by tshark."""
    out = tmp_path / "feed.pcapng"
    ct = wire.Conntrack(
        state="new", reply_dir=False, info=2, id=7, mark=None, status=None, timeout=None, zone=None,
        proto=17, orig=wire.CtTuple("192.0.2.1", "203.0.113.9", 40000, 40001),
        reply=wire.CtTuple("198.51.100.2", "192.0.2.1", 40001, 40000), labels=None,
    )  # fmt: skip
    feed.publish_when_subscribed(
        topics(5, 6),
        msg(5, rec(5, V4, prefix="in: ", mark=3, indev=2, ct=ct), rec(5, b"", len=328, uid=1000, hook=3)),
        msg(6, rec(6, V6, outdev=4, hook=4), node="r2"),
        wire.encode(5, "r1", 1, 5, [rec(5, V4_BIG[:60], len=len(V4_BIG), hook=2)]),  # 3 lost before it
    )
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-g", "6", "-c", "4", "-w", str(out))
    _, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 4 packets written, 3 lost\n"
    names = ("frame.interface_name", "frame.interface_description", "frame.len", "frame.cap_len")
    names += ("frame.packet_flags_direction", "frame.comment", "ip.dst", "ipv6.dst")
    args = [a for n in names for a in ("-e", n)]
    r = subprocess.run(
        ["tshark", "-r", str(out), "-T", "fields", "-E", "separator=|", *args],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [line.split("|") for line in r.stdout.splitlines()]
    inbound, outbound, forward = "0x00000001", "0x00000002", ""  # epb_flags; none when forwarded
    ep = feed.endpoint
    assert rows == [
        ["r1:5", ep, str(len(V4)), str(len(V4)), inbound,
         "hook prerouting, prefix 'in: ', mark 3, in 2, ct new id 7 proto 17 "
         "orig 192.0.2.1:40000 > 203.0.113.9:40001 reply 198.51.100.2:40001 > 192.0.2.1:40000",
         "198.51.100.2", ""],
        ["r1:5", ep, "328", "0", outbound, "hook output, uid 1000, metadata only", "", ""],
        ["r2:6", ep, str(len(V6)), str(len(V6)), outbound, "hook postrouting, out 4", "", "2001:db8::2"],
        ["r1:5", ep, str(len(V4_BIG)), "60", forward,
         "hook forward,nflogd: 3 packets lost on the feed before this one (node r1, group 5)",
         "198.51.100.3", ""],
    ]  # fmt: skip


def test_the_file_name_picks_the_format(feed, procs, tmp_path):
    standard_feed(feed)
    out = tmp_path / "x.PCAPNG"
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-g", "6", "-c", "3", "-w", str(out))
    _, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 3 packets written, 0 lost\n"
    assert out.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"  # a pcapng section


def test_pcapng_has_no_nflog_linktype(procs, tmp_path):
    p = run_tap(procs, "-e", "ipc:///nonexistent", "-w", str(tmp_path / "x.pcapng"), "--linktype", "nflog")
    _, err = finish(p)
    assert p.returncode == 2 and "--linktype nflog goes with --format pcap" in err
