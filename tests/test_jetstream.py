"""The feed into NATS JetStream: the stream record mapping, the relay's publisher against real
nats-server processes (one node, a three-node cluster with an R3 stream), and the client's
JetStreamSubscriber reading it back with the Subscriber's accounting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from daemonutil import REPO, NflogdProcess, RelayProcess, relay_command, wait_until
from feedutil import FakeFeed, rec
from natsutil import NatsCluster, NatsServer, free_port, nats_server_binary
from nflogd_client import stream, wire
from nflogd_client.jetstream import JetStreamSubscriber, _Account, parse_endpoint

from nflogd import config_relay

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(nats_server_binary() is None, reason="nats-server is not installed (make deps)"),
]
nats = pytest.importorskip("nats", reason="nats-py is not installed (pip install 'nflogd-client[jetstream]')")

WAIT = 20.0
VECTOR = REPO / "tests" / "vectors" / "v1-two-packets.json"
DOC = REPO / "docs" / "wire-format.md"
UDP_PORT = 9999
TAP = (
    [str(REPO / ".venv/bin/nflog-tap")]
    if (REPO / ".venv/bin/nflog-tap").exists()
    else [sys.executable, "-m", "nflogd_client.tap"]
)


# -- the mapping -------------------------------------------------------------------------------


def vector_frames() -> list[bytes]:
    return [bytes.fromhex(f) for f in json.loads(VECTOR.read_text())["frames"]]


def test_the_record_of_a_vector_is_the_one_in_the_doc():
    frames = vector_frames()
    r = stream.record(frames, partitions=8)
    assert (r.node, r.group, r.epoch, r.first_seq, r.count) == ("gw-1", 258, 1718000000123456789, 1000, 2)
    assert r.key == "gw-1.258"
    assert r.partition == 0
    assert stream.subject("nflog", r) == "nflog.0.gw-1.258"
    assert r.msg_id == "gw-1.258.1718000000123456789.1000"
    assert r.value == b"".join(frames[1:])
    assert stream.frames_of(r.value) == frames
    assert wire.decode(stream.frames_of(r.value)).packets == wire.decode(frames).packets
    doc = DOC.read_text()
    section = doc[doc.index("## Stream records") :]
    for text in ("`nflog.0.gw-1.258`", "`gw-1.258.1718000000123456789.1000`", f"{len(r.value)} bytes"):
        assert text in section
    # the value's hex in the doc is the frames' hex, end to end
    hexdump = re.search(r"```hex\n\[record value.*?\n(.*?)```", section, re.S).group(1)
    assert bytes.fromhex(re.sub(r"#.*", "", hexdump)) == r.value


@pytest.mark.parametrize(
    "node, token",
    [("router1", "router1"), ("gw-1_a", "gw-1_a"), ("a.b", "a%2Eb"), ("", "="), ("é *>", "%C3%A9%20%2A%3E")],
)
def test_node_names_become_one_subject_token(node, token):
    assert stream.node_token(node) == token
    assert not set(token) & set(".*> \t")


def test_a_message_that_is_not_a_feed_batch_is_no_record():
    with pytest.raises(wire.WireError, match="4 frames"):
        stream.record([b"x"])
    with pytest.raises(wire.WireError, match="header"):
        stream.record([b"\0\1", b"NFLD", b"", b""])
    with pytest.raises(wire.WireError, match="need"):
        stream.frames_of(vector_frames()[1] + b"short")


# -- the reader's accounting -------------------------------------------------------------------


def batch(node: str, first_seq: int, n: int, epoch: int = 1, group: int = 1) -> wire.Batch:
    return wire.decode(node_msg(node, group, first_seq, n=n, epoch=epoch))


def test_a_late_message_fills_its_gap_and_a_repeated_one_is_skipped():
    acct = _Account()
    assert acct.take(batch("r1", 0, 2))
    assert acct.take(batch("r1", 4, 2))  # 2, 3 missing
    assert acct.lost == {("r1", 1): 2}
    assert acct.take(batch("r1", 8, 1))  # 6, 7 missing
    assert acct.lost == {("r1", 1): 4}
    assert acct.take(batch("r1", 2, 2))  # the late one: no loss there after all
    assert acct.lost == {("r1", 1): 2}
    assert not acct.take(batch("r1", 2, 2))  # seen: a redelivery
    assert not acct.take(batch("r1", 8, 1))
    assert acct.duplicates == 3 and acct.duplicate_messages == 2 and acct.received == 7  # packets
    assert acct.take(batch("r1", 6, 1))  # half of the other gap
    assert acct.lost == {("r1", 1): 1}
    assert acct.take(batch("r1", 3, 2, epoch=2))  # a restart: 0..2 of the new run lost
    assert acct.restarts == 1 and acct.lost == {("r1", 1): 4}
    assert acct.take(batch("r1", 0, 3, epoch=2))  # ... unless they come late
    assert acct.lost == {("r1", 1): 1}
    assert acct.take(batch("r2", 10, 1))  # another node: its own baseline
    assert acct.lost == {("r1", 1): 1, ("r2", 1): 0}


def test_messages_stored_out_of_order_are_all_delivered_and_counted_in_packets():
    """A stream holding a (node, group)'s messages out of order (retried publishes that landed
    late, messages given back by a reader that closed): a reader starting anywhere delivers
    every stored packet once, counts no loss where none was, and counts a redelivery in
    packets."""
    acct = _Account()
    # the reader began at the stream position of 20..30; 10..20 was stored after it
    assert acct.take(batch("r1", 20, 10))
    assert acct.take(batch("r1", 10, 10))  # before where it began: delivered, no loss, no duplicate
    assert acct.take(batch("r1", 40, 10))  # 30..40 missing so far
    assert acct.take(batch("r1", 0, 5))
    assert acct.lost == {("r1", 1): 10} and acct.duplicates == 0
    assert acct.take(batch("r1", 30, 10))  # it came after all
    assert acct.lost == {("r1", 1): 0} and acct.received == 45
    assert not acct.take(batch("r1", 10, 10))  # delivered before: 10 packets skipped
    assert acct.duplicates == 10 and acct.duplicate_messages == 1 and acct.received == 45


def test_a_sequence_mark_shows_the_tail_lost():
    acct = _Account()
    assert acct.take(batch("r1", 0, 5))
    assert acct.take(batch("r1", 9, 0))  # the mark: the run sent 0..8; 5..8 never came
    assert acct.lost == {("r1", 1): 4} and acct.received == 5
    assert acct.take(batch("r1", 9, 0))  # the relay's mark, the same: nothing more
    assert acct.take(batch("r1", 5, 4))  # ... unless they come late
    assert acct.lost == {("r1", 1): 0} and acct.duplicates == 0
    assert acct.take(batch("r1", 2, 0, epoch=2))  # a restart whose first word is a mark
    assert acct.restarts == 1 and acct.lost == {("r1", 1): 2}


def test_a_sequence_mark_has_its_own_stream_id():
    """A mark shares first_seq with the next message: its id must differ, or the stream would
    take that message for a duplicate of the mark."""
    frames = wire.encode(5, "r1", 1718000000123456789, 4242, [], kernel_dropped=3)
    r = stream.record(frames, partitions=8)
    assert r.count == 0 and r.msg_id == "r1.5.1718000000123456789.4242.mark"
    assert stream.record(node_msg("r1", 5, 4242, epoch=1718000000123456789)).msg_id == (
        "r1.5.1718000000123456789.4242"
    )


def test_the_accounting_keeps_max_nodes():
    acct = _Account(max_nodes=2)
    acct.take(batch("a", 0, 1))
    acct.take(batch("a", 3, 1))  # a lost 2
    acct.take(batch("b", 0, 1))
    acct.take(batch("a", 4, 1))  # a heard from again: b is now the oldest
    acct.take(batch("c", 0, 1))
    assert acct.evicted == 1 and set(acct.lost) == {("a", 1), ("c", 1)}
    acct.take(batch("d", 0, 1))
    assert acct.evicted == 2 and set(acct.lost) == {("c", 1), ("d", 1)} and acct.evicted_lost == 2


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, culprit",
    [
        ({}, "jetstream.servers: is required"),
        ({"servers": "http://x:1"}, "jetstream.servers[0]: must be nats://"),
        ({"servers": "nats://x"}, "jetstream.servers[0]: missing ':PORT'"),
        ({"servers": "nats://x:1", "replicas": 7}, "jetstream.replicas: must be an integer 1..5"),
        ({"servers": "nats://x:1", "storage": "disk"}, "jetstream.storage: must be file or memory"),
        ({"servers": "nats://x:1", "stream": "a.b"}, "jetstream.stream:"),
        ({"servers": "nats://x:1", "subject_prefix": "a.*"}, "jetstream.subject_prefix:"),
        ({"servers": "nats://x:1", "buffer": 1}, "jetstream: unknown key 'buffer'"),
        (
            {"servers": "nats://x:1", "max_age_s": 60},
            "jetstream.duplicate_window_s: must not exceed max_age_s",
        ),
    ],
)
def test_bad_jetstream_settings_name_the_key(section, culprit):
    text = yaml.safe_dump({"upstreams": ["ipc:///tmp/x.sock"], "jetstream": section})
    with pytest.raises(config_relay.ConfigError) as e:
        config_relay.parse_relay(text)
    assert str(e.value).startswith(culprit), str(e.value)


def test_the_defaults():
    cfg = config_relay.parse_relay(
        "upstreams: [ipc:///tmp/x.sock]\njetstream: {servers: nats://127.0.0.1:4222}\n"
    )
    js = cfg.jetstream
    assert (js.stream, js.subject_prefix, js.partitions, js.replicas, js.storage) == (
        "NFLOG",
        "nflog",
        8,
        1,
        "file",
    )
    assert config_relay.parse_relay("upstreams: [ipc:///tmp/x.sock]\n").jetstream is None


def test_endpoint_strings():
    assert parse_endpoint("nats://h1:4222,h2:4222/FEED?durable=g&workers=2&worker=1&start=17") == {
        "servers": ["nats://h1:4222", "nats://h2:4222"],
        "stream": "FEED",
        "durable": "g",
        "workers": 2,
        "worker": 1,
        "start": 17,
    }
    assert parse_endpoint("nats://h:1")["stream"] == "NFLOG"
    with pytest.raises(ValueError, match="unknown option 'group'"):
        parse_endpoint("nats://h:1/S?group=5")
    with pytest.raises(ValueError, match="start must be"):
        parse_endpoint("nats://h:1/S?start=yesterday")


# -- helpers -----------------------------------------------------------------------------------


class Host:
    """The test's own network namespace, as NflogdProcess wants one (popen, entered)."""

    def popen(self, *cmd, **kw):
        return subprocess.Popen(list(cmd), **kw)

    def entered(self):
        return contextlib.nullcontext()


