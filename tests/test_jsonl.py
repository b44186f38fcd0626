"""nflog-tap --format json: read back with the real jq and with Python's json, from an
in-process feed (exact fields, loss and restart lines) and from the real daemon."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_tap
from daemonutil import NflogdProcess
from feedutil import TS, msg, rec, topics
from nflogd_client import jsonl, wire
from nflogd_client.community_id import community_id, community_id_icmp
from nsutil import SteadyTraffic
from scapy.compat import raw
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from test_tap import V4, V4_BIG, V6, finish, run_tap

pytestmark = pytest.mark.timeout(120)

procs = test_tap.procs  # the fixture: subprocesses killed at the end

JQ = shutil.which("jq") or "/usr/bin/jq"  # the Makefile installs jq
KEYS = {
    "event", "node", "group", "seq", "time", "time_ns", "ts_kernel", "len", "caplen", "truncated",
    "prefix", "mark", "indev", "indev_name", "outdev", "outdev_name", "physindev", "physoutdev",
    "physindev_name", "physoutdev_name",
    "uid", "gid", "hook", "hook_name", "hw_protocol", "hwaddr", "kernel_seq",
    "family", "src", "dst", "protocol", "sport", "dport", "community_id", "ct", "vlan", "l2hdr",
}  # fmt: skip
EVENT_KEYS = {"event", "node", "group", "where", "lost", "time", "time_ns"}


def jq(program: str, text: str, *args: str) -> list:
    r = subprocess.run([JQ, "-c", *args, program], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def lines(out: bytes) -> list[dict]:
    return [json.loads(line) for line in out.decode().splitlines()]


# -- the schema, exactly ---------------------------------------------------------------------------


@pytest.mark.needs("jq")
def test_packets_as_json_lines(feed, procs):
    feed.publish_when_subscribed(
        topics(5, 6),
        msg(5, rec(5, V4, prefix="in: ", mark=3, uid=1000, indev=2), rec(5, V4_BIG[:60], len=len(V4_BIG))),
        msg(
            6, rec(6, V6, outdev=4, gid=100, hook=3, hwaddr=b"\x02\0\0\0\0\x01", ts_kernel=False), first_seq=9
        ),
    )
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-g", "6", "-c", "3", "--format", "json")
    out, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 3 packets written, 0 lost\n"
    a, b, c = objs = lines(out)
    assert all(set(o) == KEYS for o in objs)  # every key, always; no payload unless asked
    assert a == {
        "event": "packet", "node": "r1", "group": 5, "seq": 0,
        "time": "2023-11-14T22:13:20.123456789Z", "time_ns": TS, "ts_kernel": True,
        "len": 38, "caplen": 38, "truncated": False, "prefix": "in: ", "mark": 3,
        "indev": 2, "indev_name": None, "outdev": None, "outdev_name": None,
        "physindev": None, "physoutdev": None, "uid": 1000, "gid": None,
        "hook": 0, "hook_name": "prerouting", "hw_protocol": 0x0800, "hwaddr": None, "kernel_seq": None,
        "family": "ipv4", "src": "192.0.2.1", "dst": "198.51.100.2", "protocol": 17,
        "sport": 40000, "dport": 40001,
        "physindev_name": None, "physoutdev_name": None,
        "community_id": community_id("192.0.2.1", "198.51.100.2", 17, 40000, 40001),
        "ct": None, "vlan": None, "l2hdr": None,
    }  # fmt: skip
    assert (b["len"], b["caplen"], b["truncated"], b["prefix"], b["mark"], b["uid"]) == (
        len(V4_BIG), 60, True, None, None, None,
    )  # fmt: skip
    assert (b["dst"], b["dport"]) == ("198.51.100.3", 40003)  # the header is within the 60 bytes
    assert (c["group"], c["seq"], c["family"], c["src"], c["dst"], c["dport"]) == (
        6, 9, "ipv6", "2001:db8::1", "2001:db8::2", 40002,
    )  # fmt: skip
    assert (c["outdev"], c["gid"], c["hook_name"], c["hwaddr"], c["ts_kernel"], c["indev"]) == (
        4, 100, "output", "02:00:00:00:00:01", False, None,
    )  # fmt: skip
    # jq reads the same: nulls are JSON null, numbers numbers.
    text = out.decode()
    assert jq("select(.event == \"packet\") | [.group, .prefix, .mark, .dport]", text) == [
        [5, "in: ", 3, 40001], [5, None, None, 40003], [6, None, None, 40002],
    ]  # fmt: skip
    assert jq("[.uid, .gid] | map(. == null)", text) == [[False, True], [True, True], [True, False]]
    assert jq("map(keys) | unique | length", text, "-s") == [1]


@pytest.mark.needs("jq")
def test_conntrack_vlan_and_link_header_lines(feed, procs):
    ct = wire.Conntrack(
        state="established", reply_dir=True, info=3, id=77, mark=5, status=0x1A, timeout=120, zone=None,
        proto=17, orig=wire.CtTuple("192.0.2.1", "203.0.113.9", 40000, 53),
        reply=wire.CtTuple("198.51.100.2", "192.0.2.1", 53, 40000), labels=None,
    )  # fmt: skip
    l2 = bytes.fromhex("0200000000020200000000010800")
    feed.publish_when_subscribed(
        topics(5),
        msg(5, rec(5, V4, ct=ct), rec(5, V4, vlan=wire.Vlan(0x2005, 0x8100), l2hdr=l2, physindev=3)),
    )
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-c", "2", "--format", "json")
    out, _ = finish(p)
    a, b = lines(out)
    assert set(a) == set(b) == KEYS
    assert a["ct"] == {
        "state": "established", "reply_dir": True, "info": 3, "id": 77, "mark": 5, "status": 0x1A,
        "timeout": 120, "zone": None, "proto": 17, "labels": None,
        "orig": {"src": "192.0.2.1", "dst": "203.0.113.9", "sport": 40000, "dport": 53},
        "reply": {"src": "198.51.100.2", "dst": "192.0.2.1", "sport": 53, "dport": 40000},
    }  # fmt: skip
    assert (a["vlan"], a["l2hdr"], b["ct"]) == (None, None, None)
    assert b["vlan"] == {"id": 5, "pcp": 1, "tci": 0x2005, "proto": 0x8100} and b["l2hdr"] == l2.hex()
    assert jq(".ct.orig.dst", out.decode()) == ["203.0.113.9", None]


def test_community_id_of_packets():
    """The flow's Community ID from the captured headers: both directions alike, ICMP by type."""
    fwd = IP(src="10.0.0.1", dst="127.0.0.1") / TCP(sport=1234, dport=80)
    back = IP(src="127.0.0.1", dst="10.0.0.1") / TCP(sport=80, dport=1234)
    ids = {
        jsonl.packet_object(wire.Packet.build(1, raw(p), hw_protocol=0x0800))["community_id"]
        for p in (fwd, back)
    }
    assert ids == {community_id("10.0.0.1", "127.0.0.1", 6, 1234, 80)}
    ping = raw(IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6EchoRequest(id=1))
    obj = jsonl.packet_object(wire.Packet.build(1, ping, hw_protocol=0x86DD))
    assert obj["community_id"] == community_id_icmp("2001:db8::1", "2001:db8::2", 58, 128, 0)
    cut = wire.Packet.build(1, raw(fwd)[:22], len=40, hw_protocol=0x0800)  # the ports were not copied
    assert jsonl.packet_object(cut)["community_id"] is None
    gre = raw(IP(src="10.1.12.2", dst="10.1.12.1", proto=47) / (b"x" * 8))
    assert jsonl.packet_object(wire.Packet.build(1, gre, hw_protocol=0x0800))["community_id"] == community_id(
        "10.1.12.1", "10.1.12.2", 47
    )


