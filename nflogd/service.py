"""What ``nflogd`` and ``nflogd-relay`` share as programs: command line, logging, the control
loop with its signals, timers and watchdog, and the reload.

::

    def main(argv=None) -> int:                  # nflogd.relay.main
        return service.main(argv, prog="nflogd-relay", description="...",
                            default_config="/etc/nflogd-relay.yaml",
                            load=config_relay.load_relay, make=Relay)

    class Relay(Program):                        # what a program adds of its own
        load = staticmethod(config_relay.load_relay)   # reload() rereads self.path with it
        def start(self):
            self.watch(sock, handler)            # handler() whenever sock polls readable
            self.recheck(sock)                   # after a send or connect on a watched ZeroMQ socket
            timer = self.timer(callback, 0.25)   # callback() every 0.25 s; timer.hurry(): now
        def apply(self, new): ...                # put a reread config in force, or NflogdError
        def status(self) -> str: ...             # systemd's STATUS, the reload's log line

``Program.run()`` polls until SIGTERM/SIGINT; SIGHUP calls ``reload()``: ``RELOADING=1``,
load, ``apply()``, then ``READY=1`` with ``STATUS=<status()>`` and ``reloaded PATH:
<status()>``, or ``reload: <error>; keeping the running configuration`` and the status
with ``; last reload failed: <error>``. ``WATCHDOG=1`` every half ``$WATCHDOG_USEC``.

Command line: ``PROG [-c PATH] [--check] [--log-level LEVEL] [--log-file PATH] [--version]``.
``--check`` loads the config, prints ``ok`` and exits 0, or prints ``PROG: <error>`` and
exits 2. Otherwise ``check_limits()`` raises the soft open-files limit to the hard one and
refuses (exit 1, one line) limits too tight for a run, and ``make(cfg, path)`` builds the
program, whose ``install_signals()``, ``start()`` and ``run()`` are called and ``close()``
always: exit 0 after SIGTERM/SIGINT, 1 for a runtime failure, 2 for a bad config. Every
failure is one line on stderr, priority err (``<3>``) under journald, never a traceback.

Log lines: ``LEVEL: message`` under journald (which stamps them; ``$JOURNAL_STREAM`` names
stderr); anywhere else ``2026-12-01T20:15:03.123+0000 LEVEL: message``, local time with its
offset. ``--log-file PATH`` appends them to PATH instead of stderr (a fatal error's one line
goes to stderr as well), reopening the file when logrotate has moved it away.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import math
import os
import resource
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, cast

import zmq

from .errors import ConfigError, NflogdError
from .sdnotify import Notifier

if TYPE_CHECKING:
    from .access import CurveAccess
    from .config_publish import PublishConfig
    from .metrics import MetricsServer
    from .publish import Publisher

__all__ = ["Program", "SignalWakeup", "Timer", "check_limits", "fail", "main", "setup_logging"]

log = logging.getLogger("nflogd")


class SignalWakeup:
    """SIGTERM, SIGINT and SIGHUP only write their number to a socketpair that a loop polls.

    Python's handlers run between bytecodes of the main thread, which a loop blocked in
    ``zmq.Poller.poll`` may not reach for a long time; ``signal.set_wakeup_fd`` makes the
    signal itself readable on ``fileno()`` instead.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self._r, self._w = socket.socketpair()
        for s in (self._r, self._w):
            s.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._old_handlers = {signum: signal.signal(signum, _ignore) for signum in self.SIGNALS}

    def fileno(self) -> int:
        return self._r.fileno()

    def read(self) -> set[int]:
        """The signals received since the last read."""
        try:
            return set(self._r.recv(4096))
        except BlockingIOError:
            return set()

    def close(self) -> None:
        """Put back the handlers and wakeup fd found at start."""
        signal.set_wakeup_fd(self._old_wakeup)
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._r.close()
        self._w.close()


