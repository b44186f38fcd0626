"""The daemon: NFLOG groups in, one ZeroMQ feed out, Prometheus counters on the side.

Command line::

    nflogd [-c PATH] [--check] [--log-level LEVEL]      # also: python -m nflogd

``--check`` loads the config and exits 0, or prints ``nflogd: <error>`` and
exits 2. Exit status otherwise: 0 after SIGTERM/SIGINT, 1 for a runtime
failure (a group another process holds, an endpoint in use), 2 for a bad config.

Start-up order: load the config; bind every group; drop privileges (config
``user``; without one, CAP_NET_ADMIN at most all the same) while the process
has one thread; umask 0o007; the CURVE keys (``publish.curve``); the publisher; the metrics
HTTP server; a capture thread per group (``nflogd.capture_loop``); ``READY=1``.
Every thread starts after the drop. The capture threads read their groups and
publish each batch on their own; the main thread is the control plane, the
loop of ``service.Program`` over the signal wakeup, the feed server's fd and the
capture threads' fault pipe, with
the feed's subscriptions read after every poll (``Publisher.next_check_ms``
bounds the wait) and the watchdog; signal handlers do nothing but wake it. A
capture thread that fails stops the daemon (exit 1).

SIGHUP rereads the config. An invalid one is logged on one line and the
running config stays. Otherwise, applied without a restart:

- groups: new ones bound, removed ones closed, changed ones ``reconfigure()``d
  (no rebind: groups left as they were lose nothing). Their feed ``seq`` and
  counters carry on within the epoch if a group is removed and added back.
  A group whose ``netns`` changed, or whose namespace name now stands for
  another namespace (a restarted container), is reopened there.
- ``publish.bind``: new endpoints bound, dropped ones unbound (peers connected
  through a dropped endpoint stay connected).
- ``publish.hwm``: applies at once, to every subscriber.
- ``publish.curve.authorized_keys_dir``: its ``*.key`` files are read again, so
  a client whose key was added is admitted from its next connection attempt (a
  removed key stops new connections; one already connected stays). Turning
  CURVE on or off, another server key, or other ``ipc_filter_groups`` need a
  restart: such a reload is refused as a whole.
- ``node``: applies to the next message; ``epoch`` and ``seq`` carry on.
- ``metrics``: the server is restarted on the new address, or started/stopped.
- ``user``: needs a restart (root is gone); a change is logged and ignored.

Groups with ``netns`` are opened by entering the namespace, which needs
CAP_SYS_ADMIN: after ``user`` dropped it, a reload that would open one fails
with that said (a restart opens it), while the groups already open go on.

If a new group, endpoint or metrics address cannot be bound, nothing of the
new config is applied and the error is logged.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import time

from prometheus_client.registry import CollectorRegistry

from . import config, netns, privileges, service
from .access import CurveAccess
from .capture import GroupCounters, GroupReader
from .capture_loop import CaptureLoop
from .errors import NamespaceError, NflogdError
from .ifnames import LinkTable
from .metrics import DaemonCollector, MetricsServer
from .publish import Publisher, check_restart_only, make_ipc_dirs
from .sdnotify import Notifier
from .service import Program

__all__ = ["main", "Daemon", "DEFAULT_CONFIG"]

log = logging.getLogger("nflogd")

DEFAULT_CONFIG = "/etc/nflogd.yaml"


def _group_error(group: int, err: Exception) -> str:
    """The error's text, naming the group if it does not already."""
    text = str(err)
    return text if f"group {group}" in text else f"group {group}: {text}"


def _wake_only() -> None:
    """The handler of an fd that only has to wake the control loop."""