@pytest.mark.needs("jq")
def test_payload_only_when_asked(feed, procs):
    feed.publish_when_subscribed(topics(5), msg(5, rec(5, V4), rec(5, V4_BIG[:60], len=len(V4_BIG))))
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-c", "2", "--format", "json", "--payload")
    out, _ = finish(p)
    objs = lines(out)
    assert [base64.b64decode(o["payload"]) for o in objs] == [V4, V4_BIG[:60]]
    assert jq(".payload | @base64d | length", out.decode()) == [len(V4), 60]


@pytest.mark.needs("jq")
def test_loss_and_restart_lines(feed, procs):
    feed.publish_when_subscribed(
        topics(5),
        wire.encode(5, "r1", 1, 0, [rec(5, V4)], kernel_dropped=2),
        wire.encode(5, "r1", 1, 4, [rec(5, V4)], kernel_dropped=7),  # 3 lost on the feed, 5 in the kernel
        wire.encode(5, "r1", 2, 2, [rec(5, V4)]),  # a new run: 2 sent before this client saw it
    )
    p = run_tap(procs, "-e", feed.endpoint, "-g", "5", "-c", "3", "--format", "json")
    out, err = finish(p)
    assert p.returncode == 0 and err == "nflog-tap: 3 packets written, 5 lost, 1 daemon restarts\n"
    objs = lines(out)
    kinds = [(o["event"], o.get("where"), o.get("lost"), o.get("seq")) for o in objs]
    assert kinds == [
        ("packet", None, None, 0),
        ("loss", "feed", 3, None), ("loss", "kernel", 5, None), ("packet", None, None, 4),
        ("restart", None, None, None), ("loss", "feed", 2, None), ("packet", None, None, 2),
    ]  # fmt: skip
    events = [o for o in objs if o["event"] != "packet"]
    assert all(set(o) == EVENT_KEYS and (o["node"], o["group"]) == ("r1", 5) for o in events)
    assert jq('select(.event == "loss") | .lost', out.decode()) == [3, 5, 2]
    assert jq('select(.event == "restart") | [.where, .lost]', out.decode()) == [[None, None]]


