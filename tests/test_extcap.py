"""nflogd-extcap driven by the real tshark against the real daemon in a test namespace.

Each test installs the extcap into a temporary HOME as a user would (``nflogd-extcap
--install``), lists the daemon's endpoint in ``nflogd-extcap.conf`` there, and lets tshark
find it, run it, and write what it captured; tshark's own NFLOG dissector reads it back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemonutil import NflogdProcess, wait_until
from nsutil import SteadyTraffic
from test_security import TCP, curve_section, make_keys

pytestmark = pytest.mark.timeout(120)

WAIT = 60.0  # seconds: the bound on one tshark run (it loads every dissector first)
PREFIX = "g1 in: "
PORTS = (9991, 9992)


def extcap(*args: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nflogd_client.extcap", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=WAIT)


@pytest.fixture
def home(tmp_path) -> dict:
    """The environment of a user with a fresh HOME where the extcap is installed."""
    h = tmp_path / "home"
    h.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WIRESHARK_", "XDG_", "NFLOGD_"))}
    env["HOME"] = str(h)
    r = extcap("--install", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("nflogd-extcap: installed ") and str(h) in r.stdout
    return env


def configure(env: dict, *lines: str) -> None:
    conf = Path(env["HOME"]) / ".config" / "wireshark" / "nflogd-extcap.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("# endpoints of nflogd feeds\n" + "".join(f"{line}\n" for line in lines))


def tshark_interfaces(env: dict) -> list[str]:
    r = subprocess.run(["tshark", "-D"], capture_output=True, text=True, env=env, timeout=WAIT)
    assert r.returncode == 0, r.stderr
    return [line.split(". ", 1)[1] for line in r.stdout.splitlines()]


def iface_of(env: dict, endpoint: str) -> str:
    """The interface tshark lists for ``endpoint`` (its display name carries the endpoint)."""
    for line in tshark_interfaces(env):
        if line.startswith("nflogd-") and endpoint in line:
            return line.split(" ", 1)[0]
    raise AssertionError(f"tshark -D lists no interface for {endpoint}: {tshark_interfaces(env)}")


def fields(path: Path, *names: str, extra: tuple[str, ...] = ()) -> list[list[str]]:
    args = [a for n in names for a in ("-e", n)]
    r = subprocess.run(
        ["tshark", "-r", str(path), *extra, "-T", "fields", "-E", "occurrence=f", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


def capture(netns, env: dict, iface: str, n: int, out: Path, *args: str, traffic=PORTS) -> tuple[int, str]:
    """tshark -i iface -a packets:n -w out in the namespace, with UDP to ``traffic`` meanwhile."""
    p = netns.popen(
        "tshark", "-i", iface, "-a", f"packets:{n}", "-a", "duration:40", "-w", str(out), *args,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sender = SteadyTraffic(netns, traffic, interval=0.005)
    sender.start()
    try:
        _, err = p.communicate(timeout=WAIT)
    finally:
        sender.stop()
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


def log_rules(netns) -> None:
    netns.log_rule(1, hook="input", match="udp dport 9991", extra=f'prefix "{PREFIX}"')
    netns.log_rule(2, hook="input", match="udp dport 9992")


# -- listing and the protocol ----------------------------------------------------------------------


@pytest.mark.needs("tshark")
def test_install_lists_generic_and_configured_interfaces(home):
    assert "nflogd (nflogd feed (any endpoint: set it in the options))" in tshark_interfaces(home)
    configure(home, "tcp://router1:5555  router1", "ipc:///run/nflogd/feed.sock")
    listed = tshark_interfaces(home)
    assert "nflogd-tcp-router1-5555 (nflogd feed router1)" in listed
    assert "nflogd-ipc-run-nflogd-feed-sock (nflogd feed ipc:///run/nflogd/feed.sock)" in listed
    r = extcap("--extcap-interface", "nflogd-tcp-router1-5555", "--extcap-config", env=home)
    assert r.returncode == 0
    endpoint = "{call=--endpoint}{display=Endpoint}{type=string}{required=true}{default=tcp://router1:5555}"
    assert endpoint in r.stdout
    assert all("{save=true}" in line for line in r.stdout.splitlines() if line.startswith("arg "))
    r = extcap("--extcap-interface", "nflogd", "--extcap-dlts", env=home)
    assert r.stdout.startswith("dlt {number=239}{name=NFLOG}")


def test_bad_config_line_and_interface_one_line(home):
    configure(home, "router1:5555")
    r = extcap("--extcap-interfaces", env=home)
    conf = Path(home["HOME"]) / ".config/wireshark/nflogd-extcap.conf"
    assert r.returncode == 2
    assert r.stderr == f"nflogd-extcap: {conf}:2: expected ENDPOINT [display name], got 'router1:5555'\n"
    configure(home)
    r = extcap("--extcap-interface", "eth0", "--extcap-config", env=home)
    assert r.returncode == 2
    assert r.stderr == "nflogd-extcap: --extcap-interface 'eth0': not one of this program's interfaces\n"


def test_capture_filter_validation_call(home):
    """Wireshark's filter field asks with --extcap-capture-filter alone: silence is valid."""
    ok = extcap("--extcap-capture-filter", "udp dst port 9992", "--extcap-interface", "nflogd", env=home)
    assert ok.returncode == 0 and ok.stdout == ""
    bad = extcap("--extcap-capture-filter", "udp portt 1", "--extcap-interface", "nflogd", env=home)
    why = "capture filter 'udp portt 1': can't parse filter expression: syntax error"
    assert bad.stdout.splitlines() == [why]


