"""nflogd-relay between real daemons and real clients: three router namespaces joined by veth
pairs to a collector namespace, nothing connected to the host's own namespace."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import zmq
import zmq.auth
from daemonutil import REPO, NflogdProcess, RelayProcess, relay_command, unit_settings, wait_until
from nflogd_client import Subscriber, filters
from nsutil import NetNS

pytestmark = pytest.mark.timeout(60)

PORT = 5555  # each daemon's tcp endpoint, on its router's veth address
UDP_PORT = 9999  # what the routers' log rule matches
WAIT = 10.0
TAP = (
    [str(REPO / ".venv/bin/nflog-tap")]
    if (REPO / ".venv/bin/nflog-tap").exists()
    else [sys.executable, "-m", "nflogd_client.tap"]
)


def router_address(i: int) -> str:
    return f"10.77.{i}.1"


def router_endpoint(i: int, port: int = PORT) -> str:
    return f"tcp://{router_address(i)}:{port}"


class Lab:
    """``routers[i]`` (router1..N) each joined to ``collector`` by a veth pair: 10.77.i.1/30 on
    the router's end, 10.77.i.2/30 on the collector's. No address anywhere else, no routes beyond
    those links: nothing can leave these namespaces."""

    def __init__(self, n: int):
        self.namespaces: list[NetNS] = []
        try:
            self.collector = self._netns("nflc")
            self.routers = []
            for i in range(1, n + 1):
                r = self._netns("nflr")
                # made inside the router namespace, its peer moved straight into the collector's
                r.run(*f"ip link add up0 type veth peer name r{i} netns {self.collector.name}".split())
                r.run("ip", "addr", "add", f"{router_address(i)}/30", "dev", "up0")
                r.run("ip", "link", "set", "up0", "up")
                self.collector.run("ip", "addr", "add", f"10.77.{i}.2/30", "dev", f"r{i}")
                self.collector.run("ip", "link", "set", f"r{i}", "up")
                r.log_rule(1, match=f"udp dport {UDP_PORT}")
                self.routers.append(r)
        except BaseException:
            self.close()
            raise

    def _netns(self, prefix: str) -> NetNS:
        ns = NetNS(prefix)
        self.namespaces.append(ns)
        return ns

    def close(self) -> None:
        for ns in reversed(self.namespaces):  # a veth pair goes with either of its namespaces
            ns.close()


@pytest.fixture
def lab():
    made: list[Lab] = []

    def make(n: int = 3) -> Lab:
        made.append(Lab(n))
        return made[-1]

    yield make
    for one in made:
        one.close()


def daemon(
    router: NetNS, workdir: Path, i: int, *, groups=(1,), publish: dict | None = None
) -> NflogdProcess:
    """nflogd in ``router`` as node router<i>, publishing on its veth address only."""
    publish = publish or {"bind": [router_endpoint(i)], "insecure": True}
    return NflogdProcess(
        router, workdir / f"router{i}", groups=groups, node=f"router{i}", extra={"publish": publish}
    )


def subscribed(d: NflogdProcess, topic: str = "(all)", times: int = 1, via: str = "") -> None:
    """Wait until the daemon (or relay) has logged ``times`` subscriptions to ``topic``."""
    line = f"DEBUG: subscribe {topic!r}{via}"
    wait_until(lambda: d.stderr.count(line) >= times, f"{d.workdir.name}: {line} x{times}\n{d.stderr}")


class Reader(threading.Thread):
    """Owns some Subscribers from start() on and keeps every batch they receive, per client."""

    def __init__(self, subs: list[Subscriber]):
        super().__init__(daemon=True)
        self.subs = subs
        self.batches: list[list] = [[] for _ in subs]
        self._done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        poller = zmq.Poller()
        for sub in self.subs:
            poller.register(sub.socket, zmq.POLLIN)
        try:
            while not self._done.is_set():
                poller.poll(50)
                for sub, out in zip(self.subs, self.batches):
                    while (batch := sub.recv_batch(timeout=0)) is not None:
                        out.append(batch)
        except BaseException as e:  # pragma: no cover - reported by stop()
            self.error = e

    def payloads(self, client: int, node: str) -> list[bytes]:
        """UDP payloads (after the 20-byte IPv4 and 8-byte UDP headers) of ``node``'s packets."""
        return [p.data[28:] for b in list(self.batches[client]) if b.node == node for p in b.packets]

    def stop(self) -> None:
        self._done.set()
        self.join(WAIT)
        if self.error is not None:
            raise self.error


def send(router: NetNS, tag: str, n: int, *, chunk: int = 50, pause: float = 0.0) -> list[bytes]:
    """Send ``n`` datagrams ``tag-k`` in the router, ``chunk`` at a time with ``pause`` between."""
    payloads = [f"{tag}-{k}".encode() for k in range(n)]
    for k in range(0, n, chunk):
        router.send_udp(payloads[k : k + chunk], port=UDP_PORT)
        if pause:
            time.sleep(pause)
    return payloads


