"""longpoll: real-time push over plain HTTP, in one file, standard library only.

Start a server, publish with curl, and wait for the next message::

    python -m longpoll serve                          # http://127.0.0.1:5000
    curl -d 'build done' localhost:5000/channels/ci   # publish
    curl 'localhost:5000/channels/ci?since=0'         # read what the channel holds
    curl localhost:5000/channels/ci                   # wait for the next message

or from Python, in the same process or over HTTP::

    server = longpoll.make_server(port=0).start()
    server.hub.publish("ci", {"status": "green"}, title="Build")
    for msg in longpoll.Client(server.url).subscribe("ci", since="0"): print(msg)

The module holds four parts, each usable alone: the ``Hub`` (channels of
messages with cursors, no HTTP), the ``Server`` (the wire protocol over
``http.server``), the ``Client`` (``urllib``), and the command line.

Limits, stated honestly:

- SECURITY WARNING: the server has no authentication. Anyone who can reach
  its port can publish to and read every channel. It binds to 127.0.0.1 by
  default; do not expose it to a network you do not trust.
- Messages live in memory. A restart loses them; clients holding an old
  cursor are told so (``"gap": true``) instead of getting wrong data.
- Every connection is served by a thread of its own (``ThreadingHTTPServer``),
  which suits hundreds of waiting clients, not tens of thousands.
"""

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Client",
    "Handler",
    "Hub",
    "LongpollError",
    "Message",
    "Server",
    "Subscription",
    "main",
    "make_server",
]

import bisect
import email.utils
import functools
import heapq
import http.client
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Iterator, NamedTuple

