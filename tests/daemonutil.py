"""The real nflogd as a subprocess in a test's network namespace, always stopped afterwards.

::

    from daemonutil import NflogdProcess, receive

    def test_something(netns, tmp_path):
        netns.log_rule(1, match="udp dport 9999")
        with NflogdProcess(netns, tmp_path, groups=[1]) as d:   # returns once READY=1 came
            ctx = zmq.Context()
            sub = d.subscribe(ctx)                             # returns once the daemon has the subscription
            netns.send_udp([b"a", b"b"])
            batches = receive(sub, lambda bs: sum(len(b.packets) for b in bs) >= 2)
            d.metric("nflogd_packets_total", group="1")       # scraped inside the namespace
            sub.close(linger=0); ctx.term()
        d.returncode, d.stderr                                 # after SIGTERM

The daemon gets a config written to ``tmp_path/nflogd.yaml`` (``groups``, ``node``,
an ipc endpoint ``ipc://<tmp_path>/run/feed.sock``, metrics on 127.0.0.1:9477 inside
the namespace, and anything passed in ``extra``), ``--log-level debug``, and
``$NOTIFY_SOCKET`` pointing at a datagram socket in ``tmp_path`` that the helper reads
instead of sleeping: ``start()`` waits for ``READY=1``, ``reload()`` sends SIGHUP and
waits for the next ``READY=1``. Its stderr goes to a file, ``.stderr`` reads it.
``stop()`` sends SIGTERM and kills after a deadline; ``__exit__`` always stops it.

``RelayProcess`` runs ``nflogd-relay`` the same way (``relay.yaml``, ``relay.stderr``,
metrics on 127.0.0.1:9478), with ``upstreams`` in place of ``groups`` and ``node``.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parent.parent
NFLOGD = REPO / ".venv" / "bin" / "nflogd"
NFLOGD_RELAY = REPO / ".venv" / "bin" / "nflogd-relay"
METRICS_PORT = 9477
#: How much slower than a native run this one is: make test-vm's emulated guest (TCG) sets
#: NFLOGD_TIME_SCALE, which stretches the daemon's start and stop deadlines (nothing else).
TIME_SCALE = float(os.environ.get("NFLOGD_TIME_SCALE", "1"))
RELAY_METRICS_PORT = 9478


def nflogd_command() -> list[str]:
    """The installed ``nflogd`` script, or ``python -m nflogd`` from the checkout."""
    if NFLOGD.exists():
        return [str(NFLOGD)]
    return [sys.executable, "-m", "nflogd"]


#: What a run of the daemon does not import: left out of readable_runtime()'s copy.
_NOT_RUNTIME = (
    "pip", "setuptools", "_distutils_hack", "pkg_resources", "ruff", "hypothesis", "_hypothesis",
    "pytest", "_pytest", "pygments", "__editable__", "iniconfig", "pluggy", "packaging",
)  # fmt: skip


def readable_runtime(dest: Path) -> tuple[list[str], dict[str, str]]:
    """``python -m nflogd`` from a copy of the checkout's packages and the venv's runtime
    libraries in ``dest``, for a daemon started as an unprivileged user: the checkout may
    live under a directory only root can enter (a clone into ``mktemp -d``). Returns the
    command and the environment it needs. ``dest`` must be readable by that user."""
    site = dest / "site"
    venv_site = Path(sysconfig.get_paths()["purelib"])
    for entry in venv_site.iterdir():
        if entry.name.startswith(_NOT_RUNTIME) or entry.name == "__pycache__":
            continue
        copy = shutil.copytree if entry.is_dir() else shutil.copy2
        copy(entry, site / entry.name, **({"symlinks": True} if entry.is_dir() else {}))
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "nflogd", site / "nflogd", ignore=ignore)
    shutil.copytree(REPO / "client" / "nflogd_client", site / "nflogd_client", ignore=ignore)
    for d in [dest, *(p for p in site.rglob("*") if p.is_dir())]:
        d.chmod(0o755)
    python = os.path.realpath(sys.executable)
    return [python, "-s", "-m", "nflogd"], {"PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}


def relay_command() -> list[str]:
    """The installed ``nflogd-relay`` script, or ``python -m nflogd.relay`` from the checkout."""
    if NFLOGD_RELAY.exists():
        return [str(NFLOGD_RELAY)]
    return [sys.executable, "-m", "nflogd.relay"]


class DaemonError(AssertionError):
    """The daemon did not do what the test waited for; the message carries its stderr."""


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)  # a daemon that dropped root can still write to it
        self.messages: list[dict[str, str]] = []

    def _recv(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return False
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        return True

    def wait(
        self, key: str, value: str = "1", *, after: int = 0, timeout: float = 10.0,
        alive: Callable[[], bool] = lambda: True,
    ) -> dict[str, str]:  # fmt: skip
        """The first message from index ``after`` on with ``key=value``; DaemonError on timeout."""
        deadline = time.monotonic() + timeout
        seen = after
        while True:
            for msg in self.messages[seen:]:
                if msg.get(key) == value:
                    return msg
            seen = max(seen, len(self.messages))
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"no {key}={value} within {timeout} s")
            if not self._recv(min(left, 0.1)) and not alive():
                raise DaemonError(f"the daemon exited before sending {key}={value}")

    def drain(self, timeout: float = 0.0) -> list[dict[str, str]]:
        """Receive what is queued (waiting up to ``timeout`` for the first); return all messages."""
        if self._recv(timeout):
            while self._recv(0.001):
                pass
        return self.messages

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Started:
    """``with x:`` starts ``x`` (unless ``running()``) and stops it at the end; a start that
    fails half-way stops what it started."""

    def running(self) -> bool:
        return False

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self):
        if not self.running():
            try:
                self.start()
            except BaseException:
                self.stop()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def end_process(proc: subprocess.Popen | None, signum: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Signal a child that still runs (after SIGCONT, in case a test left it stopped) and
    wait for it; SIGKILL after ``timeout`` s."""
    if proc is not None and proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signum)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NflogdProcess(Started):
    """One nflogd run in ``netns`` with its files in ``workdir`` (see the module docstring).

    ``groups``: group numbers or mappings as the config's ``groups`` takes them.
    ``metrics``: serve metrics on 127.0.0.1:``METRICS_PORT`` (in the namespace) or not.
    ``extra``: more top-level config keys, merged over the generated ones (a ``publish``
    mapping replaces the generated one entirely). ``env``: added to the environment; ``cwd``:
    where it runs (default: the checkout).
    """

    #: Names the config and stderr files in ``workdir``.
    name = "nflogd"
    metrics_port = METRICS_PORT

    def __init__(
        self,
        netns,
        workdir: Path,
        *,
        groups=(1,),
        node: str = "test",
        metrics: bool = True,
        extra: dict | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log_level: str = "debug",
        ready_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ):
        self.netns = netns
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / f"{self.name}.yaml"
        self.endpoint = f"ipc://{self.workdir}/run/feed.sock"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics" if metrics else None
        self.args = args
        self.env = env or {}
        self.cwd = cwd if cwd is not None else REPO
        self.log_level = log_level
        self.ready_timeout = ready_timeout * TIME_SCALE
        self.stop_timeout = stop_timeout * TIME_SCALE
        self.proc: subprocess.Popen | None = None
        self.notify: NotifySocket | None = None
        self.ready_msg: dict[str, str] | None = None
        self._stderr_path = self.workdir / f"{self.name}.stderr"
        self.config = self.make_config(groups=groups, node=node, metrics=metrics, extra=extra)
        self.write_config(self.config)

    # -- config ----------------------------------------------------------------

    def make_config(self, *, groups=(1,), node="test", metrics=True, extra=None) -> dict:
        cfg = {
            "node": node,
            "groups": list(groups),
            "publish": {"bind": [self.endpoint]},
            "metrics": {"listen": f"127.0.0.1:{METRICS_PORT}" if metrics else None},
        }
        cfg.update(extra or {})
        return cfg

    def write_config(self, cfg: dict | str) -> None:
        """Write the config file (a dict as YAML, or text as is); a reload() reads it."""
        text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False)
        if not isinstance(cfg, str):
            self.config = cfg
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    # -- life ------------------------------------------------------------------

    def command(self) -> list[str]:
        return nflogd_command()

    def start(self, wait_ready: bool = True) -> NflogdProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.notify = NotifySocket(self.workdir / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock")
        env = {**os.environ, "NOTIFY_SOCKET": self.notify.path, "PYTHONUNBUFFERED": "1", **self.env}
        cmd = [*self.command(), "-c", str(self.config_path), "--log-level", self.log_level, *self.args]
        with open(self._stderr_path, "ab") as err:
            self.proc = self.netns.popen(
                *cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, cwd=str(self.cwd)
            )
        if wait_ready:
            try:
                self.ready_msg = self.notify.wait("READY", timeout=self.ready_timeout, alive=self.alive)
            except DaemonError as e:
                raise DaemonError(f"{e}; stderr:\n{self.stderr}") from None
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def stderr(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def run_to_exit(self, timeout: float = 10.0) -> int:
        """Start without waiting for READY=1 and wait for the process to end by itself (a
        start that must fail); its exit status. Stopped whatever happens."""
        self.start(wait_ready=False)
        try:
            return self.wait(timeout)
        finally:
            self.stop()

    def wait(self, timeout: float = 5.0) -> int:
        """Wait for the daemon to exit by itself; its exit status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(f"still running after {timeout} s; stderr:\n{self.stderr}") from None

    def reload(self, timeout: float = 10.0) -> dict[str, str]:
        """SIGHUP, then the next READY=1 message (its STATUS says whether the reload failed)."""
        assert self.notify is not None
        mark = len(self.notify.drain())
        self.send_signal(signal.SIGHUP)
        try:
            self.notify.wait("RELOADING", after=mark, timeout=timeout, alive=self.alive)
            return self.notify.wait("READY", after=mark, timeout=timeout, alive=self.alive)
        except DaemonError as e:
            raise DaemonError(f"{e}; stderr:\n{self.stderr}") from None

    def stop(self, signum: int = signal.SIGTERM) -> int | None:
        """Signal the daemon and wait; SIGKILL after ``stop_timeout``. Its exit status."""
        proc = self.proc
        end_process(proc, signum, self.stop_timeout)
        if self.notify is not None:
            self.notify.close()
        return None if proc is None else proc.returncode

    def running(self) -> bool:
        return self.proc is not None

    # -- feed ------------------------------------------------------------------

    def subscribe(self, ctx, topics=(b"",), timeout: float = 5.0):
        """A SUB socket on the feed (RCVHWM unlimited), returned once the daemon has its
        subscriptions (it logs each at debug level; the helper waits for those lines)."""
        import zmq

        assert self.log_level == "debug", "subscribe() watches the daemon's debug log"
        lines = [f"DEBUG: subscribe {(t.hex() or '(all)')!r}" for t in topics]
        before = [self.stderr.count(line) for line in lines]
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        for t in topics:
            sock.setsockopt(zmq.SUBSCRIBE, t)
        deadline = time.monotonic() + timeout
        while True:
            text = self.stderr
            if all(text.count(line) > n for line, n in zip(lines, before)):
                return sock
            if time.monotonic() > deadline or not self.alive():
                sock.close(linger=0)
                raise DaemonError(f"the daemon did not log the subscription; stderr:\n{text}")
            time.sleep(0.01)

    # -- metrics ---------------------------------------------------------------

    def scrape(self, timeout: float = 5.0) -> dict[tuple[str, tuple], float]:
        """The metrics, fetched from inside the namespace: {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        assert self.metrics_url is not None, "metrics are off for this daemon"
        with self.netns.entered():
            conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=timeout)
            try:
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                body = resp.read().decode()
            finally:
                conn.close()
        if resp.status != 200:
            raise DaemonError(f"GET /metrics: HTTP {resp.status}")
        out = {}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample's value from a fresh scrape, None if absent."""
        return self.scrape().get((name, tuple(sorted(labels.items()))))


class RelayProcess(NflogdProcess):
    """One nflogd-relay run in ``netns``: ``upstreams`` as its config takes them, its feed on
    ``ipc://<workdir>/run/feed.sock`` (``.endpoint``), metrics on 127.0.0.1:9478 there."""

    name = "relay"
    metrics_port = RELAY_METRICS_PORT

    def __init__(self, netns, workdir: Path, *, upstreams, **kw):
        self.upstreams = list(upstreams)
        super().__init__(netns, workdir, **kw)

    def make_config(self, *, metrics=True, extra=None, **_) -> dict:
        cfg = {
            "upstreams": self.upstreams,
            "publish": {"bind": [self.endpoint]},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}" if metrics else None},
        }
        cfg.update(extra or {})
        return cfg

    def command(self) -> list[str]:
        return relay_command()


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A systemd unit file's settings: {key: [values in order]} (sections ignored)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def receive(sock, done: Callable[[list], bool], timeout: float = 10.0) -> list:
    """Decode messages from ``sock`` into ``wire.Batch``es until ``done(batches)`` or the timeout."""
    import zmq
    from nflogd_client import wire

    batches: list = []
    deadline = time.monotonic() + timeout
    while not done(batches):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if sock.poll(max(1, int(min(left, 0.1) * 1000)), zmq.POLLIN):
            while True:
                try:
                    msg = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                batches.append(wire.decode(msg))
    return batches


def packet_count(batches) -> int:
    return sum(len(b.packets) for b in batches)


def wait_until(pred, what: str = "condition", timeout: float = 10.0, interval: float = 0.02):
    """Poll ``pred()`` until it is true and return its value; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return value
