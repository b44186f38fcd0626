"""Readers at the edges a user meets: nflog-tap on what pcap cannot hold and on a CURVE
endpoint without keys, scapy's sniff() with no feed, nothing listening or a refused key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemonutil import NflogdProcess, wait_until
from feedutil import msg, rec, topics
from scapy.utils import RawPcapReader
from test_security import TCP, curve_section, make_keys

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0  # seconds: the bound on one reader run (it imports scapy first)


def tap_command() -> list[str]:
    script = Path(sys.executable).parent / "nflog-tap"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nflogd_client.tap"]


# -- pcap's limits ----------------------------------------------------------------------------------

FAR = 4_102_444_800 * 1_000_000_000 + 5_000  # ns: 2100-01-01, past pcap's (signed 32-bit) seconds
BIG = 300_000  # bytes: a payload over libpcap's largest snaplen


@pytest.mark.needs("tcpdump")
@pytest.mark.parametrize("linktype", ["ip", "nflog"])
def test_times_and_lengths_past_pcaps_limits_are_clamped_counted_said_once(feed, tmp_path, linktype):
    """Wire-valid extremes: a time in 2100 and a 300,000-byte packet give a file tcpdump
    shows whole (no "Error converting time", no "Invalid header"), one line said, the count last."""
    v4 = bytes.fromhex("4500001c000000004011") + bytes(10) + bytes(8)  # 28 bytes of IPv4 and UDP
    feed.publish_when_subscribed(
        topics(5),
        msg(5, rec(5, v4, FAR), rec(5, v4 + bytes(BIG - len(v4))), rec(5, v4, FAR), rec(5, v4)),
    )
    out = tmp_path / "x.pcap"
    r = subprocess.run(
        [*tap_command(), "-e", feed.endpoint, "-g", "5", "-c", "4", "--linktype", linktype, "-w", str(out)],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr == (
        "nflog-tap: group 5 seq 0: beyond what pcap holds: a time past 2038 written as 2038-01-19"
        " 03:14:07 UTC; such packets are written clamped and counted in the last line\n"
        "nflog-tap: 4 packets written, 0 lost, 3 clamped to pcap's limits\n"
    )
    with RawPcapReader(str(out)) as reader:
        records = [(meta.caplen, meta.wirelen, meta.sec) for _, meta in reader]
    assert [sec for *_, sec in records] == [2**31 - 1, 1_700_000_000, 2**31 - 1, 1_700_000_000]
    assert all(caplen <= wirelen <= 262144 for caplen, wirelen, _ in records)
    if linktype == "ip":  # cut to libpcap's largest snaplen, the original length too
        assert records[1][:2] == (262144, 262144)
    else:  # the payload cut to what an attribute holds, the record its own length
        assert records[1][0] == records[1][1] < 65600
    shown = subprocess.run(["tcpdump", "-n", "-r", str(out)], capture_output=True, text=True, timeout=WAIT)
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout.splitlines()) == 4
    assert "Error" not in shown.stdout and "Invalid" not in shown.stdout, shown.stdout


# -- a CURVE endpoint without keys ---------------------------------------------------------------


@pytest.mark.kernel
def test_curve_endpoint_without_keys_is_said_once(netns, tmp_path):
    """A reader without keys is told once that the endpoint requires CURVE, however long it
    retries; libzmq's bare "handshake failed" of the same refusal never replaces that line."""
    keys = make_keys(tmp_path / "curve")
    publish = {"bind": [f"ipc://{tmp_path}/d/run/feed.sock", TCP], "curve": curve_section(keys)}
    with NflogdProcess(netns, tmp_path / "d", groups=[1], extra={"publish": publish}):
        p = netns.popen(
            *tap_command(), "-e", TCP, "-g", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            time.sleep(7)  # three retries, AUTH_RETRY_S apart
            p.terminate()
            _, err = p.communicate(timeout=WAIT)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = err.splitlines()
    assert lines[:-1] == [
        f"nflog-tap: nflogd feed {TCP}: handshake failed: the endpoint requires CURVE (give "
        "server_public_key and client_secret_key_file, nflog-tap --server-key/--client-key); "
        "retrying every 2 s"
    ], err
    assert lines[-1] == "nflog-tap: 0 packets printed, 0 lost"


# -- scapy speaks up --------------------------------------------------------------------------------

SNIFF = """
import sys
from scapy.all import sniff
from nflogd_client import ZMQNFLOGSocket
kw = {{}}
if len(sys.argv) > 2:
    kw = {{"server_public_key": sys.argv[2], "client_secret_key_file": sys.argv[3]}}
pkts = sniff(L2socket=ZMQNFLOGSocket, endpoint=sys.argv[1], iface="nflog:1", timeout={timeout}, **kw)
print(len(pkts))
"""


def sniff_in(netns, *args: str, timeout: float = 3.0) -> subprocess.CompletedProcess:
    code = SNIFF.format(timeout=timeout)
    return netns.run(sys.executable, "-c", code, *args, check=False, timeout=WAIT)


@pytest.mark.kernel
def test_sniff_says_why_nothing_arrives(netns, tmp_path):
    """sniff(L2socket=ZMQNFLOGSocket) says on stderr, once, what recv() would say: no such
    socket, nothing listening, a CURVE key the daemon refuses; and still returns at its timeout."""
    missing = f"ipc://{tmp_path}/nowhere/feed.sock"
    r = sniff_in(netns, missing)
    assert r.returncode == 0 and r.stdout == "0\n", r.stderr
    assert r.stderr == (
        f"nflogd feed {missing}: no such socket: {tmp_path}/nowhere does not exist (is nflogd running?);"
        " retrying\n"
    )
    r = sniff_in(netns, TCP)
    assert r.returncode == 0 and r.stdout == "0\n", r.stderr
    assert (
        r.stderr == f"nflogd feed {TCP}: nothing listening on 127.0.0.1:5555 (connection refused); retrying\n"
    )

    keys = make_keys(tmp_path / "curve")
    publish = {"bind": [f"ipc://{tmp_path}/d/run/feed.sock", TCP], "curve": curve_section(keys)}
    with NflogdProcess(netns, tmp_path / "d", groups=[1], extra={"publish": publish}) as d:
        r = sniff_in(netns, TCP, str(keys.server_pub), str(keys.bob_secret))  # bob: not in clients/
        wait_until(
            lambda: "is not in publish.curve.authorized_keys_dir: refused" in d.stderr, "the daemon's refusal"
        )
    assert r.returncode == 0 and r.stdout == "0\n", r.stderr
    assert r.stderr.startswith(
        f"nflogd feed {TCP}: CURVE handshake refused: this client's public key is not in the daemon's"
        " publish.curve.authorized_keys_dir; retrying every 2 s\n"
    ), r.stderr