def sync(lab: Lab, reader: Reader, nodes: list[str]) -> None:
    """Probe every router until each client has a packet from each node: the whole path is up,
    every client's subscription included (a relay reports only a topic's first one)."""

    def done() -> bool:
        return all(reader.payloads(c, n) for c in range(len(reader.subs)) for n in nodes)

    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline, "probes did not reach every client"
        for r in lab.routers:
            r.send_udp([b"probe"], port=UDP_PORT)
        time.sleep(0.05)


def contiguous(batches) -> None:
    """Within each epoch, each message starts where the previous one ended."""
    expected: dict[int, int] = {}
    for b in batches:
        if b.epoch in expected:
            assert b.first_seq == expected[b.epoch], f"gap in {b.node} epoch {b.epoch}: {b!r}"
        expected[b.epoch] = b.next_seq


# -- fan-in, fan-out, and a restart -----------------------------------------------------------------


@pytest.mark.kernel
def test_every_packet_arrives_once_at_each_client_and_a_restart_is_one_nodes_gap(lab, tmp_path):
    lab = lab(3)
    nodes = ["router1", "router2", "router3"]
    daemons = [daemon(r, tmp_path, i) for i, r in enumerate(lab.routers, 1)]
    relay = RelayProcess(lab.collector, tmp_path / "relay", upstreams=[router_endpoint(i) for i in (1, 2, 3)])
    contexts: list[zmq.Context] = []
    try:
        for d in daemons:
            d.start()
        relay.start()
        ctx = zmq.Context()
        contexts.append(ctx)
        # two clients of the relay, over ipc; a third connected to the three daemons directly
        # (tcp on the veths: its ZeroMQ threads start inside the collector namespace)
        clients = [Subscriber(relay.endpoint, context=ctx) for _ in range(2)]
        with lab.collector.entered():
            direct_ctx = zmq.Context()
            contexts.append(direct_ctx)
            clients.append(Subscriber([router_endpoint(i) for i in (1, 2, 3)], context=direct_ctx))
        for d in daemons:
            subscribed(d, times=2)  # the relay passed its clients' subscription on; the direct client's
        reader = Reader(clients)
        reader.start()
        sync(lab, reader, nodes)
        sent: dict[str, list[bytes]] = {}

        # router1 and router3 send all along, router2 is restarted in the middle
        def stream(i: int) -> None:
            sent[nodes[i - 1]] = send(lab.routers[i - 1], f"r{i}", 1500, pause=0.04)

        senders = [threading.Thread(target=stream, args=(i,)) for i in (1, 3)]
        for t in senders:
            t.start()
        r2 = lab.routers[1]
        before = send(r2, "r2a", 300, pause=0.02)
        for c in range(len(clients)):
            wait_until(lambda c=c: set(before) <= set(reader.payloads(c, "router2")), "router2's first run")
        daemons[1].stop()
        down = send(r2, "r2down", 100)  # nobody has the group: the kernel logs them to no one
        daemons[1].start()
        unsure = send(r2, "r2b", 100)  # before the new run has its subscribers: received or lost
        subscribed(daemons[1], times=4)  # the relay and the direct client, both runs
        after = send(r2, "r2c", 300, pause=0.02)
        for t in senders:
            t.join(WAIT)
        for c in range(len(clients)):
            for node in nodes:
                want = set(sent.get(node, ())) | (set(after) if node == "router2" else set())
                wait_until(lambda c=c, node=node, want=want: want <= set(reader.payloads(c, node)), node)
        reader.stop()

        for c, sub in enumerate(clients):
            for node in ("router1", "router3"):
                got = [p for p in reader.payloads(c, node) if p != b"probe"]
                assert Counter(got) == Counter(sent[node]), f"client {c}, {node}: not each packet once"
                batches = [b for b in reader.batches[c] if b.node == node]
                assert len({b.epoch for b in batches}) == 1
                contiguous(batches)
                assert sub.lost[(node, 1)] == 0
            got2 = [p for p in reader.payloads(c, "router2") if p != b"probe"]
            assert Counter(got2).most_common(1)[0][1] == 1, "a packet of router2 arrived twice"
            assert set(before) | set(after) <= set(got2)
            assert not set(down) & set(got2)
            batches2 = [b for b in reader.batches[c] if b.node == "router2"]
            assert len({b.epoch for b in batches2}) == 2
            contiguous(batches2)
            # the restart is router2's alone: one restart, and as lost exactly the packets of the
            # new run that went out before this client was subscribed again
            assert sub.restarts == 1
            assert sub.lost[("router2", 1)] == len(unsure) - len(set(unsure) & set(got2))
            assert sub.total_lost == sub.lost[("router2", 1)]
            assert sub.malformed == 0

        m = relay.scrape()
        for i in (1, 2, 3):
            label = (("upstream", router_endpoint(i)),)
            assert m[("nflogd_relay_upstream_up", label)] == 1
            assert m[("nflogd_relay_upstream_connects_total", label)] == (2 if i == 2 else 1)
            assert m[("nflogd_relay_messages_total", label)] > 0
        assert m[("nflogd_relay_subscribers", ())] == 2
        assert "upstream tcp://10.77.2.1:5555: disconnected" in relay.stderr
    finally:
        relay.stop()
        for d in daemons:
            d.stop()
        for c in contexts:
            c.destroy(linger=0)
    assert relay.returncode == 0, relay.stderr


# -- filtering at the source ------------------------------------------------------------------------