class Timer:
    """A callback that ``Program.run()`` calls once ``due`` (``time.monotonic()`` seconds) has come.

    With an ``interval`` (seconds) it is due again that long after each call; without one it
    is idle after a call (``due`` None) until the program sets ``due`` again. ``hurry()``
    makes it due now: the loop's next poll does not wait. ``each_turn``: called after every
    poll as well, whatever woke it (the interval is then the longest wait between calls).
    """

    def __init__(
        self, callback: Callable[[], object], interval: float | None = None, each_turn: bool = False
    ):
        self.callback = callback
        self.interval = interval
        self.each_turn = each_turn
        self.due: float | None = None if interval is None else time.monotonic() + interval

    def hurry(self) -> None:
        self.due = time.monotonic()


class Program:
    """What the daemon and the relay hold alike: their state, their control loop, their reload.

    The loop (``run()``) polls the sockets and fds given to ``watch()`` until the next
    ``Timer`` is due, calls the handler of each one readable, then every timer due (or called
    each turn); the signal wakeup is watched from ``install_signals()`` (SIGTERM/SIGINT stop
    the loop, SIGHUP calls ``reload()``) and the systemd watchdog is pinged from a timer
    while ``$WATCHDOG_USEC`` asks for it. ``reload()`` says RELOADING, loads the file at ``path``
    with ``load``, ``apply()``s it, then READY with ``status()``, or logs why not and keeps
    the running config.

    Subclasses set ``load``, set ``ctx``, ``access`` (the CURVE keys admitted), ``publisher``
    and ``metrics_server`` in ``start()`` and watch their own sockets there, implement
    ``apply()`` and ``status()``, and end ``close()`` with ``_release()``.
    """

    #: Reads and checks the program's config file (``config.load``, ``config_relay.load_relay``).
    load: Callable[[str], Any]

    def __init__(self, cfg: Any, path: str, notifier: Notifier | None = None):
        self.cfg = cfg
        self.path = path
        self.notifier = notifier if notifier is not None else Notifier.from_environ()
        self.ctx: zmq.Context[Any] | None = None
        self.access: CurveAccess | None = None
        self.publisher: Publisher | None = None
        self.metrics_server: MetricsServer | None = None
        self._stop = False
        self._wakeup: SignalWakeup | None = None
        self._poller = zmq.Poller()
        self._handlers: dict[object, Callable[[], object]] = {}  # watched socket or fd -> handler
        self._timers: list[Timer] = []
        #: Seconds the loop sleeps after a turn in which the ``gather`` handlers read messages
        #: and emptied their queues (``watch(..., gather=True)``); 0: no sleep.
        self.gather_s = 0.0
        self._gathered: set[object] = set()
        #: ZeroMQ sockets watched through their ZMQ_FD: socket -> fd; the fds whose handler is
        #: called the next turn whatever the poll says (``recheck()``, or it returned True)
        self._zmq_fds: dict[object, int] = {}
        self._edge: set[int] = set()
        self._pending: set[int] = set()

    # -- the loop --------------------------------------------------------------

    def install_signals(self) -> None:
        """SIGTERM/SIGINT/SIGHUP only wake the loop (``SignalWakeup``)."""
        self._wakeup = SignalWakeup()
        self.watch(self._wakeup.fileno(), self._handle_signals)

    def watch(self, obj: zmq.Socket | int, handler: Callable[[], object], gather: bool = False) -> None:
        """Call ``handler()`` whenever ``obj`` (a ZeroMQ socket or an fd) polls readable.

        ``gather``: a stream of messages that may wait ``gather_s`` to be handled together. The
        handler reads until it has read everything, or a bounded number and returns True when
        more is left. A turn that read such messages and emptied their queues is followed by a
        sleep of ``gather_s`` (the other events wait as well, at most that long), then a turn
        for everything ready: a steady trickle costs one wake-up per ``gather_s`` rather than
        one per message. A message after a pause is handled at once, a backlog without pause.

        A ZeroMQ socket is watched through its ``ZMQ_FD``, which says that something changed,
        not that a message is there: its handler must read until the socket has nothing left
        (``ZMQ_EVENTS`` without POLLIN, or ``zmq.Again``) or return True (called again the next
        turn), and whatever else is done on the socket (a send, a connect) must be followed by
        ``recheck(sock)``. So a turn asks ZeroMQ about the sockets that changed only: polled as
        sockets, every one of them cost its mailbox check (a poll and a getpid) every turn.
        """
        if isinstance(obj, zmq.Socket):
            fd = cast(int, obj.getsockopt(zmq.FD))
            self._zmq_fds[obj] = fd
            self._edge.add(fd)
            self._pending.add(fd)  # whatever came before it was watched
            obj = fd
        self._handlers[obj] = handler
        self._poller.register(obj, zmq.POLLIN)
        if gather:
            self._gathered.add(obj)

    def recheck(self, sock: zmq.Socket) -> None:
        """Call the handler of the watched ZeroMQ socket ``sock`` the next turn: something was
        done on it that may have taken in what its ``ZMQ_FD`` would have signalled."""
        fd = self._zmq_fds.get(sock)
        if fd is not None:
            self._pending.add(fd)

    def unwatch(self, obj: zmq.Socket | int) -> None:
        """Stop watching ``obj``; its handler is not called again, not even later this turn."""
        if isinstance(obj, zmq.Socket):
            fd = self._zmq_fds.pop(obj, None)
            if fd is None:
                return
            self._edge.discard(fd)
            self._pending.discard(fd)
            obj = fd
        if self._handlers.pop(obj, None) is not None:
            self._poller.unregister(obj)
            self._gathered.discard(obj)

    def timer(
        self, callback: Callable[[], object], interval: float | None = None, each_turn: bool = False
    ) -> Timer:
        """A Timer that ``run()`` serves (every ``interval`` seconds, or when its ``due`` is set;
        ``each_turn``: after every poll too)."""
        t = Timer(callback, interval, each_turn)
        self._timers.append(t)
        return t

    def run(self) -> None:
        """Serve the watched sockets and the timers until SIGTERM/SIGINT."""
        interval = self.notifier.watchdog_interval
        if interval:
            self.timer(self.notifier.watchdog, interval)
        handlers, timers, gathered, poll = self._handlers, self._timers, self._gathered, self._poller.poll
        edge, pending = self._edge, self._pending
        steady = False  # the last turn read gathered messages, and emptied their queues
        while not self._stop:
            if steady:  # more are likely on their way: let them gather, then take all at once
                time.sleep(self.gather_s)
                events = poll(0)
            else:
                events = poll(0 if pending else self._timeout())
            ready = [obj for obj, _ in events]
            if pending:
                ready += [fd for fd in pending if fd not in ready]
                pending.clear()
            steady = backlog = False
            for obj in ready:
                handler = handlers.get(obj)  # None: unwatched by a handler earlier this turn
                if handler is not None:
                    more = handler()
                    if more and obj in edge:
                        pending.add(obj)  # its fd will not say so again
                    if obj in gathered:
                        steady, backlog = True, backlog or bool(more)
            if backlog or not self.gather_s:
                steady = False
            now = time.monotonic()
            for t in timers:
                if t.each_turn or (t.due is not None and t.due <= now):
                    t.due = None if t.interval is None else now + t.interval
                    t.callback()

    def _timeout(self) -> int | None:
        """Milliseconds until the first timer is due (None: none is)."""
        due = [t.due for t in self._timers if t.due is not None]
        if not due:
            return None
        return max(0, math.ceil((min(due) - time.monotonic()) * 1000))

    def _handle_signals(self) -> None:
        """SIGTERM/SIGINT end the loop; SIGHUP reloads."""
        signums = self._wakeup.read() if self._wakeup is not None else set()
        if signums & {signal.SIGTERM, signal.SIGINT}:
            log.info("%s: stopping", "SIGTERM" if signal.SIGTERM in signums else "SIGINT")
            self._stop = True
        elif signal.SIGHUP in signums:
            self.reload()

    # -- reload ----------------------------------------------------------------

    def reload(self) -> bool:
        """Reread the config and apply it; False if it was not applied."""
        self.notifier.reloading()
        try:
            new = self.load(self.path)
        except ConfigError as e:
            return self._reload_failed(str(e))
        except OSError as e:
            return self._reload_failed(f"{self.path}: {e.strerror or e}")
        try:
            self.apply(new)
        except NflogdError as e:
            return self._reload_failed(str(e))
        self.cfg = new
        log.info("reloaded %s: %s", self.path, self.status())
        self.notifier.ready(self.status())
        return True

    def _reload_failed(self, why: str) -> bool:
        log.error("reload: %s; keeping the running configuration", why)
        self.notifier.ready(f"{self.status()}; last reload failed: {why}")
        return False

    def apply(self, new: Any) -> None:  # pragma: no cover - every program has its own
        """Put ``new`` (a config ``load`` read) in force, or raise NflogdError with nothing changed."""
        raise NotImplementedError

    def status(self) -> str:  # pragma: no cover - every program has its own
        """What the program does now, one line: systemd's STATUS and the reload log line."""
        raise NotImplementedError

    def _context(self) -> zmq.Context[Any]:
        """The ZeroMQ context that ``start()`` made."""
        if self.ctx is None:
            raise RuntimeError("the program has not started")
        return self.ctx

    def _feed(self) -> Publisher:
        """The publisher that ``start()`` made (the loop and reloads run only after it)."""
        if self.publisher is None:
            raise RuntimeError("the program has not started")
        return self.publisher

    def _apply_publish(self, publish: PublishConfig) -> None:
        """What a reload changes of the ``publish`` section and cannot fail, once the endpoints
        are rebound: the CURVE authorized keys read again, ``hwm`` for new subscribers, the own
        server's limits."""
        if self.access is not None and publish.curve is not None:  # CURVE on or off: a restart
            try:
                self.access.configure(publish.curve)
            except NflogdError as e:  # only if the directory changed since the config was read
                log.error("reload: %s; the authorized keys loaded before stay", e)
        publisher = self._feed()
        publisher.set_limits(publish)
        if publish.hwm != publisher.hwm:
            publisher.set_hwm(publish.hwm)
            log.info("reload: publish.hwm %d applies to subscribers connecting from now on", publish.hwm)

    # -- stop ------------------------------------------------------------------

    def _release(self) -> None:
        """The end of ``close()``: metrics, the feed, the context, the signal handlers, the
        notifier. Safe after a failed start."""
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        self.access = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        if self._wakeup is not None:
            self._wakeup.close()
            self._wakeup = None
        self.notifier.close()