# -- capturing with tshark -------------------------------------------------------------------------


@pytest.mark.kernel
def test_tshark_captures_real_packets_with_group_prefix_payload(netns, tmp_path, home):
    log_rules(netns)
    with NflogdProcess(netns, tmp_path / "d", groups=[1, 2]) as d:
        configure(home, f"{d.endpoint} test-daemon")
        iface = iface_of(home, "test-daemon")
        out = tmp_path / "cap.pcapng"
        rc, err = capture(netns, home, iface, 20, out)
        assert rc == 0, err
        assert "extcap" not in err, err  # no loss: nothing Wireshark would show as an error
        assert err.endswith("\ntshark: \n20 packets captured\n"), err  # tshark 4.0's bare line: below
    rows = fields(out, "frame.interface_name", "nflog.res_id", "nflog.prefix", "udp.dstport", "data.data")
    assert len(rows) == 20
    assert {r[0] for r in rows} == {iface}
    by_group = {(r[1], r[2], r[3]) for r in rows}
    assert by_group == {("1", PREFIX, "9991"), ("2", "", "9992")}, rows
    for r in rows:
        assert bytes.fromhex(r[4]).startswith(b"steady ")
    # The file is pcapng, and the kernel's attributes survive: hook, uid absent at INPUT.
    assert {r[0] for r in fields(out, "nflog.hook")} == {"1"}  # NF_INET_LOCAL_IN


@pytest.mark.kernel
def test_capture_filter_is_applied(netns, tmp_path, home):
    log_rules(netns)
    with NflogdProcess(netns, tmp_path / "d", groups=[1, 2]) as d:
        configure(home, d.endpoint)
        iface = iface_of(home, d.endpoint)
        out = tmp_path / "filtered.pcapng"
        rc, err = capture(netns, home, iface, 10, out, "-f", "udp dst port 9992")
        assert rc == 0, err
        rows = fields(out, "nflog.res_id", "udp.dstport")
        assert len(rows) == 10 and {tuple(r) for r in rows} == {("2", "9992")}
        # A filter libpcap refuses stops the capture with libpcap's message, never ignored.
        rc, err = capture(netns, home, iface, 1, tmp_path / "bad.pcapng", "-f", "udp portt 1")
        assert rc != 0 and "can't parse filter expression: syntax error" in err, err


@pytest.mark.kernel
def test_raw_linktype_and_group_option(netns, tmp_path, home):
    log_rules(netns)
    with NflogdProcess(netns, tmp_path / "d", groups=[1, 2]) as d:
        configure(home, d.endpoint)
        iface = iface_of(home, d.endpoint)
        key = iface.replace("-", "_")
        out = tmp_path / "raw.pcapng"
        opts = ("-o", f"extcap.{key}.linktype:ip", "-o", f"extcap.{key}.groups:1")
        rc, err = capture(netns, home, iface, 5, out, *opts)
        assert rc == 0, err
    rows = fields(out, "frame.protocols", "udp.dstport")
    assert len(rows) == 5 and all(r[0].startswith("raw:ip:udp") and r[1] == "9991" for r in rows), rows
    # each packet's direction from its hook (INPUT: inbound) and its attributes in a comment
    rows = fields(out, "frame.packet_flags_direction", "frame.comment")
    assert all(int(r[0], 16) == 1 and f"prefix {PREFIX!r}" in r[1] for r in rows), rows