@pytest.mark.kernel
def test_subscriptions_reach_the_daemon_and_other_groups_stay_there(lab, tmp_path, ctx):
    lab = lab(1)
    router = lab.routers[0]
    router.log_rule(5, match="udp dport 9995")
    router.log_rule(6, match="udp dport 9996")
    nobody = f"ipc://{tmp_path}/nobody.sock"
    with (
        daemon(router, tmp_path, 1, groups=[5, 6]) as d,
        RelayProcess(lab.collector, tmp_path / "relay", upstreams=[router_endpoint(1), nobody]) as relay,
    ):
        sub = Subscriber(relay.endpoint, groups=[5], context=ctx)
        subscribed(d, "0005")
        subscribed(relay, "0005")
        router.send_udp([b"six"] * 20, port=9996)
        wait_until(lambda: d.metric("nflogd_packets_total", group="6") == 20, "group 6 captured")
        router.send_udp([b"five"] * 20, port=9995)
        batches = []
        while sum(len(b.packets) for b in batches) < 20:
            batch = sub.recv_batch(timeout=WAIT)
            assert batch is not None, f"got {batches}"
            batches.append(batch)
        assert {b.group for b in batches} == {5}
        assert sub.recv_batch(timeout=0.2) is None

        m = relay.scrape()
        up = (("upstream", router_endpoint(1)),)
        down = (("upstream", nobody),)
        # the relay received what the client did: group 6 never left the router
        assert m[("nflogd_relay_messages_total", up)] == len(batches)
        assert m[("nflogd_relay_bytes_total", up)] > 20 * 72
        assert m[("nflogd_relay_messages_total", down)] == 0
        assert (m[("nflogd_relay_upstream_up", up)], m[("nflogd_relay_upstream_up", down)]) == (1, 0)
        assert m[("nflogd_relay_upstream_connects_total", up)] == 1
        assert m[("nflogd_relay_upstream_handshake_failures_total", up)] == 0
        assert m[("nflogd_relay_subscribers", ())] == 1
        assert m[("nflogd_relay_subscribed_topics", ())] == 1
        assert ("nflogd_relay_build_info", (("version", "0.1.0"),)) in m

        # a second reader of the group: the daemon hears of neither its subscription nor its hang-up
        sub2 = Subscriber(relay.endpoint, groups=[5], context=ctx)
        wait_until(lambda: relay.stderr.count("DEBUG: subscribe '0005'") == 2, "the second reader")
        sub2.close()
        wait_until(lambda: relay.metric("nflogd_relay_subscribers") == 1, "the second reader gone")
        assert d.stderr.count("DEBUG: subscribe '0005'") == 1 and "unsubscribe '0005'" not in d.stderr
        sub.close()  # the last subscriber gone: the daemon hears the unsubscription
        wait_until(lambda: "DEBUG: unsubscribe '0005'" in d.stderr, "the unsubscription")
        wait_until(lambda: relay.metric("nflogd_relay_subscribed_topics") == 0, "no topics")


# -- CURVE on both sides ----------------------------------------------------------------------------


@pytest.mark.kernel
def test_curve_upstream_and_downstream(lab, tmp_path):
    lab = lab(1)
    router = lab.routers[0]
    keys, clients_dir, relays_dir = tmp_path / "keys", tmp_path / "clients", tmp_path / "relays"
    for d in (keys, clients_dir, relays_dir):
        d.mkdir()

    def keypair(name: str) -> tuple[str, str]:
        public, secret = zmq.auth.create_certificates(keys, name)
        return str(public), str(secret)

    router_key, router_secret = keypair("router")
    relay_key, relay_secret = keypair("relay")
    stranger_key, stranger_secret = keypair("stranger")
    alice_key, alice_secret = keypair("alice")
    shutil.copy(relay_key, relays_dir)  # the router admits the relay...
    shutil.copy(alice_key, clients_dir)  # ...and the relay admits alice; nobody knows the stranger
    publish = {
        "bind": [router_endpoint(1), router_endpoint(1, PORT + 1)],
        "curve": {"secret_key_file": router_secret, "authorized_keys_dir": str(relays_dir)},
    }
    upstreams = [
        {"endpoint": router_endpoint(1), "server_public_key": router_key,
         "client_secret_key_file": relay_secret},
        {"endpoint": router_endpoint(1, PORT + 1), "server_public_key": router_key,
         "client_secret_key_file": stranger_secret},  # the router does not hold this key
    ]  # fmt: skip
    relay_publish = {
        "bind": ["tcp://127.0.0.1:5556"],
        "curve": {"secret_key_file": relay_secret, "authorized_keys_dir": str(clients_dir)},
    }
    with (
        daemon(router, tmp_path, 1, publish=publish) as d,
        RelayProcess(
            lab.collector, tmp_path / "relay", upstreams=upstreams, extra={"publish": relay_publish}
        ) as relay,
        lab.collector.entered(),
    ):
        ctx = zmq.Context()  # its threads live in the collector namespace, where 127.0.0.1:5556 is
        try:
            alice = Subscriber("tcp://127.0.0.1:5556", context=ctx, server_public_key=relay_key,
                               client_secret_key_file=alice_secret)  # fmt: skip
            stranger = Subscriber("tcp://127.0.0.1:5556", context=ctx, server_public_key=relay_key,
                                  client_secret_key_file=stranger_secret)  # fmt: skip
            subscribed(d, via=" (CURVE)")
            got = []
            deadline = time.monotonic() + WAIT
            while not got:
                assert time.monotonic() < deadline, relay.stderr
                router.send_udp([b"secret"], port=UDP_PORT)
                got = [p for p in iter(lambda: alice.recv(timeout=0.1), None)]
            assert got[0].node == "router1" and got[0].data[28:] == b"secret"
            assert stranger.recv(timeout=0.3) is None  # refused at the relay's handshake
            stranger.close()
            alice.close()
        finally:
            ctx.destroy(linger=0)
        m = relay.scrape()
        good = (("upstream", router_endpoint(1)),)
        bad = (("upstream", router_endpoint(1, PORT + 1)),)
        assert (m[("nflogd_relay_upstream_up", good)], m[("nflogd_relay_upstream_up", bad)]) == (1, 0)
        assert m[("nflogd_relay_upstream_handshake_failures_total", bad)] >= 1
        assert m[("nflogd_relay_upstream_handshake_failures_total", good)] == 0
        # libzmq gives up after a refusal; the relay retries, and gets in once the router admits it
        shutil.copy(stranger_key, relays_dir)
        d.reload()
        wait_until(
            lambda: relay.metric("nflogd_relay_upstream_up", upstream=router_endpoint(1, PORT + 1)), "retry"
        )
    assert (
        relay.stderr.count(f"WARNING: upstream {router_endpoint(1, PORT + 1)}: CURVE handshake refused") == 1
    )