def _ignore(signum, frame) -> None:
    """The handler of SIGTERM/SIGINT/SIGHUP: the wakeup fd carries the signal to the loop."""


# -- logging ----------------------------------------------------------------------


class _Formatter(logging.Formatter):
    """``LEVEL: message``; under journald also the ``<N>`` priority prefix of sd-daemon(3),
    elsewhere a timestamp first (journald stamps its lines itself)."""

    _PRIO = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def __init__(self, journal: bool):
        super().__init__(
            "%(levelname)s: %(message)s" if journal else "%(asctime)s %(levelname)s: %(message)s"
        )
        self.journal = journal

    def formatTime(self, record: logging.LogRecord, datefmt=None) -> str:  # noqa: N802 - logging's name
        t = time.localtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}" + time.strftime("%z", t)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journal:
            text = f"<{self._PRIO.get(record.levelname, 6)}>" + text.replace("\n", " ")
        return text


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str, path: str | None = None) -> None:
    """Log at ``level`` to stderr, or appending to the file ``path``; OSError if it cannot be opened."""
    if path is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        journal = _stderr_is_journal()
    else:
        handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        journal = False
    handler.setFormatter(_Formatter(journal))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- resource limits ----------------------------------------------------------------

#: Open files the daemon needs besides its peers' connections (groups, ZeroMQ's mailboxes and
#: epoll, the metrics server, key files): below this, refused at start.
MIN_OPEN_FILES = 64
#: Threads a run needs at once: ZeroMQ's I/O thread and reaper, the metrics server, the CURVE
#: authenticator; probed at start, since libzmq aborts when it cannot start one.
THREADS_NEEDED = 4
#: Memory probed at start besides the threads, bytes: what a run holds on top of the interpreter.
MEMORY_PROBE = 32 << 20


