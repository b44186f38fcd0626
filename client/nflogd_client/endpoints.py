"""Where a feed client stands with each endpoint: connecting, connected or refused, and why.

libzmq connects in the background and never says why a connect fails: its socket monitor
reports only a retry, about every 100 ms. This module turns the monitor's events, and a
probe where the events cannot tell (``probe``: the ipc socket file, the tcp host and
port, tried as the client would), into a state and a cause per endpoint, and into log
lines: a failure is said once, in one line naming the endpoint and the likely cause, the
retries after it are quiet (debug), a new cause is said again, and so is the recovery::

    nflogd feed ipc:///run/nflogd/feed.sock: permission denied on /run/nflogd: join group nflog; retrying
    nflogd feed ipc:///run/nflogd/feed.sock: connected

``EndpointTracker`` is a small state machine: fed with parsed monitor events (``event``)
and probe results (``probed``), it says what is due (``probes_due``, ``reconnects_due``,
``timeout``) and never receives or waits itself, so a blocking client (``Subscriber``), a
poll loop (``nflogd-relay``'s upstreams) or an event loop can drive it alike. ``Monitor``
is the one wrapper of libzmq's socket monitor (the daemon's feed counts its peers with one
too); ``Prober`` runs the probes a tracker asks for in threads of their own, so that no
driver waits for a resolver or a tcp connect while other endpoints deliver;
``EndpointWatch`` holds the three for one connecting socket and connects again where a
handshake was refused. ``check_endpoint`` refuses a malformed endpoint before libzmq does,
with the accepted forms.

States (``EndpointStatus.state``):

``connecting``
    not connected yet, or connection lost; libzmq retries. ``error`` says why, once known.
``connected``
    the ZMTP handshake (CURVE's included) is done: messages flow.
``refused``
    the peer refused the handshake (CURVE key or mechanism); the client connects again
    every ``AUTH_RETRY_S`` seconds, so a daemon given the key later is joined by itself.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

__all__ = [
    "AUTH_RETRY_S",
    "CONNECTED",
    "CONNECTING",
    "ENDPOINT_FORMS",
    "PROBE_INTERVAL_S",
    "REFUSED",
    "EndpointStatus",
    "EndpointTracker",
    "EndpointWatch",
    "Monitor",
    "Prober",
    "check_endpoint",
    "probe",
]

CONNECTING = "connecting"
CONNECTED = "connected"
REFUSED = "refused"

#: Seconds between attempts to reconnect to an endpoint that refused the handshake.
AUTH_RETRY_S = 2.0
#: Seconds between probes of an endpoint that keeps failing.
PROBE_INTERVAL_S = 5.0
#: Seconds a probe's tcp connect waits.
PROBE_TIMEOUT_S = 1.0
#: Seconds a handshake failure without detail waits to be said: a refusal often shows first as
#: a bare failure (the server hung up while this side still wrote) and then with its cause.
VAGUE_GRACE_S = 1.0

ENDPOINT_FORMS = "tcp://HOST:PORT, ipc:///absolute/path or ipc://@abstract-name"

#: What a feed client's monitor reports (zmq_socket_monitor(3)).
EVENTS = (
    zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

# ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH (zmq.h): CURVE on one side only.
_MECHANISM_MISMATCH = 0x11000002


def check_endpoint(endpoint: object) -> str:
    """Return ``endpoint`` if it has one of the ``ENDPOINT_FORMS``, else raise ValueError naming it."""
    if not isinstance(endpoint, str):
        raise TypeError(f"endpoints: expected str, got {endpoint!r}")
    transport, sep, address = endpoint.partition("://")
    why = None
    if not sep:
        why = "not an endpoint"
    elif transport == "tcp":
        host, colon, port = address.rpartition(":")
        if not colon or not host:
            why = "missing HOST:PORT"
        elif not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            why = f"port must be 1..65535, got {port!r}"
        elif ":" in host and not (host.startswith("[") and host.endswith("]")):
            why = "an IPv6 address needs brackets, like tcp://[::1]:5555"
    elif transport == "ipc":
        if not (address.startswith("/") or (address.startswith("@") and len(address) > 1)):
            why = "the ipc path must be absolute"
        elif "\0" in address:
            why = "the ipc path contains a NUL character"
    else:
        why = f"unsupported transport {transport!r}"
    if why is not None:
        raise ValueError(f"endpoint {endpoint!r}: {why}; expected {ENDPOINT_FORMS}")
    return endpoint


# -- probes -----------------------------------------------------------------------------------------


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _join(gid: int) -> str:
    """What to do to pass a directory or socket of group ``gid``."""
    if gid == 0:  # a daemon run as root without a group of its own: nobody else is meant to read
        return (
            "its group is root, so only root reads this feed: run nflogd with group nflog "
            "(make run, or the package's unit) and join that group"
        )
    return f"join group {_group_name(gid)}"


def _ipc_denied(path: str) -> str:
    """The cause of EACCES on ``path``: the first directory we may not enter, or the file."""
    parts = os.path.abspath(path).split("/")[1:]
    here = "/"
    for part in parts[:-1]:
        child = os.path.join(here, part)
        if not os.access(child, os.X_OK):
            return f"permission denied on {child}: {_join(os.stat(child).st_gid)}"
        here = child
    try:
        gid = os.stat(path).st_gid
    except OSError:
        return f"permission denied on {path}"
    return f"permission denied on {path}: {_join(gid)}"


def _probe_ipc(address: str) -> str | None:
    if address.startswith("@"):
        target = "\0" + address[1:]
    else:
        target = address
        try:
            st = os.stat(address)
        except FileNotFoundError:
            parent = os.path.dirname(address) or "/"
            if not os.path.isdir(parent):
                return f"no such socket: {parent} does not exist (is nflogd running?)"
            return f"no such socket {address} (is nflogd running?)"
        except PermissionError:
            return _ipc_denied(address)
        except OSError as e:
            return f"{address}: {e.strerror}"
        if not stat.S_ISSOCK(st.st_mode):
            return f"{address} is not a socket"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PROBE_TIMEOUT_S)
    try:
        s.connect(target)
    except PermissionError:
        return _ipc_denied(address)
    except ConnectionRefusedError:
        return f"nothing listening on {address} (a stale socket: is nflogd running?)"
    except FileNotFoundError:
        return f"no such socket {address} (is nflogd running?)"
    except (socket.timeout, TimeoutError, BlockingIOError):
        return None  # a full backlog: someone serves it
    except OSError as e:
        return f"{address}: {e.strerror or e}"
    finally:
        s.close()
    return None


def _probe_tcp(address: str) -> str | None:
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot resolve host {host!r}: {e.strerror}"
    except (OSError, ValueError) as e:
        return f"cannot resolve host {host!r}: {e}"
    why = None
    for family, kind, proto, _, addr in infos:
        s = socket.socket(family, kind, proto)
        s.settimeout(PROBE_TIMEOUT_S)
        try:
            s.connect(addr)
            return None
        except ConnectionRefusedError:
            why = why or f"nothing listening on {host}:{port} (connection refused)"
        except (socket.timeout, TimeoutError):
            why = why or f"no answer from {host}:{port} within {PROBE_TIMEOUT_S:g} s (a firewall?)"
        except OSError as e:
            why = why or f"{host}:{port}: {e.strerror or e}"
        finally:
            s.close()
    return why


def probe(endpoint: str) -> str | None:
    """Why connecting to ``endpoint`` fails now, tried as libzmq would; None if it seems to work.

    ipc: the socket file's existence, type and permissions (naming the group to join), and
    whether anyone accepts on it; tcp: the host's resolution and a connect with a 1 s timeout.
    Blocks for at most that connect (and the resolver)."""
    transport, _, address = endpoint.partition("://")
    if transport == "ipc":
        return _probe_ipc(address)
    if transport == "tcp":
        return _probe_tcp(address)
    return None


# -- the monitor --------------------------------------------------------------------------------------


class Monitor:
    """libzmq's socket monitor of ``sock``: ``socket`` to poll, ``events()`` parsed and drained.

    ``events``: the zmq_socket_monitor(3) mask. ``hwm``: events queued before libzmq drops
    more; None is pyzmq's ``get_monitor_socket()`` (1,000), 0 no limit, for a count that must
    not lose one in a burst (the feed's connection budget). ``close()`` stops monitoring
    and closes ``socket``; safe to call twice.
    """

    def __init__(self, sock: zmq.Socket[Any], events: int = EVENTS, *, hwm: int | None = None) -> None:
        self._watched = sock
        #: The PAIR socket the events arrive on, for a poller.
        self.socket: zmq.Socket[Any] | None
        if hwm is None:
            self.socket = sock.get_monitor_socket(events)
            return
        address = f"inproc://nflogd-monitor-{id(self)}"
        sock.monitor(address, events)
        self.socket = sock.context.socket(zmq.PAIR)
        self.socket.setsockopt(zmq.RCVHWM, hwm)  # before connect: the pipe takes it then
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def events(self) -> Iterator[Mapping[str, Any]]:
        """The queued events, as ``zmq.utils.monitor.parse_monitor_message`` gives them; never waits.

        ``event`` and ``value`` (the fd for ACCEPTED and DISCONNECTED, an errno or protocol
        error for failures) compare as ints; ``endpoint`` is bytes."""
        mon = self.socket
        while mon is not None:
            try:
                frames = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                yield parse_monitor_message(frames)
            except RuntimeError:  # pragma: no cover - pyzmq's refusal of what libzmq never sends
                continue

    def close(self) -> None:
        if self.socket is None:
            return
        try:
            self._watched.disable_monitor()
        except zmq.ZMQError:
            pass
        self.socket.close(linger=0)
        self.socket = None


class EndpointWatch:
    """Where a connecting socket stands with each endpoint, kept from its monitor and probes.

    Owns the socket's ``Monitor``, an ``EndpointTracker`` (``tracker``; ``curve``, ``logger``
    and ``label`` are its) and a ``Prober``. The driver polls ``monitor`` and calls
    ``handle_monitor()`` when it is readable, and ``step()`` by ``due_at()``: that collects
    and starts probes and connects again an endpoint that refused the handshake (libzmq
    gives up on it), by ``connect`` (default ``sock.connect``: the client's own, when options
    must be set before each connect). Create it before connecting, so that no event is missed.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        endpoints: Iterable[str],
        *,
        curve: bool = False,
        logger: logging.Logger | None = None,
        label: str = "nflogd feed",
        connect: Callable[[str], None] | None = None,
    ) -> None:
        self._sock = sock
        self._connect = connect if connect is not None else sock.connect
        self._log = logger or logging.getLogger(__name__)
        self.tracker = EndpointTracker(endpoints, curve=curve, logger=self._log, label=label)
        self._prober = Prober(self.tracker)  # probes in threads: a tcp one may wait a second
        self._monitor = Monitor(sock)

    @property
    def monitor(self) -> zmq.Socket[Any] | None:
        """The monitor's socket, for the driver's poller (None once closed)."""
        return self._monitor.socket

    def handle_monitor(self) -> None:
        """Apply the monitor's queued events to ``tracker`` (which logs the changes)."""
        for ev in self._monitor.events():
            self.tracker.event(ev)

    def step(self) -> None:
        """Collect finished probes, start the due ones, connect again the endpoints due
        after a refusal (disconnect first: libzmq may still hold the connection)."""
        tracker = self.tracker
        self._prober.step()
        tracker.say_due()
        for endpoint in tracker.reconnects_due():
            tracker.reconnected(endpoint)
            try:
                self._sock.disconnect(endpoint)
            except zmq.ZMQError:
                pass  # libzmq already dropped it
            self._connect(endpoint)
            self._log.debug("%s %s: connecting again", tracker.label, endpoint)

    def due_at(self) -> float | None:
        """When ``step()`` has something to do (``time.monotonic()`` seconds), or None."""
        due = [t for t in (self.tracker.due_at(), self._prober.due_at()) if t is not None]
        return min(due) if due else None

    def close(self) -> None:
        """Stop monitoring (the socket itself stays the caller's); safe to call twice."""
        self._monitor.close()