# -- reload -----------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_sighup_adds_and_removes_upstreams(lab, tmp_path, ctx):
    lab = lab(2)
    with (
        daemon(lab.routers[0], tmp_path, 1) as d1,
        daemon(lab.routers[1], tmp_path, 2) as d2,
        RelayProcess(lab.collector, tmp_path / "relay", upstreams=[router_endpoint(1)]) as relay,
    ):
        sub = Subscriber(relay.endpoint, context=ctx)
        subscribed(d1)
        relay.write_config({**relay.config, "upstreams": [router_endpoint(2)]})
        assert "last reload failed" not in relay.reload().get("STATUS", "")
        subscribed(d2)  # the new upstream got the subscription in force
        wait_until(lambda: d1.metric("nflogd_subscribers") == 0, "router1 to lose the relay")
        lab.routers[1].send_udp([b"hello"], port=UDP_PORT)
        pkt = sub.recv(timeout=WAIT)
        assert pkt is not None and pkt.node == "router2"
        m = relay.scrape()
        assert ("nflogd_relay_upstream_up", (("upstream", router_endpoint(1)),)) not in m
        relay.write_config({**relay.config, "metrics": {"listen": "127.0.0.1:9479"}})
        assert "metrics: a change needs a restart" in relay.reload()["STATUS"]
        sub.close()


# -- command line and service -----------------------------------------------------------------------


def run_cli(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nflogd.relay"] if module else relay_command()
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30, cwd=REPO)


@pytest.mark.parametrize("module", [False, True], ids=["script", "python-m"])
def test_check_documented_config(module):
    res = run_cli("--check", "-c", str(REPO / "etc" / "nflogd-relay.yaml"), module=module)
    assert (res.returncode, res.stderr, res.stdout) == (0, "", "ok\n")


@pytest.mark.parametrize(
    "text, expect",
    [
        ("upstreams: []\n", "upstreams: must not be empty"),
        ("upstreams: [tcp://a:1\n", "invalid YAML"),
        ("upstreams: [{endpoint: tcp://a:1, server_public_key: /no.key, client_secret_key_file: /k}]\n",
         "upstreams[0].server_public_key: cannot read /no.key"),
        (None, "cannot read"),
    ],
    ids=["empty", "yaml", "key-file", "missing-file"],
)  # fmt: skip
def test_check_bad_config(tmp_path, text, expect):
    path = tmp_path / "relay.yaml"
    if text is not None:
        path.write_text(text)
    res = run_cli("--check", "-c", str(path))
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nflogd-relay: ") and expect in lines[0], res.stderr
    assert res.stdout == ""


def test_endpoint_in_use_exits_1(tmp_path):
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # another process serving the path
    try:
        busy.bind(str(tmp_path / "busy.sock"))
        busy.listen()
        path = tmp_path / "relay.yaml"
        path.write_text(
            f"upstreams: [ipc://{tmp_path}/none.sock]\n"
            f"publish: {{bind: 'ipc://{tmp_path}/busy.sock'}}\nmetrics: {{listen: null}}\n"
        )
        res = run_cli("-c", str(path))
    finally:
        busy.close()
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1] == (
        f"nflogd-relay: publish.bind: ipc://{tmp_path}/busy.sock: another process is serving this path"
    )


