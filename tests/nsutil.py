"""Test network namespaces: each test gets its own, with loopback up and nft rules of its choosing.

Only loopback inside the namespace is used; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import time
import uuid

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetNS:
    """A named network namespace (``ip netns add``), deleted by ``close()``."""

    def __init__(self, prefix: str = "nflt"):
        self.name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.path = f"/run/netns/{self.name}"
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *cmd: str, input: str | None = None, check: bool = True, **kw):
        """Run a command inside the namespace; returns CompletedProcess (text mode)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            input=input, text=True, check=check, capture_output=True, **kw,
        )  # fmt: skip

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def nft(self, ruleset: str) -> None:
        """Load an nft ruleset (``nft -f -`` syntax) into the namespace."""
        res = self.run("nft", "-f", "-", input=ruleset, check=False)
        if res.returncode:
            raise RuntimeError(f"nft failed: {res.stderr.strip()}")

    def log_rule(
        self, group: int, *, hook: str = "output", match: str = "meta l4proto udp", extra: str = ""
    ) -> None:
        """Add one ``log group N`` rule for ``match`` (an nft expression) at ``hook``."""
        table = f"t{group}_{hook}"
        self.nft(
            f"table inet {table} {{\n"
            f"  chain c {{\n    type filter hook {hook} priority 0;\n"
            f"    {match} log group {group} {extra}\n  }}\n}}\n"
        )

    @contextlib.contextmanager
    def entered(self):
        """Switch the calling thread into the namespace; sockets made inside stay in it."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield self
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    def socket(self, family=socket.AF_INET, type=socket.SOCK_DGRAM) -> socket.socket:
        """A socket that lives in the namespace."""
        with self.entered():
            return socket.socket(family, type)

    def send_udp(self, payloads, addr: str = "127.0.0.1", port: int = 9999) -> int:
        """Send each payload as one UDP datagram to addr:port on the namespace's loopback."""
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        n = 0
        with self.socket(fam) as s:
            for p in payloads:
                s.sendto(p, (addr, port))
                n += 1
        return n

    def nf_log_settings(self) -> dict[str, str]:
        """The namespace's /proc/sys/net/netfilter/nf_log/* (which logger each family uses)."""
        out = self.run("sh", "-c", "grep -H . /proc/sys/net/netfilter/nf_log/*").stdout
        return dict(line.rsplit(":", 1) for line in out.splitlines())

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


class SteadyTraffic(threading.Thread):
    """UDP to several ports of the namespace's loopback, round-robin, until ``stop()``.

    ``sent`` counts the datagrams per port; ``stop()`` returns it.
    """

    def __init__(self, netns: NetNS, ports, interval: float = 0.001, size: int = 100):
        super().__init__(daemon=True)
        self.netns, self.ports, self.interval, self.size = netns, list(ports), interval, size
        self.sent = dict.fromkeys(self.ports, 0)
        self.halt = threading.Event()

    def run(self) -> None:
        with self.netns.socket() as s:
            i = 0
            while not self.halt.is_set():
                for port in self.ports:
                    s.sendto((b"steady %d " % i).ljust(self.size, b"."), ("127.0.0.1", port))
                    self.sent[port] += 1
                i += 1
                time.sleep(self.interval)

    def stop(self) -> dict[int, int]:
        self.halt.set()
        self.join(5)
        return self.sent