class StreamRelay(RelayProcess):
    """nflogd-relay in this namespace, metrics on a free loopback port, a jetstream section."""

    def __init__(self, workdir: Path, *, upstreams, jetstream: dict, **kw):
        self.metrics_port = free_port()
        extra = {"jetstream": {"connect_timeout_ms": 5000, **jetstream}, **kw.pop("extra", {})}
        super().__init__(Host(), workdir, upstreams=upstreams, extra=extra, **kw)

    def stream_metric(self, name: str, **labels) -> float:
        return self.metric(name, stream=self.config["jetstream"].get("stream", "NFLOG"), **labels) or 0.0


@pytest.fixture
def feed(tmp_path):
    f = FakeFeed(tmp_path / "feed.sock")
    yield f
    f.close()


def node_msg(
    node: str, group: int, first_seq: int, n: int = 1, size: int = 40, epoch: int = 1
) -> list[bytes]:
    packets = [rec(group, b"E" + (first_seq + k).to_bytes(4, "big") + b"x" * (size - 5)) for k in range(n)]
    return wire.encode(group, node, epoch, first_seq, packets)


def read_all(subs, want: int, timeout: float = WAIT) -> list[list[wire.Batch]]:
    """Batches per subscriber, until together they hold ``want`` packets and nothing more comes."""
    got: list[list[wire.Batch]] = [[] for _ in subs]
    deadline = time.monotonic() + timeout
    while sum(len(b.packets) for bs in got for b in bs) < want:
        assert time.monotonic() < deadline, f"only {sum(len(b.packets) for bs in got for b in bs)} of {want}"
        for sub, out in zip(subs, got):
            while (b := sub.recv_batch(timeout=0.05)) is not None:
                out.append(b)
    for sub, out in zip(subs, got):  # nothing beyond
        while (b := sub.recv_batch(timeout=0.3)) is not None:
            out.append(b)
    return got


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def stream_info(url: str, name: str = "NFLOG"):
    async def info():
        nc = await nats.connect(url)
        try:
            return await nc.jetstream().stream_info(name)
        finally:
            await nc.close()

    return asyncio.run(info())