def check_limits() -> None:
    """Raise the soft open-files limit to the hard one; fail with one line (NflogdError) if it
    cannot hold a run, rather than letting libzmq abort on it later.

    Feed peers each hold a file descriptor: the connection budget (``publish.max_connections``,
    ``Publisher.budget``) is sized from this limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass  # e.g. above fs.nr_open: keep the soft limit
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        raise NflogdError(
            f"RLIMIT_NOFILE is {soft} (hard limit {hard}): at least {MIN_OPEN_FILES} open files are "
            "needed (systemd: LimitNOFILE=)"
        )


def probe_threads(extra: int = 0) -> None:
    """Start (and end) the threads a run needs (THREADS_NEEDED, and ``extra``: the daemon's
    capture threads), and take its memory, once: NflogdError in one line if RLIMIT_AS or a
    task limit is too tight, rather than an abort in libzmq, which cannot survive failing to
    start a thread. Called after the privilege drop (which needs a single thread), before
    the ZeroMQ context."""
    release = threading.Event()
    threads = []
    needed = THREADS_NEEDED + extra
    try:
        probe = bytearray(MEMORY_PROBE)
        del probe
        for _ in range(needed):
            t = threading.Thread(target=release.wait, daemon=True)
            t.start()
            threads.append(t)
    except (RuntimeError, MemoryError) as e:
        as_soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        limit = "unlimited" if as_soft == resource.RLIM_INFINITY else f"{as_soft >> 20} MiB"
        why = str(e) if isinstance(e, RuntimeError) else "out of memory"
        raise NflogdError(
            f"cannot start: {why} (RLIMIT_AS {limit}; a run needs {needed} threads and "
            f"about {MEMORY_PROBE >> 20} MiB more; systemd: LimitAS=, TasksMax=, MemoryMax=)"
        ) from None
    finally:
        release.set()
        for t in threads:
            t.join()


# -- command line -----------------------------------------------------------------


def _parser(prog: str, description: str, default_config: str) -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--version", action="version", version=f"{prog} {__version__}")
    p.add_argument("-c", "--config", default=default_config, metavar="PATH",
                   help=f"configuration file (default {default_config})")  # fmt: skip
    p.add_argument("--check", action="store_true", help="validate the configuration and exit (0 ok, 2 bad)")
    p.add_argument("--log-level", default="info", metavar="LEVEL", type=str.lower,
                   choices=["debug", "info", "warning", "error"],
                   help="debug, info (default), warning or error")  # fmt: skip
    p.add_argument("--log-file", metavar="PATH",
                   help="append log lines to PATH instead of stderr (default: stderr)")  # fmt: skip
    return p


def fail(prog: str, message, status: int) -> int:
    """Print ``PROG: <message>`` on one line (priority err under journald); return ``status``."""
    prefix = "<3>" if _stderr_is_journal() else ""
    text = " ".join(str(message).split())
    print(f"{prefix}{prog}: {text}", file=sys.stderr, flush=True)
    return status


def _os_text(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def main(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    default_config: str,
    load: Callable[[str], Any],
    make: Callable[[Any, str], Any],
) -> int:
    """Parse ``argv``, load the config, run the program ``make`` builds; the exit status."""
    args = _parser(prog, description, default_config).parse_args(argv)
    try:
        setup_logging(args.log_level, args.log_file)
    except OSError as e:
        return fail(prog, f"--log-file: {args.log_file}: {e.strerror or e}", 2)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        return fail(prog, e, 2)
    except OSError as e:
        return fail(prog, f"{args.config}: {e.strerror or e}", 2)
    if args.check:
        print("ok", flush=True)
        return 0
    try:
        check_limits()
    except NflogdError as e:
        return fail(prog, e, 1)
    program = make(cfg, args.config)
    try:
        program.install_signals()
        program.start()
        program.run()
    except ConfigError as e:
        return fail(prog, e, 2)
    except NflogdError as e:
        return fail(prog, e, 1)
    except zmq.ZMQError as e:
        return fail(prog, f"zmq: {e}", 1)
    except OSError as e:
        return fail(prog, _os_text(e), 1)
    finally:
        program.close()
    log.info("stopped")
    return 0