class Prober:
    """Runs ``probe`` for each endpoint ``tracker.probes_due()`` names, in a short-lived
    thread of its own, and hands the result to ``tracker.probed`` on a later ``step()``.

    ``step()`` from the thread that owns the tracker; ``due_at()`` says when to call it
    again (``time.monotonic()`` seconds) while probes are under way, else None.
    """

    #: Seconds between looks at a probe under way.
    CHECK_S = 0.05

    def __init__(self, tracker: EndpointTracker, probe: Callable[[str], str | None] = probe) -> None:
        self._tracker = tracker
        self._probe = probe
        #: endpoint -> (thread, [result])
        self._running: dict[str, tuple[threading.Thread, list[str | None]]] = {}
        self._check_at = 0.0

    def step(self) -> None:
        tracker = self._tracker
        for endpoint, (thread, box) in list(self._running.items()):
            if not thread.is_alive():
                del self._running[endpoint]
                tracker.probed(endpoint, box[0])
        for endpoint in tracker.probes_due():
            result: list[str | None] = [None]
            thread = threading.Thread(
                target=self._run, args=(endpoint, result), name=f"nflogd probe {endpoint}", daemon=True
            )
            tracker.probe_started(endpoint)
            self._running[endpoint] = (thread, result)
            thread.start()
        if self._running:
            self._check_at = time.monotonic() + self.CHECK_S

    def due_at(self) -> float | None:
        return self._check_at if self._running else None

    def _run(self, endpoint: str, box: list[str | None]) -> None:
        try:
            box[0] = self._probe(endpoint)
        except Exception as e:  # pragma: no cover - probe() catches what it expects
            box[0] = f"probe failed: {e}"