# -- the relay's start -------------------------------------------------------------------------


def test_the_relay_says_in_one_line_when_the_server_refuses_the_stream(tmp_path, feed):
    with NatsServer(tmp_path / "nats") as srv:
        relay = StreamRelay(
            tmp_path / "relay", upstreams=[feed.endpoint], jetstream={"servers": [srv.url], "replicas": 3}
        )
        assert relay.run_to_exit(15) == 1
        last = relay.stderr.strip().splitlines()[-1]
        assert last.startswith("nflogd-relay: jetstream: the server refused stream NFLOG (R3"), relay.stderr
        assert "replicas" in last and "Traceback" not in relay.stderr


def test_the_relay_says_in_one_line_when_no_server_answers(tmp_path, feed):
    url = f"nats://127.0.0.1:{free_port()}"
    relay = StreamRelay(
        tmp_path / "relay",
        upstreams=[feed.endpoint],
        jetstream={"servers": [url], "connect_timeout_ms": 1000},
    )
    assert relay.run_to_exit(15) == 1
    last = relay.stderr.strip().splitlines()[-1]
    assert last.startswith("nflogd-relay: jetstream.servers: ") and url in last, relay.stderr
    assert "Traceback" not in relay.stderr


def test_an_existing_stream_is_checked_and_brought_to_the_config(tmp_path, feed):
    with NatsServer(tmp_path / "nats") as srv:
        js = {"servers": [srv.url], "partitions": 2, "max_age_s": 3600}
        with StreamRelay(tmp_path / "r1", upstreams=[feed.endpoint], jetstream=js) as relay:
            assert "created stream NFLOG" in relay.stderr
        with StreamRelay(
            tmp_path / "r2", upstreams=[feed.endpoint], jetstream={**js, "max_age_s": 600}
        ) as relay:
            assert "stream NFLOG updated: max_age_s now as configured" in relay.stderr
        assert stream_info(srv.url).config.max_age == 600


# -- routers -> daemons -> relay -> JetStream -> consumers --------------------------------------


