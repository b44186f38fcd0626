"""The NATS JetStream driver of the relay's stream publisher (``nflogd/streampub.py``).

``open()`` connects to ``jetstream.servers`` (nats-py, which reconnects by itself afterwards)
and creates the stream from the config, or checks an existing one and updates the settings that
differ; a refusal (R3 on a single server, a subject another stream holds, a setting the server
will not change) becomes one ``NflogdError`` line naming the stream and the server's reason.
``publish()`` queues one record (``nflogd_client.stream``): subject
``<subject_prefix>.<partition>.<node token>.<group>``, header ``Nats-Msg-Id``, the wire bytes as
payload, and a callback that its ack settles (a timeout after ``ack_timeout_ms`` without one);
``flush()`` writes the records queued, many publishes in one write. Errors that pass
(timeouts, no stream leader, disconnected) are ``Transient`` and retried with
the same ``Nats-Msg-Id``, which the stream's duplicate window turns into one stored message;
the others are ``Rejected``.

nats-py is an optional dependency (``pip install 'nflogd-client[jetstream]'``): the relay imports
this module only when its config has a ``jetstream`` section.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from importlib.metadata import version

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import DEFAULT_PENDING_SIZE, Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nflogd_client import stream
from nflogd_client.jetstream import nats_connect

from .config_relay import JetStreamConfig
from .errors import NflogdError
from .streampub import Rejected, Settle, Transient

__all__ = ["JetStreamDriver", "stream_config"]

log = logging.getLogger("nflogd.jetstream")

# A batch of publishes is one write through the client's own buffer and flusher, its
# ``_send_command`` and ``_flush_pending`` (what its publish() calls); nats-py 2.6 to 2.x have them.
if not (hasattr(Client, "_send_command") and hasattr(Client, "_flush_pending")):
    raise ImportError(
        f"nats-py {version('nats-py')} has no Client._send_command/_flush_pending, which the relay"
        " writes its batches with: install nats-py >= 2.6, < 3"
    )

#: Bytes nats-py holds for the next connection while it reconnects (its default ``pending_size``).
PENDING_BYTES = DEFAULT_PENDING_SIZE

_TRANSIENT = (
    asyncio.TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.FlushTimeoutError,
    OSError,
)


def stream_config(cfg: JetStreamConfig) -> api.StreamConfig:
    """The stream's settings from the relay's ``jetstream`` section (docs/jetstream.md)."""
    return api.StreamConfig(
        name=cfg.stream,
        description="nflogd feed: one message per kernel batch, wire format v1",
        subjects=[f"{cfg.subject_prefix}.{k}.>" for k in range(cfg.partitions)],
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=float(cfg.max_age_s),
        max_bytes=cfg.max_bytes or -1,
        storage=api.StorageType.FILE if cfg.storage == "file" else api.StorageType.MEMORY,
        num_replicas=cfg.replicas,
        duplicate_window=float(cfg.duplicate_window_s),
    )


#: (StreamConfig field, config key) compared with an existing stream
_CHECKED = (
    ("subjects", "partitions/subject_prefix"),
    ("max_age", "max_age_s"),
    ("max_bytes", "max_bytes"),
    ("storage", "storage"),
    ("num_replicas", "replicas"),
    ("duplicate_window", "duplicate_window_s"),
    ("retention", None),
    ("discard", None),
)


def _reason(e: BaseException) -> str:
    if isinstance(e, nats.js.errors.APIError):
        return f"{e.description or 'refused'} (error {e.err_code})"
    return str(e) or type(e).__name__


class JetStreamDriver:
    """A ``streampub.Driver`` for one JetStream stream; see the module docstring."""

    def __init__(self, cfg: JetStreamConfig):
        self.cfg = cfg
        self.name = cfg.stream
        self.connected = False
        self._nc: Client | None = None
        self._ack_timeout = cfg.ack_timeout_ms / 1000
        self._prefix = cfg.subject_prefix
        #: The inbox subscription for acks, made at open(): the ack of publish N comes to <inbox>N.
        self._acks: Subscription | None = None
        self._inbox = b""
        self._token = 0
        self._pending: dict[int, tuple[Settle, float]] = {}  # token -> (settle, deadline), oldest first
        self._out: list[bytes] = []  # the commands of the publishes not flushed yet
        self._out_bytes = 0  # their payloads and headers
        self._sweeper: asyncio.Future | None = None
        self._time = time.monotonic  # the event loop's clock, from open()

    async def open(self) -> None:
        cfg = self.cfg
        where = ", ".join(cfg.servers)
        timeout = cfg.connect_timeout_ms / 1000
        try:
            nc = await nats_connect(
                list(cfg.servers), "nflogd-relay", timeout,
                error_cb=self._error, disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
            )  # fmt: skip
        except asyncio.TimeoutError:
            raise NflogdError(f"jetstream.servers: no answer from {where} within {timeout:g} s") from None
        except Exception as e:
            raise NflogdError(f"jetstream.servers: cannot connect to {where}: {_reason(e)}") from None
        self._nc = nc
        self.connected = True
        await self._ensure_stream(nc.jetstream(timeout=timeout), timeout)
        self._time = asyncio.get_running_loop().time
        inbox = nc.new_inbox() + "."
        self._inbox = inbox.encode()
        self._acks = await nc.subscribe(inbox + "*", cb=self._ack)

    async def _ensure_stream(self, js: JetStreamContext, timeout: float) -> None:
        want = stream_config(self.cfg)
        name = self.cfg.stream
        try:
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                info = None
            if info is None:
                await js.add_stream(want)
                log.info("jetstream: created stream %s (%s)", name, self._settings())
                return
            have = info.config
            diff = [
                key or field
                for field, key in _CHECKED
                if getattr(have, field) != getattr(want, field)
                and not (field == "subjects" and sorted(have.subjects or []) == sorted(want.subjects or []))
            ]
            if not diff:
                log.info("jetstream: stream %s is as configured (%s)", name, self._settings())
                return
            try:
                await js.update_stream(want)
            except nats.js.errors.APIError as e:
                raise NflogdError(
                    f"jetstream: stream {name} differs from the config in {', '.join(diff)} and the "
                    f"server refused to change it: {_reason(e)}"
                ) from None
            log.warning("jetstream: stream %s updated: %s now as configured", name, ", ".join(diff))
        except NflogdError:
            raise
        except nats.js.errors.APIError as e:
            raise NflogdError(
                f"jetstream: the server refused stream {name} ({self._settings()}): {_reason(e)}"
            ) from None
        except (asyncio.TimeoutError, nats.errors.Error) as e:
            raise NflogdError(
                f"jetstream: stream {name}: no answer from JetStream at {', '.join(self.cfg.servers)} "
                f"({_reason(e)}; is JetStream enabled, and does the cluster have a leader?)"
            ) from None

    def _settings(self) -> str:
        c = self.cfg
        size = f"{c.max_bytes} bytes" if c.max_bytes else "no size limit"
        age = f"{c.max_age_s} s" if c.max_age_s else "no age limit"
        parts = f"{c.partitions} partitions"
        return f"R{c.replicas}, {c.storage}, {parts}, {age}, {size}, dedup {c.duplicate_window_s} s"

    def publish(self, rec: stream.Record, settle: Settle) -> None:
        """Queue the publish of ``rec`` for the next ``flush()``; ``settle(exc, duplicate)`` is
        called once, with its ack (``exc`` None, ``duplicate`` True for a message already
        stored), ``Transient`` or ``Rejected``; ``Transient`` or ``Rejected`` raised at once when
        it cannot go out now (not connected; over the server's ``max_payload``).

        The publishes of one batch go to the connection as one write of NATS ``HPUB`` commands,
        built here (a third of nats-py's ``publish()`` per message); their acks come to one
        inbox subscription, and one sweeper settles those without an ack after
        ``ack_timeout_ms``: no task, future, request or timer per message."""
        nc = self._nc
        if nc is None or nc.is_closed or nc.is_draining_pubs:
            raise Transient("the connection is closed")
        value = rec.value
        if len(value) > nc.max_payload:
            raise Rejected(f"{len(value)} bytes, over the server's max_payload ({nc.max_payload})")
        if not nc.is_connected and nc.pending_data_size + self._out_bytes + len(value) > PENDING_BYTES:
            # reconnecting: nats-py holds what is written in order for the next connection, as much
            # as its buffer takes; the rest waits in ours for a retry
            raise Transient("disconnected; reconnecting")
        self._token += 1
        token = self._token
        hdr = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % rec.msg_id.encode()
        out = self._out
        size = len(hdr) + len(value)
        out.append(
            b"HPUB %s %s%d %d %d\r\n"
            % (stream.subject(self._prefix, rec).encode(), self._inbox, token, len(hdr), size)
        )
        out.append(hdr)
        out.append(value)
        out.append(b"\r\n")
        self._out_bytes += size
        self._pending[token] = (settle, self._time() + self._ack_timeout)

    async def flush(self) -> None:
        """Write the publishes queued since the last flush."""
        out, nc = self._out, self._nc
        if not out or nc is None:
            return
        if self._sweeper is None:  # from the first publish on
            self._sweeper = asyncio.ensure_future(self._sweep())
        data = b"".join(out)
        out.clear()
        self._out_bytes = 0
        try:
            # nats-py's own buffer and flusher, as its publish() uses them, with many commands at once
            await nc._send_command(data)
            await nc._flush_pending()
        except _TRANSIENT as e:  # the acks will not come: the sweeper settles them as Transient
            log.debug("jetstream: a write failed: %s", _reason(e))

    async def _ack(self, msg: Msg) -> None:
        try:
            settle, _ = self._pending.pop(int(msg.subject[len(self._inbox) :]))
        except (KeyError, ValueError):
            return  # timed out already: the retry's ack will do
        status = msg.headers.get("Status") if msg.headers else None
        if status == "503":  # no responders: no stream (leader) takes the subject now
            settle(Transient("no stream answered (no leader?)"), False)
            return
        data = msg.data
        if data[:10] == b'{"stream":' and b'"error"' not in data:  # an ack: no JSON parse needed
            settle(None, b'"duplicate":true' in data)
            return
        try:
            resp = json.loads(msg.data)
        except ValueError:
            settle(Transient(f"an ack that is not JSON: {msg.data[:60]!r}"), False)
            return
        err = resp.get("error")
        if err is None:
            settle(None, bool(resp.get("duplicate")))
        elif err.get("code") == 503:
            settle(Transient(f"{err.get('description')} (error {err.get('err_code')})"), False)
        else:
            settle(Rejected(f"{err.get('description')} (error {err.get('err_code')})"), False)

    async def _sweep(self) -> None:
        """Settle the publishes whose ack is overdue as Transient (deadlines are in publish order)."""
        pending = self._pending
        timeout = f"no ack within {self._ack_timeout:g} s"
        while True:
            await asyncio.sleep(min(0.1, self._ack_timeout / 4))
            now = self._time()
            while pending:
                token, (settle, deadline) = next(iter(pending.items()))
                if deadline > now:
                    break
                del pending[token]
                settle(Transient(timeout), False)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        pending, self._pending = self._pending, {}
        self._out.clear()
        self._out_bytes = 0
        for settle, _ in pending.values():
            settle(Transient("the connection is closing"), False)
        nc, self._nc = self._nc, None
        self.connected = False
        if nc is not None:
            try:
                await asyncio.wait_for(nc.close(), 5)
            except Exception:  # pragma: no cover - closing a broken connection
                pass

    async def _error(self, e: Exception) -> None:
        log.debug("jetstream: %s", _reason(e))

    async def _disconnected(self) -> None:
        if self.connected:
            log.warning("jetstream: disconnected from %s; reconnecting", ", ".join(self.cfg.servers))
        self.connected = False

    async def _reconnected(self) -> None:
        self.connected = True
        url = self._nc.connected_url if self._nc is not None else None
        log.info("jetstream: connected to %s", url.netloc if url is not None else "the cluster")
