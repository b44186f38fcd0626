"""AsyncSubscriber against the real daemon in a test namespace: async with / for, recv with a
timeout, recv_batch, cancellation that loses nothing, a daemon restart mid-stream, CURVE."""

from __future__ import annotations

import asyncio
import time

import pytest
from daemonutil import NflogdProcess, wait_until
from nflogd_client import Subscriber
from nflogd_client.aio import AsyncSubscriber
from nsutil import SteadyTraffic
from test_security import TCP, curve_section, curve_subscribes, in_netns, make_keys

pytestmark = pytest.mark.timeout(60)


def subscribed(d: NflogdProcess, before: int) -> None:
    wait_until(lambda: d.stderr.count("DEBUG: subscribe") > before, "the subscription", 10)


def payloads(pkts) -> list[bytes]:
    return [p.data[28:] for p in pkts]  # IPv4 + UDP headers


@pytest.mark.kernel
def test_async_with_for_recv_and_batches(netns, tmp_path):
    netns.log_rule(1, match="udp dport 9999")
    with NflogdProcess(netns, tmp_path / "d", groups=[1]) as d:

        async def main():
            before = d.stderr.count("DEBUG: subscribe")
            async with AsyncSubscriber(d.endpoint, groups=[1]) as sub:
                subscribed(d, before)
                assert await sub.recv(timeout=0.2) is None  # nothing yet: None, on time
                netns.send_udp([b"a", b"b", b"c"])
                first = await sub.recv(timeout=5)
                rest = await sub.recv_batch(timeout=5)  # what recv left of the batch, or the next
                got = [first, *rest.packets]
                while len(got) < 3:
                    got.append(await sub.recv(timeout=5))
                netns.send_udp([b"d", b"e"])
                more = []
                async for pkt in sub:
                    more.append(pkt)
                    if len(more) == 2:
                        break
                assert payloads(got + more) == [b"a", b"b", b"c", b"d", b"e"]
                assert [p.seq for p in got + more] == [0, 1, 2, 3, 4]
                assert (sub.lost, sub.restarts, sub.received) == ({("test", 1): 0}, 0, 5)
                with pytest.raises(TypeError, match="async for"):
                    iter(sub)
            assert sub.closed

        asyncio.run(main())


@pytest.mark.kernel
def test_cancellation_loses_nothing_and_the_loop_keeps_running(netns, tmp_path):
    netns.log_rule(1, match="udp dport 9999")
    with NflogdProcess(netns, tmp_path / "d", groups=[1]) as d:

        async def main():
            before = d.stderr.count("DEBUG: subscribe")
            sub = AsyncSubscriber(d.endpoint)
            subscribed(d, before)
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            t = asyncio.create_task(ticker())
            waiting = asyncio.create_task(sub.recv())
            await asyncio.sleep(0.3)
            assert ticks >= 10  # recv() waits without blocking the loop
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(sub.recv(), 0.1)
            netns.send_udp([b"one", b"two"])
            got = [await sub.recv(timeout=5), await sub.recv(timeout=5)]
            assert payloads(got) == [b"one", b"two"] and [p.seq for p in got] == [0, 1]
            # Cancelled with a batch half served: the rest is still there.
            netns.send_udp([b"x", b"y", b"z"])
            x = await sub.recv(timeout=5)
            task = asyncio.create_task(sub.recv_batch())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            rest = []
            while len(rest) < 2:
                rest.append(await sub.recv(timeout=5))
            assert payloads([x, *rest]) == [b"x", b"y", b"z"] and sub.total_lost == 0
            # Closed while a recv waits: that recv ends, cancelled, and the socket is closed.
            waiting = asyncio.create_task(sub.recv())
            await asyncio.sleep(0.1)
            sub.close()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(waiting, 5)
            assert sub.closed
            t.cancel()

        asyncio.run(main())