@pytest.mark.kernel
def test_daemons_to_a_consumer_group_and_replay(tmp_path):
    from nsutil import NetNS

    routers = [NetNS("nflj"), NetNS("nflj")]
    nodes = ["router1", "router3"]  # group 1 of these: partitions 6 and 5, one per worker of two
    daemons: list[NflogdProcess] = []
    subs: list[JetStreamSubscriber] = []
    try:
        for ns, node in zip(routers, nodes):
            ns.log_rule(1, match=f"udp dport {UDP_PORT}")
            daemons.append(NflogdProcess(ns, tmp_path / node, groups=[1], node=node, metrics=False).start())
        with NatsServer(tmp_path / "nats") as srv:
            url = f"{srv.url}/NFLOG"
            relay = StreamRelay(
                tmp_path / "relay", upstreams=[d.endpoint for d in daemons], jetstream={"servers": [srv.url]}
            )
            with relay:
                for d in daemons:
                    wait_until(lambda d=d: "subscribe '(all)'" in d.stderr, "the relay's subscription", WAIT)
                workers = [
                    JetStreamSubscriber(f"{url}?durable=ids&workers=2&worker={i}&start=all") for i in (0, 1)
                ]
                subs += workers

                def send(tag: str, n: int) -> set[bytes]:
                    sent = set()
                    for ns, node in zip(routers, nodes):
                        payloads = [f"{tag}-{node}-{k}".encode() for k in range(n)]
                        for k in range(0, n, 50):
                            ns.send_udp(payloads[k : k + 50], port=UDP_PORT)
                        sent |= set(payloads)
                    return sent

                def payloads(batches) -> list[bytes]:
                    return [p.data[28:] for b in batches for p in b.packets]

                first = send("a", 300)
                got = read_all(workers, len(first))
                # two workers, one consumer group: each its own node, together every packet once
                assert {b.node for b in got[0]} == {"router1"} and {b.node for b in got[1]} == {"router3"}
                both = payloads(got[0]) + payloads(got[1])
                assert sorted(both) == sorted(first)
                assert [w.total_lost for w in workers] == [0, 0]
                assert workers[0].partitions == [0, 2, 4, 6] and workers[1].partitions == [1, 3, 5, 7]

                # a worker stopped and started again resumes from its durable consumers
                workers[0].close()
                time.sleep(0.5)
                t_second = time.time()
                second = send("b", 100)
                workers[0] = JetStreamSubscriber(f"{url}?durable=ids&workers=2&worker=0")
                subs.append(workers[0])
                got = read_all(workers, len(second))
                assert sorted(payloads(got[0]) + payloads(got[1])) == sorted(second)
                assert [w.total_lost for w in workers] == [0, 0]
                assert [w.duplicates for w in workers] == [0, 0]  # the acks of the first run held
                assert relay.stream_metric("nflogd_relay_stream_dropped_packets_total", reason="buffer") == 0

                # a daemon restarted: a new epoch in the stream, one restart at its worker, no loss
                daemons[0].stop()
                daemons[0].start()
                wait_until(lambda: daemons[0].stderr.count("subscribe '(all)'") >= 2, "resubscribed", WAIT)
                third = {f"c-router1-{k}".encode() for k in range(50)}
                routers[0].send_udp(sorted(third), port=UDP_PORT)
                got = read_all(workers, len(third))
                assert sorted(payloads(got[0])) == sorted(third) and not payloads(got[1])
                assert (workers[0].restarts, workers[0].total_lost, workers[1].restarts) == (1, 0, 0)

            # replay from the start: every packet again, in order, no loss; from a time; from a sequence
            with JetStreamSubscriber(url, start="all") as again:
                (all_batches,) = read_all([again], len(first) + len(second) + len(third))
                assert sorted(payloads(all_batches)) == sorted(first | second | third)
                assert (again.total_lost, again.restarts) == (0, 1)
                seqs = {}
                for b in all_batches:  # in order: each (node, epoch) contiguous from 0
                    assert seqs.get((b.node, b.epoch), 0) == b.first_seq
                    seqs[(b.node, b.epoch)] = b.next_seq
            with JetStreamSubscriber(url, start=t_second) as later:
                (batches,) = read_all([later], len(second) + len(third))
                assert sorted(payloads(batches)) == sorted(second | third)
            with JetStreamSubscriber(url, start=3) as from_seq:
                b = from_seq.recv_batch(timeout=5)
                assert from_seq.last_stream_seq == 3 and b is not None
    finally:
        for s in subs:
            s.close()
        for d in daemons:
            d.stop()
        for ns in routers:
            ns.close()


def test_a_worker_that_closes_gives_back_what_it_fetched_ahead(tmp_path, feed):
    with NatsServer(tmp_path / "nats") as srv:
        with StreamRelay(
            tmp_path / "relay", upstreams=[feed.endpoint], jetstream={"servers": [srv.url]}
        ) as relay:
            feed.wait_subscribed({b""})
            for i in range(50):
                feed.publish(node_msg("r1", 1, i))
            wait_until(lambda: relay.stream_metric("nflogd_relay_stream_published_total") == 50, "50 acks")
        url = f"{srv.url}/NFLOG?durable=g&start=all"
        with JetStreamSubscriber(url) as first:
            wait_until(lambda: first.queued() == 51, "the reader fetched ahead")  # and the exit's mark
            one = first.recv_batch(timeout=5)
        t0 = time.monotonic()
        with JetStreamSubscriber(url, ack_wait_s=30) as second:
            (rest,) = read_all([second], 49, timeout=10)
        assert time.monotonic() - t0 < 10  # not after ack_wait_s
        assert [one.first_seq] + [b.first_seq for b in rest if b.packets] == list(range(50))
        assert (rest[-1].packets, rest[-1].first_seq) == ([], 50)  # the relay's mark at its exit
        assert second.duplicates == 0 and second.total_lost == 0


# -- the engine away ---------------------------------------------------------------------------