class Daemon(Program):
    """One run of the daemon over one config; ``install_signals()``, ``start()``, ``run()``, ``close()``."""

    load = staticmethod(config.load)

    def __init__(self, cfg, path: str, notifier: Notifier | None = None):
        super().__init__(cfg, path, notifier)
        self.readers: dict = {}  # group -> GroupReader; replaced, never mutated (metrics reads it)
        self.retired: dict[int, GroupCounters] = {}  # counts of groups a reload closed
        self.registry = CollectorRegistry()
        self.loops: dict[int, CaptureLoop] = {}  # group -> its capture thread
        self.tables: dict[object, LinkTable] = {}  # a reader's netns_id -> its interface names
        self._watching_links = False
        self.retired_resyncs = 0  # resyncs of interface tables a reload closed
        self._fault_r, self._fault_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # a capture thread failed

    # -- start -----------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        for settings in cfg.groups:
            self.readers = {**self.readers, settings.group: self._open_reader(settings)}
        if cfg.user:
            if os.geteuid() == 0:
                pw = pwd.getpwnam(cfg.user)
                make_ipc_dirs(cfg.publish.bind, (pw.pw_uid, pw.pw_gid))
            privileges.drop(cfg.user)
        else:
            privileges.confine()
        os.umask(0o007)
        service.probe_threads(len(cfg.groups))  # a one-line error now, not a libzmq abort later
        if cfg.publish.curve is not None:
            self.access = CurveAccess(cfg.publish.curve)
        keys = self.access.keys if self.access is not None else None
        self.publisher = Publisher(cfg.publish, node=cfg.node, curve_keys=keys)
        publisher = self.publisher
        DaemonCollector(
            self.group_counters, lambda: publisher.subscribers, registry=self.registry,
            limits=lambda: (self.publisher, self.metrics_server), ifnames_resyncs=self.ifnames_resyncs,
        )  # fmt: skip
        if cfg.metrics is not None:
            self.metrics_server = MetricsServer(cfg.metrics.host, cfg.metrics.port, self.registry)
        self.watch(self._fault_r, self._check_capture)
        self._watching_links = True
        for key, table in self.tables.items():
            self._watch_links(key, table)
        for fd in publisher.fds:  # readable: subscriptions may be queued, read by _check_feed
            self.watch(fd, _wake_only)
        for reader in self.readers.values():
            self._start_capture(reader)
        self._feed_check = self.timer(self._check_feed, each_turn=True)
        self._schedule_feed_check()
        log.info("%s", self.status())
        self.notifier.ready(self.status())

    def _open_reader(self, settings):
        try:
            reader = GroupReader(settings)
        except NflogdError as e:
            text = _group_error(settings.group, e)
            if isinstance(e, NamespaceError) and e.errno == errno.EPERM and self.publisher is not None:
                text += " (not held after start: restart nflogd to open this group)"
            raise NflogdError(text) from None
        log.debug("group %d bound%s", settings.group, f" in netns {settings.netns}" if settings.netns else "")
        self._attach_names(reader)
        return reader

    def _attach_names(self, reader) -> None:
        """Give the reader its namespace's interface names, opening the table if it is the
        first group there (at start; a reload can do it in nflogd's own namespace only)."""
        key = reader.netns_id
        table = self.tables.get(key)
        if table is None:
            try:
                table = LinkTable(reader.settings.netns)
            except (OSError, NflogdError) as e:
                log.warning("group %d: no interface names on the feed: %s", reader.group, e)
                return
            self.tables[key] = table
            if self._watching_links:
                self._watch_links(key, table)
        reader.set_ifnames(table.names)

    def _watch_links(self, key: object, table: LinkTable) -> None:
        def changed() -> None:
            try:
                if not table.update():
                    return
            except OSError as e:
                log.warning("netns %s: interface names stop updating: %s", table.netns or "(own)", e)
                self.unwatch(table.fileno())
                return
            for reader in self.readers.values():
                if reader.netns_id == key and not reader.closed:
                    reader.set_ifnames(table.names)

        self.watch(table.fileno(), changed)

    def ifnames_resyncs(self) -> int:
        """Interface tables dumped again after dropped notifications, since start."""
        return self.retired_resyncs + sum(t.resyncs for t in list(self.tables.values()))

    def _close_tables(self, keep: set[object]) -> None:
        for key in [k for k in self.tables if k not in keep]:
            table = self.tables.pop(key)
            self.retired_resyncs += table.resyncs
            if self._watching_links:
                self.unwatch(table.fileno())
            table.close()

    def _moved(self, reader, settings) -> bool:
        """Whether the group must be reopened elsewhere: its ``netns`` names another namespace
        than the one its socket is in (changed in the config, or a restarted container's)."""
        new = settings.netns
        if new is None or reader.netns_id is None:
            return new is not None or reader.netns_id is not None
        try:
            if netns.identity(new) == reader.netns_id:
                return False
        except NamespaceError as e:
            if new != reader.settings.netns:
                return True  # opening it fails and names the namespace
            log.warning("reload: group %d: %s; it stays open where it was opened", reader.group, e)
            return False
        if new != reader.settings.netns or netns.can_enter():
            return True  # a config change: if it cannot be entered, the reload fails saying why
        # Unchanged config, but the name now stands for a new namespace (a restarted container):
        # following it needs CAP_SYS_ADMIN, gone after start. Not worth failing every reload for.
        log.warning(
            "reload: group %d: netns %r now names another namespace; the group stays in the one it "
            "was opened in until nflogd restarts", reader.group, new,
        )  # fmt: skip
        return False

    def _start_capture(self, reader) -> None:
        """Start the group's capture thread."""
        g = reader.group
        retired = self.retired

        def base_dropped() -> int:
            base = retired.get(g)
            return base.kernel_dropped if base is not None else 0

        loop = CaptureLoop(reader, self._feed(), on_error=self._capture_failed, base_dropped=base_dropped)
        self.loops[g] = loop
        loop.start()

    def _stop_capture(self, reader) -> None:
        """Stop the group's capture thread; the batch it is sending goes out first."""
        loop = self.loops.pop(reader.group, None)
        if loop is not None:
            loop.stop()

    def _capture_failed(self) -> None:
        """Called in a capture thread that stops on an error: wake the control loop."""
        try:
            os.write(self._fault_w, b"!")
        except OSError:
            pass

    # -- loop ------------------------------------------------------------------

    def _check_feed(self) -> None:
        """Read the feed's queued subscriptions (after every poll), then set when to look again."""
        self._schedule_feed_check(self._feed().handle_incoming())

    def _schedule_feed_check(self, more: bool = False) -> None:
        """At once if a turn's worth was left (``more``), else when ``next_check_ms()`` says
        (None: only after an event, the feed's fd readable)."""
        if more:
            self._feed_check.hurry()
            return
        ms = self._feed().next_check_ms()
        self._feed_check.due = None if ms is None else time.monotonic() + ms / 1000

    def _check_capture(self) -> None:
        """Raise the error that stopped a capture thread (the daemon exits 1)."""
        try:
            os.read(self._fault_r, 4096)
        except OSError:
            pass
        for loop in self.loops.values():
            if loop.error is not None:
                raise NflogdError(_group_error(loop.group, loop.error))

    # -- reload ----------------------------------------------------------------

    def apply(self, new) -> None:
        """Put the reread config in force (module docstring); NflogdError with nothing changed."""
        old = self.cfg
        publisher = self._feed()
        check_restart_only(old.publish, new.publish)
        wanted = {g.group: g for g in new.groups}
        moved = {g for g, r in self.readers.items() if g in wanted and self._moved(r, wanted[g])}
        # 1. everything that can fail, undone if a later step fails
        added = {}
        try:
            for g, settings in wanted.items():
                if g not in self.readers or g in moved:
                    added[g] = self._open_reader(settings)
            old_endpoints = list(publisher.endpoints)
            publisher.rebind(new.publish.bind)
            try:
                old_server = self._swap_metrics(old.metrics, new.metrics)
            except NflogdError:
                publisher.rebind(old_endpoints)
                raise
        except NflogdError:
            for reader in added.values():
                reader.close()
            raise
        # 2. what cannot fail
        if old_server is not None:
            old_server.close()
        if new.user != old.user:
            log.warning("reload: user changed to %r: takes effect at the next restart", new.user)
        if new.node != old.node:
            publisher.node = new.node
            log.info("reload: node is now %r", new.node)
        self._apply_publish(new.publish)
        readers = dict(self.readers)
        for g in [g for g in readers if g not in wanted or g in moved]:
            reader = readers.pop(g)
            self._stop_capture(reader)
            self.retired[g] = self.retired.get(g, GroupCounters()).add(reader.counters)
            self._close_reader(reader)
            log.info("group %d closed%s", g, " (moving namespaces)" if g in moved else "")
        for g, reader in readers.items():
            if reader.settings != wanted[g]:
                try:
                    reader.reconfigure(wanted[g])
                    log.info("group %d reconfigured", g)
                except NflogdError as e:
                    log.error("reload: %s; group %d keeps its settings", _group_error(g, e), g)
        for g, reader in added.items():
            readers[g] = reader
            self._start_capture(reader)
            log.info("group %d added", g)
        self.readers = {g: readers[g] for g in wanted if g in readers}
        self._close_tables({r.netns_id for r in self.readers.values()})

    def _swap_metrics(self, old, new) -> MetricsServer | None:
        """Start the server for ``new`` if it differs; return the old server to close."""
        if old == new:
            return None
        current = self.metrics_server
        if new is None:
            self.metrics_server = None
            return current
        try:
            self.metrics_server = MetricsServer(new.host, new.port, self.registry)
            return current
        except NflogdError:
            if current is None:
                raise
        # the old server may hold the port (same port, other address): free it and retry
        current.close()
        try:
            self.metrics_server = MetricsServer(new.host, new.port, self.registry)
            return None
        except NflogdError:
            try:
                self.metrics_server = MetricsServer(old.host, old.port, self.registry)
            except NflogdError as e:
                self.metrics_server = None
                log.error("reload: could not restart the old metrics server: %s", e)
            raise

    # -- state -----------------------------------------------------------------

    def group_counters(self):
        """(group, counters) for every group seen since start, closed readers included."""
        readers = self.readers
        retired = self.retired
        out = []
        for g in sorted(set(readers) | set(retired)):
            reader = readers.get(g)
            base = retired.get(g)
            if base is None:
                out.append((g, reader.counters))
            else:
                total = GroupCounters().add(base)
                if reader is not None:
                    total.add(reader.counters)
                out.append((g, total))
        return out

    def _groups_text(self) -> str:
        def name(g: int) -> str:
            ns = self.readers[g].settings.netns
            return f"{g} (netns {ns})" if ns else str(g)

        groups = sorted(self.readers)
        return ("groups " + ", ".join(map(name, groups))) if groups else "no groups"

    def status(self) -> str:
        return f"capturing {self._groups_text()}"

    # -- stop ------------------------------------------------------------------

    def _close_reader(self, reader) -> None:
        try:
            reader.close()
        except Exception as e:  # closing must go on with the others
            log.warning("group %d: close failed: %s", reader.group, e)

    def close(self) -> None:
        """Stop the capture threads, unbind the groups and release everything; safe after a
        failed start."""
        self.notifier.stopping()
        loops, self.loops = self.loops, {}
        for loop in loops.values():
            loop.stop()
        readers, self.readers = self.readers, {}
        for reader in readers.values():
            self._close_reader(reader)
        self._close_tables(set())
        self._release()
        for fd in (self._fault_r, self._fault_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fault_r = self._fault_w = -1


def main(argv: list[str] | None = None) -> int:
    return service.main(
        argv,
        prog="nflogd",
        description="Capture NFLOG groups and publish them on a ZeroMQ feed.",
        default_config=DEFAULT_CONFIG,
        load=config.load,
        make=Daemon,
    )