@pytest.mark.kernel
def test_daemon_restart_is_a_comment_and_in_the_statistics(netns, tmp_path, home):
    log_rules(netns)
    d = NflogdProcess(netns, tmp_path / "d", groups=[1])
    with d:
        configure(home, d.endpoint)
        iface = iface_of(home, d.endpoint)
        out = tmp_path / "restart.pcapng"
        p = netns.popen(
            "tshark", "-i", iface, "-a", "duration:40", "-w", str(out),
            env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        sender = SteadyTraffic(netns, [9991], interval=0.005)
        sender.start()
        try:
            before = lambda: out.exists() and len(fields(out, "frame.number")) >= 5  # noqa: E731
            wait_until(before, "packets before the restart", 30)
            d.stop()
            d.start()
            wait_until(lambda: d.stderr.count("DEBUG: subscribe") >= 2, "the extcap's new subscription", 30)
            time.sleep(0.5)  # packets of the new run, some sent before the extcap reconnected
            p.terminate()
            _, err = p.communicate(timeout=WAIT)
        finally:
            sender.stop()
            if p.poll() is None:
                p.kill()
                p.wait()
    comments = [r[0] for r in fields(out, "frame.comment") if r[0]]
    assert len(comments) == 1, comments
    assert comments[0].startswith("nflogd: daemon test restarted")
    assert comments[0].endswith("(node test, group 1)")
    # At the end, the count: tshark shows what the extcap wrote to stderr.
    # (with the client's own lines about the endpoint going away and coming back).
    assert "Error by extcap pipe: " in err and "disconnected; reconnecting" in err, err
    assert re.search(
        r"(\n|: )nflogd-extcap: \d+ packets captured, \d+ packets lost on the feed, 1 daemon restarts\n", err
    )


@pytest.mark.kernel
def test_curve_feed_through_the_key_options(netns, tmp_path, home):
    keys = make_keys(tmp_path / "curve")
    log_rules(netns)
    publish = {"bind": [f"ipc://{tmp_path}/d/run/feed.sock", TCP], "curve": curve_section(keys)}
    with NflogdProcess(netns, tmp_path / "d", groups=[1], extra={"publish": publish}):
        configure(home, f"{TCP} curve-daemon")
        iface = iface_of(home, "curve-daemon")
        key = iface.replace("-", "_")
        out = tmp_path / "curve.pcapng"
        opts = (
            "-o", f"extcap.{key}.serverkey:{keys.server_pub}",
            "-o", f"extcap.{key}.clientkey:{keys.alice_secret}",
        )  # fmt: skip
        rc, err = capture(netns, home, iface, 5, out, *opts, traffic=[9991])
        assert rc == 0, err
    rows = fields(out, "nflog.res_id", "nflog.prefix")
    assert rows == [["1", PREFIX]] * 5


# -- the control pipes, as Wireshark drives them -----------------------------------------------------


def read_frames(fd: int, want: int, timeout: float = WAIT) -> list[tuple[int, int, str]]:
    """Control frames (control number, command, payload) from a non-blocking pipe."""
    import select

    buf, frames = b"", []
    deadline = time.monotonic() + timeout
    while len(frames) < want and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 65536)
            buf += chunk
        while len(buf) >= 6 and len(buf) >= 4 + int.from_bytes(buf[1:4], "big"):
            assert buf[:1] == b"T"  # the sync pipe indication
            n = int.from_bytes(buf[1:4], "big")
            frames.append((buf[4], buf[5], buf[6 : 4 + n].decode()))
            buf = buf[4 + n :]
    return frames


