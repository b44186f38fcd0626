"""Who may read the feed: CURVE on tcp (keys, reload, refusals), exposure checks, IPC_FILTER_GID,
nflogd-keygen, and the privileges of every thread of the running daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
import zmq
from daemonutil import NflogdProcess, nflogd_command, packet_count, receive
from nflogd_client import Subscriber, curve
from nflogd_client.subscriber import AUTH_RETRY_S
from pubutil import serve

from nflogd import config
from nflogd.config_publish import PublishConfig
from nflogd.errors import ConfigError
from nflogd.publish import Publisher

pytestmark = pytest.mark.timeout(60)

TCP = "tcp://127.0.0.1:5555"
NET_ADMIN = 1 << 12
KEYGEN = Path(sys.executable).parent / "nflogd-keygen"


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    out = subprocess.run(
        [str(KEYGEN), str(directory), name], capture_output=True, text=True, check=True, timeout=20
    )
    public, secret = out.stdout.split()
    return Path(public), Path(secret)


def make_keys(base: Path) -> SimpleNamespace:
    """server pair; clients/ with alice's public key; bob's pair, unknown to the daemon."""
    server_pub, server_secret = keygen(base, "server")
    alice_pub, alice_secret = keygen(base / "alice", "alice")
    bob_pub, bob_secret = keygen(base / "bob", "bob")
    clients = base / "clients"
    clients.mkdir()
    shutil.copy(alice_pub, clients / "alice.key")
    return SimpleNamespace(
        dir=base, clients=clients, server_pub=server_pub, server_secret=server_secret,
        alice_pub=alice_pub, alice_secret=alice_secret, bob_pub=bob_pub, bob_secret=bob_secret,
    )  # fmt: skip


@pytest.fixture
def keys(tmp_path):
    return make_keys(tmp_path / "curve")


def curve_section(keys) -> dict:
    return {"secret_key_file": str(keys.server_secret), "authorized_keys_dir": str(keys.clients)}


def curve_daemon(netns, workdir: Path, keys, **kw) -> NflogdProcess:
    ipc = f"ipc://{workdir}/run/feed.sock"
    publish = {"bind": [ipc, TCP], "curve": curve_section(keys)}
    return NflogdProcess(netns, workdir, extra={"publish": publish, **kw.pop("extra", {})}, **kw)


def curve_subscribes(d: NflogdProcess) -> int:
    return d.stderr.count("DEBUG: subscribe '(all)' (CURVE)")


def wait_for(pred, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def in_netns(netns, fn):
    """Call ``fn`` with the thread in ``netns``: a context's IO thread starts with its first socket
    and stays in the namespace it was created in."""
    with netns.entered():
        return fn()


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*nflogd_command(), "--check", "-c", str(path)], capture_output=True, text=True, timeout=30
    )


def task_status(pid: int) -> list[dict[str, str]]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        out.append({k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())})
    return out


# -- CURVE end to end ---------------------------------------------------------------------------


@pytest.mark.kernel
def test_authorized_client_reads_tcp_with_the_seq_of_ipc(netns, tmp_path, keys, ctx):
    """alice (key file) and nflog-tap read over CURVE; an ipc client without keys reads the same
    packets with the same seq; a client without CURVE on the tcp endpoint gets nothing."""
    netns.log_rule(1, match="udp dport 9999")
    with curve_daemon(netns, tmp_path / "d", keys) as d:
        cctx = in_netns(netns, zmq.Context)
        try:

            def connect():
                alice = Subscriber(
                    TCP, server_public_key=keys.server_pub, client_secret_key_file=keys.alice_secret,
                    context=cctx,
                )  # fmt: skip
                plain = Subscriber(TCP, context=cctx)
                return alice, plain

            alice, plain = in_netns(netns, connect)
            wait_for(lambda: curve_subscribes(d) >= 1, "alice's subscription")
            ipc = d.subscribe(ctx)
            tap = netns.popen(
                str(Path(sys.executable).parent / "nflog-tap"), "-e", TCP, "-c", "2",
                "--server-key", curve.public_key(keys.server_pub).decode(),
                "--client-key", str(keys.alice_secret),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                # a process start (its imports included) in a busy suite: 15 s, and its own words if it ends
                wait_for(
                    lambda: curve_subscribes(d) >= 2 or tap.poll() is not None, "nflog-tap's subscription", 15
                )
                assert tap.poll() is None, tap.communicate()[1]
                netns.send_udp([b"one", b"two"])
                got = [alice.recv(timeout=5), alice.recv(timeout=5)]
                assert [p.data[28:] for p in got] == [b"one", b"two"]
                batches = receive(ipc, lambda bs: packet_count(bs) >= 2)
                assert [p.seq for b in batches for p in b.packets] == [p.seq for p in got] == [0, 1]
                out, err = tap.communicate(timeout=10)
            finally:
                tap.kill()
                tap.communicate()  # its pipes closed, whatever happened
            assert tap.returncode == 0, err
            assert len(out.splitlines()) == 2 and err == b"nflog-tap: 2 packets printed, 0 lost\n"
            assert plain.recv(timeout=0.3) is None
            alice.close()
            plain.close()
            ipc.close(linger=0)
        finally:
            cctx.destroy(linger=0)
    assert d.returncode == 0


@pytest.mark.kernel
def test_unknown_client_gets_nothing_until_sighup_adds_its_key(netns, tmp_path, keys):
    netns.log_rule(1, match="udp dport 9999")
    with curve_daemon(netns, tmp_path / "d", keys) as d:
        cctx = in_netns(netns, zmq.Context)
        try:
            server_z85 = curve.public_key(keys.server_pub)  # the Z85 text works as well as the file

            def connect(secret):
                return Subscriber(
                    TCP, server_public_key=server_z85, client_secret_key_file=secret, context=cctx
                )

            alice = in_netns(netns, lambda: connect(keys.alice_secret))
            bob = in_netns(netns, lambda: connect(keys.bob_secret))
            wait_for(lambda: curve_subscribes(d) >= 1, "alice's subscription")
            wait_for(lambda: "is not in publish.curve.authorized_keys_dir" in d.stderr, "bob's refusal")
            netns.send_udp([b"for alice"])
            assert alice.recv(timeout=5).data[28:] == b"for alice"
            assert bob.recv(timeout=0.3) is None
            assert bob.refused == 1

            shutil.copy(keys.bob_pub, keys.clients / "bob.key")
            assert "failed" not in d.reload()["STATUS"]
            assert "CURVE: 2 authorized client keys" in d.stderr
            assert bob.recv(timeout=AUTH_RETRY_S + 1) is None  # bob connects again meanwhile
            wait_for(lambda: curve_subscribes(d) >= 2, "bob's subscription after the reload")
            assert bob.refused == 1
            netns.send_udp([b"for both"])
            assert alice.recv(timeout=5).data[28:] == b"for both"
            assert bob.recv(timeout=5).data[28:] == b"for both"

            # turning CURVE off is refused as a whole: bob still reads
            d.write_config(d.make_config(extra={"publish": {"bind": [TCP]}}))
            status = d.reload()["STATUS"]
            assert status.endswith(
                "publish.curve: turning CURVE off needs a restart (systemctl restart nflogd)"
            )
            netns.send_udp([b"still CURVE"])
            assert bob.recv(timeout=5).data[28:] == b"still CURVE"
            alice.close()
            bob.close()
        finally:
            cctx.destroy(linger=0)
    assert d.returncode == 0


# -- bad keys stop the daemon -------------------------------------------------------------------


def _bad_keys(keys, case: str) -> tuple[dict, str]:
    """(publish.curve section, expected error after 'nflogd: ') for one broken key set."""
    section = curve_section(keys)
    if case == "missing-secret":
        section["secret_key_file"] = str(keys.dir / "nope.key_secret")
        return section, (
            f"publish.curve.secret_key_file: cannot read {keys.dir}/nope.key_secret: "
            "[Errno 2] No such file or directory"
        )
    if case == "public-as-secret":
        section["secret_key_file"] = str(keys.server_pub)
        return section, (
            f"publish.curve.secret_key_file: {keys.server_pub}: no secret key in it; "
            "give the NAME.key_secret file that nflogd-keygen writes, not NAME.key"
        )
    if case == "missing-dir":
        section["authorized_keys_dir"] = str(keys.dir / "nope")
        return section, (
            f"publish.curve.authorized_keys_dir: cannot read {keys.dir}/nope: "
            "[Errno 2] No such file or directory"
        )
    if case == "dir-is-a-file":
        section["authorized_keys_dir"] = str(keys.server_pub)
        return section, (
            f"publish.curve.authorized_keys_dir: cannot read {keys.server_pub}: [Errno 20] Not a directory"
        )
    assert case == "garbage-key"
    (keys.clients / "eve.key").write_text('metadata\ncurve\n    public-key = "short"\n')
    return (
        section,
        f"publish.curve.authorized_keys_dir: {keys.clients}/eve.key: public-key: "
        "a CURVE key is 40 Z85 characters, got 5",
    )


@pytest.mark.parametrize(
    "case", ["missing-secret", "public-as-secret", "missing-dir", "dir-is-a-file", "garbage-key"]
)
def test_bad_keys_fail_check_on_one_line(tmp_path, keys, case):
    section, expect = _bad_keys(keys, case)
    path = tmp_path / "nflogd.yaml"
    path.write_text(yaml.safe_dump({"groups": [1], "publish": {"bind": [TCP], "curve": section}}))
    res = check(path)
    assert (res.returncode, res.stderr) == (2, f"nflogd: {expect}\n")


@pytest.mark.kernel
def test_keys_the_user_cannot_read_stop_the_start(netns):
    """root reads the keys at --check; the daemon, once it is nobody, cannot: exit 2 at start."""
    workdir = Path(tempfile.mkdtemp(prefix="nflogd-sec-", dir="/tmp"))
    try:
        os.chmod(workdir, 0o755)
        keys = make_keys(workdir / "curve")
        os.chown(keys.server_secret, 65534, 65534)  # the service user owns its secret key
        os.chmod(keys.clients, 0o700)  # ... but the client keys are root's alone
        d = curve_daemon(netns, workdir, keys, extra={"user": "nobody"}, log_level="warning")
        assert d.run_to_exit() == 2
        assert d.stderr.splitlines() == [
            f"nflogd: publish.curve.authorized_keys_dir: cannot read {keys.clients}: "
            "[Errno 13] Permission denied"
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- exposure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://[::]:5555", "tcp://feed.example.net:5555"]
)
def test_exposed_tcp_without_curve_is_refused(endpoint):
    text = f"groups: [1]\npublish: {{bind: ['ipc:///run/x.sock', '{endpoint}']}}"
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    assert str(info.value) == (
        f"publish.bind[1]: {endpoint} is not a loopback address and publish.curve is not set: every host "
        "that reaches it could read the feed; set publish.curve (docs/security.md) or publish.insecure: true"
    )
    assert config.parse(text.replace("]}", "], insecure: true}")).publish.insecure is True


@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1:5555", "tcp://127.1.2.3:5555", "tcp://[::1]:5555", "tcp://localhost:5555"]
)
def test_loopback_tcp_needs_nothing(endpoint):
    assert config.parse(f"groups: [1]\npublish: {{bind: '{endpoint}'}}").publish.bind == (endpoint,)


def test_exposed_tcp_check_and_curve(tmp_path, keys):
    path = tmp_path / "nflogd.yaml"
    publish = {"bind": ["tcp://0.0.0.0:5555"]}
    path.write_text(yaml.safe_dump({"groups": [1], "publish": publish}))
    res = check(path)
    assert res.returncode == 2 and res.stderr.startswith("nflogd: publish.bind[0]: tcp://0.0.0.0:5555 is not")
    assert res.stderr.count("\n") == 1
    for extra in ({"insecure": True}, {"curve": curve_section(keys)}):
        path.write_text(yaml.safe_dump({"groups": [1], "publish": {**publish, **extra}}))
        assert check(path).returncode == 0, extra
    with pytest.raises(ConfigError, match="^bind\\[0\\]: tcp://0.0.0.0:5555 is not a loopback address"):
        PublishConfig(bind=("tcp://0.0.0.0:5555",))


def test_curve_config_hides_the_secret_key(keys):
    cfg = config.parse(
        f"groups: [1]\npublish: {{curve: {{secret_key_file: {keys.server_secret}, "
        f"authorized_keys_dir: {keys.clients}}}}}"
    )
    public, secret = curve.keypair(keys.server_secret)
    assert (cfg.publish.curve.public_key, cfg.publish.curve.secret_key) == (public, secret)
    assert secret.decode() not in repr(cfg)


# -- ipc ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ours", [True, False], ids=["our-gid", "other-gid"])
def test_ipc_filter_gid(tmp_path, ctx, ours):
    gid = os.getgid() if ours else 65534
    text = f"groups: [1]\npublish: {{bind: 'ipc://{tmp_path}/f.sock', ipc_filter_groups: [{gid}]}}"
    pub = Publisher(config.parse(text).publish)
    sub = ctx.socket(zmq.SUB)
    try:
        sub.connect(f"ipc://{tmp_path}/f.sock")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:  # the subscription arrives, or not
            serve(pub, lambda: pub.subscription_messages > 0, "no subscription", 1.0 if ours else 0.3)
        except AssertionError:
            pass
        assert bool(pub.subscription_messages) is ours
    finally:
        sub.close(linger=0)
        pub.close(linger=0)


def test_ipc_filter_groups_by_name():
    cfg = config.parse("groups: [1]\npublish: {ipc_filter_groups: [nogroup, 0, nogroup]}")
    assert cfg.publish.ipc_filter_gids == (65534, 0)
    with pytest.raises(ConfigError, match=r"^publish.ipc_filter_groups\[0\]: no such group 'nflt-none'$"):
        config.parse("groups: [1]\npublish: {ipc_filter_groups: nflt-none}")


# -- client keys --------------------------------------------------------------------------------


def test_subscriber_key_arguments(keys, ctx):
    with pytest.raises(ValueError, match="^server_public_key: needs client_secret_key_file"):
        Subscriber(TCP, server_public_key=keys.server_pub, context=ctx)
    with pytest.raises(ValueError, match="^client_secret_key_file: needs server_public_key"):
        Subscriber(TCP, client_secret_key_file=keys.alice_secret, context=ctx)
    with pytest.raises(curve.KeyFileError, match="^client_secret_key_file: .*alice.key: no secret key in it"):
        Subscriber(TCP, server_public_key=keys.server_pub, client_secret_key_file=keys.alice_pub, context=ctx)
    with pytest.raises(curve.KeyFileError, match=r"^server_public_key: cannot read /nope: \[Errno 2\]"):
        Subscriber(TCP, server_public_key="/nope", client_secret_key_file=keys.alice_secret, context=ctx)
    with Subscriber(
        TCP, server_public_key=keys.server_pub, client_secret_key_file=keys.alice_secret, context=ctx
    ) as sub:
        assert sub.socket.getsockopt(zmq.MECHANISM) == zmq.CURVE


# -- nflogd-keygen ------------------------------------------------------------------------------


def test_keygen_writes_a_usable_pair(tmp_path):
    public, secret = keygen(tmp_path / "new" / "dir", "r1")
    assert (public.name, secret.name) == ("r1.key", "r1.key_secret")
    assert (public.stat().st_mode & 0o777, secret.stat().st_mode & 0o777) == (0o644, 0o600)
    pub, sec = curve.keypair(secret)
    assert curve.public_key(public) == pub and zmq.curve_public(sec) == pub
    assert curve.authorized_keys(public.parent) == {pub: str(public)}

    again = subprocess.run([str(KEYGEN), str(public.parent), "r1"], capture_output=True, text=True)
    assert (again.returncode, again.stderr) == (
        1,
        f"nflogd-keygen: {public} exists; remove it or choose another NAME\n",
    )
    for args in ([str(tmp_path)], [str(tmp_path), "a/b"], [str(tmp_path), "x.key"]):
        bad = subprocess.run([str(KEYGEN), *args], capture_output=True, text=True)
        assert (
            bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("nflogd-keygen: ")
        )


# -- privileges ---------------------------------------------------------------------------------


@pytest.mark.kernel
def test_every_thread_is_the_user_with_net_admin_at_most(netns):
    """user: nobody, CURVE and metrics: every thread (the capture's, the metrics server's; CURVE
    is the feed's own server's, on the main thread) runs as nobody, with no capability but
    CAP_NET_ADMIN, for good (bounding set, NNP)."""
    workdir = Path(tempfile.mkdtemp(prefix="nflogd-sec-", dir="/tmp"))
    try:
        os.chmod(workdir, 0o755)
        keys = make_keys(workdir / "curve")
        os.chown(keys.server_secret, 65534, 65534)
        with curve_daemon(netns, workdir, keys, extra={"user": "nobody"}) as d:
            tasks = task_status(d.pid)
            assert len(tasks) >= 3, tasks  # main, capture, metrics
            for t in tasks:
                assert t["Uid"].split() == ["65534"] * 4, t["Name"]
                assert int(t["CapEff"], 16) | int(t["CapPrm"], 16) | int(t["CapInh"], 16) == NET_ADMIN
                assert int(t["CapBnd"], 16) == NET_ADMIN and t["NoNewPrivs"] == "1", t["Name"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.kernel
def test_without_user_root_keeps_net_admin_only(netns, tmp_path, keys):
    with curve_daemon(netns, tmp_path / "d", keys) as d:
        tasks = task_status(d.pid)
        assert len(tasks) >= 3  # main, capture, metrics
        for t in tasks:
            assert t["Uid"].split() == ["0"] * 4
            assert int(t["CapEff"], 16) | int(t["CapPrm"], 16) == NET_ADMIN, t["Name"]
            assert int(t["CapBnd"], 16) == NET_ADMIN and t["NoNewPrivs"] == "1", t["Name"]
        assert "running as root (uid 0) with CAP_NET_ADMIN only" in d.stderr
