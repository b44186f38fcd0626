"""Real nats-server processes with JetStream for the tests: one node or a three-node cluster on
127.0.0.1, free ports, each server's store_dir under the test's tmp_path, always stopped.

::

    from natsutil import NatsServer, NatsCluster

    with NatsServer(tmp_path / "nats") as srv:          # returns once /healthz says ok
        srv.url                                        # nats://127.0.0.1:PORT
    with NatsCluster(tmp_path / "cluster", 3) as c:     # routes between all three, JetStream on each
        c.urls; c.servers[1].kill(); c.servers[1].start()

``nats-server`` is the Debian package's binary, which ``make deps`` copies into ``.venv/bin``
(or one on ``$PATH``); tests that need it are skipped with the reason when it is missing.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

from daemonutil import Started, end_process

REPO = Path(__file__).resolve().parent.parent


def nats_server_binary() -> str | None:
    local = REPO / ".venv" / "bin" / "nats-server"
    if local.exists():
        return str(local)
    return shutil.which("nats-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer(Started):
    """One nats-server with JetStream; ``routes``/``cluster_port`` make it a cluster member."""

    def __init__(
        self,
        workdir: Path,
        name: str = "n1",
        *,
        port: int | None = None,
        cluster_port: int | None = None,
        routes: tuple[int, ...] = (),
        extra: str = "",
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = port or free_port()
        self.http_port = free_port()
        self.cluster_port = cluster_port
        self.store = self.workdir / "store"
        self.config_path = self.workdir / "nats.conf"
        self.log_path = self.workdir / "nats.log"
        lines = [
            f"server_name: {name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.http_port}",
            f'jetstream {{ store_dir: "{self.store}", max_memory_store: 64MB, max_file_store: 64GB }}',
        ]
        if extra:  # more server settings, e.g. "max_payload: 8192"
            lines.append(extra)
        if cluster_port is not None:
            route_list = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
            lines.append(
                f"cluster {{ name: nflt, listen: 127.0.0.1:{cluster_port}, routes: [{route_list}] }}"
            )
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> NatsServer:
        binary = nats_server_binary()
        assert binary is not None, "nats-server is not installed (make deps installs it)"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "-c", str(self.config_path)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        if wait:
            self.wait_healthy()
        return self

    def healthz(self) -> dict | None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=2)
            try:
                conn.request("GET", "/healthz")
                return json.loads(conn.getresponse().read() or b"{}")
            finally:
                conn.close()
        except (OSError, ValueError):
            return None

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            h = self.healthz()
            if h is not None and h.get("status") == "ok":
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"nats-server {self.name} exited: {self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"nats-server {self.name} not healthy ({h}): {self.log[-2000:]}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a goodbye."""
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        end_process(self.proc)

    def running(self) -> bool:
        return self.proc is not None


class NatsCluster(Started):
    """``n`` servers routed to each other (cluster ``nflt``), JetStream on every one."""

    def __init__(self, workdir: Path, n: int = 3):
        cluster_ports = [free_port() for _ in range(n)]
        self.servers = [
            NatsServer(
                Path(workdir) / f"n{i + 1}",
                f"n{i + 1}",
                cluster_port=cluster_ports[i],
                routes=tuple(p for j, p in enumerate(cluster_ports) if j != i),
            )
            for i in range(n)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> NatsCluster:
        for s in self.servers:
            s.start(wait=False)
        for s in self.servers:
            s.wait_healthy(30)
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