logger = logging.getLogger("longpoll")


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
DEFAULT_TIMEOUT = 30.0          # seconds a long-poll is held when not told
MAX_TIMEOUT = 300.0             # the longest hold a client may ask for
DEFAULT_LIMIT = 100             # messages per response when not told
MAX_LIMIT = 1000
DEFAULT_RETENTION = 1000        # messages kept per channel
DEFAULT_MAX_AGE = 24 * 3600.0   # seconds a message is kept
MAX_BODY = 1 << 20              # bytes in a request body
MAX_TITLE = 256                 # characters in a title
MAX_CHANNELS_PER_REQUEST = 32
DEFAULT_CHANNEL = "default"     # where /send publishes and /receive takes

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
# A cursor names the hub's history and a position in it: "<history>-<seq>".
CURSOR_RE = re.compile(r"([A-Za-z0-9]{1,32})-([0-9]{1,19})\Z")
PRIORITY_NAMES = {"min": 1, "low": 2, "default": 3, "high": 4, "max": 5, "urgent": 5}


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class LongpollError(Exception):
    """The one error longpoll raises: plain words and the HTTP status that fits.

    The server renders it as ``{"error": message}``; the client raises it
    with the status the server answered (``status`` is None when no server
    answered at all).
    """

    def __init__(self, status: int | None, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def __str__(self) -> str:
        return f"{self.status} {self.message}" if self.status else self.message


def _bad_request(message: str) -> LongpollError:
    return LongpollError(HTTPStatus.BAD_REQUEST, message)


def check_channel(name: str) -> str:
    """Return *name* if it is a valid channel name, else raise a 400 error."""
    if not isinstance(name, str) or not CHANNEL_RE.match(name):
        raise _bad_request(
            f"invalid channel name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return name


def _check_channels(channels: str | Iterable[str]) -> tuple[str, ...]:
    names = (channels,) if isinstance(channels, str) else tuple(channels)
    if not names:
        raise _bad_request("no channel given")
    if len(names) > MAX_CHANNELS_PER_REQUEST:
        raise _bad_request(
            f"at most {MAX_CHANNELS_PER_REQUEST} channels per request")
    for name in names:
        check_channel(name)
    return tuple(dict.fromkeys(names))  # drop repeats, keep order


# ---------------------------------------------------------------------------
# Messages and channels (no HTTP in this part)
# ---------------------------------------------------------------------------

class Message:
    """One published message. ``json`` is its wire form, encoded once."""

    __slots__ = ("seq", "id", "channel", "time", "message", "title",
                 "priority", "json", "born")

    def __init__(self, seq: int, id: str, channel: str, message: Any,
                 title: str | None, priority: int | None) -> None:
        self.seq = seq
        self.id = id
        self.channel = channel
        self.time = round(time.time(), 3)
        self.born = time.monotonic()   # for age-based retention
        self.message = message
        self.title = title
        self.priority = priority
        self.json = json.dumps(self.as_dict(), ensure_ascii=False,
                               separators=(",", ":")).encode()

    def as_dict(self) -> dict[str, Any]:
        """The message as every response carries it (PROTOCOL.md)."""
        d = {"id": self.id, "channel": self.channel, "time": self.time,
             "message": self.message}
        if self.title is not None:
            d["title"] = self.title
        if self.priority is not None:
            d["priority"] = self.priority
        return d

    def __repr__(self) -> str:
        return f"<Message {self.id} on {self.channel}: {self.message!r:.40}>"


class Batch(NamedTuple):
    """What a read returns: messages, the cursor to pass back, and loss."""

    messages: list[Message]
    cursor: str
    gap: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = {"messages": [m.as_dict() for m in self.messages],
             "cursor": self.cursor}
        if self.gap:
            d["gap"] = True
        return d

    def to_json(self) -> bytes:
        """The response body, joined from the messages' pre-encoded JSON."""
        gap = b',"gap":true' if self.gap else b""
        return (b'{"messages":[' + b",".join(m.json for m in self.messages)
                + b'],"cursor":"' + self.cursor.encode() + b'"' + gap + b"}")


_seq_of = lambda m: m.seq  # noqa: E731 (the key for bisect and merge)


class Channel:
    """A bounded log of messages, oldest first, and who waits on it."""

    __slots__ = ("name", "messages", "dropped", "waiters", "taken")

    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: list[Message] = []
        self.dropped = 0       # seq of the newest message retention dropped
        self.waiters: set[Callable[[], None]] = set()
        self.taken = 0         # seq of the last message /receive handed out

    def read_after(self, seq: int) -> list[Message]:
        """The messages published after position *seq*, oldest first."""
        return self.messages[bisect.bisect_right(self.messages, seq, key=_seq_of):]

    def trim(self, retention: int, max_age: float | None) -> None:
        """Drop messages beyond the count limit or older than *max_age*."""
        drop = len(self.messages) - retention
        if max_age:
            cutoff = time.monotonic() - max_age
            old = 0
            for m in self.messages:
                if m.born >= cutoff:
                    break
                old += 1
            drop = max(drop, old)
        if drop > 0:
            self.dropped = self.messages[drop - 1].seq
            del self.messages[:drop]


class Hub:
    """Channels of messages with cursors: publish, read, and wait. Thread-safe.

    Every message gets the next number of one sequence shared by all the
    hub's channels, so a cursor is a single position that is valid for any
    set of channels, and messages of several channels merge in publish
    order. A cursor also carries ``history``, a random name for this hub's
    life: a cursor from another hub (or from before a restart) cannot be
    placed and is answered from the oldest held message with ``gap`` set.

    Methods that may be overridden or used by servers: ``publish``,
    ``read``, ``wait``, ``take``, ``watch``, ``prune``, ``close``.
    """

    def __init__(self, retention: int = DEFAULT_RETENTION,
                 max_age: float | None = DEFAULT_MAX_AGE) -> None:
        if retention < 1:
            raise ValueError("retention must be at least 1 message")
        #: Messages kept per channel; older ones are dropped first.
        self.retention = retention
        #: Seconds a message is kept (None or 0: no age limit).
        self.max_age = max_age
        #: Names this hub's history in every cursor it hands out.
        self.history = secrets.token_hex(4)
        self._lock = threading.Lock()
        self._channels: dict[str, Channel] = {}
        self._seq = 0
        self._waiting = 0
        self._closed = False

    # -- state --------------------------------------------------------------

    @property
    def cursor(self) -> str:
        """The head: a cursor that sees only messages published from now on."""
        return self._cursor(self._seq)

    @property
    def waiting(self) -> int:
        """How many ``wait``/``take`` calls (and watchers) are parked now."""
        return self._waiting

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def closed(self) -> bool:
        return self._closed

    def _cursor(self, seq: int) -> str:
        return f"{self.history}-{seq}"

    def _channel(self, name: str) -> Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = Channel(name)
        return channel

    # -- publishing -----------------------------------------------------------

    def publish(self, channel: str, message: Any, *, title: str | None = None,
                priority: int | None = None) -> Message:
        """Append *message* (any JSON value) to *channel* and wake its waiters."""
        check_channel(channel)
        if title is not None and (not isinstance(title, str)
                                  or len(title) > MAX_TITLE):
            raise _bad_request(f"title must be a string of at most {MAX_TITLE} characters")
        if priority is not None and (type(priority) is not int
                                     or not 1 <= priority <= 5):
            raise _bad_request("priority must be an integer from 1 (min) to 5 (urgent)")
        try:  # refuse what would make invalid JSON for every reader
            json.dumps(message, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _bad_request(f"message is not plain JSON: {exc}") from None
        with self._lock:
            if self._closed:
                raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE, "the hub is closed")
            self._seq += 1
            msg = Message(self._seq, self._cursor(self._seq), channel,
                          message, title, priority)
            ch = self._channel(channel)
            ch.messages.append(msg)
            ch.trim(self.retention, self.max_age)
            # Waiters are one-shot: a woken waiter reads and registers again.
            waiters, ch.waiters = ch.waiters, set()
        for wake in waiters:
            wake()
        return msg

    # -- reading --------------------------------------------------------------

    def _position(self, since: str | None) -> tuple[int | None, bool, bool]:
        """Place *since*: (seq or None for "from now on", everything, unplaceable)."""
        if since is None:
            return None, False, False
        if since == "0":
            return 0, True, False
        match = CURSOR_RE.match(since) if isinstance(since, str) else None
        if not match:
            raise _bad_request(
                f"invalid since {since!r}: pass 0 or a cursor this server returned")
        seq = int(match.group(2))
        if match.group(1) != self.history or seq > self._seq:
            return 0, False, True  # another history: answer from the oldest
        return seq, False, False

    def _read(self, names: tuple[str, ...], after: int, everything: bool,
              unplaceable: bool, limit: int) -> Batch:
        """Read under the lock: messages after *after* in *names*, merged."""
        gap = unplaceable
        runs = []
        for name in names:
            ch = self._channels.get(name)
            if ch is None:
                continue
            ch.trim(self.retention, self.max_age)
            if ch.dropped > after and not everything:
                gap = True
            run = ch.read_after(after)
            if run:
                runs.append(run)
        if not runs:
            return Batch([], self._cursor(self._seq), gap)
        if len(runs) == 1:
            available = runs[0]
        else:
            available = list(heapq.merge(*runs, key=_seq_of))
        if len(available) > limit:  # the rest comes on the next read
            messages = available[:limit]
            return Batch(messages, messages[-1].id, gap)
        return Batch(available, self._cursor(self._seq), gap)

    def read(self, channels: str | Iterable[str], since: str | None = None,
             limit: int = DEFAULT_LIMIT) -> Batch:
        """Return at once what *channels* hold after cursor *since*.

        *since* None means "from now on" (an empty batch with the head
        cursor), ``"0"`` everything still held, else a cursor returned before.
        """
        names = _check_channels(channels)
        limit = _check_limit(limit)
        with self._lock:
            after, everything, unplaceable = self._position(since)
            if after is None:
                after = self._seq
            return self._read(names, after, everything, unplaceable, limit)

    def wait(self, channels: str | Iterable[str], since: str | None = None,
             timeout: float = DEFAULT_TIMEOUT, limit: int = DEFAULT_LIMIT) -> Batch:
        """Like ``read``, but block up to *timeout* seconds for a message.

        Returns early with an empty batch when the hub closes.
        """
        names = _check_channels(channels)
        limit = _check_limit(limit)
        with self._lock:
            after, everything, unplaceable = self._position(since)
            if after is None:
                after = self._seq  # "from now on" is fixed when the call starts

        def attempt() -> tuple[bool, Batch]:
            batch = self._read(names, after, everything, unplaceable, limit)
            return bool(batch.messages or batch.gap), batch

        return self._block(names, attempt, timeout)

    def take(self, channel: str = DEFAULT_CHANNEL,
             timeout: float = DEFAULT_TIMEOUT) -> Message | None:
        """Work queue: the oldest message of *channel* no other taker got.

        Each message is taken once (the ``/receive`` route); broadcast
        readers still see every message. Returns None on timeout or close.
        """
        check_channel(channel)

        def attempt() -> tuple[bool, Message | None]:
            ch = self._channel(channel)
            pending = ch.read_after(ch.taken)
            if pending:
                ch.taken = pending[0].seq
                return True, pending[0]
            return False, None

        return self._block((channel,), attempt, timeout)

    def _block(self, names: tuple[str, ...],
               attempt: Callable[[], tuple[bool, Any]], timeout: float) -> Any:
        """Call *attempt* under the lock until it is done, time runs out or
        the hub closes, and return its last answer (always made under the
        lock, so a timeout's cursor never skips a message). Between attempts
        sleep on an Event registered with the channels *names*."""
        woken = threading.Event()
        wake = woken.set
        deadline = time.monotonic() + max(0.0, timeout)
        parked = False
        try:
            while True:
                with self._lock:
                    done, result = attempt()
                    if done or self._closed or time.monotonic() >= deadline:
                        return result
                    for name in names:
                        self._channel(name).waiters.add(wake)
                    if not parked:
                        self._waiting += 1
                        parked = True
                    woken.clear()
                woken.wait(deadline - time.monotonic())
        finally:
            if parked:
                with self._lock:
                    self._waiting -= 1
                    for name in names:
                        ch = self._channels.get(name)
                        if ch is not None:
                            ch.waiters.discard(wake)

    # -- watching (for servers that park requests without a thread) -----------

    def watch(self, channels: str | Iterable[str],
              wake: Callable[[], None]) -> Callable[[], None]:
        """Call *wake()* once: on the next publish to any of *channels*, or
        on close. It runs in the publisher's thread, so keep it short (hand
        the work to your own loop). Returns a function that cancels it."""
        names = _check_channels(channels)
        guard = threading.Lock()

        def cancel() -> None:
            with self._lock:
                for name in names:
                    ch = self._channels.get(name)
                    if ch is not None:
                        ch.waiters.discard(once)

        def once() -> None:
            if guard.acquire(blocking=False):  # the first call wins
                cancel()
                wake()

        with self._lock:
            if not self._closed:
                for name in names:
                    self._channel(name).waiters.add(once)
                return cancel
        once()
        return cancel

    # -- housekeeping ---------------------------------------------------------

    def prune(self) -> None:
        """Apply age retention everywhere and forget channels that never held
        anything and that nobody waits on. Servers call this now and then."""
        with self._lock:
            for name, ch in list(self._channels.items()):
                ch.trim(self.retention, self.max_age)
                if not (ch.messages or ch.waiters or ch.dropped or ch.taken):
                    del self._channels[name]

    def close(self) -> None:
        """Wake every waiter; from now on waits return at once and publishing
        raises a 503 ``LongpollError``."""
        with self._lock:
            self._closed = True
            waiters = set()
            for ch in self._channels.values():
                waiters |= ch.waiters
                ch.waiters = set()
        for wake in waiters:
            wake()


def _check_limit(limit: int) -> int:
    if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
        raise _bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return limit


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------

def _json_body(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _decode_header(value: str, name: str) -> str:
    """http.client decodes headers as Latin-1; give back the UTF-8 text."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise _bad_request(f"the {name} header is not valid UTF-8") from None


def _parse_priority(value: str) -> int:
    text = value.strip().lower()
    if text in PRIORITY_NAMES:
        return PRIORITY_NAMES[text]
    if text in ("1", "2", "3", "4", "5"):
        return int(text)
    raise _bad_request(
        "priority must be 1-5 or one of min, low, default, high, max, urgent")


class Handler(BaseHTTPRequestHandler):
    """Speaks the longpoll protocol (PROTOCOL.md) over HTTP/1.1 keep-alive.

    Reaches its hub and settings as ``self.server``. Methods that may be
    overridden: ``route`` (add paths), ``respond`` (add headers), and the
    ``handle_*`` methods that serve each route.
    """

    protocol_version = "HTTP/1.1"
    server_version = f"longpoll/{__version__}"
    sys_version = ""
    #: Longest request line accepted, in bytes; longer gets 414.
    max_request_line = 8192

    server: "Server"

    # -- connection life ------------------------------------------------------

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # applied by StreamRequestHandler
        super().setup()
        try:  # without it a small response can wait 40 ms for a delayed ACK
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.track(self.connection, False)

    def handle_one_request(self) -> None:
        """Read one request and answer it; any socket trouble closes quietly."""
        self.close_connection = True
        self._body_unread = False
        try:
            line = self.rfile.readline(self.max_request_line + 1)
            if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: ignore one empty line
                line = self.rfile.readline(self.max_request_line + 1)
            if not line:
                return
            self._started = time.monotonic()
            self.raw_requestline = line
            if len(line) > self.max_request_line:
                self.refuse_request_line(HTTPStatus.REQUEST_URI_TOO_LONG,
                                         "request line too long")
                return
            if not str(line, "iso-8859-1").split():  # parse_request would not answer
                self.refuse_request_line(HTTPStatus.BAD_REQUEST, "empty request line")
                return
            if not self.parse_request():  # it has answered with send_error
                return
            if self.request_version == "HTTP/0.9":
                self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported")
                return
            if self.headers.defects:  # e.g. a header line without a colon
                self.send_error(HTTPStatus.BAD_REQUEST, "malformed header section")
                return
            self.dispatch()
            if self._body_unread:  # the next bytes would not be a request
                self.close_connection = True
                self.linger()
        except OSError as exc:  # timeouts, resets, broken pipes: routine
            logger.debug("connection from %s closed: %r", self.client_address[0], exc)
            self.close_connection = True

    def refuse_request_line(self, status: HTTPStatus, message: str) -> None:
        """Answer a request line that parse_request must not see."""
        self.requestline = self.raw_requestline[:80].decode("latin-1").rstrip("\r\n")
        self.command, self.request_version = None, "HTTP/1.1"
        self.send_error(status, message)

    def linger(self, seconds: float = 2.0, most: int = 16 << 20) -> None:
        """Read and drop what the client still sends before closing, so that
        a client busy sending a refused body reads our answer instead of a
        reset (Apache's "lingering close"). Bounded in time and bytes."""
        deadline = time.monotonic() + seconds
        self.connection.shutdown(socket.SHUT_WR)
        while most > 0 and time.monotonic() < deadline:
            self.connection.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.connection.recv(65536)
            if not chunk:
                break
            most -= len(chunk)

    # -- answering ------------------------------------------------------------

    def respond(self, status: int, body: bytes, *,
                content_type: str = "application/json",
                headers: Iterable[tuple[str, str]] = ()) -> None:
        """Write the whole response in one send (status, headers, body)."""
        status = HTTPStatus(status)
        if self.server.closing:
            self.close_connection = True
        lines = [f"HTTP/1.1 {status.value} {status.phrase}",
                 f"Server: {self.server_version}",
                 f"Date: {email.utils.formatdate(usegmt=True)}",
                 f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}",
                 "Cache-Control: no-store"]
        lines += [f"{k}: {v}" for k, v in headers]
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)
        self.log_request(status.value, len(body))

    def respond_json(self, status: int, obj: Any, **kwargs: Any) -> None:
        self.respond(status, _json_body(obj), **kwargs)

    def respond_error(self, error: LongpollError) -> None:
        status = HTTPStatus(error.status or HTTPStatus.INTERNAL_SERVER_ERROR)
        if self._body_unread or status >= 500 or status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            self.close_connection = True
        self.respond_json(status, {"error": error.message},
                          headers=error.headers.items())

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own parse errors (400, 414, 431, 505), as JSON."""
        self.close_connection = True
        if not hasattr(self, "_started"):
            self._started = time.monotonic()
        status = HTTPStatus(code)
        self.respond_error(LongpollError(status, message or status.phrase.lower()))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        elapsed = (time.monotonic() - getattr(self, "_started", time.monotonic())) * 1000
        logger.info('%s "%s" %s %s %.1fms', self.client_address[0],
                    self.requestline, code, size, elapsed)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s: " + format, self.client_address[0], *args)

    # -- routing --------------------------------------------------------------

    def route(self, path: str) -> tuple[dict[str, Callable[..., None]], tuple]:
        """Map *path* to {method: handler} and the handler's arguments."""
        if path.startswith("/channels/"):
            names = urllib.parse.unquote(path[len("/channels/"):]).split(",")
            return ({"GET": self.handle_poll, "POST": self.handle_publish},
                    (_check_channels(names),))
        routes = {
            "/": {"GET": self.handle_index, "HEAD": self.handle_index},
            "/health": {"GET": self.handle_health, "HEAD": self.handle_health},
            "/send": {"POST": self.handle_send},
            "/receive": {"GET": self.handle_receive},
        }
        if path in routes:
            return routes[path], ()
        raise LongpollError(HTTPStatus.NOT_FOUND, f"no such path: {path}")

    def dispatch(self) -> None:
        self._body_unread = self._has_body()
        self.server.count_request(+1)
        try:
            url = urllib.parse.urlsplit(self.path)
            self.query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            methods, args = self.route(url.path)
            handler = methods.get(self.command)
            if handler is None:
                allow = ", ".join(methods)
                raise LongpollError(HTTPStatus.METHOD_NOT_ALLOWED,
                                    f"{self.command} is not allowed here; use {allow}",
                                    {"Allow": allow})
            handler(*args)
        except LongpollError as error:
            self.respond_error(error)
        except OSError:
            raise  # the connection broke: nobody to answer
        except Exception:
            logger.exception("error serving %r", self.requestline)
            self.respond_error(LongpollError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                             "internal server error"))
        finally:
            self.server.count_request(-1)

    # Each method name the protocol knows is routed; route() says 405.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = dispatch

    # -- request parts --------------------------------------------------------

    def _has_body(self) -> bool:
        return bool(self.headers.get("Transfer-Encoding")
                    or self.headers.get("Content-Length", "0").strip() not in ("", "0"))

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.max_body:
            self._body_unread = True
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
            return False
        return super().handle_expect_100()

    def _too_large(self) -> str:
        return f"body too large: the limit is {self.server.max_body} bytes"

    def read_body(self) -> bytes:
        """The request body, Content-Length or chunked, within ``max_body``."""
        limit = self.server.max_body
        encoding = self.headers.get("Transfer-Encoding", "").strip().lower()
        if encoding:
            if encoding != "chunked":
                raise _bad_request(f"unsupported Transfer-Encoding: {encoding}")
            body = self._read_chunked(limit)
        else:
            lengths = set(self.headers.get_all("Content-Length") or ["0"])
            length = lengths.pop().strip() if len(lengths) == 1 else ""
            if not length.isdigit():
                raise _bad_request("Content-Length must be one whole number")
            if int(length) > limit:
                raise LongpollError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
            body = self.rfile.read(int(length))
            if len(body) < int(length):
                raise ConnectionResetError("client closed the connection mid-body")
        self._body_unread = False
        return body

    def _read_chunked(self, limit: int) -> bytes:
        chunks, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _bad_request("malformed chunked body") from None
            if size == 0:
                break
            total += size
            if total > limit or size < 0:
                raise LongpollError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
            chunks.append(self.rfile.read(size))
            self.rfile.readline(3)  # the CRLF after the chunk
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)

    def param_timeout(self, default: float | None = None) -> float:
        """The ``timeout`` parameter, clamped to the server's maximum."""
        text = self.query.get("timeout")
        if text is None:
            return min(self.server.default_timeout if default is None else default,
                       self.server.max_timeout)
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value >= 0:  # also refuses NaN
            raise _bad_request(f"timeout must be a number of seconds >= 0, not {text!r}")
        return min(value, self.server.max_timeout)

    def param_limit(self) -> int:
        text = self.query.get("limit")
        if text is None:
            return DEFAULT_LIMIT
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
            raise _bad_request(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {text!r}")
        return int(text)

    def parse_publish_body(self) -> tuple[Any, str | None, int | None]:
        """(message, title, priority) from a JSON body or a plain one."""
        body = self.read_body()
        if self.headers.get_content_type() == "application/json":
            try:
                data = json.loads(body, parse_constant=_reject_constant)
            except (ValueError, RecursionError) as exc:
                raise _bad_request(f"body is not valid JSON: {exc}") from None
            if not isinstance(data, dict) or "message" not in data:
                raise _bad_request('a JSON body must be an object with a "message" field')
            return data["message"], data.get("title"), data.get("priority")
        try:
            message = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_request("body is not valid UTF-8") from None
        title = self.headers.get("Title") or self.headers.get("X-Title")
        priority = self.headers.get("Priority") or self.headers.get("X-Priority")
        return (message,
                None if title is None else _decode_header(title, "Title"),
                None if priority is None else _parse_priority(priority))

    # -- routes ---------------------------------------------------------------

    def handle_publish(self, names: tuple[str, ...]) -> None:
        if len(names) != 1:
            raise _bad_request("publish to one channel at a time")
        message, title, priority = self.parse_publish_body()
        msg = self.server.hub.publish(names[0], message, title=title, priority=priority)
        self.respond_json(HTTPStatus.CREATED,
                          {"id": msg.id, "channel": msg.channel, "time": msg.time})

    def handle_poll(self, names: tuple[str, ...]) -> None:
        since = self.query.get("since") or None  # an empty since means absent
        timeout, limit = self.param_timeout(), self.param_limit()
        batch = self.server.hub.wait(names, since, timeout=timeout, limit=limit)
        self.respond(HTTPStatus.OK, batch.to_json())

    def handle_send(self) -> None:
        message, title, priority = self.parse_publish_body()
        self.server.hub.publish(DEFAULT_CHANNEL, message, title=title, priority=priority)
        self.respond_json(HTTPStatus.OK, {"status": "Message sent."})

    def handle_receive(self) -> None:
        msg = self.server.hub.take(DEFAULT_CHANNEL, timeout=self.param_timeout())
        self.respond_json(HTTPStatus.OK, {"message": None if msg is None else msg.message})

    def handle_health(self) -> None:
        hub = self.server.hub
        self.respond_json(HTTPStatus.OK, {
            "status": "ok", "waiting": hub.waiting, "channels": hub.channel_count,
            "uptime": round(time.monotonic() - self.server.started, 3)})

    def handle_index(self) -> None:
        self.respond(HTTPStatus.OK, INDEX_TEXT.format(version=__version__).encode(),
                     content_type="text/plain; charset=utf-8")


class Server(ThreadingHTTPServer):
    """A longpoll HTTP server around a ``Hub`` (``self.hub``).

    ``start()`` serves from a daemon thread; ``close()`` answers every waiting
    client, closes idle keep-alive connections and releases the port.
    Class attributes configure it; pass keyword arguments to override.
    """

    daemon_threads = True
    allow_reuse_address = True
    #: Listen backlog: room for many clients reconnecting at once.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int] = (DEFAULT_HOST, DEFAULT_PORT),
                 hub: Hub | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, max_timeout: float = MAX_TIMEOUT,
                 max_body: int = MAX_BODY, read_timeout: float = 30.0,
                 handler_class: type[Handler] = Handler) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        #: The hub holding this server's channels.
        self.hub = hub if hub is not None else Hub()
        #: Hold, in seconds, of a long-poll that names no timeout.
        self.default_timeout = timeout
        #: The longest hold a client may ask for.
        self.max_timeout = max_timeout
        #: Largest request body accepted, in bytes (413 beyond).
        self.max_body = max_body
        #: Seconds a connection may stay silent while a request is expected.
        self.read_timeout = read_timeout
        self.started = time.monotonic()
        self.closing = False
        self._connections: set[socket.socket] = set()
        self._active = 0
        self._state = threading.Condition()
        self._serving = False
        self._thread: threading.Thread | None = None
        self._next_prune = 0.0
        super().__init__(address, handler_class)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall
        # for seconds on a machine without DNS; we never need it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:5000``."""
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def track(self, conn: socket.socket, is_open: bool) -> None:
        with self._state:
            (self._connections.add if is_open else self._connections.discard)(conn)
            self._state.notify_all()

    def count_request(self, delta: int) -> None:
        with self._state:
            self._active += delta
            self._state.notify_all()

    def service_actions(self) -> None:
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + 10.0
            self.hub.prune()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving = False

    def start(self) -> "Server":
        """Serve from a daemon thread; return self (so ``make_server().start()``)."""
        self._thread = threading.Thread(target=self.serve_forever,
                                        name="longpoll-server", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Stop: wake and answer every parked request, close idle
        connections, release the port. Returns within about *timeout* s."""
        deadline = time.monotonic() + timeout
        self.closing = True
        self.hub.close()  # parked requests answer now, with Connection: close
        with self._state:
            self._state.wait_for(lambda: self._active == 0,
                                 max(0.0, deadline - time.monotonic()))
        if self._serving:
            self._stop_serving(deadline)
        with self._state:
            for conn in self._connections:  # idle keep-alive: wake its read
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._state.wait_for(lambda: not self._connections,
                                 max(0.0, deadline - time.monotonic()))
        self.server_close()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def _stop_serving(self, deadline: float) -> None:
        """``shutdown()``, without waiting out serve_forever's poll interval:
        a loopback connection wakes its select() once the stop is asked."""
        stopper = threading.Thread(target=self.shutdown, daemon=True)
        stopper.start()
        host, port = self.server_address[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        while stopper.is_alive() and time.monotonic() < deadline:
            try:
                socket.create_connection((host, port), timeout=0.2).close()
            except OSError:
                pass
            stopper.join(0.05)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("unexpected error with a connection from %s", client_address[0])


def make_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                hub: Hub | None = None, **options: Any) -> Server:
    """Bind a ``Server`` (port 0 picks a free port: read ``server.url``)."""
    return Server((host, port), hub, **options)


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------

class _Cutoff:
    """Lets another thread cut the socket of a request in flight.

    Either ``cut()`` sees the socket, or ``register()`` sees the cut: a
    request started just as its subscription closes never holds on.
    """

    def __init__(self) -> None:
        self.stopped = False
        self.sockets: list[socket.socket] = []

    def register(self, sock: socket.socket) -> None:
        self.sockets.append(sock)
        if self.stopped:
            self._shut(sock)

    def cut(self) -> None:
        self.stopped = True
        for sock in list(self.sockets):
            self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _CutoffConnection:
    """Mixed into http.client's connections: registers the socket with a
    ``_Cutoff`` as soon as it is connected."""

    def __init__(self, cutoff: _Cutoff, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cutoff = cutoff

    def connect(self) -> None:
        super().connect()
        self._cutoff.register(self.sock)


class _TrackedHTTPConnection(_CutoffConnection, http.client.HTTPConnection):
    pass


class _TrackedHTTPSConnection(_CutoffConnection, http.client.HTTPSConnection):
    pass


class _TrackedHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's HTTP(S) handler, with connections a ``_Cutoff`` can cut."""

    def __init__(self, cutoff: _Cutoff, context: Any = None) -> None:
        urllib.request.HTTPHandler.__init__(self)
        urllib.request.HTTPSHandler.__init__(self, context=context)
        self._cutoff = cutoff

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_TrackedHTTPConnection, self._cutoff), req)

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_TrackedHTTPSConnection, self._cutoff),
                            req, context=self._context)