# -- the state machine -----------------------------------------------------------------------------


@dataclasses.dataclass
class EndpointStatus:
    """One endpoint's state (``CONNECTING``, ``CONNECTED``, ``REFUSED``) and its latest failure."""

    endpoint: str
    state: str = CONNECTING
    #: Why it is not connected (None while connected, or before a cause is known).
    error: str | None = None
    #: Handshakes completed.
    connects: int = 0
    #: Handshakes the peer refused or that failed.
    handshake_failures: int = 0
    #: When ``state`` last changed, ``time.monotonic()`` seconds.
    since: float = 0.0


class EndpointTracker:
    """Endpoint states from monitor events and probe results; logs a failure once, then quietly.

    ``curve``: whether this client uses CURVE (it words the handshake failures). ``label``
    starts every log line, followed by the endpoint. Drive it with::

        for ev in monitor.events(): tracker.event(ev)
        for ep in tracker.probes_due(): tracker.probed(ep, probe(ep))   # or Prober(tracker).step()
        for ep in tracker.reconnects_due(): disconnect, connect again; tracker.reconnected(ep)
        tracker.say_due()
        wait at most tracker.timeout() seconds before doing so again

    A handshake failure without detail is said only if no failure with a cause (CURVE
    required, a key refused) came within ``VAGUE_GRACE_S``: libzmq reports one refusal as
    either, by a race, and the cause is what the reader needs.
    """

    def __init__(
        self,
        endpoints: Iterable[str] = (),
        *,
        curve: bool = False,
        logger: logging.Logger | None = None,
        label: str = "nflogd feed",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.curve = curve
        self.label = label
        self._log = logger or logging.getLogger(__name__)
        self._clock = clock
        self._status: dict[str, EndpointStatus] = {}
        self._said: dict[str, str | None] = {}  # endpoint -> the failure last logged, None: none
        self._probe_at: dict[str, float] = {}  # endpoint -> when a probe is due
        self._probed: dict[str, float] = {}  # endpoint -> when it was last probed
        self._probing: set[str] = set()  # probes under way (``probe_started``)
        self._retry_at: dict[str, float] = {}  # endpoint -> when to connect again (refused)
        self._cause: dict[str, str] = {}  # endpoint -> a handshake failure's cause, until it connects
        self._vague_at: dict[str, float] = {}  # endpoint -> when to say a failure without detail
        for e in endpoints:
            self.add(e)

    def add(self, endpoint: str) -> None:
        self._status[endpoint] = EndpointStatus(endpoint, since=self._clock())
        self._said[endpoint] = None

    def remove(self, endpoint: str) -> None:
        for d in (self._status, self._said, self._probe_at, self._probed, self._retry_at, self._cause):
            d.pop(endpoint, None)
        self._vague_at.pop(endpoint, None)
        self._probing.discard(endpoint)

    def __getitem__(self, endpoint: str) -> EndpointStatus:
        return self._status[endpoint]

    def status(self) -> dict[str, EndpointStatus]:
        """A copy of every endpoint's status, in the order they were added."""
        return {e: dataclasses.replace(s) for e, s in self._status.items()}

    # -- input ------------------------------------------------------------------------------------

    def event(self, ev: Mapping[str, Any]) -> None:
        """Apply one parsed monitor event (``parse_monitor_message``)."""
        raw = ev.get("endpoint", b"")
        endpoint = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        st = self._status.get(endpoint)
        if st is None:
            return
        kind = ev["event"]
        now = self._clock()
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._set(st, CONNECTED, None, now)
            st.connects += 1
            self._retry_at.pop(endpoint, None)
            self._probe_at.pop(endpoint, None)
            self._cause.pop(endpoint, None)
            self._vague_at.pop(endpoint, None)
            if self._said[endpoint] is not None:
                self._said[endpoint] = None
                self._log.info("%s %s: connected", self.label, endpoint)
            else:
                self._log.debug("%s %s: connected", self.label, endpoint)
        elif kind == zmq.EVENT_DISCONNECTED:
            if st.state == CONNECTED:
                self._set(st, CONNECTING, "disconnected", now)
                self._say(endpoint, "disconnected; reconnecting", "disconnected")
        elif kind == zmq.EVENT_CONNECT_RETRIED:
            if st.state == CONNECTING and endpoint not in self._probe_at and endpoint not in self._probing:
                last = self._probed.get(endpoint)
                self._probe_at[endpoint] = now if last is None else max(now, last + PROBE_INTERVAL_S)
        elif kind in (
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.EVENT_HANDSHAKE_FAILED_AUTH,
        ):
            st.handshake_failures += 1
            self._probe_at.pop(endpoint, None)
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # libzmq connects again itself
                cause = self._cause.get(endpoint)
                if cause is not None:  # the same refusal, seen without its cause this time
                    self._set(st, REFUSED, cause, now)
                    self._log.debug("%s %s: handshake failed (%s)", self.label, endpoint, cause)
                    return
                self._set(st, REFUSED, self._handshake_failure(kind, 0), now)
                self._vague_at.setdefault(endpoint, now + VAGUE_GRACE_S)
                return
            why = self._handshake_failure(kind, int(ev.get("value", 0)))
            self._set(st, REFUSED, why, now)
            self._cause[endpoint] = why
            self._vague_at.pop(endpoint, None)
            self._retry_at[endpoint] = now + AUTH_RETRY_S  # libzmq gives up on these
            self._say(endpoint, f"{why}; retrying every {AUTH_RETRY_S:g} s", why)

    def probe_started(self, endpoint: str) -> None:
        """A probe of ``endpoint`` is under way: no longer due; ``probed`` gives its result."""
        self._probe_at.pop(endpoint, None)
        self._probing.add(endpoint)

    def probed(self, endpoint: str, why: str | None) -> None:
        """Apply a probe's result: ``why`` the endpoint fails, or None if it seemed to work."""
        st = self._status.get(endpoint)
        self._probe_at.pop(endpoint, None)
        self._probing.discard(endpoint)
        self._probed[endpoint] = self._clock()
        if st is None or st.state != CONNECTING or why is None:
            return
        st.error = why
        self._say(endpoint, f"{why}; retrying", why)

    def reconnected(self, endpoint: str) -> None:
        """The client connected ``endpoint`` again, as ``reconnects_due`` asked: connecting,
        the refusal kept as ``error`` until the handshake says otherwise (a probe may find
        that the daemon is now away)."""
        self._retry_at.pop(endpoint, None)
        st = self._status.get(endpoint)
        if st is not None and st.state == REFUSED:
            self._set(st, CONNECTING, st.error, self._clock())

    def say_due(self, now: float | None = None) -> None:
        """Say the handshake failures without detail whose grace has passed with no cause found."""
        now = self._clock() if now is None else now
        for endpoint, t in list(self._vague_at.items()):
            if t > now:
                continue
            del self._vague_at[endpoint]
            st = self._status.get(endpoint)
            if st is not None and st.state != CONNECTED and endpoint not in self._cause:
                why = self._handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 0)
                self._say(endpoint, f"{why}; retrying", why)

    # -- what is due --------------------------------------------------------------------------------

    def probes_due(self, now: float | None = None) -> list[str]:
        now = self._clock() if now is None else now
        return [e for e, t in self._probe_at.items() if t <= now]

    def reconnects_due(self, now: float | None = None) -> list[str]:
        now = self._clock() if now is None else now
        return [e for e, t in self._retry_at.items() if t <= now]

    def due_at(self) -> float | None:
        """When the next probe, reconnect or saying is due (``clock`` seconds), or None if none is pending."""
        due = [*self._probe_at.values(), *self._retry_at.values(), *self._vague_at.values()]
        return min(due) if due else None

    def timeout(self, now: float | None = None) -> float | None:
        """Seconds until a probe, reconnect or saying is due (0: now), or None if none is pending."""
        now = self._clock() if now is None else now
        due = [*self._probe_at.values(), *self._retry_at.values(), *self._vague_at.values()]
        return max(0.0, min(due) - now) if due else None

    # -- inside ---------------------------------------------------------------------------------------

    def _handshake_failure(self, kind: int, value: int) -> str:
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH and value == 300:  # ZAP's "temporary error"
            return (
                "refused for now: the daemon has as many readers as its limits allow "
                "(publish.max_connections, max_connections_per_source)"
            )
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (
                "CURVE handshake refused: this client's public key is not in the daemon's "
                "publish.curve.authorized_keys_dir"
            )
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
            if self.curve:
                return "handshake failed: the endpoint does not use CURVE (drop the keys for it)"
            return (
                "handshake failed: the endpoint requires CURVE "
                "(give server_public_key and client_secret_key_file, nflog-tap --server-key/--client-key)"
            )
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return f"handshake failed: protocol error {value:#x} (not an nflogd feed?)"
        if self.curve:
            return "CURVE handshake failed: wrong server key?"
        return "handshake failed"

    def _set(self, st: EndpointStatus, state: str, error: str | None, now: float) -> None:
        if st.state != state:
            st.since = now
        st.state = state
        st.error = error

    def _say(self, endpoint: str, line: str, cause: str) -> None:
        if self._said.get(endpoint) == cause:
            self._log.debug("%s %s: %s", self.label, endpoint, line)
            return
        self._said[endpoint] = cause
        self._log.warning("%s %s: %s", self.label, endpoint, line)