def test_the_server_down_the_relay_buffers_in_bounds_then_counts_drops_that_readers_see_as_loss(
    tmp_path, feed
):
    srv = NatsServer(tmp_path / "nats")
    buffer_bytes = 1 << 16
    js = {"servers": [srv.url], "buffer_bytes": buffer_bytes, "max_in_flight": 8, "ack_timeout_ms": 500}
    try:
        srv.start()
        with StreamRelay(tmp_path / "relay", upstreams=[feed.endpoint], jetstream=js) as relay:
            reader = JetStreamSubscriber(f"{srv.url}/NFLOG?durable=all&start=all")
            try:
                feed.wait_subscribed({b""})
                seq = 0

                def publish(n: int) -> None:
                    nonlocal seq
                    for _ in range(n):
                        feed.publish(node_msg("r1", 7, seq, n=2, size=500))
                        seq += 2

                publish(10)
                wait_until(
                    lambda: relay.stream_metric("nflogd_relay_stream_published_total") == 10, "10 acks", WAIT
                )
                assert relay.stream_metric("nflogd_relay_stream_connected") == 1
                srv.stop()
                wait_until(lambda: relay.stream_metric("nflogd_relay_stream_connected") == 0, "disconnected")
                held = []
                for _ in range(20):  # 200 messages of ~1.2 kB against a 64 KiB buffer
                    publish(10)
                    held.append(relay.stream_metric("nflogd_relay_stream_buffered_bytes"))
                    time.sleep(0.02)
                wait_until(
                    lambda: (
                        relay.stream_metric("nflogd_relay_stream_dropped_messages_total", reason="buffer") > 0
                    ),
                    "drops",
                    WAIT,
                )
                assert max(held) <= buffer_bytes
                # and the process: 40 MB more offered while the server is away, RSS barely moves
                rss = rss_kib(relay.pid)
                big = 0
                for _ in range(40):
                    for _ in range(100):
                        feed.publish(node_msg("r1", 7, seq, n=10, size=1000))
                        seq += 10
                        big += 1
                    time.sleep(0.05)
                wait_until(
                    lambda: relay.stream_metric("nflogd_relay_stream_messages_total") >= 210 + big, "offered"
                )
                assert rss_kib(relay.pid) - rss < 16 * 1024
                assert relay.stream_metric("nflogd_relay_stream_buffered_bytes") <= buffer_bytes
                assert relay.stderr.count("buffer full") == 1  # one line for the episode
                srv.start()
                wait_until(
                    lambda: relay.stream_metric("nflogd_relay_stream_buffered_messages") == 0, "drained", 30
                )
                assert relay.stream_metric("nflogd_relay_stream_connected") == 1
                assert relay.stream_metric("nflogd_relay_stream_errors_total") > 0  # acks timed out
                assert relay.stream_metric("nflogd_relay_stream_retries_total") > 0
                publish(5)
                dropped = relay.stream_metric("nflogd_relay_stream_dropped_packets_total", reason="buffer")
                assert 0 < dropped < seq
                got = read_all([reader], seq - dropped, timeout=30)
                assert reader.total_lost == dropped
                assert reader.received == seq - dropped
                assert reader.lost == {("r1", 7): dropped}
                assert "buffer has room again" in relay.stderr
            finally:
                reader.close()
        del got
    finally:
        srv.stop()


def test_a_buffer_short_of_a_failover_is_warned_of_and_the_last_words_count_packets(tmp_path, feed):
    """At a rate whose 8 s (a leader failover) exceed buffer_bytes the relay says so, once; with
    the server gone, SIGTERM's last words give the packets not published, as the metric does."""
    srv = NatsServer(tmp_path / "nats")
    js = {"servers": [srv.url], "buffer_bytes": 1 << 16, "ack_timeout_ms": 500}
    try:
        srv.start()
        relay = StreamRelay(tmp_path / "relay", upstreams=[feed.endpoint], jetstream=js, stop_timeout=20)
        with relay:
            feed.wait_subscribed({b""})
            seq = 0
            for _ in range(300):  # ~1.2 kB each, 100 a second: 8 s of it is twice 64 KiB
                feed.publish(node_msg("r1", 7, seq, n=2, size=500))
                seq += 2
                time.sleep(0.01)
            wait_until(lambda: relay.stream_metric("nflogd_relay_stream_published_total") >= 300, "acks")
            wait_until(lambda: "holds" in relay.stderr, "the warning")
            assert relay.stderr.count("a leader failover stalls publishing") == 1, relay.stderr
            srv.stop()
            wait_until(lambda: relay.stream_metric("nflogd_relay_stream_connected") == 0, "disconnected")
            for _ in range(10):
                feed.publish(node_msg("r1", 7, seq, n=3))
                seq += 3
            wait_until(lambda: relay.stream_metric("nflogd_relay_stream_buffered_messages") >= 10, "held")
            relay.stop()
        assert relay.returncode == 0
        assert "stopped with 30 packets not published" in relay.stderr, relay.stderr
    finally:
        srv.stop()


