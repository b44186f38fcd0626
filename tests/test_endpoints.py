"""A client says why it gets nothing: endpoint state, one line per failure, the recovery.

Against the real daemon and nflog-tap where the failure is the daemon's absence, against real
ZeroMQ CURVE servers for the handshake failures, and as an unprivileged forked child for a
socket directory it may not enter.
"""

from __future__ import annotations

import grp
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import zmq
import zmq.auth
from daemonutil import NflogdProcess, wait_until
from nflogd_client import Subscriber
from nflogd_client.endpoints import CONNECTED, CONNECTING, REFUSED, check_endpoint
from test_tap import tap_command

pytestmark = pytest.mark.timeout(120)

WAIT = 20.0


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_state(sub: Subscriber, endpoint: str, state: str, error: str | None = None, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        st = sub.endpoints[endpoint]
        if st.state == state and (error is None or (st.error and error in st.error)):
            return st
        assert time.monotonic() < deadline, f"{endpoint}: {st}"
        sub.recv(timeout=0.1)


def warnings_for(caplog, endpoint: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and endpoint in r.getMessage()
    ]


# -- malformed endpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    ["router1:5555", "tcp://router1", "tcp://[::1:5555", "udp://x:1", "ipc://relative", "tcp://::1:5"],
)
def test_a_malformed_endpoint_is_refused_with_the_accepted_forms(endpoint):
    with pytest.raises(ValueError) as e:
        Subscriber(endpoint)
    assert str(e.value).startswith(f"endpoint {endpoint!r}: ")
    assert "tcp://HOST:PORT, ipc:///absolute/path" in str(e.value)


def test_nflog_tap_refuses_a_malformed_endpoint_in_one_line():
    r = subprocess.run(
        [*tap_command(), "-e", "router1:5555", "-c", "1"], capture_output=True, text=True, timeout=WAIT
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "nflog-tap: endpoint 'router1:5555': not an endpoint; expected "
        "tcp://HOST:PORT, ipc:///absolute/path or ipc://@abstract-name"
    ]


@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "ipc:///run/x.sock", "ipc://@feed"]
)
def test_good_endpoints_pass(endpoint):
    assert check_endpoint(endpoint) == endpoint


# -- the daemon away, then there -----------------------------------------------------------------------