def test_unit_runs_without_any_capability():
    s = unit_settings(REPO / "systemd" / "nflogd-relay.service")
    expect = {
        "Type": "notify", "ExecStart": "/usr/bin/nflogd-relay -c /etc/nflogd-relay.yaml",
        "ExecReload": "/bin/kill -HUP $MAINPID", "User": "nflogd-relay", "Group": "nflog",
        "CapabilityBoundingSet": "", "RuntimeDirectory": "nflogd-relay", "NoNewPrivileges": "yes",
        "MemoryDenyWriteExecute": "yes", "PrivateUsers": "yes",
    }  # fmt: skip
    assert {k: s.get(k, [None])[-1] for k in expect} == expect
    assert "AmbientCapabilities" not in s
    daemon_unit = unit_settings(REPO / "systemd" / "nflogd.service")
    shared = {k for k in daemon_unit if k.startswith(("Protect", "Restrict", "Private", "Lock", "System"))}
    missing = {k for k in shared if k not in s}
    assert not missing, f"the daemon's hardening the relay lacks: {missing}"


# -- the tail of a stream ---------------------------------------------------------------------------


def _tap_counts(stderr: str) -> tuple[int, int]:
    """(packets printed, lost) from nflog-tap's last words."""
    line = [s for s in stderr.splitlines() if s.startswith("nflog-tap: ")][-1]
    printed, lost = (int(x) for x in re.match(r"nflog-tap: (\d+) packets printed, (\d+) lost", line).groups())
    return printed, lost


class TailReader(threading.Thread):
    """One reader, made in this thread by ``make()`` (-> ``recv``, the next packet or None, and
    the object with the accounting): its first packet (``ready``), then, once ``go`` is set,
    every packet until nothing has come for ``quiet`` seconds; the first and last ``seq``."""

    def __init__(self, make, go: threading.Event, quiet: float = 3.5):
        super().__init__(daemon=True)
        self.make, self.go, self.quiet = make, go, quiet
        self.ready = threading.Event()
        self.acct = None
        self.first: int | None = None
        self.last: int | None = None
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            recv, self.acct = self.make()
            try:
                while self.first is None:
                    self.take(recv, 0.05)
                self.ready.set()
                self.go.wait(60)
                while self.take(recv, self.quiet):
                    pass
            finally:
                self.acct.close()
        except BaseException as e:  # pragma: no cover - reported by the test
            self.error = e
            self.ready.set()

    def take(self, recv, timeout: float) -> bool:
        p = recv(timeout)
        if p is None:
            return False
        if self.first is None:
            self.first = p.seq
        self.last = p.seq
        self.count += 1
        return True


@pytest.mark.kernel
def test_a_tail_the_relay_dropped_is_counted_by_every_reader(lab, tmp_path):
    """A burst whose end the relay drops for readers that are not reading (their queues at the
    relay's publish.hwm): the daemon's sequence mark, a second after its last packet, tells each
    reader where the sequence ended, so lost = sent - received for the Subscriber, the
    AsyncSubscriber, the scapy socket and nflog-tap alike."""
    from nflogd_client.aio import AsyncSubscriber
    from nflogd_client.scapy_socket import ZMQNFLOGSocket

    lab = lab(1)
    router = lab.routers[0]
    d = daemon(router, tmp_path, 1, groups=({"group": 1, "queue_threshold": 1},))
    relay = RelayProcess(lab.collector, tmp_path / "relay", upstreams=[router_endpoint(1)])
    relay.write_config({**relay.config, "publish": {"bind": [relay.endpoint], "hwm": 10}})
    endpoint = relay.endpoint

    def make_sub():
        sub = Subscriber(endpoint, rcvhwm=1)
        return sub.recv, sub

    class AsyncReader(AsyncSubscriber):  # on an event loop of its own thread
        def __init__(self):
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            super().__init__(endpoint, rcvhwm=1)

        def close(self, linger: int = 0) -> None:
            super().close(linger)
            self.loop.close()

    def make_async():
        sub = AsyncReader()
        return (lambda timeout: sub.loop.run_until_complete(sub.recv(timeout))), sub

    class ScapyReader:  # the scapy socket's packets, and its Subscriber's accounting
        def __init__(self):
            self.sock = ZMQNFLOGSocket(endpoint, rcvhwm=1)
            self.subscriber = self.sock.subscriber

        def recv(self, timeout):
            pkt = self.sock.recv(timeout=timeout)
            return None if pkt is None else pkt.nflog_packet

        def close(self):
            self.sock.close()

        def __getattr__(self, name):
            return getattr(self.subscriber, name)

    def make_scapy():
        r = ScapyReader()
        return r.recv, r

    tap = tap_out = tap_err = None
    go = threading.Event()
    readers = [TailReader(make, go) for make in (make_sub, make_async, make_scapy)]
    names = ("Subscriber", "AsyncSubscriber", "scapy socket")
    try:
        d.start()
        relay.start()
        tap_out = open(tmp_path / "tap.txt", "w+")
        tap_err = open(tmp_path / "tap.err", "w+")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        tap = subprocess.Popen([*TAP, "-e", endpoint], stdout=tap_out, stderr=tap_err, env=env)
        for r in readers:
            r.start()

        def probed() -> bool:
            tap_out.seek(0)
            return all(r.ready.is_set() for r in readers) and " seq " in tap_out.read()

        deadline = time.monotonic() + WAIT
        while not probed():  # the whole path is up, and each reader has its baseline
            assert time.monotonic() < deadline, "probes did not reach every reader"
            router.send_udp([b"probe"], port=UDP_PORT)
            time.sleep(0.05)
        assert all(r.error is None for r in readers), [r.error for r in readers]
        time.sleep(2.5)  # the probes' marks are out
        tap.send_signal(signal.SIGSTOP)  # nflog-tap reads nothing either
        send(router, "burst", 4000, chunk=200)
        wait_until(lambda: d.metric("nflogd_packets_total", group="1") >= 4000, "the burst captured")
        passed = [-1.0]

        def relayed() -> bool:  # the relay has passed on (or dropped) all of it: its count stands
            now = relay.metric("nflogd_relay_messages_total", upstream=router_endpoint(1))
            done, passed[0] = now == passed[0], now
            return done

        wait_until(relayed, "the relay's count to stand", interval=0.5)
        tap.send_signal(signal.SIGCONT)
        go.set()  # every reader reads again; the marks come a second after the last packet
        for r in readers:
            r.join(30)
            assert not r.is_alive() and r.error is None, r.error
        tap.send_signal(signal.SIGINT)
        tap.wait(10)
        end = int(d.metric("nflogd_packets_total", group="1"))  # the sequence's end: seq counts capture
        assert not d.metric("nflogd_kernel_dropped_packets_total", group="1")
        for name, r in zip(names, readers):
            acct = r.acct
            assert r.last is not None and r.last < end - 1, f"{name}: the tail was not dropped ({r.last})"
            assert acct.total_lost == end - r.first - acct.received, f"{name}: lost {acct.total_lost}"
            assert acct.received == r.count
        tap_out.seek(0)
        lines = [x for x in tap_out.read().splitlines() if " seq " in x]
        first = int(re.search(r" seq (\d+) ", lines[0]).group(1))
        tap_err.seek(0)
        printed, lost = _tap_counts(tap_err.read())
        assert printed == len(lines) and int(re.search(r" seq (\d+) ", lines[-1]).group(1)) < end - 1
        assert lost == end - first - printed, "nflog-tap"
    finally:
        go.set()
        if tap is not None and tap.poll() is None:
            tap.send_signal(signal.SIGCONT)
            tap.kill()
            tap.wait()
        for f in (tap_out, tap_err):
            if f is not None:
                f.close()
        relay.stop()
        d.stop()