def test_five_tuple():
    cases = [
        (IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=1, dport=22), ("ipv4", 6, 1, 22)),
        (IP(src="192.0.2.1", dst="192.0.2.2", frag=100) / UDP(sport=1, dport=2), ("ipv4", 17, None, None)),
        (IP(src="192.0.2.1", dst="192.0.2.2", proto=1) / b"\x08\0\0\0", ("ipv4", 1, None, None)),
        (IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / UDP(sport=5, dport=53),
         ("ipv6", 17, 5, 53)),
        (IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(offset=0) / TCP(sport=7, dport=8),
         ("ipv6", 6, 7, 8)),
        (IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(offset=9, nh=6) / (b"x" * 8),
         ("ipv6", 6, None, None)),
    ]  # fmt: skip
    for pkt, (family, proto, sport, dport) in cases:
        data = raw(pkt)
        hw = 0x86DD if family == "ipv6" else 0x0800
        t = jsonl.five_tuple(hw, data)
        assert (t["family"], t["protocol"], t["sport"], t["dport"]) == (family, proto, sport, dport), pkt
        assert t["src"] in ("192.0.2.1", "2001:db8::1")
    # Cut before the ports, not IP at all, an unknown link protocol: null, never 0.
    assert jsonl.five_tuple(0x0800, raw(IP() / TCP())[:22])["sport"] is None
    assert jsonl.five_tuple(0x0800, b"\x60" + b"\0" * 39) == dict.fromkeys(
        ("family", "src", "dst", "protocol", "sport", "dport")
    )
    assert jsonl.five_tuple(0x0806, b"\0" * 28)["family"] is None


# -- the real daemon -------------------------------------------------------------------------------


@pytest.mark.kernel
def test_real_packets_through_jq_and_flushed_per_batch(netns, tmp_path):
    netns.log_rule(1, hook="input", match="udp dport 9991", extra='prefix "g1 in: "')
    with NflogdProcess(netns, tmp_path / "d", groups=[1]) as d:
        tap_bin = str(Path(sys.executable).parent / "nflog-tap")
        p = subprocess.Popen(
            [tap_bin, "-e", d.endpoint, "--format", "json", "--ifnames"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        sender = SteadyTraffic(netns, [9991], interval=0.01)
        sender.start()
        try:
            # While the tap runs: lines arrive as the batches do (nothing waits for a buffer to fill).
            got = [json.loads(p.stdout.readline()) for _ in range(5)]
            assert p.poll() is None
        finally:
            sender.stop()
            p.terminate()
            rest, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    text = "".join(json.dumps(o) + "\n" for o in got) + rest.decode()
    packets = jq('select(.event == "packet")', text)
    assert len(packets) >= 5 and all(set(o) == KEYS for o in packets)
    for o in packets:
        assert (o["node"], o["group"], o["prefix"], o["hook_name"]) == ("test", 1, "g1 in: ", "input")
        assert (o["family"], o["src"], o["dst"], o["protocol"], o["dport"]) == (
            "ipv4",
            "127.0.0.1",
            "127.0.0.1",
            17,
            9991,
        )
        assert (o["indev"], o["indev_name"], o["outdev"], o["outdev_name"]) == (1, "lo", None, None)
        assert o["ts_kernel"] is True and o["time"].endswith("Z") and len(o["time"]) == 30
    first = packets[0]["seq"]  # what the daemon sent before the tap subscribed is not lost to it
    assert jq('select(.event == "packet") | .seq', text) == list(range(first, first + len(packets)))


# -- the documented command lines, as pasted -------------------------------------------------------


def documented_lines() -> list[str]:
    import re

    root = Path(__file__).resolve().parent.parent
    found = []
    for doc in ("README.md", "docs/json-lines.md"):
        for block in re.findall(r"```sh\n(.*?)```", (root / doc).read_text(), re.S):
            for line in block.splitlines():
                if line.startswith("nflog-tap ") and ("--format json" in line or "--reorder-ms" in line):
                    found.append(line)
    return found


@pytest.mark.needs("jq")
@pytest.mark.parametrize("line", documented_lines())
def test_documented_command_lines_run(line, tmp_path):
    import os
    import re

    from feedutil import FakeFeed

    feed = FakeFeed(tmp_path / "feed.sock")
    try:
        groups = [int(g) for g in re.findall(r"-g (\d+)", line)]
        five = [msg(5, *[rec(5, V4)] * 10, first_seq=s) for s in (0, 10, 20, 30, 40, 53, 63, 73, 83, 93, 103)]
        six = [msg(6, *[rec(6, V6)] * 10, first_seq=s) for s in range(0, 100, 10)]
        feed.publish_when_subscribed(topics(*groups), *five, *six)
        env = {**os.environ, "NFLOGD_ENDPOINT": feed.endpoint}
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        r = subprocess.run(
            ["sh", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        feed.close()
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("nflog-tap: 100 packets written, ") and r.stderr.count("\n") == 1, r.stderr
    if "| jq" in line:
        assert r.stdout, line
        if "add" in line:
            assert r.stdout == "3\n"  # the gap after seq 50 in group 5
    if "-w " in line:
        out = tmp_path / line.split("-w ")[1].split()[0]
        assert out.stat().st_size > 0