def test_control_pipes_log_loss_and_closing_stops(home, feed, tmp_path):
    """Wireshark's side by hand: the fifo and both control pipes; the log gets the loss, and
    closing the control pipe ends the capture with the count in the log."""
    from feedutil import msg, rec, topics

    fifo, c_in, c_out = (tmp_path / n for n in ("data", "control-in", "control-out"))
    for path in (fifo, c_in, c_out):
        os.mkfifo(path)
    configure(home, feed.endpoint)
    feed.publish_when_subscribed(
        topics(), msg(5, rec(5, b"\x45" + b"\0" * 19)), msg(5, rec(5, b"\x45" + b"\0" * 19), first_seq=4)
    )
    p = subprocess.Popen(
        [sys.executable, "-m", "nflogd_client.extcap", "--capture", "--fifo", str(fifo),
         "--extcap-interface", "nflogd", "--endpoint", feed.endpoint,
         "--extcap-control-in", str(c_in), "--extcap-control-out", str(c_out)],
        env=home, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        data = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        out = os.open(c_out, os.O_RDONLY | os.O_NONBLOCK)
        w = wait_until(lambda: _open_writer(c_in), "the extcap's end of the control-in pipe", 30)
        os.write(w, b"T\x00\x00\x02\x00\x00")  # Initialized, as the GUI sends once ready
        loss = "nflogd: 3 packets lost on the feed before this one (node r1, group 5)"
        assert read_frames(out, 3) == [
            (0, 1, f"capturing {feed.endpoint} groups all\n"),  # Set: the log window's first line
            (0, 2, loss + "\n"),  # Add: a line in the log window
            (0, 6, loss),  # and the status bar
        ]
        os.close(w)  # Wireshark closes its end: the capture is over
        _, err = p.communicate(timeout=WAIT)
        assert p.returncode == 0
        assert err == "nflogd-extcap: 2 packets captured, 3 packets lost on the feed\n"
        assert read_frames(out, 1) == [(0, 2, "2 packets captured, 3 packets lost on the feed\n")]
        os.close(out)
        os.close(data)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _open_writer(path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody reads it yet
        return None


@pytest.mark.needs("tshark")
def test_documented_install_lines_run(tmp_path):
    """The README's and docs/extcap.md's install blocks, as pasted, in a fresh HOME."""
    import re

    root = Path(__file__).resolve().parent.parent
    for doc in ("README.md", "docs/extcap.md"):
        blocks = [
            b for b in re.findall(r"```sh\n(.*?)```", (root / doc).read_text(), re.S) if "nflogd-extcap" in b
        ]
        assert len(blocks) == 1, doc
        h = tmp_path / doc.replace("/", "-")
        h.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WIRESHARK_", "XDG_", "NFLOGD_"))}
        env.update(HOME=str(h), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        r = subprocess.run(["sh", "-ec", blocks[0]], env=env, capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 0, r.stderr
        assert "nflogd (nflogd feed (any endpoint: set it in the options))" in r.stdout
        if "nflogd-extcap.conf" in blocks[0]:
            assert "nflogd-tcp-127-0-0-1-5555 (nflogd feed local)" in r.stdout
    # docs/extcap.md's example nflogd-extcap.conf, as printed there.
    (conf,) = re.findall(r"\n  ```\n(.*?)  ```", (root / "docs/extcap.md").read_text(), re.S)
    configure(env, *(line.strip() for line in conf.splitlines()))
    listed = tshark_interfaces(env)
    assert "nflogd-tcp-router1-5555 (nflogd feed router1)" in listed
    assert "nflogd-ipc-run-nflogd-relay-feed-sock (nflogd feed all routers (relay))" in listed


@pytest.mark.kernel
def test_reordering_option_puts_two_groups_in_time_order(netns, tmp_path, home):
    """Group 1 cut every 200 ms, group 2 every 10 ms: frames step back in time without a
    window, and never with the option's 500 ms, given through tshark's -o."""
    log_rules(netns)
    groups = [{"group": 1, "flush_ms": 200, "queue_threshold": 1000}, {"group": 2, "flush_ms": 10}]
    least = {}
    with NflogdProcess(netns, tmp_path / "d", groups=groups) as d:
        configure(home, d.endpoint)
        iface = iface_of(home, d.endpoint)
        for window in ("0", "500"):
            out = tmp_path / f"window{window}.pcapng"
            opt = f"extcap.{iface.replace('-', '_')}.reorderms:{window}"
            rc, err = capture(netns, home, iface, 300, out, "-o", opt)
            assert rc == 0, err
            rows = fields(out, "nflog.res_id", "frame.time_delta")
            assert len(rows) == 300 and {r[0] for r in rows} == {"1", "2"}
            least[window] = min(float(r[1]) for r in rows)
    assert least["0"] < -0.05  # a group-1 batch, up to 200 ms older than group 2's last packet
    assert least["500"] >= 0


@pytest.mark.needs("tshark")
def test_the_bare_tshark_line_is_tsharks_own_for_every_extcap(tmp_path):
    """tshark 4.0 ends an extcap capture that went well with "tshark: " and nothing after it
    (the empty message it was handed): Wireshark's own randpkt extcap gets the same line."""
    r = subprocess.run(
        ["tshark", "-i", "randpkt", "-a", "packets:3", "-w", str(tmp_path / "r.pcapng")],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    if "randpkt" not in r.stderr:
        pytest.skip(f"this tshark has no randpkt extcap: {r.stderr}")
    assert r.returncode == 0, r.stderr
    assert r.stderr.endswith("\ntshark: \n3 packets captured\n"), r.stderr


@pytest.mark.needs("tshark")
def test_the_documented_preference_names_are_tsharks(home):
    """docs/extcap.md spells out each option's tshark preference: exactly those tshark knows."""
    root = Path(__file__).resolve().parent.parent
    documented = set(re.findall(r"\| `(extcap\.nflogd\.[a-z]+)` \|", (root / "docs/extcap.md").read_text()))
    r = subprocess.run(
        ["tshark", "-G", "currentprefs"], capture_output=True, text=True, env=home, timeout=WAIT
    )
    known = set(re.findall(r"^#?(extcap\.nflogd\.[a-z]+):", r.stdout, re.M))
    assert (
        documented
        == known
        == {
            f"extcap.nflogd.{o}"
            for o in ("endpoint", "groups", "linktype", "reorderms", "serverkey", "clientkey")
        }
    )


@pytest.mark.kernel
def test_curve_endpoint_without_keys_is_said_once_to_tshark(netns, tmp_path, home):
    """Without the key options, tshark shows why nothing came: the endpoint requires CURVE, once."""
    keys = make_keys(tmp_path / "curve")
    log_rules(netns)
    publish = {"bind": [f"ipc://{tmp_path}/d/run/feed.sock", TCP], "curve": curve_section(keys)}
    with NflogdProcess(netns, tmp_path / "d", groups=[1], extra={"publish": publish}):
        configure(home, f"{TCP} curve-daemon")
        iface = iface_of(home, "curve-daemon")
        p = netns.popen(
            "tshark", "-i", iface, "-a", "duration:6", "-w", str(tmp_path / "none.pcapng"),
            env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _, err = p.communicate(timeout=WAIT)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert err.count("handshake failed") == 1, err
    assert (
        f"Error by extcap pipe: nflogd feed {TCP}: handshake failed: the endpoint requires CURVE (give "
        "server_public_key and client_secret_key_file, nflog-tap --server-key/--client-key);"
        " retrying every 2 s"
    ) in err, err


@pytest.mark.needs("tshark")
def test_a_packet_over_the_snaplen_is_cut_counted_and_the_file_reads(home, feed, tmp_path):
    """Wire-valid, though no daemon sends it: 300,000 captured bytes as raw IP. The record is
    cut to 262,144 bytes, the most Wireshark reads, its original length kept; counted at the end."""
    from feedutil import msg, rec, topics

    v4 = bytes.fromhex("4500001c000000004011") + bytes(10) + bytes(8)  # 28 bytes of IPv4 and UDP
    feed.publish_when_subscribed(
        topics(), msg(5, rec(5, v4), rec(5, v4 + bytes(300_000 - len(v4))), rec(5, v4))
    )
    out = tmp_path / "big.pcapng"
    p = subprocess.Popen(
        [sys.executable, "-m", "nflogd_client.extcap", "--capture", "--fifo", str(out),
         "--extcap-interface", "nflogd", "--endpoint", feed.endpoint, "--linktype", "ip"],
        env=home, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: out.exists() and out.stat().st_size > 262_144 + 2 * 28, "the three packets", 30)
        time.sleep(0.2)
        p.terminate()
        _, err = p.communicate(timeout=WAIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0
    assert err == "nflogd-extcap: 3 packets captured, 1 packets cut to 262144 bytes\n"
    rows = fields(out, "frame.len", "frame.cap_len")
    assert rows == [["28", "28"], ["300000", "262144"], ["28", "28"]]