# -- readers' filters, run at the routers -----------------------------------------------------------

MINE = "udp[8:4] = 0x6d696e65"  # the payload begins with "mine"


def sent_bytes(routers: list[NflogdProcess]) -> int:
    """Bytes the routers' feeds wrote to their readers: what the relay's upstream links carried."""
    return sum(int(d.metric("nflogd_feed_sent_bytes_total") or 0) for d in routers)


def flood(lab: Lab, tag: str, n: int = 500, mine_every: int = 100) -> int:
    """``n`` datagrams of 1,000 bytes from each router, every ``mine_every``-th beginning with
    ``mine``; how many of those each router sent."""
    payloads = [
        (b"mine" if k % mine_every == 0 else b"xxxx") + f"-{tag}-{k}-".encode().ljust(996, b".")
        for k in range(n)
    ]
    for r in lab.routers:
        for k in range(0, n, 50):
            r.send_udp(payloads[k : k + 50], port=UDP_PORT)
    return len(range(0, n, mine_every))


def packets(d: NflogdProcess) -> int:
    return int(d.metric("nflogd_packets_total", group="1") or 0)


def take(sub: Subscriber, n: int, epochs: set | None = None) -> list:
    """``n`` packets of ``sub`` (sequence marks read on the way); the epochs of their messages
    added to ``epochs``."""
    got: list = []
    while len(got) < n:
        batch = sub.recv_batch(timeout=WAIT)
        assert batch is not None, f"{len(got)} packets of {n}"
        got += batch.packets
        if epochs is not None and batch.packets:
            epochs.add(batch.epoch)
    assert len(got) == n
    return got


def accepted(sub: Subscriber) -> None:
    deadline = time.monotonic() + WAIT
    while sub.filter_state == "pending":  # the routers' replies, through the relay
        assert time.monotonic() < deadline, "no answer to the filter through the relay"
        assert sub.recv_batch(timeout=0.05) is None
    assert sub.filter_state == "accepted"