def test_a_tail_the_stream_buffer_dropped_is_counted_by_the_reader(tmp_path, feed):
    """The server away while the last messages of a run come: the relay's buffer drops them
    (counted), and nothing follows them. The relay's own sequence mark, two seconds after the
    last packets, still fits the full buffer and is stored once the server is back, so the
    reader counts the tail: lost = sent - received, equal to the relay's dropped packets."""
    srv = NatsServer(tmp_path / "nats")
    js = {"servers": [srv.url], "buffer_bytes": 1 << 16, "ack_timeout_ms": 500}
    try:
        srv.start()
        with StreamRelay(tmp_path / "relay", upstreams=[feed.endpoint], jetstream=js) as relay:
            feed.wait_subscribed({b""})
            seq = 0
            for _ in range(10):
                feed.publish(node_msg("r1", 7, seq, n=2, size=500))
                seq += 2
            wait_until(lambda: relay.stream_metric("nflogd_relay_stream_published_total") == 10, "10 acks")
            srv.stop()
            wait_until(lambda: relay.stream_metric("nflogd_relay_stream_connected") == 0, "disconnected")
            for _ in range(200):  # ~1.2 kB each against a 64 KiB buffer: the end is dropped
                feed.publish(node_msg("r1", 7, seq, n=2, size=500))
                seq += 2
            wait_until(lambda: relay.metric("nflogd_relay_marks_total") == 1, "the relay's mark")
            dropped = relay.stream_metric("nflogd_relay_stream_dropped_packets_total", reason="buffer")
            assert dropped > 0
            srv.start()
            drained = lambda: relay.stream_metric("nflogd_relay_stream_buffered_messages") == 0  # noqa: E731
            wait_until(drained, "drained", 30)
            with JetStreamSubscriber(f"{srv.url}/NFLOG", start="all") as reader:
                (got,) = read_all([reader], seq - dropped, timeout=30)
                assert got[-1].packets == [] and got[-1].first_seq == seq  # the mark, last
                assert max(p.seq for b in got for p in b.packets) < seq - 2  # the tail never came
                assert reader.received == seq - dropped
                assert reader.total_lost == dropped == seq - reader.received
    finally:
        srv.stop()


def readme_jetstream_config() -> dict:
    """The README's relay config with a jetstream section, as pasted."""
    readme = (REPO / "README.md").read_text()
    return yaml.safe_load(
        next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "jetstream:" in b)
    )


def test_a_message_the_server_refuses_is_dropped_counted_and_seen_as_loss(tmp_path, feed):
    with NatsServer(tmp_path / "nats", extra="max_payload: 8192") as srv:
        with StreamRelay(
            tmp_path / "relay", upstreams=[feed.endpoint], jetstream={"servers": [srv.url]}
        ) as relay:
            reader = JetStreamSubscriber(f"{srv.url}/NFLOG", start="all")
            try:
                feed.wait_subscribed({b""})
                feed.publish(node_msg("r1", 1, 0, n=2))
                for i in range(3):  # 10 packets of 1000 bytes: over max_payload
                    feed.publish(node_msg("r1", 1, 2 + 10 * i, n=10, size=1000))
                feed.publish(node_msg("r1", 1, 32, n=2))
                wait_until(lambda: relay.stream_metric("nflogd_relay_stream_published_total") == 2, "2 acks")
                wait_until(
                    lambda: (
                        relay.stream_metric("nflogd_relay_stream_dropped_packets_total", reason="rejected")
                        == 30
                    ),
                    "30 rejected",
                )
                (got,) = read_all([reader], 4)
                assert reader.lost == {("r1", 1): 30}
                warned = [
                    line
                    for line in relay.stderr.splitlines()
                    if " WARNING: " in f" {line}" and "refused: " in line
                ]
                assert len(warned) == 1 and relay.stderr.count("refused: ") == 3  # one warning, then debug
                assert relay.stream_metric("nflogd_relay_stream_buffered_bytes") == 0
            finally:
                reader.close()


def voluntary_switches(pid: int, tid: int) -> int:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))


def test_a_steady_feed_is_relayed_in_batches_and_every_message_arrives(tmp_path, feed):
    """Messages one at a time at 5,000 a second, as a fleet's feed comes: the relay's control
    loop reads them in batches, one wake-up per gathering rather than one per message (the CPU
    this saves: bench/profile_relay.py, docs/performance.md), and every message reaches both a
    reader of the relay's feed and the stream, each once and in order."""
    from nflogd_client import Subscriber

    n, rate = 2000, 5000.0
    with NatsServer(tmp_path / "nats") as srv:
        js = {"servers": [srv.url]}
        with StreamRelay(tmp_path / "relay", upstreams=[feed.endpoint], jetstream=js) as relay:
            with Subscriber(relay.endpoint) as sub:
                feed.wait_subscribed({b""})
                first = 0
                while sub.recv_batch(timeout=0.1) is None:  # the reader's connection is through
                    feed.publish(node_msg("r1", 1, first))
                    first += 1
                while sub.recv_batch(timeout=0.3) is not None:
                    pass
                before = voluntary_switches(relay.pid, relay.pid)
                t0 = time.monotonic()
                for i in range(n):  # on schedule: behind it (a busy machine), the next ones go at once
                    time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                    feed.publish(node_msg("r1", 1, first + i))
                batches = list(iter(lambda: sub.recv_batch(timeout=1), None))
                wakeups = voluntary_switches(relay.pid, relay.pid) - before
                assert [p.seq for b in batches for p in b.packets] == list(range(first, first + n))
                assert sub.total_lost == 0
                assert wakeups < n / 2, f"{wakeups} wake-ups of the control loop for {n} messages"
        with JetStreamSubscriber(f"{srv.url}/NFLOG", start="all") as reader:
            (stored,) = read_all([reader], first + n)
            assert [p.seq for b in stored for p in b.packets] == list(range(first + n))
            assert reader.total_lost == reader.duplicates == 0