@pytest.mark.kernel
def test_daemon_restart_mid_stream(netns, tmp_path):
    netns.log_rule(1, match="udp dport 9991")
    d = NflogdProcess(netns, tmp_path / "d", groups=[1])
    sender = SteadyTraffic(netns, [9991], interval=0.005)
    with d:

        async def main():
            before = d.stderr.count("DEBUG: subscribe")
            async with AsyncSubscriber(d.endpoint, groups=[1]) as sub:
                subscribed(d, before)
                sender.start()
                for _ in range(10):
                    assert await sub.recv(timeout=5) is not None
                d.stop()
                d.start()  # a new epoch on the same ipc path; libzmq reconnects by itself
                deadline = time.monotonic() + 20
                while sub.restarts == 0 and time.monotonic() < deadline:
                    await sub.recv(timeout=1)
                assert sub.restarts == 1
                after = [await sub.recv(timeout=5) for _ in range(10)]
                assert all(p is not None for p in after)
                seqs = [p.seq for p in after]
                assert seqs == list(range(seqs[0], seqs[0] + 10))  # the new run, without gaps
                assert sub.received >= 20 and sub.malformed == 0

        try:
            asyncio.run(main())
        finally:
            sender.stop()


@pytest.mark.kernel
def test_curve_refused_then_admitted(netns, tmp_path):
    """The Subscriber's refusal handling, driven by the event loop: bob is refused and counted;
    once his key is added and the daemon reloaded, the same AsyncSubscriber gets in."""
    keys = make_keys(tmp_path / "curve")
    netns.log_rule(1, match="udp dport 9999")
    publish = {"bind": [f"ipc://{tmp_path}/d/run/feed.sock", TCP], "curve": curve_section(keys)}
    with NflogdProcess(netns, tmp_path / "d", groups=[1], extra={"publish": publish}) as d:

        async def main():
            ctx = in_netns(netns, lambda: __import__("zmq").Context())
            try:
                sub = in_netns(
                    netns,
                    lambda: AsyncSubscriber(
                        TCP,
                        server_public_key=keys.server_pub,
                        client_secret_key_file=keys.bob_secret,
                        context=ctx,
                    ),
                )
                assert await sub.recv(timeout=1.0) is None
                assert sub.refused >= 1
                (keys.clients / "bob.key").write_text(keys.bob_pub.read_text())
                d.reload()
                deadline = time.monotonic() + 15
                while curve_subscribes(d) < 1 and time.monotonic() < deadline:
                    await sub.recv(timeout=0.2)
                assert curve_subscribes(d) >= 1
                netns.send_udp([b"hello"])
                pkt = await sub.recv(timeout=5)
                assert pkt is not None and pkt.data[28:] == b"hello"
                sub.close()
            finally:
                ctx.destroy(linger=0)

        asyncio.run(main())


def test_same_counters_as_the_subscriber():
    """Not a copy: every counter and the accounting come from Subscriber itself."""
    assert issubclass(AsyncSubscriber, Subscriber)
    shared = ("_take", "_account", "_malformed", "_update", "_poll_ms", "pending", "_connect", "endpoints")
    for name in shared:
        assert getattr(AsyncSubscriber, name) is getattr(Subscriber, name)


def test_docs_snippet_imports_what_it_uses():
    import ast
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "asyncio.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            module = __import__(node.module, fromlist=["_"])
            assert all(hasattr(module, a.name) for a in node.names)


@pytest.mark.kernel
def test_endpoint_state_kept_while_awaiting(netns, tmp_path):
    """sub.endpoints as on a Subscriber, kept up by the awaiting recv: connecting with the
    cause while no daemon is there, connected once it is, connecting again after it stops."""
    d = NflogdProcess(netns, tmp_path / "d", groups=[1])

    async def state(sub, want: str, error: str | None = None):
        deadline = time.monotonic() + 10
        while True:
            st = sub.endpoints[d.endpoint]
            if st.state == want and (error is None or (st.error and error in st.error)):
                return st
            assert time.monotonic() < deadline, st
            await sub.recv(timeout=0.1)

    async def main():
        async with AsyncSubscriber(d.endpoint, groups=[1]) as sub:
            st = await state(sub, "connecting", "no such socket")
            assert st.connects == 0
            with d:
                st = await state(sub, "connected")
                assert st.error is None and st.connects == 1
            await state(sub, "connecting")

    asyncio.run(main())