@pytest.mark.kernel
def test_nflog_tap_says_once_why_it_gets_nothing_and_that_it_recovered(netns, tmp_path):
    """The daemon is not running yet: the tap says so within seconds, once; the daemon starts:
    the tap says it connected and prints the packet."""
    netns.log_rule(1, match="udp dport 9999")
    d = NflogdProcess(netns, tmp_path / "d", groups=[1])
    err_path = tmp_path / "tap.stderr"
    with open(err_path, "wb") as err:
        tap = subprocess.Popen(
            [*tap_command(), "-e", d.endpoint, "-g", "1", "-c", "1"],
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        line = f"nflog-tap: nflogd feed {d.endpoint}: no such socket"
        wait_until(lambda: line in err_path.read_text(), "the tap's reason", timeout=WAIT)
        time.sleep(1.0)  # libzmq retries about every 100 ms meanwhile: none of them is said
        assert err_path.read_text().count(line) == 1, err_path.read_text()
        assert "(is nflogd running?); retrying" in err_path.read_text()
        with d:
            wait_until(lambda: f"nflogd feed {d.endpoint}: connected" in err_path.read_text(), "the recovery")
            deadline = time.monotonic() + WAIT
            while tap.poll() is None:
                assert time.monotonic() < deadline, err_path.read_text()
                netns.send_udp([b"hello"])
                time.sleep(0.1)
        out = tap.stdout.read().decode()
    finally:
        if tap.poll() is None:
            tap.kill()
        tap.wait(WAIT)
        tap.stdout.close()
    assert tap.returncode == 0
    assert "group 1" in out
    lines = err_path.read_text().splitlines()
    assert lines[0].startswith(line) and lines[1] == f"nflog-tap: nflogd feed {d.endpoint}: connected"
    assert lines[-1] == "nflog-tap: 1 packets printed, 0 lost"


@pytest.mark.kernel
def test_subscriber_state_follows_the_daemon(netns, tmp_path, caplog):
    """``sub.endpoints``: connecting with the cause, connected, connecting again after the
    daemon stops (said once), connected after it starts again."""
    caplog.set_level(logging.DEBUG, logger="nflogd_client")
    d = NflogdProcess(netns, tmp_path / "d", groups=[1])
    sub = Subscriber(d.endpoint, groups=1)
    try:
        st = wait_state(sub, d.endpoint, CONNECTING, "no such socket")
        assert st.connects == 0
        with d:
            st = wait_state(sub, d.endpoint, CONNECTED)
            assert st.error is None and st.connects == 1
        wait_state(sub, d.endpoint, CONNECTING)
        with NflogdProcess(netns, tmp_path / "d", groups=[1]):
            assert wait_state(sub, d.endpoint, CONNECTED).connects == 2
    finally:
        sub.close()
    said = warnings_for(caplog, d.endpoint)
    run = d.endpoint[len("ipc://") :].rsplit("/", 1)[0]
    assert (
        said[0]
        == f"nflogd feed {d.endpoint}: no such socket: {run} does not exist (is nflogd running?); retrying"
    )
    assert said[1] == f"nflogd feed {d.endpoint}: disconnected; reconnecting"
    assert len(said) <= 3, said  # and perhaps, once, what the probe found between the runs
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [f"nflogd feed {d.endpoint}: connected"] * 2


def test_nothing_listening_and_an_unknown_host(caplog):
    caplog.set_level(logging.INFO, logger="nflogd_client")
    port = free_port()
    nobody = f"tcp://127.0.0.1:{port}"
    unknown = "tcp://no-such-host.invalid:5555"
    with Subscriber([nobody, unknown]) as sub:
        wait_state(sub, nobody, CONNECTING, f"nothing listening on 127.0.0.1:{port} (connection refused)")
        wait_state(sub, unknown, CONNECTING, "cannot resolve host 'no-such-host.invalid'")
        time.sleep(0.5)
        sub.recv(timeout=0.5)
    assert len(warnings_for(caplog, nobody)) == 1
    assert len(warnings_for(caplog, unknown)) == 1


def test_stats_shows_each_endpoint_state(tmp_path):
    endpoint = f"ipc://{tmp_path}/none.sock"
    p = subprocess.Popen(
        [*tap_command(), "--stats", "-e", endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        time.sleep(3)
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=WAIT)
    assert p.returncode == 0
    assert (
        f"endpoint {endpoint}: connecting (no such socket {tmp_path}/none.sock (is nflogd running?))"
        in out.decode()
    )


# -- permissions -------------------------------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("owner", ["system group", "root"])
def test_permission_denied_names_the_group_to_join(netns, tmp_path, owner):
    """A user outside the group of the daemon's socket directory is told which group to join;
    if that is root's (a daemon run as root, group root), how to give the feed a group."""
    group = next((g for g in ("nflog", "adm", "disk", "sys") if _has_group(g)), None)
    if owner == "root":
        group = "root"
    if group is None:
        pytest.skip("no system group to give the directory")
    gid = grp.getgrnam(group).gr_gid
    top = tempfile.mkdtemp(prefix="nflogd-perm-")  # not under tmp_path, which may be mode 0700
    daemon = None
    try:
        os.chmod(top, 0o755)
        run = os.path.join(top, "run")
        os.mkdir(run, 0o750)
        os.chown(run, 0, gid)
        path = os.path.join(run, "feed.sock")
        daemon = NflogdProcess(
            netns, tmp_path / "d", groups=[1], extra={"publish": {"bind": [f"ipc://{path}"]}}
        )
        daemon.start()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the unprivileged user, no exec: nothing from the checkout runs as it
            try:
                os.close(r)
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                c = zmq.Context()
                sub = Subscriber(f"ipc://{path}", context=c)
                deadline = time.monotonic() + 5
                st = sub.endpoints[f"ipc://{path}"]
                while st.error is None and time.monotonic() < deadline:
                    sub.recv(timeout=0.1)
                    st = sub.endpoints[f"ipc://{path}"]
                os.write(w, f"{st.state}|{st.error}".encode())
                sub.close()
                c.destroy(linger=0)
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            said = f.read()
        os.waitpid(pid, 0)
        assert daemon.stop() == 0
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(top)
    if group == "root":
        assert said == (
            f"connecting|permission denied on {run}: its group is root, so only root reads this feed:"
            " run nflogd with group nflog (make run, or the package's unit) and join that group"
        )
    else:
        assert said == f"connecting|permission denied on {run}: join group {group}"


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


# -- CURVE -------------------------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    for name in ("server", "client", "other"):
        zmq.auth.create_certificates(d, name)
    return d


def curve_server(ctx, keys, endpoint):
    public, secret = zmq.auth.load_certificate(keys / "server.key_secret")
    s = ctx.socket(zmq.XPUB)
    s.curve_server = True
    s.curve_publickey = public
    s.curve_secretkey = secret
    s.bind(endpoint)
    return s


def test_curve_failures_say_what_is_wrong(ctx, keys, caplog):
    caplog.set_level(logging.INFO, logger="nflogd_client")
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    server = curve_server(ctx, keys, endpoint)
    try:
        with Subscriber(endpoint, context=ctx) as plain:  # no keys against a CURVE endpoint
            wait_state(plain, endpoint, REFUSED, "the endpoint requires CURVE")
        wrong = keys / "other.key"  # not the server's key
        with Subscriber(
            endpoint, context=ctx, server_public_key=wrong, client_secret_key_file=keys / "client.key_secret"
        ) as sub:
            st = wait_state(sub, endpoint, REFUSED, "CURVE handshake failed: wrong server key?")
            time.sleep(0.5)
            sub.recv(timeout=0.5)
            assert sub.endpoints[endpoint].handshake_failures > st.handshake_failures  # libzmq retries
            assert sub.refused == sub.endpoints[endpoint].handshake_failures
            # a failure without detail is said once no cause came within VAGUE_GRACE_S
            wait_until(lambda: sub.recv(timeout=0.1) or len(warnings_for(caplog, endpoint)) == 2, "its line")
        with Subscriber(
            endpoint,
            context=ctx,
            server_public_key=keys / "server.key",
            client_secret_key_file=keys / "client.key_secret",
        ) as good:
            assert wait_state(good, endpoint, CONNECTED).error is None
    finally:
        server.close(linger=0)
    said = warnings_for(caplog, endpoint)
    assert said == [
        f"nflogd feed {endpoint}: handshake failed: the endpoint requires CURVE (give server_public_key "
        "and client_secret_key_file, nflog-tap --server-key/--client-key); retrying every 2 s",
        f"nflogd feed {endpoint}: CURVE handshake failed: wrong server key?; retrying",
    ]


@pytest.mark.kernel
def test_relay_says_once_why_an_upstream_is_away(netns, tmp_path):
    from daemonutil import RelayProcess

    away = f"ipc://{tmp_path}/away/feed.sock"
    with RelayProcess(netns, tmp_path / "relay", upstreams=[away]) as relay:
        line = (
            f"WARNING: upstream {away}: no such socket: {tmp_path}/away does not exist (is nflogd running?)"
        )
        wait_until(lambda: line in relay.stderr, "the relay's reason", timeout=WAIT)
        time.sleep(1.0)
        assert relay.stderr.count(f"upstream {away}: no such socket") == 1
        assert relay.metric("nflogd_relay_upstream_up", upstream=away) == 0