def test_r3_one_cluster_node_killed_mid_stream_loses_nothing(tmp_path, feed):
    """The README's config (servers put on the test's cluster): R3, one node killed, no loss."""
    readme = readme_jetstream_config()
    with NatsCluster(tmp_path / "cluster", 3) as cluster:
        js = {**readme["jetstream"], "servers": cluster.urls}
        checked = tmp_path / "readme-relay.yaml"
        checked.write_text(yaml.safe_dump({**readme, "jetstream": js}))
        assert subprocess.run([*relay_command(), "--check", "-c", str(checked)]).returncode == 0
        with StreamRelay(tmp_path / "relay", upstreams=[feed.endpoint], jetstream=js) as relay:
            info = stream_info(cluster.urls[0])
            assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
            leader = next(s for s in cluster.servers if s.name == info.cluster.leader)
            url = "nats://" + ",".join(u.split("//")[1] for u in cluster.urls) + "/NFLOG"
            reader = JetStreamSubscriber(url, start="all", durable="r3")
            try:
                feed.wait_subscribed({b""})
                total = 0
                for i in range(300):
                    feed.publish(node_msg("r1", 1, total, n=2), node_msg("r2", 1, total, n=2))
                    total += 2
                    if i == 100:
                        leader.kill()  # the stream's leader, without a goodbye
                    time.sleep(0.005)
                got = read_all([reader], 2 * total, timeout=60)
                seen = sorted((b.node, p.seq) for b in got[0] for p in b.packets)
                assert seen == sorted((n, s) for n in ("r1", "r2") for s in range(total))
                assert reader.total_lost == 0
                assert relay.stream_metric("nflogd_relay_stream_dropped_messages_total", reason="buffer") == 0
                marks = relay.metric("nflogd_relay_marks_total")  # the relay's, two seconds after each node
                assert relay.stream_metric("nflogd_relay_stream_published_total") == 600 + marks
            finally:
                reader.close()


def test_r3_a_reader_closed_mid_stream_hands_over_to_the_next_every_stored_packet_once(tmp_path, feed):
    """A real R3 cluster, one node killed while the stream fills; the stream holds messages out
    of order (two pairs swapped, one where the second reader begins), lacks one message (4
    packets lost on the way) and ends with a sequence mark after a tail that never came (4
    more). A reader closed mid-stream gives back what it had fetched ahead, and a reader of the
    same consumer started at once delivers the rest: every stored packet once, nothing skipped
    as a duplicate, the loss counted in packets."""
    with NatsCluster(tmp_path / "cluster", 3) as cluster:
        js = {"servers": cluster.urls, "replicas": 3}
        with StreamRelay(tmp_path / "relay", upstreams=[feed.endpoint], jetstream=js) as relay:
            feed.wait_subscribed({b""})
            order = [b for b in range(99) if b != 50]  # block b: packets 4b .. 4b+3; 50 never sent
            for i in (20, 60):  # 21 before 20: where the second reader begins, below its first
                order[i], order[i + 1] = order[i + 1], order[i]
            info = stream_info(cluster.urls[0])
            replica = next(s for s in cluster.servers if s.name != info.cluster.leader)
            for k, b in enumerate(order):
                feed.publish(node_msg("r1", 1, 4 * b, n=4))
                if k == 40:
                    replica.kill()
                time.sleep(0.003)
            feed.publish(wire.encode(1, "r1", 1, 4 * 100, []))  # the mark: 396..399 never came
            sent = len(order) + 1
            # at least: where the node killed held publishes that are retried after ack_timeout_ms,
            # the relay's own sequence mark (2 s after the last packets) is stored as well
            wait_until(
                lambda: relay.stream_metric("nflogd_relay_stream_published_total") >= sent
                and relay.stream_metric("nflogd_relay_stream_buffered_messages") == 0,
                "every message stored", timeout=30,
            )  # fmt: skip
        replica.start()  # back: the readers need the cluster's meta leader, which it may have been
        stored = {4 * b + k for b in order for k in range(4)}
        url = "nats://" + ",".join(u.split("//")[1] for u in cluster.urls) + "/NFLOG?durable=g&start=all"
        first = JetStreamSubscriber(url, prefetch=32, timeout=30)
        try:
            got_first = [first.recv_batch(timeout=10) for _ in range(20)]
            assert first.queued() > 0  # fetched ahead, not handed over
        finally:
            first.close()
        t0 = time.monotonic()
        with JetStreamSubscriber(url, ack_wait_s=30) as second:
            (rest,) = read_all([second], len(stored) - 4 * 20, timeout=15)
            assert time.monotonic() - t0 < 15  # given back at once, not after ack_wait_s
            delivered = [p.seq for b in got_first + rest for p in b.packets]
            assert sorted(delivered) == sorted(stored)  # each stored packet once
            assert first.duplicates == second.duplicates == 0
            assert first.total_lost == 0
            assert second.total_lost == 8 and second.lost == {("r1", 1): 8}


# -- nflog-tap and scapy on a stream -------------------------------------------------------------


