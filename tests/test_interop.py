"""The feed's own server against other ZeroMQ implementations, each in a process of its own:
the venv's pyzmq (its bundled libzmq), Debian's python3-zmq (Debian's libzmq, under
/usr/bin/python3) and JeroMQ (Debian's libjeromq-java, pure Java, ZMTP 2.0: the server
downgrades for it), as SUB and as XSUB, on ipc and loopback tcp (JeroMQ: tcp only, it has no
Unix sockets). Each subscribes to one group and must get every message of it, in order, and
nothing of another.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from nflogd_client import wire
from pubutil import serve

from nflogd.config_publish import PublishConfig
from nflogd.publish import Publisher

pytestmark = pytest.mark.timeout(60)

MESSAGES = 200
DEBIAN_PYTHON = "/usr/bin/python3"
JEROMQ = Path("/usr/share/java/jeromq.jar")

#: A reader on pyzmq: argv kind endpoint topic-hex count; prints the libzmq version, then
#: each message's data frame in hex, one a line, then "end".
PYZMQ_READER = r"""
import sys, zmq
kind, endpoint, topic, count = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), int(sys.argv[4])
ctx = zmq.Context()
s = ctx.socket(zmq.SUB if kind == "SUB" else zmq.XSUB)
s.setsockopt(zmq.RCVHWM, 0)
s.connect(endpoint)
if kind == "SUB":
    s.setsockopt(zmq.SUBSCRIBE, topic)
else:
    s.send(b"\x01" + topic)
print(zmq.zmq_version(), flush=True)
for _ in range(count):
    if not s.poll(15000):
        break
    frames = s.recv_multipart()
    print(frames[-1].hex(), flush=True)
print("end", flush=True)
s.close(linger=0)
ctx.term()
"""

#: The same on JeroMQ (run as a single-file Java program).
JEROMQ_READER = r"""
import org.zeromq.ZMQ;

public class Reader {
    public static void main(String[] args) {
        String kind = args[0], endpoint = args[1];
        byte[] topic = new byte[args[2].length() / 2];
        for (int i = 0; i < topic.length; i++)
            topic[i] = (byte) Integer.parseInt(args[2].substring(2 * i, 2 * i + 2), 16);
        int count = Integer.parseInt(args[3]);
        ZMQ.Context ctx = ZMQ.context(1);
        ZMQ.Socket s = ctx.socket(kind.equals("SUB") ? ZMQ.SUB : ZMQ.XSUB);
        s.setRcvHWM(0);
        s.setReceiveTimeOut(15000);
        s.connect(endpoint);
        if (kind.equals("SUB")) {
            s.subscribe(topic);
        } else {
            byte[] sub = new byte[topic.length + 1];
            sub[0] = 1;
            System.arraycopy(topic, 0, sub, 1, topic.length);
            s.send(sub, 0);
        }
        System.out.println("jeromq " + ZMQ.getVersionString());
        System.out.flush();
        for (int n = 0; n < count; n++) {
            byte[] last = s.recv(0);
            if (last == null)
                break;
            while (s.hasReceiveMore())
                last = s.recv(0);
            StringBuilder hex = new StringBuilder();
            for (byte b : last)
                hex.append(String.format("%02x", b));
            System.out.println(hex);
            System.out.flush();
        }
        System.out.println("end");
        System.out.flush();
        s.close();
        ctx.term();
    }
}
"""


def batch(group: int, data: bytes):
    count, table, payload = wire.pack_records([wire.Packet.build(group, data, ts_ns=10**18)])
    return SimpleNamespace(group=group, count=count, table=table, data=payload)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pub(ctx, tmp_path):
    p = Publisher(
        PublishConfig(bind=(f"ipc://{tmp_path}/f.sock", f"tcp://127.0.0.1:{free_port()}")), node="n"
    )
    yield p
    p.close(linger=0)


def reader_command(impl: str, tmp_path: Path) -> list[str]:
    if impl == "pyzmq":
        return [sys.executable, "-c", PYZMQ_READER]
    if impl == "debian-pyzmq":
        return [DEBIAN_PYTHON, "-c", PYZMQ_READER]
    source = tmp_path / "Reader.java"
    source.write_text(JEROMQ_READER)
    return ["java", "-cp", str(JEROMQ), str(source)]


def available(impl: str) -> bool:
    if impl == "debian-pyzmq":
        return subprocess.run([DEBIAN_PYTHON, "-c", "import zmq"], capture_output=True).returncode == 0
    if impl == "jeromq":
        return JEROMQ.exists() and shutil.which("java") is not None
    return True


MATRIX = [
    (impl, kind, transport)
    for impl in ("pyzmq", "debian-pyzmq", "jeromq")
    for kind in ("SUB", "XSUB")
    for transport in ("ipc", "tcp")
    if not (impl == "jeromq" and transport == "ipc")
]


@pytest.mark.parametrize("impl, kind, transport", MATRIX)
def test_every_message_of_its_group_reaches_another_implementation(pub, tmp_path, impl, kind, transport):
    if not available(impl):
        pytest.fail(f"{impl} is not installed: make deps installs it (TEST_DEBS)")
    endpoint = next(ep for ep in pub.endpoints if ep.startswith(transport))
    version, got, sent, err = read_through(
        pub,
        [*reader_command(impl, tmp_path), kind, endpoint, wire.topic(1).hex(), str(MESSAGES)],
        lambda i: b"%s %s %d " % (impl.encode(), kind.encode(), i) + bytes(i % 50),
    )
    assert got == sent, (impl, kind, transport, version, len(got), err[-2000:])
    if impl == "jeromq":
        assert version.startswith("jeromq")
    else:
        assert version.startswith("4."), version


def read_through(pub, cmd: list[str], data: Callable[[int], bytes]) -> tuple[str, list[str], list[str], str]:
    """A reader process ``cmd`` (of READER's kind: it prints its version, each message of group
    1 in hex, then "end" after MESSAGES) served by ``pub`` until its subscription, then
    MESSAGES messages ``data(i)`` of group 1, each after one of group 2 it must not get.
    (its version line, what it got, what was sent, its stderr)."""
    before = pub.subscription_messages
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        serve(
            pub, lambda: pub.subscription_messages > before or proc.poll() is not None, "its subscription", 20
        )
        assert proc.poll() is None, proc.communicate()
        sent = []
        for i in range(MESSAGES):
            pub.publish(batch(2, b"not for it"))  # another group: filtered out by the server
            pub.publish(batch(1, data(i)))
            sent.append(data(i).hex())
            pub.handle_incoming()
        serve(pub, lambda: proc.poll() is not None, "the reader's end", 40)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = out.splitlines()
    assert lines and lines[-1] == "end", (out, err)
    return lines[0], lines[1:-1], sent, err


def test_the_two_libzmq_are_two_versions():
    """The matrix holds two libzmq builds, not one twice."""
    if not available("debian-pyzmq"):
        pytest.fail("python3-zmq is not installed: make deps installs it (TEST_DEBS)")
    import zmq

    theirs = subprocess.run(
        [DEBIAN_PYTHON, "-c", "import zmq; print(zmq.zmq_version(), zmq.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert theirs[1].startswith("/usr/lib/python3/") and zmq.__file__ != theirs[1]
    assert theirs[0] != zmq.zmq_version(), theirs