@pytest.mark.kernel
def test_a_readers_filter_runs_at_the_routers_and_the_relay_carries_only_its_packets(lab, tmp_path, ctx):
    """Two routers, the relay, two readers with one filter and one without: the filter reaches
    both routers, whose links to the relay then carry only its packets (a small fraction of
    the bytes the unfiltered reader costs); each reader gets exactly what it asked for,
    numbered by the filter per router, with no loss, and the routers' sequence marks."""
    lab = lab(2)
    ups = [router_endpoint(1), router_endpoint(2)]
    with (
        daemon(lab.routers[0], tmp_path, 1) as d1,
        daemon(lab.routers[1], tmp_path, 2) as d2,
        RelayProcess(lab.collector, tmp_path / "relay", upstreams=ups) as relay,
    ):
        routers, nodes = [d1, d2], ["router1", "router2"]
        flt = Subscriber(relay.endpoint, groups=[1], filter=MINE, context=ctx)
        accepted(flt)
        for d in routers:
            subscribed(d, "0001")  # the group, through the filter
        before = sent_bytes(routers)
        mine = flood(lab, "a")
        got = take(flt, 2 * mine)
        wait_until(lambda: all(packets(d) == 500 for d in routers), "captured")
        filtered = sent_bytes(routers) - before

        every = Subscriber(relay.endpoint, groups=[1], context=ctx)
        twin = Subscriber(relay.endpoint, groups=[1], filter=MINE, context=ctx)
        accepted(twin)  # its own subscription (its tag): its own replies
        for d in routers:
            subscribed(d, "0001", times=2)  # the unfiltered reader's, on the relay's other link
        time.sleep(0.2)
        before = sent_bytes(routers)
        flood(lab, "b")
        everything = take(every, 1000)
        got += take(flt, 2 * mine)
        twins = take(twin, 2 * mine)
        unfiltered = sent_bytes(routers) - before

        assert all(p.data[28:32] == b"mine" for p in got)
        assert sorted(p.data for p in twins) == sorted(p.data for p in got[2 * mine :])
        assert sorted(p.data for p in twins) == sorted(p.data for p in everything if p.data[28:32] == b"mine")
        for node in nodes:  # numbered by the filter per router from 0: nothing lost, none excluded
            assert [p.seq for p in got if p.node == node] == list(range(2 * mine))
        assert flt.total_lost == twin.total_lost == every.total_lost == 0
        # the filtered reader alone cost the routers' links a small part of the unfiltered one
        assert filtered < 0.03 * unfiltered, (filtered, unfiltered)

        marks: dict[str, int] = {}
        deadline = time.monotonic() + WAIT
        while len(marks) < 2:  # each router's sequence mark, in the filter's numbering
            assert time.monotonic() < deadline, f"marks: {marks}"
            batch = flt.recv_batch(timeout=0.5)
            if batch is not None:
                assert not batch.packets
                marks[batch.node] = batch.first_seq
        assert marks == {node: 2 * mine for node in nodes}
        assert relay.metric("nflogd_relay_filters") == 1
        for sub in (flt, twin, every):
            sub.close()
        wait_until(lambda: relay.metric("nflogd_relay_filters") == 0, "the filter's links closed")
        assert relay.alive()


@pytest.mark.kernel
def test_a_routers_refusal_reaches_the_reader_through_the_relay(lab, tmp_path, ctx):
    lab = lab(1)
    with (
        daemon(lab.routers[0], tmp_path, 1) as d,
        RelayProcess(lab.collector, tmp_path / "relay", upstreams=[router_endpoint(1)]) as relay,
    ):
        spec = filters.HEAD.pack(2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # version 2
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, filters.FILTER_TOPIC + spec)
        sock.connect(relay.endpoint)
        assert sock.poll(WAIT * 1000), "no reply through the relay"
        reply = filters.filter_reply(sock.recv_multipart())
        assert reply == (False, "filter version 2; this daemon reads version 1")
        sock.close()
        wait_until(lambda: d.metric("nflogd_feed_filters_refused_total") == 1, "counted at the router")
        assert relay.alive()


def rejoined(sub: Subscriber, d: NflogdProcess, times: int) -> None:
    """Wait in ``recv`` (where libzmq resends a reconnected socket's subscriptions) until the
    router has the filter's group subscribed ``times`` times; nothing arrives meanwhile."""
    line = "DEBUG: subscribe '0001'"
    deadline = time.monotonic() + WAIT
    while d.stderr.count(line) < times:
        assert time.monotonic() < deadline, f"{line} x{times}\n{d.stderr}"
        batch = sub.recv_batch(timeout=0.05)
        assert batch is None or not batch.packets, batch


@pytest.mark.kernel
def test_a_filtered_reader_counts_exactly_what_it_missed_while_the_relay_was_away(lab, tmp_path, ctx):
    """The relay restarts: the router's run of the filter lingers meanwhile (numbering what it
    passes), the relay's new link takes it up again, and the reader counts exactly the packets
    its filter passed while it was away, none it excluded. Away longer than the router's
    publish.filter_linger_ms, the run ends: the reader sees a restart (a new epoch), never a
    silent reset of its numbering."""
    lab = lab(1)
    with (
        daemon(lab.routers[0], tmp_path, 1) as d,
        RelayProcess(lab.collector, tmp_path / "relay", upstreams=[router_endpoint(1)]) as relay,
    ):
        flt = Subscriber(relay.endpoint, groups=[1], filter=MINE, context=ctx)
        try:
            accepted(flt)
            subscribed(d, "0001")
            mine = flood(lab, "a")  # 5 of 500
            first: set[int] = set()
            got = take(flt, mine, first)
            assert [p.seq for p in got] == list(range(mine))

            relay.stop()
            missed = flood(lab, "b")  # passed by the filter at the router, nobody to get them
            wait_until(lambda: packets(d) == 1000, "captured")
            relay.start()
            rejoined(flt, d, times=2)  # the relay's new link, through the same run
            epochs: set[int] = set()
            again = take(flt, flood(lab, "c"), epochs)
            assert [p.seq for p in again] == list(range(2 * mine, 3 * mine))
            assert epochs == first
            assert flt.total_lost == missed and flt.restarts == 0

            d.write_config({**d.config, "publish": {**d.config["publish"], "filter_linger_ms": 100}})
            d.reload()
            relay.stop()
            time.sleep(0.5)  # past the linger: the run ends
            flood(lab, "d")
            wait_until(lambda: packets(d) == 2000, "captured")
            relay.start()
            rejoined(flt, d, times=3)
            epochs = set()
            fresh = take(flt, flood(lab, "e"), epochs)
            assert [p.seq for p in fresh] == list(range(mine))  # a new run, from 0
            assert len(epochs) == 1 and epochs.pop() > first.pop()
            assert flt.restarts == 1 and flt.total_lost == missed  # a restart, nothing made up
        finally:
            flt.close()