@pytest.mark.needs("tcpdump")
def test_an_hour_old_capture_opens_in_tcpdump_and_scapy(tmp_path, feed):
    from nflogd_client import ZMQNFLOGSocket
    from scapy.all import UDP, sniff
    from scapy.layers.inet import IP
    from scapy.packet import raw

    packets = [
        raw(IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=4000 + k, dport=53) / b"q") for k in range(5)
    ]
    with NatsServer(tmp_path / "nats") as srv:
        with StreamRelay(
            tmp_path / "relay", upstreams=[feed.endpoint], jetstream={"servers": [srv.url]}
        ) as relay:
            feed.wait_subscribed({b""})
            feed.publish(wire.encode(5, "r1", 1, 0, [rec(5, p) for p in packets[:3]]))
            feed.publish(wire.encode(6, "r1", 1, 0, [rec(6, p) for p in packets[3:]]))
            wait_until(
                lambda: relay.stream_metric("nflogd_relay_stream_published_total") == 2, "2 acks", WAIT
            )
        endpoint = f"{srv.url}/NFLOG?start=all"
        pcap = tmp_path / "old.pcap"
        tap = subprocess.run(
            [*TAP, "-e", endpoint, "-g", "5", "-c", "3", "-w", str(pcap)],
            capture_output=True,
            timeout=WAIT,
        )
        assert tap.returncode == 0 and tap.stderr.decode() == "nflog-tap: 3 packets written, 0 lost\n", (
            tap.stderr
        )
        lines = subprocess.run(
            ["tcpdump", "-n", "-r", str(pcap)], capture_output=True, timeout=WAIT
        ).stdout.decode()
        assert [line.split(" > ")[0].split()[-1] for line in lines.splitlines()] == [
            f"192.0.2.1.{4000 + k}" for k in range(3)
        ]
        got = sniff(L2socket=ZMQNFLOGSocket, iface="nflog:6", endpoint=endpoint, count=2, timeout=WAIT)
        assert [p[UDP].sport for p in got] == [4003, 4004]
        bad = subprocess.run(
            [*TAP, "-e", f"{srv.url}/NOSUCH", "-c", "1", "-w", "-"],
            capture_output=True,
            timeout=WAIT,
        )
        assert bad.returncode == 2
        assert bad.stderr.decode() == f"nflog-tap: {srv.url}/NOSUCH: no such stream\n"


# -- without nats-py, and reloads ----------------------------------------------------------------


def test_the_relay_runs_without_nats_py_unless_it_has_a_jetstream_section(tmp_path, feed):
    """nats-py made unimportable (sys.modules entry None): a relay without the section starts."""
    hide = "import sys; sys.modules['nats'] = None; from nflogd.relay import main; sys.exit(main())"
    plain = RelayProcess(Host(), tmp_path / "plain", upstreams=[feed.endpoint], metrics=False)
    plain.command = lambda: [sys.executable, "-c", hide]
    with plain:
        assert "relaying 1 upstream" in plain.stderr
    with_js = StreamRelay(
        tmp_path / "js", upstreams=[feed.endpoint], jetstream={"servers": ["nats://127.0.0.1:1"]}
    )
    with_js.command = lambda: [sys.executable, "-c", hide]
    assert with_js.run_to_exit(15) == 1
    last = with_js.stderr.strip().splitlines()[-1]
    assert last.startswith("nflogd-relay: jetstream: needs the nats-py package"), with_js.stderr


def test_a_reload_that_changes_the_jetstream_section_is_refused(tmp_path, feed):
    with NatsServer(tmp_path / "nats") as srv:
        with StreamRelay(
            tmp_path / "relay", upstreams=[feed.endpoint], jetstream={"servers": [srv.url]}
        ) as relay:
            cfg = dict(relay.config)
            cfg["jetstream"] = {**cfg["jetstream"], "replicas": 3}
            relay.write_config(cfg)
            status = relay.reload()
            assert "jetstream: a change needs a restart" in status.get("STATUS", ""), status
            feed.wait_subscribed({b""})
            feed.publish(node_msg("r1", 1, 0))
            wait_until(
                lambda: relay.stream_metric("nflogd_relay_stream_published_total") == 1, "still publishing"
            )


def test_without_nats_py_the_reader_says_what_to_install():
    """Without nats-py a JetStreamSubscriber is one ImportError naming the extra, raised
    where it is made (not a traceback from the reader's thread)."""
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "from nflogd_client.jetstream import JetStreamSubscriber\n"
        "try:\n    JetStreamSubscriber('nats://127.0.0.1:9/feed', [5])\n"
        "except ImportError as e:\n    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.strip() == "JetStreamSubscriber needs nats-py: pip install 'nflogd-client[jetstream]'"


def test_a_nats_py_without_the_batched_write_is_refused_in_one_line(tmp_path, feed):
    """The relay writes its publishes through nats-py's Client._send_command/_flush_pending;
    a nats-py without them is refused at start in one line that names the versions to install."""
    hide = (
        "import sys; from nats.aio.client import Client; del Client._send_command\n"
        "from nflogd.relay import main; sys.exit(main())"
    )
    relay = StreamRelay(tmp_path, upstreams=[feed.endpoint], jetstream={"servers": ["nats://127.0.0.1:1"]})
    relay.command = lambda: [sys.executable, "-c", hide]
    assert relay.run_to_exit(15) == 1
    assert "Traceback" not in relay.stderr, relay.stderr
    last = relay.stderr.strip().splitlines()[-1]
    assert last.startswith("nflogd-relay: jetstream: nats-py "), relay.stderr
    assert last.endswith(
        "has no Client._send_command/_flush_pending, which the relay writes its"
        " batches with: install nats-py >= 2.6, < 3"
    ), relay.stderr