_RETRY_STATUSES = {429, 500, 502, 503, 504}


class Client:
    """Publish, poll and subscribe over HTTP, with retries and failover.

    *url* is one base URL or a list of them; on connection errors, 5xx and
    429 the client backs off (exponentially, with jitter, honouring
    ``Retry-After``) and moves to the next URL. *timeout* is the long-poll
    hold asked of the server; the socket waits 15 s longer than that.
    """

    def __init__(self, url: str | Iterable[str] = DEFAULT_URL, *,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0,
                 token: str | None = None) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("give at least one server URL")
        #: Base URLs, tried in turn.
        self.urls = [u.rstrip("/") for u in urls]
        #: Long-poll hold asked of the server, in seconds.
        self.timeout = timeout
        #: Attempts after the first for publish and poll (subscribe never gives up).
        self.retries = retries
        #: First backoff delay and its cap, in seconds.
        self.backoff, self.max_backoff = backoff, max_backoff
        self.token = token
        self._current = 0  # index of the server that answered last

    # -- the requests ---------------------------------------------------------

    def publish(self, channel: str, message: Any, *, title: str | None = None,
                priority: int | None = None) -> dict[str, Any]:
        """Publish *message* (any JSON value); return ``{"id", "channel", "time"}``.

        Retried only when the server surely did not take it (connection
        refused, 429, 503), so a retry never publishes twice.
        """
        check_channel(channel)
        body = {"message": message}
        if title is not None:
            body["title"] = title
        if priority is not None:
            body["priority"] = priority
        return self._call("POST", f"/channels/{channel}", _json_body(body),
                          self._socket_timeout(0), safe=False)

    def poll(self, channels: str | Iterable[str], since: str | None = None, *,
             timeout: float | None = None, limit: int | None = None) -> dict[str, Any]:
        """One long-poll: ``{"messages": [...], "cursor": ..., "gap"?: true}``."""
        hold = self.timeout if timeout is None else timeout
        return self._call("GET", self._poll_path(channels, since, hold, limit),
                          None, self._socket_timeout(hold))

    def subscribe(self, channels: str | Iterable[str], since: str | None = None, *,
                  timeout: float | None = None) -> "Subscription":
        """An endless iterator of messages (dicts); see ``Subscription``."""
        return Subscription(self, channels, since,
                            self.timeout if timeout is None else timeout)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health", None, self._socket_timeout(0))

    # -- plumbing -------------------------------------------------------------

    def _socket_timeout(self, hold: float) -> float:
        return hold + 15.0

    @staticmethod
    def _poll_path(channels: str | Iterable[str], since: str | None,
                   hold: float, limit: int | None) -> str:
        query = {"timeout": f"{hold:g}"}
        if since is not None:
            query["since"] = since
        if limit is not None:
            query["limit"] = str(limit)
        names = ",".join(_check_channels(channels))
        return f"/channels/{names}?{urllib.parse.urlencode(query)}"

    def _delay(self, failures: int, retry_after: float | None = None) -> float:
        """Exponential backoff with "equal jitter"; at least Retry-After."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** min(failures, 30))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        return max(delay, retry_after or 0.0)

    def _request(self, method: str, path: str, body: bytes | None,
                 socket_timeout: float, cutoff: _Cutoff | None = None) -> dict[str, Any]:
        """One HTTP exchange with the current server; raise LongpollError."""
        url = self.urls[self._current] + path
        headers = {"Accept": "application/json",
                   "User-Agent": f"longpoll/{__version__}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, body, headers, method=method)
        opener = urllib.request.build_opener(_TrackedHandler(cutoff or _Cutoff()))
        try:
            with opener.open(request, timeout=socket_timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError, OSError):
                detail = exc.reason
            raise LongpollError(exc.code, str(detail), dict(exc.headers)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException,
                ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            error = LongpollError(None, f"{url}: {reason}")
            error.refused = isinstance(reason, ConnectionRefusedError)
            raise error from None

    def _call(self, method: str, path: str, body: bytes | None,
              socket_timeout: float, safe: bool = True) -> dict[str, Any]:
        """``_request`` with retries, backoff and failover."""
        failures = 0
        while True:
            try:
                return self._request(method, path, body, socket_timeout)
            except LongpollError as error:
                if not self._retryable(error, safe) or failures >= self.retries:
                    raise
                failures += 1
                self._failover(error)
                time.sleep(self._delay(failures, _retry_after(error)))

    @staticmethod
    def _retryable(error: LongpollError, safe: bool) -> bool:
        if safe:
            return error.status is None or error.status in _RETRY_STATUSES
        return getattr(error, "refused", False) or error.status in (429, 503)

    def _failover(self, error: LongpollError) -> None:
        if error.status != 429:  # a rate limit is ours to wait out, not the server's fault
            self._current = (self._current + 1) % len(self.urls)
        logger.warning("%s; retrying%s", error,
                       f" on {self.urls[self._current]}" if len(self.urls) > 1 else "")


def _retry_after(error: LongpollError) -> float | None:
    value = {k.lower(): v for k, v in error.headers.items()}.get("retry-after")
    try:
        return min(float(value), 3600.0) if value is not None else None
    except ValueError:
        return None


class Subscription:
    """Iterate to receive messages (dicts) forever; ``close()`` to stop.

    Keeps its cursor (``self.cursor``), so no message is lost or repeated
    across polls, reconnects and failovers between servers that share
    history. Connection errors, 5xx and 429 are retried forever with
    backoff. When the server reports that messages were lost (retention
    dropped them, or it restarted), the next message carries ``"gap": True``
    and ``self.gaps`` counts it. Other errors (e.g. 403) are raised.
    Usable as a context manager.
    """

    def __init__(self, client: Client, channels: str | Iterable[str],
                 since: str | None, timeout: float) -> None:
        self.client = client
        self.channels = _check_channels(channels)
        #: Where the next poll starts: pass it as ``since`` to resume later.
        self.cursor = since
        #: How many times the server reported lost messages.
        self.gaps = 0
        self.timeout = timeout
        self._stop = threading.Event()
        self._cutoff = _Cutoff()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        client, failures, gap_pending = self.client, 0, False
        while not self._stop.is_set():
            path = client._poll_path(self.channels, self.cursor, self.timeout, None)
            try:
                batch = client._request("GET", path, None,
                                        client._socket_timeout(self.timeout), self._cutoff)
            except LongpollError as error:
                if self._stop.is_set():
                    break
                if not client._retryable(error, safe=True):
                    raise
                failures += 1
                client._failover(error)
                self._stop.wait(client._delay(failures, _retry_after(error)))
                continue
            finally:
                self._cutoff.sockets.clear()
            failures = 0
            if batch.get("gap"):
                self.gaps += 1
                gap_pending = True
                logger.warning("messages on %s were lost before they could be read",
                               ",".join(self.channels))
            for message in batch.get("messages", []):
                if gap_pending:
                    message["gap"], gap_pending = True, False
                if len(self.channels) == 1:  # a message id is a cursor too
                    self.cursor = message["id"]
                yield message
                if self._stop.is_set():
                    return
            self.cursor = batch["cursor"]

    def close(self) -> None:
        """Stop iterating; cuts a held poll short. Safe from any thread."""
        self._stop.set()
        self._cutoff.cut()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Web page
# ---------------------------------------------------------------------------

INDEX_TEXT = """\
longpoll {version}: real-time push over plain HTTP.