@pytest.mark.kernel
def test_a_reader_past_the_relays_filter_limit_is_told_why(lab, tmp_path, ctx):
    """63 distinct filters pass through the relay (its 64 links to the router, within the
    router's default max_connections_per_source); the 64th reader's is refused with the relay's
    reason (the reply a daemon gives), counted and logged once; its connection stays, and a
    filter it states once there is room passes."""
    lab = lab(1)
    with (
        daemon(lab.routers[0], tmp_path, 1) as d,
        RelayProcess(lab.collector, tmp_path / "relay", upstreams=[router_endpoint(1)]) as relay,
    ):
        socks = []
        try:
            for uid in range(64):
                sock = ctx.socket(zmq.SUB)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SUBSCRIBE, filters.Filter(uid=uid).topic(b"t"))
                sock.connect(relay.endpoint)
                socks.append(sock)
                if uid < 63:  # each accepted by the router, through the relay, before the next
                    assert sock.poll(WAIT * 1000), f"no reply to filter {uid}"
                    assert filters.filter_reply(sock.recv_multipart()) == (True, "")
            assert socks[63].poll(WAIT * 1000), "no reply past the limit"
            assert filters.filter_reply(socks[63].recv_multipart()) == (
                False, "nflogd-relay passes 63 distinct filters already, its limit"
            )  # fmt: skip
            assert relay.metric("nflogd_relay_filters_refused_total") == 1
            assert relay.metric("nflogd_relay_filters") == 63
            assert relay.stderr.count("filter refused: 63 filters in use") == 1
            socks[0].close()  # one let go: a filter stated now passes
            wait_until(lambda: relay.metric("nflogd_relay_filters") == 62, "the first filter let go")
            socks[63].setsockopt(zmq.SUBSCRIBE, filters.Filter(uid=99).topic(b"t"))
            assert socks[63].poll(WAIT * 1000), "no reply after room was made"
            assert filters.filter_reply(socks[63].recv_multipart()) == (True, "")
        finally:
            for sock in socks:
                sock.close()
        assert relay.alive() and d.alive()


def test_the_relays_server_passes_filter_topics_on_as_they_are_and_runs_none(ctx, tmp_path):
    """The relay's Publisher (filter_topics): each reader's filter and its groups through it
    are handed on byte for byte (and undone at its hang-up), never compiled into a filter of
    its own (the relay passes upstream a topic's first and last); what comes back on those
    topics (the daemon's reply, the filtered messages) reaches the readers that hold them,
    no one else."""
    from nflogd_client import wire
    from pubutil import serve

    from nflogd.config_publish import PublishConfig
    from nflogd.publish import Publisher

    ep = f"ipc://{tmp_path}/relay.sock"
    pub = Publisher(PublishConfig(bind=(ep,)), filter_topics=True)
    passed: list[bytes] = []
    pub.on_filter = passed.append  # None: every one passed on
    f = filters.Filter("udp port 53")
    spec_topic, through = f.topic(b"tag1"), f.group_topic(wire.topic(1))
    readers = []
    try:
        for _ in range(2):  # two readers of one filter topic: passed on once
            r = ctx.socket(zmq.SUB)
            r.connect(ep)
            r.subscribe(spec_topic)
            r.subscribe(through)
            readers.append(r)
        other = ctx.socket(zmq.SUB)
        other.connect(ep)
        other.subscribe(wire.topic(1))
        readers.append(other)
        serve(pub, lambda: pub.subscription_messages >= 5, "the subscriptions")
        assert passed.count(b"\x01" + spec_topic) == 2 and passed.count(b"\x01" + through) == 2
        assert pub.filters() == []  # nothing compiled: the relay runs no filter
        pub.forward(filters.reply(spec_topic, True))
        msg = wire.frames(1, "r1", 1, 0, 0, 0, b"", b"")
        pub.forward([through, *msg[1:]])
        for r in readers[:2]:
            assert r.poll(2000)
            assert filters.filter_reply(r.recv_multipart()) == (True, "")
            assert r.poll(2000)
            assert r.recv_multipart()[0] == through
        assert not other.poll(300)  # not on its topics
        readers[0].close(linger=0)
        serve(pub, lambda: passed.count(b"\x00" + spec_topic) == 1, "the hang-up's cancels")
        assert passed.count(b"\x00" + through) == 1
    finally:
        for r in readers:
            r.close(linger=0)
        pub.close(linger=0)