Publish:   curl -d 'hello' HOST/channels/NAME
Read:      curl 'HOST/channels/NAME?since=0'
Wait:      curl HOST/channels/NAME      (holds until the next message)
Health:    curl HOST/health
"""


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

EPILOG = """\
examples:
  python -m longpoll serve
  python -m longpoll publish news 'build done' --title CI --priority 4
  echo '{"ok": true}' | python -m longpoll publish news --json
  python -m longpoll subscribe news
  python -m longpoll subscribe news alerts --since 0 --json
  python -m longpoll subscribe ci --count 1    # wait for the next message, then exit
"""


def _serve(args: Any) -> int:
    hub = Hub(retention=args.retention, max_age=args.max_age or None)
    try:
        server = make_server(args.host, args.port, hub, timeout=args.timeout,
                             max_timeout=args.max_timeout, max_body=args.max_body)
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", args.host, args.port, exc.strerror or exc)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.start()
    logger.warning("longpoll %s listening on %s (Ctrl-C to stop)", __version__, server.url)
    stop.wait()
    logger.warning("shutting down: answering %d waiting clients", hub.waiting)
    server.close()
    return 0


def _print_message(message: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(message, ensure_ascii=False), flush=True)
        return
    body = message.get("message")
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    title = message.get("title")
    print(f"{title}: {text}" if title else text, flush=True)


def _publish(args: Any) -> int:
    text = sys.stdin.read() if args.message is None else args.message
    if args.json:
        try:
            message = json.loads(text)
        except ValueError as exc:
            logger.error("--json: the message is not valid JSON: %s", exc)
            return 2
    else:
        message = text.rstrip("\n") if args.message is None else text
    client = Client(args.url or [DEFAULT_URL], token=args.token)
    result = client.publish(args.channel, message, title=args.title, priority=args.priority)
    print(result["id"], flush=True)
    return 0


def _subscribe(args: Any) -> int:
    client = Client(args.url or [DEFAULT_URL], token=args.token)
    with client.subscribe(args.channels, since=args.since) as subscription:
        for count, message in enumerate(subscription, 1):
            _print_message(message, args.json)
            if count == args.count:
                break
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python -m longpoll serve | publish | subscribe``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="longpoll", description="Real-time push over plain HTTP.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"longpoll {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_logging(p: argparse.ArgumentParser) -> None:
        p.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
        p.add_argument("-q", "--quiet", action="store_true", help="log only problems")

    def add_client(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", action="append", metavar="URL",
                       help=f"server base URL; repeat for failover (default {DEFAULT_URL}, "
                            "or $LONGPOLL_URL)")
        p.add_argument("--token", default=os.environ.get("LONGPOLL_TOKEN"),
                       help="bearer token (default $LONGPOLL_TOKEN)")
        add_logging(p)

    serve = commands.add_parser("serve", help="run a push server",
                                description="Run a longpoll server until SIGINT or SIGTERM.")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    serve.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                       help="seconds a poll is held when the client names none (default 30)")
    serve.add_argument("--max-timeout", type=float, default=MAX_TIMEOUT,
                       help="longest hold a client may ask for (default 300)")
    serve.add_argument("--retention", type=int, default=DEFAULT_RETENTION,
                       help="messages kept per channel (default 1000)")
    serve.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE,
                       help="seconds a message is kept, 0 for no limit (default 86400)")
    serve.add_argument("--max-body", type=int, default=MAX_BODY,
                       help="largest request body in bytes (default 1048576)")
    add_logging(serve)

    publish = commands.add_parser(
        "publish", help="publish a message",
        description="Publish MESSAGE (or standard input) to CHANNEL; print its id.")
    publish.add_argument("channel", metavar="CHANNEL")
    publish.add_argument("message", metavar="MESSAGE", nargs="?",
                         help="the text to publish (default: standard input)")
    publish.add_argument("--title", help="a title, e.g. for desktop notifications")
    publish.add_argument("--priority", type=_priority_arg,
                         help="1-5 or min, low, default, high, urgent")
    publish.add_argument("--json", action="store_true",
                         help="MESSAGE is JSON, published as that value")
    add_client(publish)

    subscribe = commands.add_parser(
        "subscribe", help="print messages as they arrive",
        description="Print each message of the CHANNELs as it arrives, until Ctrl-C.")
    subscribe.add_argument("channels", metavar="CHANNEL", nargs="+")
    subscribe.add_argument("--since", help="start after this cursor (0: all held)")
    subscribe.add_argument("--json", action="store_true",
                           help="one JSON object per line, with id, time, title, priority")
    subscribe.add_argument("--count", type=int, metavar="N",
                           help="exit after N messages (e.g. wait for one in a script)")
    add_client(subscribe)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command != "serve" and not args.url and os.environ.get("LONGPOLL_URL"):
        args.url = [os.environ["LONGPOLL_URL"]]
    level = (logging.DEBUG if args.verbose else logging.WARNING if args.quiet
             else logging.INFO if args.command == "serve" else logging.WARNING)
    # Our own handler on our own logger, for this call only: the CLI's words
    # reach stderr even inside a process whose logging is set up otherwise.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    run = {"serve": _serve, "publish": _publish, "subscribe": _subscribe}[args.command]
    try:
        return run(args)
    except LongpollError as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # e.g. `longpoll subscribe news | head -1`
        sys.stderr.close()
        return 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _priority_arg(text: str) -> int:
    try:
        return _parse_priority(text)
    except LongpollError as error:
        import argparse
        raise argparse.ArgumentTypeError(error.message) from None


if __name__ == "__main__":
    sys.exit(main())
