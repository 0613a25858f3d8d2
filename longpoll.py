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

The module holds five parts, each usable alone: the ``Hub`` (channels of
messages with cursors, no HTTP), its stores (memory, ``sqlite3``, Redis),
the ``Server`` (the wire protocol over ``http.server``), the ``Client``
(``urllib``), and the command line.

Limits, stated honestly:

- SECURITY WARNING: without ``serve --auth FILE`` anyone who can reach the
  port can publish to and read every channel. It binds to 127.0.0.1 by
  default. Without ``--certfile`` it speaks plain HTTP: tokens and
  messages cross the network readable by anyone on the path.
- Messages live in memory unless ``serve --store sqlite:FILE`` (they survive
  restarts) or ``--store redis://...`` (several servers share them). Without
  a store a restart loses them; clients holding an old cursor are told so
  (``"gap": true``) instead of getting wrong data.
- One process, one loop: a waiting client costs a socket and a small record
  (10,000 parked clients: about 70 MB and 2 threads), but all the work runs
  on one core. Past roughly 4,000 subscribers each receiving 10 messages a
  second, that core is full and answers come in batches, later.
"""

__version__ = "0.1.0"

__all__ = [
    "Auth",
    "Batch",
    "Client",
    "Handler",
    "Hub",
    "LongpollError",
    "Message",
    "Position",
    "RedisStore",
    "Server",
    "SqliteStore",
    "Store",
    "Subscription",
    "main",
    "make_server",
    "open_store",
]

import bisect
import collections
import concurrent.futures
import email.utils
import errno
import fnmatch
import functools
import hashlib
import heapq
import hmac
import http.client
import io
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import selectors
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterable, Iterator, NamedTuple

try:
    import ssl
except ImportError:  # a Python built without OpenSSL still serves plain HTTP
    ssl = None  # type: ignore[assignment]

logger = logging.getLogger("longpoll")
# What a non-blocking send or recv raises when it must wait (TLS adds two).
_WOULD_BLOCK: tuple[type[Exception], ...] = (BlockingIOError, InterruptedError) + (
    (ssl.SSLWantReadError, ssl.SSLWantWriteError) if ssl else ())


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
# Per-client limits: generous enough that no honest client notices.
DEFAULT_PUBLISH_RATE, DEFAULT_PUBLISH_BURST = 50.0, 200      # publishes/s, at once
DEFAULT_REQUEST_RATE, DEFAULT_REQUEST_BURST = 500.0, 1000    # requests/s, at once
DEFAULT_MAX_WAITING, DEFAULT_MAX_WAITING_PER_CLIENT = 100_000, 1000
DEFAULT_MAX_CHANNELS = 100_000  # channels a hub holds at once (503 beyond)

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


@functools.lru_cache(maxsize=4096)
def _channels_in_path(text: str) -> tuple[str, ...]:
    """The channel names of a /channels/{names} path, checked (cached: the
    same few paths come back with every poll; errors are not cached)."""
    return _check_channels(urllib.parse.unquote(text).split(","))


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
                 title: str | None, priority: int | None,
                 payload: str | None = None, at: float | None = None) -> None:
        self.seq = seq
        self.id = id
        self.channel = channel
        if at is None:  # published now
            self.time = round(time.time(), 3)
            self.born = time.monotonic()   # for age-based retention
        else:  # published before (a store gives it back)
            self.time = at
            self.born = time.monotonic() - max(0.0, time.time() - at)
        self.message = message
        self.title = title
        self.priority = priority
        if payload is None:
            payload = _encode(message)
        extra = ""
        if title is not None:
            extra += ',"title":' + _encode(title)
        if priority is not None:
            extra += f',"priority":{priority}'
        self.json = (f'{{"id":"{id}","channel":"{channel}","time":{self.time!r},'
                     f'"message":{payload}{extra}}}').encode()

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

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                           allow_nan=False).encode


class Position(NamedTuple):
    """A ``since`` placed in a hub's history (see ``Hub.locate``).

    Hashable, so a server can group the requests waiting at one position.
    """

    after: int            # messages with a larger seq come next
    everything: bool      # since=0: what is held, with no gap for what is not
    unplaceable: bool     # another history's cursor: answer with a gap


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

    def trim(self, retention: int, max_age: float | None) -> list[Message] | tuple[()]:
        """Drop messages beyond the count limit or older than *max_age*;
        return them."""
        drop = len(self.messages) - retention
        if max_age:
            cutoff = time.monotonic() - max_age
            old = 0
            for m in self.messages:
                if m.born >= cutoff:
                    break
                old += 1
            drop = max(drop, old)
        if drop <= 0:
            return ()
        gone = self.messages[:drop]
        self.dropped = gone[-1].seq
        del self.messages[:drop]
        return gone


class Hub:
    """Channels of messages with cursors: publish, read, and wait. Thread-safe.

    Every message gets the next number of one sequence shared by all the
    hub's channels, so a cursor is a single position that is valid for any
    set of channels, and messages of several channels merge in publish
    order. A cursor also carries ``history``, a random name for this hub's
    life: a cursor from another hub (or from before a restart) cannot be
    placed and is answered from the oldest held message with ``gap`` set.

    Methods that may be overridden or used by servers: ``publish``,
    ``read``, ``wait``, ``take``, ``watch``, ``prune``, ``close``; and for
    a server's hot path ``locate`` (place a cursor once) and ``read_checked``.
    *store* (a ``Store`` or a URL for ``open_store``) keeps messages across
    restarts, or shares them between servers; reads always come from memory.
    """

    def __init__(self, retention: int = DEFAULT_RETENTION,
                 max_age: float | None = DEFAULT_MAX_AGE,
                 max_channels: int = DEFAULT_MAX_CHANNELS,
                 store: "Store | str | None" = None) -> None:
        if retention < 1:
            raise ValueError("retention must be at least 1 message")
        #: Messages kept per channel; older ones are dropped first.
        self.retention = retention
        #: Seconds a message is kept (None or 0: no age limit).
        self.max_age = max_age
        #: Channels held at once (with messages, or waited on); a new one
        #: past it is refused with 503 until retention frees room.
        self.max_channels = max_channels
        self._pruned = 0.0
        self._forgotten = 0  # newest message dropped from a channel since forgotten
        #: Names this hub's history in every cursor it hands out.
        self.history = secrets.token_hex(4)
        self._lock = threading.Lock()
        self._channels: dict[str, Channel] = {}
        self._seq = 0
        self._waiting = 0
        self._closed = False
        self._positions: dict[str, Position] = {}  # settled cursors, placed once
        #: Messages published since the hub started (through this hub).
        self.published = 0
        #: Where messages are kept besides memory (see ``Store``, ``open_store``).
        self.store = open_store(store) if isinstance(store, str) else store or Store()
        self.store.open(self)  # gives back what was stored: history, sequence, messages

    # -- state --------------------------------------------------------------

    @property
    def cursor(self) -> str:
        """The head: a cursor that sees only messages published from now on."""
        return self._cursor(self._seq)

    @property
    def waiting(self) -> int:
        """How many blocking ``wait``/``take`` calls are parked now (a
        server's parked requests are counted by ``Server.waiting``)."""
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

    def _make_room(self, names: tuple[str, ...]) -> None:
        """Under the lock: refuse (503) channels that would pass max_channels."""
        if len(self._channels) + len(names) <= self.max_channels:
            return  # far from the cap: the usual case, decided without a loop
        new = sum(name not in self._channels for name in names)
        if new and len(self._channels) + new > self.max_channels:
            if time.monotonic() > self._pruned + 1.0:  # at most once a second
                self._prune()
            if len(self._channels) + new > self.max_channels:
                raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE,
                                    f"no room for new channels: this server holds "
                                    f"{self.max_channels}, its maximum", {"Retry-After": "10"})

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
        try:  # encoded once, outside the lock; refuses what is not plain JSON
            payload = _encode(message)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _bad_request(f"message is not plain JSON: {exc}") from None
        with self._lock:
            if self._closed:
                raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE, "the hub is closed")
            self._make_room((channel,))
            if not self.store.shared:
                msg = Message(self._seq + 1, self._cursor(self._seq + 1), channel,
                              message, title, priority, payload)
                self.store.append(msg)  # kept before it is acknowledged; may raise
                self._seq += 1
                self.published += 1
                waiters = self._apply(msg)
        if self.store.shared:  # the store numbers it; its feed brings it here
            return self.store.publish(self, channel, message, title, priority, payload)
        for wake in waiters:
            wake()
        return msg

    def _apply(self, msg: Message) -> set[Callable[[], None]]:
        """Under the lock: append *msg* to its channel; return who to wake."""
        ch = self._channel(msg.channel)
        ch.messages.append(msg)
        gone = ch.trim(self.retention, self.max_age)
        if gone:
            self.store.dropped(gone)
        # Waiters are one-shot: a woken waiter reads and registers again.
        waiters, ch.waiters = ch.waiters, set()
        return waiters

    def _follow(self, messages: Iterable[Message], head: int = 0,
                dropped: dict[str, int] | None = None) -> None:
        """Apply what was published through other hubs sharing this one's
        store, in order, and move the head to at least *head*."""
        waiters: set[Callable[[], None]] = set()
        with self._lock:
            for name, seq in (dropped or {}).items():
                ch = self._channel(name)
                ch.dropped = max(ch.dropped, seq)
            for msg in messages:
                if msg.seq > self._seq:
                    self._seq = msg.seq
                    waiters |= self._apply(msg)
            self._seq = max(self._seq, head)
        for wake in waiters:
            wake()

    # -- reading --------------------------------------------------------------

    def locate(self, since: "str | None | Position") -> Position:
        """Place *since* in this hub's history; raise a 400 error if it is
        malformed. None ("from now on") is fixed at the head, now."""
        if isinstance(since, Position):
            return since
        if since is None:
            return Position(self._seq, False, False)
        if since == "0":
            return Position(0, True, False)
        position = self._positions.get(since)
        if position is not None:
            return position
        match = CURSOR_RE.match(since) if isinstance(since, str) else None
        if not match:
            raise _bad_request(
                f"invalid since {since!r}: pass 0 or a cursor this server returned")
        seq = int(match.group(2))
        if match.group(1) != self.history or seq > self._seq and not (
                self.store.shared and seq <= self.store.head()):  # (another server's news)
            return Position(0, False, True)  # another history: answer from the oldest
        if len(self._positions) >= 1024:  # a cursor of ours never changes place
            self._positions.clear()
        position = self._positions[since] = Position(seq, False, False)
        return position

    def _read(self, names: tuple[str, ...], position: Position, limit: int) -> Batch:
        """Read under the lock: messages after *position* in *names*, merged."""
        after, everything, gap = position
        runs = []
        for name in names:
            ch = self._channels.get(name)
            if ch is None:
                if self._forgotten > after and not everything:
                    gap = True  # it may have been one of the channels forgotten
                continue
            gone = ch.trim(self.retention, self.max_age)
            if gone:
                self.store.dropped(gone)
            if ch.dropped > after and not everything:
                gap = True
            run = ch.read_after(after)
            if run:
                runs.append(run)
        if not runs:  # (a shared store's cursor can be ahead of this hub, for a moment)
            return Batch([], self._cursor(max(self._seq, after)), gap)
        if len(runs) == 1:
            available = runs[0]
        else:
            available = list(heapq.merge(*runs, key=_seq_of))
        if len(available) > limit:  # the rest comes on the next read
            messages = available[:limit]
            return Batch(messages, messages[-1].id, gap)
        return Batch(available, self._cursor(max(self._seq, after)), gap)

    def read(self, channels: str | Iterable[str], since: "str | None | Position" = None,
             limit: int = DEFAULT_LIMIT) -> Batch:
        """Return at once what *channels* hold after cursor *since*.

        *since* None means "from now on" (an empty batch with the head
        cursor), ``"0"`` everything still held, else a cursor returned
        before (or a ``Position`` from ``locate``).
        """
        names = _check_channels(channels)
        limit = _check_limit(limit)
        with self._lock:
            return self._read(names, self.locate(since), limit)

    def read_checked(self, names: tuple[str, ...], position: Position, limit: int) -> Batch:
        """``read`` for servers that have checked *names* and *limit* and
        placed *position* already: the hot path of every poll."""
        if position.after == self._seq and not position.unplaceable:
            return Batch([], self._cursor(position.after))  # at the head: nothing newer
        with self._lock:
            return self._read(names, position, limit)

    def wait(self, channels: str | Iterable[str], since: "str | None | Position" = None,
             timeout: float = DEFAULT_TIMEOUT, limit: int = DEFAULT_LIMIT) -> Batch:
        """Like ``read``, but block up to *timeout* seconds for a message.

        Returns early with an empty batch when the hub closes.
        """
        names = _check_channels(channels)
        limit = _check_limit(limit)
        with self._lock:
            position = self.locate(since)  # "from now on" is fixed when the call starts

        def attempt() -> tuple[bool, Batch]:
            batch = self._read(names, position, limit)
            return bool(batch.messages or batch.gap), batch

        return self._block(names, attempt, timeout)

    def take(self, channel: str = DEFAULT_CHANNEL,
             timeout: float = DEFAULT_TIMEOUT) -> Message | None:
        """Work queue: the oldest message of *channel* no other taker got.

        Each message is taken once (the ``/receive`` route); broadcast
        readers still see every message. Returns None on timeout or close.
        """
        check_channel(channel)
        if self.store.shared:  # taken once across every server: the store decides
            return self._take_shared(channel, timeout)

        def attempt() -> tuple[bool, Message | None]:
            self._make_room((channel,))
            ch = self._channel(channel)
            pending = ch.read_after(ch.taken)
            if pending:
                self.store.took(channel, pending[0].seq)
                ch.taken = pending[0].seq
                return True, pending[0]
            return False, None

        return self._block((channel,), attempt, timeout)

    def _take_shared(self, channel: str, timeout: float) -> Message | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            woken = threading.Event()
            cancel = self.watch(channel, woken.set)  # before asking: no wake-up missed
            try:
                msg = self.store.take(self, channel)
                remaining = deadline - time.monotonic()
                if msg is not None or self._closed or remaining <= 0:
                    return msg
                with self._lock:
                    self._waiting += 1
                try:
                    woken.wait(remaining)
                finally:
                    with self._lock:
                        self._waiting -= 1
            finally:
                cancel()

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
                    self._make_room(names)
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

    def watch(self, channels: str | Iterable[str], wake: Callable[[], None],
              since: "str | None | Position" = None) -> Callable[[], None]:
        """Call *wake()* once: on the next publish to any of *channels*, or
        on close; at once if *since* is given and messages after it are
        already there (checked under the same lock, so none slips between
        a read and the watch). It runs in the publisher's thread, so keep it
        short (hand the work to your own loop). Returns a cancel function."""
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
            ready = self._closed
            if since is not None and not ready:
                position = self.locate(since)
                ready = any(ch is not None and ch.messages and ch.messages[-1].seq > position.after
                            for ch in map(self._channels.get, names))
            if not ready:
                self._make_room(names)
                for name in names:
                    self._channel(name).waiters.add(once)
                return cancel
        once()
        return cancel

    # -- housekeeping ---------------------------------------------------------

    def prune(self) -> None:
        """Apply age retention everywhere and forget channels that hold
        nothing and that nobody waits on (a read of one with a cursor from
        before its last message expired still gets ``gap``). Servers call
        this now and then."""
        with self._lock:
            self._prune()

    def _prune(self) -> None:
        self._pruned = time.monotonic()
        forgotten = []
        for name, ch in list(self._channels.items()):
            gone = ch.trim(self.retention, self.max_age)
            if gone:
                self.store.dropped(gone)
            if not (ch.messages or ch.waiters):
                del self._channels[name]
                self._forgotten = max(self._forgotten, ch.dropped)
                forgotten.append(ch)
        self.store.pruned(self, forgotten)

    def close(self) -> None:
        """Wake every waiter; from now on waits return at once and publishing
        raises a 503 ``LongpollError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiters = set()
            for ch in self._channels.values():
                waiters |= ch.waiters
                ch.waiters = set()
        for wake in waiters:
            wake()
        self.store.close()


def _check_limit(limit: int) -> int:
    if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
        raise _bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return limit


# ---------------------------------------------------------------------------
# Stores: where a hub keeps messages besides its memory
# ---------------------------------------------------------------------------

def open_store(url: str) -> "Store":
    """The store *url* names: ``memory:``, ``sqlite:PATH`` or ``redis://host:port/db``."""
    if url in ("memory:", "memory", ""):
        return Store()
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if not path:
            raise ValueError("sqlite: needs a file, e.g. sqlite:longpoll.db")
        return SqliteStore(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    raise ValueError(f"unknown store {url!r}: use memory:, sqlite:PATH or redis://host:port/db")


class Store:
    """The interface, and ``memory:``: keeps nothing, so a restart begins a
    new history (old cursors then get ``gap``).

    A hub calls, under its lock: ``open(hub)`` once, to give back what was
    kept (``hub.history``, ``hub._seq``, messages through ``hub._apply``);
    ``append(msg)`` before a publish is acknowledged (raise to refuse it);
    ``took(channel, seq)`` when ``/receive`` hands a message out;
    ``dropped(messages)`` when retention drops some; ``pruned(hub,
    forgotten)`` now and then, after retention ran; and ``close()``.
    A *shared* store (several servers, one history) numbers messages itself:
    the hub calls its ``publish``, ``take`` and ``head`` instead, and the
    store feeds every message to ``hub._follow`` in order.
    """

    #: True when the store numbers messages for several hubs.
    shared = False
    #: What ``open_store`` was given (passwords masked).
    url = "memory:"
    #: Requests the store failed (counted by ``_unavailable``; in /metrics).
    failures = 0

    def open(self, hub: "Hub") -> None:
        pass

    def append(self, msg: Message) -> None:
        pass

    def took(self, channel: str, seq: int) -> None:
        pass

    def dropped(self, messages: list[Message]) -> None:
        pass

    def pruned(self, hub: "Hub", forgotten: list[Channel]) -> None:
        pass

    def close(self) -> None:
        pass

    def publish(self, hub: "Hub", channel: str, message: Any, title: str | None,
                priority: int | None, payload: str) -> Message:
        raise NotImplementedError

    def take(self, hub: "Hub", channel: str) -> Message | None:
        raise NotImplementedError

    def head(self) -> int:
        raise NotImplementedError


def _unavailable(store: Store, what: str, exc: Exception) -> LongpollError:
    store.failures += 1
    logger.error("%s: %s", what, exc)
    return LongpollError(HTTPStatus.SERVICE_UNAVAILABLE, f"{what}: {exc}", {"Retry-After": "1"})


class SqliteStore(Store):
    """``sqlite:PATH``: every acknowledged message is in the file (WAL mode;
    a commit per publish survives ``kill -9``; synchronous=NORMAL, so a
    power cut may lose the last ones). Cursors stay valid across restarts."""

    def __init__(self, path: str) -> None:
        self.path, self.url = path, f"sqlite:{path}"
        self._gone: list[tuple[int]] = []  # messages dropped, to delete at the next prune
        self._dropped: dict[str, int] = {}  # and each channel's newest of them

    def open(self, hub: "Hub") -> None:
        import sqlite3  # here, not at the top: some Pythons are built without it
        self._error = sqlite3.Error
        try:
            db = self.db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None,
                                           check_same_thread=False)  # used under the hub lock
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # one server per file: a second
            db.execute("PRAGMA journal_mode=WAL")         # one would number messages too
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript("""
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY, json TEXT);
                CREATE TABLE IF NOT EXISTS channels (name TEXT PRIMARY KEY,
                    dropped INTEGER DEFAULT 0, taken INTEGER DEFAULT 0);""")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('history', ?)", (hub.history,))
            meta = dict(db.execute("SELECT key, value FROM meta"))
            hub.history = meta["history"]
            hub._forgotten = int(meta.get("forgotten", 0))
            for seq, wire in db.execute("SELECT seq, json FROM messages ORDER BY seq"):
                d = json.loads(wire)  # as the wire carried it
                hub._apply(Message(seq, hub._cursor(seq), d["channel"], d["message"],
                                   d.get("title"), d.get("priority"), None, d["time"]))
                hub._seq = seq
            hub._seq = max(hub._seq, int(meta.get("seq", 0)))
            for name, dropped, taken in db.execute("SELECT * FROM channels"):
                ch = hub._channel(name)
                ch.dropped, ch.taken = max(ch.dropped, dropped), taken
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open the store {self.path}: {exc}") from None

    def append(self, msg: Message) -> None:
        try:
            self.db.execute("INSERT INTO messages VALUES (?, ?)", (msg.seq, msg.json))
        except self._error as exc:
            raise _unavailable(self, "cannot store the message", exc) from None

    def took(self, channel: str, seq: int) -> None:
        try:
            self.db.execute("INSERT INTO channels (name, taken) VALUES (?, ?) ON CONFLICT "
                            "(name) DO UPDATE SET taken = excluded.taken", (channel, seq))
        except self._error as exc:
            raise _unavailable(self, "cannot store the take", exc) from None

    def dropped(self, messages: list[Message]) -> None:
        self._gone.extend((m.seq,) for m in messages)
        self._dropped[messages[-1].channel] = messages[-1].seq

    def pruned(self, hub: "Hub", forgotten: list[Channel]) -> None:
        """Delete what retention dropped, in one transaction."""
        db = self.db
        try:
            db.execute("BEGIN")
            db.executemany("DELETE FROM messages WHERE seq = ?", self._gone)
            db.executemany("INSERT INTO channels (name, dropped) VALUES (?, ?) ON CONFLICT "
                           "(name) DO UPDATE SET dropped = excluded.dropped",
                           self._dropped.items())
            db.executemany("DELETE FROM channels WHERE name = ?", ((ch.name,) for ch in forgotten))
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           (("seq", str(hub._seq)), ("forgotten", str(hub._forgotten))))
            db.execute("COMMIT")
            self._gone.clear()
            self._dropped.clear()
        except self._error as exc:
            logger.error("cannot prune the store %s: %s", self.path, exc)
            if db.in_transaction:
                db.execute("ROLLBACK")

    def close(self) -> None:
        self.db.close()


# Redis keys (one database per deployment): the sequence and history, a
# stream per channel, the feed every server follows, and per-channel
# marks of what retention dropped and what /receive handed out.
_R_SEQ, _R_HISTORY, _R_FEED = "longpoll:seq", "longpoll:history", "longpoll:feed"
_R_STREAM, _R_DROPPED, _R_TAKEN = "longpoll:channel:", "longpoll:dropped", "longpoll:taken"
_R_FORGOTTEN = "longpoll:forgotten"  # the newest message of a channel since forgotten
_R_FEED_LENGTH = 10_000  # feed entries kept; a server further behind reads the streams

_R_PUBLISH = """
local history = redis.call('GET', KEYS[5])
if not history then
  redis.call('SET', KEYS[5], ARGV[8])  -- Redis lost its data: carry on with ours
elseif history ~= ARGV[8] then
  return redis.error_reply('this Redis database holds another history')
end
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[9]) then
  redis.call('SET', KEYS[1], ARGV[9])  -- Redis lost its data: never reuse a number
end
local seq = redis.call('INCR', KEYS[1])
local id = seq .. '-0'
local fields = {'t', ARGV[2], 'm', ARGV[3], 'ti', ARGV[4], 'pr', ARGV[5]}
redis.call('XADD', KEYS[2], id, unpack(fields))
local over = redis.call('XLEN', KEYS[2]) - tonumber(ARGV[6])
if over > 0 then
  local old = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', over)
  redis.call('XTRIM', KEYS[2], 'MAXLEN', ARGV[6])
  redis.call('HSET', KEYS[4], ARGV[1], string.match(old[#old][1], '^%d+'))
end
table.insert(fields, 'c')
table.insert(fields, ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], id, unpack(fields))
return seq
"""
_R_TAKE = """
local taken = redis.call('HGET', KEYS[2], ARGV[1]) or '0'
local next = redis.call('XRANGE', KEYS[1], '(' .. taken .. '-0', '+', 'COUNT', 1)
if #next == 0 then return false end
redis.call('HSET', KEYS[2], ARGV[1], string.match(next[1][1], '^%d+'))
return next[1]
"""
_R_TRIM = """
redis.call('XTRIM', KEYS[1], 'MINID', (tonumber(ARGV[2]) + 1) .. '-0')
if tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
if ARGV[3] == '1' and redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  if tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[2]) then
    redis.call('SET', KEYS[4], ARGV[2])
  end
end
"""


class RedisStore(Store):
    """``redis://host:port/db``: several servers share channels. Redis
    numbers the messages (one sequence, one history, so any server's cursor
    is good on all), keeps a stream per channel (``XADD`` with ``MAXLEN``),
    and appends each message to a feed that one thread per server follows
    (``XREAD BLOCK``) into its hub: parked clients cost no Redis
    connection, and reads are answered from memory. Needs ``pip install
    redis`` (imported here only)."""

    shared = True

    def __init__(self, url: str) -> None:
        try:
            import redis
        except ImportError:
            raise ValueError("the redis store needs the redis package: "
                             "pip install 'longpoll[redis]'") from None
        self._redis = redis
        self.url = re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._feed_client = redis.Redis.from_url(url, socket_timeout=10,
                                                 socket_connect_timeout=5)
        self._dropped: dict[str, int] = {}  # per channel: dropped here, to trim in Redis
        self._publish = self.client.register_script(_R_PUBLISH)
        self._take = self.client.register_script(_R_TAKE)
        self._trim = self.client.register_script(_R_TRIM)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._feed_lock = threading.Lock()  # one reader of the feed applies at a time
        self._last = 0  # the last message of the feed applied
        self._feed_id: int | None = None  # the feed connection's id, to unblock it
        self._retry_at = 0.0  # after a failure, when to ask Redis again

    def open(self, hub: "Hub") -> None:
        try:
            self.client.set(_R_HISTORY, hub.history, nx=True)
            hub.history = self.client.get(_R_HISTORY).decode()
            self._catch_up(hub)
            self._feed_id = self._feed_client.client_id()
        except self._redis.RedisError as exc:
            raise ValueError(f"cannot use the store {self.url}: {exc}") from None
        self._thread = threading.Thread(target=self._follow, args=(hub,),
                                        name="longpoll-redis-feed", daemon=True)
        self._thread.start()

    def _ask(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call Redis; after a failure, refuse at once (503) for a second,
        so an unreachable Redis cannot hold up the server's loop each time."""
        if time.monotonic() < self._retry_at:
            self.failures += 1
            raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE, "the store is unavailable",
                                {"Retry-After": "1"})
        try:
            return call(*args, **kwargs)
        except self._redis.RedisError as exc:
            self._retry_at = time.monotonic() + 1.0
            raise _unavailable(self, "the store is unavailable", exc) from None

    def head(self) -> int:
        return int(self._ask(self.client.get, _R_SEQ) or 0)

    def publish(self, hub: "Hub", channel: str, message: Any, title: str | None,
                priority: int | None, payload: str) -> Message:
        at = round(time.time(), 3)
        seq = self._ask(self._publish,
                        keys=[_R_SEQ, _R_STREAM + channel, _R_FEED, _R_DROPPED, _R_HISTORY],
                        args=[channel, repr(at), payload, _encode(title), _encode(priority),
                              hub.retention, _R_FEED_LENGTH, hub.history, hub._seq])
        hub.published += 1
        for _ in range(3):  # read the feed up to it, so a read now sees it
            if hub._seq >= seq or hub._closed:
                break
            try:
                self._read_feed(hub, self.client, None)
            except self._redis.RedisError:
                break  # it is taken; the feed thread brings it when it can
        return Message(seq, hub._cursor(seq), channel, message, title, priority, payload, at)

    def take(self, hub: "Hub", channel: str) -> Message | None:
        entry = self._ask(self._take, keys=[_R_STREAM + channel, _R_TAKEN], args=[channel])
        return None if not entry else self._message(hub, channel, *entry)

    def dropped(self, messages: list[Message]) -> None:
        self._dropped[messages[-1].channel] = messages[-1].seq

    def pruned(self, hub: "Hub", forgotten: list[Channel]) -> None:
        """Apply age retention to the streams too (any server may: it is
        idempotent), and delete the streams of forgotten channels."""
        gone = {ch.name: ch.dropped for ch in forgotten}
        trims, self._dropped = {**self._dropped, **gone}, {}
        try:
            for name, seq in list(trims.items()):
                self._ask(self._trim, keys=[_R_STREAM + name, _R_DROPPED, _R_TAKEN, _R_FORGOTTEN],
                          args=[name, seq, int(name in gone)])
                del trims[name]
        except LongpollError:  # logged; the next prune tries again
            for name, seq in trims.items():
                self._dropped[name] = max(seq, self._dropped.get(name, 0))

    def close(self) -> None:
        self._stop.set()
        thread, deadline = self._thread, time.monotonic() + 5.0
        while (thread is not None and thread.is_alive() and time.monotonic() < deadline
               and thread is not threading.current_thread()):
            try:  # end its XREAD now (again, if it had not begun one yet)
                if self._feed_id is not None:
                    self.client.client_unblock(self._feed_id)
            except self._redis.RedisError:
                pass
            thread.join(0.05)
        self._feed_client.close()
        self.client.close()

    # -- following the feed ---------------------------------------------------

    @staticmethod
    def _message(hub: "Hub", channel: str, entry_id: bytes,
                 fields: dict[bytes, bytes] | list[bytes]) -> Message:
        if isinstance(fields, list):  # a script's reply: [name, value, ...]
            fields = dict(zip(fields[::2], fields[1::2]))
        seq = int(entry_id.split(b"-")[0])
        payload = fields[b"m"].decode()
        return Message(seq, hub._cursor(seq), channel, json.loads(payload),
                       json.loads(fields[b"ti"]), json.loads(fields[b"pr"]), payload,
                       float(fields[b"t"]))

    def _catch_up(self, hub: "Hub") -> None:
        """Read every channel's stream past the hub's head (at start, and
        when the feed has moved on beyond what this server saw)."""
        client = self.client
        after, head = hub._seq, int(client.get(_R_SEQ) or 0)
        messages: list[Message] = []
        for key in client.scan_iter(match=_R_STREAM + "*", count=1000):
            channel = key.decode()[len(_R_STREAM):]
            for entry_id, fields in client.xrange(key, f"({after}-0", f"{head}-0"):
                messages.append(self._message(hub, channel, entry_id, fields))
        dropped = {k.decode(): int(v) for k, v in client.hgetall(_R_DROPPED).items()
                   if int(v) > after}
        messages.sort(key=_seq_of)
        hub._forgotten = max(hub._forgotten, int(client.get(_R_FORGOTTEN) or 0))
        hub._follow(messages, head, dropped)
        self._last = max(head, after)  # (head is lower if Redis lost its data)

    def _read_feed(self, hub: "Hub", client: Any, block: int | None) -> None:
        """Apply the feed's next messages, in order (from the feed thread,
        or from a publisher that wants its own message applied now)."""
        reply = client.xread({_R_FEED: f"{self._last}-0"}, count=1000, block=block)
        with self._feed_lock:
            messages = []
            for _, entries in reply:
                for entry_id, fields in entries:
                    seq = int(entry_id.split(b"-")[0])
                    if seq <= self._last:
                        continue  # the other reader applied it
                    if seq != self._last + 1:  # the feed was trimmed past us
                        hub._follow(messages)
                        self._catch_up(hub)
                        return
                    messages.append(self._message(hub, fields[b"c"].decode(),
                                                  entry_id, fields))
                    self._last = seq
            hub._follow(messages)

    def _follow(self, hub: "Hub") -> None:
        """The feed thread: apply each new message in order; after a lost
        connection, resume where it stopped (or catch up from the streams)."""
        failures = 0
        while not self._stop.is_set():
            try:
                if failures:  # a new connection
                    self._feed_id = self._feed_client.client_id()
                self._read_feed(hub, self._feed_client, 1000)
                if failures:
                    logger.warning("following %s again", self.url)
                failures = 0
            except Exception as exc:
                if self._stop.is_set():
                    return  # close() cut the connection
                if not isinstance(exc, self._redis.RedisError):
                    logger.exception("error following the store %s", self.url)
                elif not failures:
                    logger.warning("lost the store %s (%s); retrying", self.url, exc)
                failures += 1
                self._stop.wait(min(5.0, 0.1 * 2 ** failures))


# ---------------------------------------------------------------------------
# Accounting: who may do what
# ---------------------------------------------------------------------------

class Auth:
    """Tokens and the channels they may read or write (``serve --auth FILE``)::

        {"tokens": {"s3cret": {"read": ["news", "ci-*"], "write": ["ci-*"]}},
         "anonymous": {"read": ["public"], "write": []}}

    Patterns are ``fnmatch`` globs. A token may do what it lists and what
    anyone may. No credentials and not allowed: 401; an unknown token: 401;
    a known token not allowed: 403. Tokens are compared in constant time.
    """

    ACTIONS = ("read", "write")

    def __init__(self, tokens: dict[str, dict[str, list[str]]],
                 anonymous: dict[str, list[str]] | None = None) -> None:
        self.tokens = [(token.encode(), rules) for token, rules in tokens.items()]
        self.anonymous = anonymous or {}

    @classmethod
    def from_file(cls, path: str) -> "Auth":
        """Read and check *path*; raise ValueError naming what is wrong."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as exc:
            raise ValueError(f"cannot read the auth file {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"the auth file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) - {"tokens", "anonymous"}:
            raise ValueError(f'{path}: expected an object with "tokens" and "anonymous"')
        tokens = data.get("tokens", {})
        if not isinstance(tokens, dict):
            raise ValueError(f'{path}: "tokens" must map each token to its rules')
        for token, rules in tokens.items():
            if not token:
                raise ValueError(f"{path}: an empty token")
            cls._check_rules(rules, f"{path}: token …{token[-2:]}")
        anonymous = data.get("anonymous", {})
        cls._check_rules(anonymous, f'{path}: "anonymous"')
        return cls(tokens, anonymous)

    @classmethod
    def _check_rules(cls, rules: Any, where: str) -> None:
        if not isinstance(rules, dict) or set(rules) - set(cls.ACTIONS):
            raise ValueError(f'{where}: expected {{"read": [...], "write": [...]}}')
        for action, patterns in rules.items():
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"{where}: {action!r} must be a list of channel patterns")

    @staticmethod
    def _allows(rules: dict[str, list[str]], action: str, channel: str) -> bool:
        return any(fnmatch.fnmatchcase(channel, p) for p in rules.get(action, ()))

    def check(self, token: str | None, action: str, channels: Iterable[str]) -> None:
        """Raise a 401 or 403 ``LongpollError`` unless *token* may *action* all *channels*."""
        rules = None
        if token:
            given = token.encode()
            for known, known_rules in self.tokens:  # every one compared: constant time
                if hmac.compare_digest(given, known):
                    rules = known_rules
            if rules is None:
                raise LongpollError(HTTPStatus.UNAUTHORIZED, "invalid token",
                                    {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        for channel in channels:
            if self._allows(self.anonymous, action, channel):
                continue
            if rules is None:
                raise LongpollError(HTTPStatus.UNAUTHORIZED,
                                    f"a token is needed to {action} {channel}",
                                    {"WWW-Authenticate": "Bearer"})
            if not self._allows(rules, action, channel):
                raise LongpollError(HTTPStatus.FORBIDDEN,
                                    f"this token may not {action} {channel}")


class RateLimit:
    """Token buckets, one per client key: *rate* per second, up to *burst*."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, when)

    def take(self, key: str) -> float:
        """Spend one token of *key*: 0.0 if it had one, else seconds to wait."""
        now = time.monotonic()
        tokens, then = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return 0.0
        self.buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate

    def prune(self) -> None:
        """Forget buckets that have filled up again (they would start full)."""
        now = time.monotonic()
        self.buckets = {k: (t, w) for k, (t, w) in self.buckets.items()
                        if t + (now - w) * self.rate < self.burst}


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------

def _json_body(obj: Any) -> bytes:
    return _encode(obj).encode()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for all requests (json.loads with options builds one per call).
_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


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


def _sse_events(batch: Batch) -> bytes:
    """A batch as Server-Sent Events: a gap event, then one event per message."""
    parts = [b"event: gap\ndata: {}\n\n"] if batch.gap else []
    parts += [b"id: " + m.id.encode() + b"\ndata: " + m.json + b"\n\n" for m in batch.messages]
    return b"".join(parts)


_STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}"
                 for status in HTTPStatus}


def _response(status: int, body: bytes, content_type: str, date: str,
              headers: Iterable[tuple[str, str]] = (), connection: str | None = None,
              head_only: bool = False) -> bytes:
    """A whole HTTP/1.1 response as bytes, ready for one send."""
    lines = [_STATUS_LINES[status],
             f"Server: longpoll/{__version__}",
             f"Date: {date}",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}",
             "Cache-Control: no-store"]
    lines += [f"{k}: {v}" for k, v in headers]
    if connection:
        lines.append(f"Connection: {connection}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


class _Headers(http.client.HTTPMessage):
    """The HTTPMessage http.server would build, filled by ``Handler``'s fast
    parser, with lookups from a dict instead of a scan through the email
    package (which cost a third of each request's time)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self._headers = pairs
        self._index: dict[str, list[str]] = {}
        for name, value in pairs:
            self._index.setdefault(name.lower(), []).append(value)

    def get(self, name: str, failobj: Any = None) -> Any:
        values = self._index.get(name.lower())
        return values[0] if values else failobj

    def get_all(self, name: str, failobj: Any = None) -> Any:
        values = self._index.get(name.lower())
        return list(values) if values else failobj

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def get_content_type(self) -> str:
        value = self.get("content-type")
        ctype = "" if value is None else value.split(";", 1)[0].strip().lower()
        return ctype if ctype.count("/") == 1 else "text/plain"


def _parse_query(query: str) -> dict[str, str]:
    """``dict(parse_qsl(query, keep_blank_values=True))``, faster."""
    params = {}
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            if "%" in part or "+" in part:
                name, value = urllib.parse.unquote_plus(name), urllib.parse.unquote_plus(value)
            params[name] = value
    return params


_UNSET = object()


class Handler(BaseHTTPRequestHandler):
    """Parses and answers the requests of one connection (PROTOCOL.md).

    The server's loop owns the socket. It gathers one whole request and calls
    ``handle_buffered(raw)``, which runs ``http.server``'s own parsing on it
    and returns the response bytes. A poll with nothing to return parks
    instead (``self.parked`` is then true) and the loop answers it later.
    Reaches its hub and settings as ``self.server``.

    Methods that may be overridden: ``route`` (add paths), ``respond`` (add
    headers) and the ``handle_*`` methods that serve each route. Code in a
    handler runs on the server's loop (or, for a large body, on a worker):
    it must not block; park a request with ``self.server.poll`` instead.
    """

    protocol_version = "HTTP/1.1"
    server_version = f"longpoll/{__version__}"
    sys_version = ""
    #: Longest request line accepted, in bytes; longer gets 414.
    max_request_line = 8192
    #: path -> {method: name of the method that serves it}.
    routes = {
        "/": {"GET": "handle_index", "HEAD": "handle_index"},
        "/health": {"GET": "handle_health", "HEAD": "handle_health"},
        "/metrics": {"GET": "handle_metrics"},
        "/send": {"POST": "handle_send"},
        "/receive": {"GET": "handle_receive"},
    }
    #: Methods of /channels/{names}.
    channel_routes = {"GET": "handle_poll", "POST": "handle_publish"}

    server: "Server"

    def __init__(self, server: "Server", client_address: tuple, conn: Any = None) -> None:
        # Deliberately not BaseRequestHandler.__init__, which would read the
        # socket itself: here the server's loop does the I/O.
        self.server = server
        self.client_address = client_address
        self.conn = conn            # the server's record of the connection
        self.close_connection = False
        self.parked = False
        self.wfile = io.BytesIO()
        self._body_unread = False
        self._started = time.monotonic()
        self.route_name = "invalid"  # which route answered, for /metrics
        self._key: Any = _UNSET

    def handle_buffered(self, raw: bytes) -> bytes:
        """Answer the one request in *raw*; return the response (b"" if parked)."""
        self.rfile = io.BytesIO(raw)
        self.parked = False
        self.handle_one_request()
        return self.take_output()

    def take_output(self) -> bytes:
        """What the handler has written since the last call."""
        data = self.wfile.getvalue()
        if data:
            self.wfile = io.BytesIO()
        return data

    def handle_one_request(self) -> None:
        """Parse the request in ``self.rfile`` with http.server, and answer it."""
        self.close_connection = True
        self._body_unread = False
        self._started = time.monotonic()
        self.route_name = "invalid"  # until dispatch knows better
        line = self.rfile.readline(self.max_request_line + 1)
        if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: ignore one empty line
            line = self.rfile.readline(self.max_request_line + 1)
        self.raw_requestline = line
        if len(line) > self.max_request_line:
            self.refuse(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
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

    def parse_request(self) -> bool:
        """http.server's parse_request, with a fast path for the common case:
        an HTTP/1.0 or 1.1 request line and plain ``Name: value`` headers.
        Anything else (folded lines, bare LFs, too many headers, other
        versions) goes to http.server's own parser, errors and all."""
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if not words:  # http.server would return False without answering
            self.refuse(HTTPStatus.BAD_REQUEST, "empty request line")
            return False
        rfile = self.rfile
        start = rfile.tell()
        if len(words) == 3 and words[2] in ("HTTP/1.1", "HTTP/1.0"):
            data = rfile.getvalue()
            if data.startswith(b"\r\n", start):
                lines, body = [], start + 2
            else:
                end = data.find(b"\r\n\r\n", start)
                lines = data[start:end].split(b"\r\n") if end > 0 else None
                body = end + 4
            pairs = []
            if lines is not None and len(lines) <= 100:
                for line in lines:
                    name, sep, value = line.partition(b":")
                    if (not sep or not name or line[:1] in b" \t" or b" " in name
                            or b"\n" in line or b"\r" in line or len(line) > 65536):
                        break
                    pairs.append((name.decode("latin-1"),
                                  value.decode("latin-1").lstrip(" \t")))
                else:
                    self.requestline = requestline
                    self.command, self.path, self.request_version = words
                    if self.path.startswith("//"):  # as http.server does (gh-87389)
                        self.path = "/" + self.path.lstrip("/")
                    self.headers = headers = _Headers(pairs)
                    conntype = headers.get("Connection", "").lower()
                    self.close_connection = (conntype == "close" or words[2] == "HTTP/1.0"
                                             and conntype != "keep-alive")
                    rfile.seek(body)
                    return True
        rfile.seek(start)
        return super().parse_request()

    def refuse(self, status: HTTPStatus, message: str) -> None:
        """Answer a request that cannot be parsed at all, and close."""
        self.raw_requestline = getattr(self, "raw_requestline", b"")
        self.requestline = self.raw_requestline[:80].decode("latin-1").rstrip("\r\n")
        self.command, self.request_version = None, "HTTP/1.1"
        self.send_error(status, message)

    # -- answering ------------------------------------------------------------

    def cors_headers(self) -> tuple[tuple[str, str], ...]:
        """CORS headers for this request's Origin, if the server allows it."""
        allowed = self.server.cors_origins
        origin = self.headers.get("Origin") if allowed else None
        if not origin:
            return ()
        if "*" in allowed:
            return (("Access-Control-Allow-Origin", "*"),)
        if origin in allowed:
            return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
        return ()

    def connection_header(self) -> str | None:
        """The Connection header this response needs, if any."""
        if self.close_connection or self.server.closing:
            self.close_connection = True
            return "close"
        if self.request_version == "HTTP/1.0":
            return "keep-alive"
        return None

    def respond(self, status: int, body: bytes, *,
                content_type: str = "application/json",
                headers: Iterable[tuple[str, str]] = ()) -> None:
        """Write the whole response (status, headers, body) at once."""
        headers = (*headers, *self.cors_headers()) if self.server.cors_origins else headers
        self.wfile.write(_response(status, body, content_type, self.server.date(), headers,
                                   self.connection_header(), self.command == "HEAD"))
        self.log_request(int(status), len(body))

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
        status = HTTPStatus(code)
        self.respond_error(LongpollError(status, message or status.phrase.lower()))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Count the answer (for /metrics) and write the access-log line."""
        with self.server._count_lock:  # workers answer some requests too
            self.server.requests[self.route_name, int(code)] += 1
        self.log_line(code, size)

    def log_line(self, code: int | str, size: int | str) -> None:
        """The access-log line alone; tokens in the query are masked."""
        if logger.isEnabledFor(logging.INFO):
            elapsed = (time.monotonic() - self._started) * 1000
            line = self.requestline
            if "token=" in line:  # tokens are never logged
                line = re.sub(r"([?&]token=)[^&\s]*", r"\1***", line)
            logger.info('%s "%s" %s %s %.1fms', self.client_address[0], line, code, size,
                        elapsed)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s: " + format, self.client_address[0], *args)

    # -- routing --------------------------------------------------------------

    def route(self, path: str) -> tuple[dict[str, str], tuple]:
        """Map *path* to {method: handler name} and the handler's arguments."""
        if path.startswith("/channels/"):
            if path.endswith("/events"):
                return {"GET": "handle_events"}, (_channels_in_path(path[10:-7]),)
            return self.channel_routes, (_channels_in_path(path[10:]),)
        methods = self.routes.get(path)
        if methods is None:
            raise LongpollError(HTTPStatus.NOT_FOUND, f"no such path: {path}")
        return methods, ()

    def dispatch(self) -> None:
        self._body_unread = self._has_body()
        try:
            path, _, query = self.path.partition("?")
            self.query = _parse_query(query)
            self._key = _UNSET
            methods, args = self.route(path)
            if self.command == "OPTIONS" and self.cors_headers():
                self.respond_preflight(methods)
                return
            name = methods.get(self.command)
            if name is None:
                allow = ", ".join(methods)
                raise LongpollError(HTTPStatus.METHOD_NOT_ALLOWED,
                                    f"{self.command} is not allowed here; use {allow}",
                                    {"Allow": allow})
            self.route_name = name[7:]  # "handle_poll" -> "poll"
            if name not in ("handle_health", "handle_metrics"):
                self.limit(self.server.request_limit, "requests")
            getattr(self, name)(*args)
        except LongpollError as error:
            self.respond_error(error)
        except Exception:
            logger.exception("error serving %r", self.requestline)
            self.respond_error(LongpollError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                             "internal server error"))

    def respond_preflight(self, methods: dict[str, str]) -> None:
        """A CORS preflight from an allowed origin: 204 with what may follow."""
        requested = self.headers.get("Access-Control-Request-Headers")
        self.respond(HTTPStatus.NO_CONTENT, b"", headers=(
            ("Access-Control-Allow-Methods", ", ".join([*methods, "OPTIONS"])),
            ("Access-Control-Allow-Headers", requested or "Content-Type, Authorization, "
             "Last-Event-ID, Title, Priority, X-Title, X-Priority"),
            ("Access-Control-Max-Age", "86400")))

    # Each method name the protocol knows is routed; route() says 405.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = dispatch

    # -- request parts --------------------------------------------------------

    def _has_body(self) -> bool:
        return bool(self.headers.get("Transfer-Encoding")
                    or self.headers.get("Content-Length", "0").strip() not in ("", "0"))

    def handle_expect_100(self) -> bool:
        return True  # the server's loop has answered "100 Continue" (or 413) already

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
            if not (length.isascii() and length.isdigit()):
                raise _bad_request("Content-Length must be one whole number")
            if int(length) > limit:
                raise LongpollError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
            body = self.rfile.read(int(length))
            if len(body) < int(length):
                raise _bad_request("the body is shorter than its Content-Length")
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
                data = _decode(body.decode("utf-8"))
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError too
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

    def token(self) -> str | None:
        """The credentials sent: ``Authorization: Bearer``, else ``?token=``."""
        header = self.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            return header[7:].strip()
        return self.query.get("token")

    def client_key(self) -> str | None:
        """Who is asking, for limits: the token, else the address (from
        X-Forwarded-For with --trust-proxy). None for loopback: exempt.
        Worked out once per request."""
        if self._key is not _UNSET:
            return self._key
        self._key = self._client_key()
        return self._key

    def _client_key(self) -> str | None:
        token = self.token()
        if token:
            return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
        address = self.client_address[0]
        if self.server.trust_proxy:
            forwarded = self.headers.get("X-Forwarded-For", "")
            address = forwarded.rsplit(",", 1)[-1].strip() or address
        return None if address in ("127.0.0.1", "::1") or address.startswith("127.") else address

    def limit(self, limiter: "RateLimit | None", what: str) -> None:
        """429 with Retry-After when this client has spent its budget."""
        key = self.client_key() if limiter is not None else None
        if key is not None:
            wait = limiter.take(key)
            if wait:
                self.server.rate_limited += 1
                raise LongpollError(HTTPStatus.TOO_MANY_REQUESTS,
                                    f"too many {what}: slow down",
                                    {"Retry-After": str(max(1, math.ceil(wait)))})

    def authorize(self, action: str, names: Iterable[str]) -> None:
        """Raise 401/403 unless this request may *action* the channels."""
        auth = self.server.auth
        if auth is not None:
            auth.check(self.token(), action, names)

    def handle_publish(self, names: tuple[str, ...]) -> None:
        if len(names) != 1:
            raise _bad_request("publish to one channel at a time")
        self.authorize("write", names)
        self.limit(self.server.publish_limit, "publishes")
        message, title, priority = self.parse_publish_body()
        msg = self.server.hub.publish(names[0], message, title=title, priority=priority)
        self.respond_json(HTTPStatus.CREATED,
                          {"id": msg.id, "channel": msg.channel, "time": msg.time})

    def handle_poll(self, names: tuple[str, ...]) -> None:
        if "text/event-stream" in self.headers.get("Accept", ""):
            self.handle_events(names)
            return
        since = self.query.get("since") or None  # an empty since means absent
        self.authorize("read", names)
        self.server.poll(self, names, since, self.param_timeout(), self.param_limit())

    def handle_events(self, names: tuple[str, ...]) -> None:
        """Server-Sent Events: resume from Last-Event-ID, else ``since``."""
        since = self.headers.get("Last-Event-ID") or self.query.get("since") or None
        self.authorize("read", names)
        self.server.stream(self, names, since)

    def handle_send(self) -> None:
        self.authorize("write", (DEFAULT_CHANNEL,))
        self.limit(self.server.publish_limit, "publishes")
        message, title, priority = self.parse_publish_body()
        self.server.hub.publish(DEFAULT_CHANNEL, message, title=title, priority=priority)
        self.respond_json(HTTPStatus.OK, {"status": "Message sent."})

    def handle_receive(self) -> None:
        self.authorize("read", (DEFAULT_CHANNEL,))
        self.server.take(self, DEFAULT_CHANNEL, self.param_timeout())

    def handle_health(self) -> None:
        self.respond_json(HTTPStatus.OK, {
            "status": "ok", "waiting": self.server.waiting,
            "channels": self.server.hub.channel_count,
            "uptime": round(time.monotonic() - self.server.started, 3)})

    def handle_metrics(self) -> None:
        """Prometheus text exposition format, version 0.0.4."""
        self.respond(HTTPStatus.OK, self.server.metrics_text().encode(),
                     content_type="text/plain; version=0.0.4; charset=utf-8")

    def handle_index(self) -> None:
        """The live page for browsers; a short help text for curl and friends."""
        if "text/html" in self.headers.get("Accept", ""):
            self.respond(HTTPStatus.OK, INDEX_HTML.encode(), content_type="text/html; charset=utf-8",
                         headers=(("Content-Security-Policy",
                                   "default-src 'self'; script-src 'unsafe-inline'; "
                                   "style-src 'unsafe-inline'"),))
        else:
            self.respond(HTTPStatus.OK, INDEX_TEXT.format(version=__version__).encode(),
                         content_type="text/plain; charset=utf-8")


class _Connection:
    """The loop's record of one client connection."""

    __slots__ = ("sock", "handler", "inbuf", "outbuf", "closed", "busy", "group",
                 "taking", "timer", "deadline", "close_after", "linger",
                 "continue_sent", "partial", "stream", "owner", "handshaking")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.handler: Handler
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closed = False
        self.busy = False            # a worker is handling its request
        self.group: _Group | None = None  # parked polls waiting together
        self.taking = False          # parked on /receive
        self.timer: int | None = None     # id of its live entry in the timer heap
        self.deadline: float | None = None  # idle, slow request or slow reader
        self.close_after = False     # close once the output is sent
        self.linger = 0              # bytes still to read and drop before closing
        self.continue_sent = False
        self.partial = 0.0           # when the request now arriving began
        self.stream = False          # an event stream (SSE): answered until it closes
        self.owner: str | None = None  # the client key its parked request counts against
        self.handshaking = False     # TLS: the handshake is not done yet


class _Group:
    """Parked polls with the same channels, position and limit: they get the
    same answer, so it is read and encoded once and written to each."""

    __slots__ = ("key", "conns", "cancel")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.conns: dict[_Connection, None] = {}
        self.cancel: Callable[[], None] = lambda: None


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to the hard limit (each
    client is one), log the result, and return it (0 where unknown)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > 1 << 20:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ImportError, ValueError, OSError):
        return 0
    clients = max(0, soft - 64)
    if clients < 10_000:
        logger.warning("the open-file limit (%d) caps clients at about %d; raise it with "
                       "`ulimit -n` or LimitNOFILE= to serve more", soft, clients)
    else:
        logger.info("open-file limit %d: room for about %d clients at once", soft, clients)
    return soft


class Server:
    """A longpoll HTTP server around a ``Hub`` (``self.hub``).

    One thread runs a ``selectors`` loop that owns every socket: waiting
    clients cost a socket and a small record, not a thread. Idle keep-alive
    connections and parked polls wait in the loop; a publish wakes the
    polls parked at the same position together, and their answer is read
    and encoded once. Requests with large bodies are decoded by a small
    worker pool. ``start()`` runs the loop in a daemon thread;
    ``serve_forever()`` runs it in the calling one; ``close()`` answers every
    waiting client, closes every connection and frees the port.

    Class attributes configure it; keyword arguments override the rest.
    Methods that may be overridden: ``service_actions`` (runs about once a
    second in the loop), ``poll`` and ``take`` (how requests park).
    """

    #: Listen backlog: room for thousands of clients reconnecting at once.
    request_queue_size = 4096
    #: Largest request head (request line and headers) in bytes; more is 431.
    max_head = 64 * 1024
    #: Bodies larger than this are decoded by a worker, not the loop.
    inline_body_limit = 64 * 1024
    #: Seconds between housekeeping sweeps (idle connections, retention).
    sweep_interval = 1.0
    #: During a burst, parked polls are answered at most once per this many
    #: seconds, so each answer carries a batch instead of one message; a
    #: poll is never held back longer than this. 0 turns it off.
    coalesce = 0.005
    #: Seconds between keepalive comments on event streams (SSE).
    keepalive = 15.0

    def __init__(self, address: tuple[str, int] = (DEFAULT_HOST, DEFAULT_PORT),
                 hub: Hub | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, max_timeout: float = MAX_TIMEOUT,
                 max_body: int = MAX_BODY, read_timeout: float = 30.0,
                 cors_origins: Iterable[str] = (), auth: Auth | None = None,
                 publish_rate: float | None = DEFAULT_PUBLISH_RATE,
                 publish_burst: int = DEFAULT_PUBLISH_BURST,
                 request_rate: float | None = DEFAULT_REQUEST_RATE,
                 request_burst: int = DEFAULT_REQUEST_BURST,
                 max_waiting: int = DEFAULT_MAX_WAITING,
                 max_waiting_per_client: int = DEFAULT_MAX_WAITING_PER_CLIENT,
                 trust_proxy: bool = False, ssl_context: Any = None, workers: int = 4,
                 handler_class: type[Handler] = Handler) -> None:
        #: The hub holding this server's channels.
        self.hub = hub if hub is not None else Hub()
        #: Hold, in seconds, of a long-poll that names no timeout.
        self.default_timeout = timeout
        #: The longest hold a client may ask for.
        self.max_timeout = max_timeout
        #: Largest request body accepted, in bytes (413 beyond).
        self.max_body = max_body
        #: Seconds a connection may idle between requests, take to send one,
        #: or take to read an answer, before it is closed.
        self.read_timeout = read_timeout
        #: Who may read and write which channels (None: everyone, everything).
        self.auth = auth
        #: Token buckets per client (None: no limit); loopback is exempt.
        self.publish_limit = RateLimit(publish_rate, publish_burst) if publish_rate else None
        self.request_limit = RateLimit(request_rate, request_burst) if request_rate else None
        #: Parked requests allowed at once, in all and per client (503 beyond).
        self.max_waiting, self.max_waiting_per_client = max_waiting, max_waiting_per_client
        #: Read the client's address from X-Forwarded-For (set by your proxy).
        self.trust_proxy = trust_proxy
        #: An ``ssl.SSLContext`` to serve HTTPS with (see ``tls_context``).
        self.ssl_context = ssl_context
        self.rate_limited = 0
        self._parked_by: collections.Counter[str] = collections.Counter()
        #: Origins whose pages may call this server from a browser ("*": any).
        self.cors_origins = frozenset(cors_origins)
        self.handler_class = handler_class
        self.started = time.monotonic()
        self.closing = False
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(self.request_queue_size)
            self.socket.setblocking(False)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pending: collections.deque[Callable[[], None]] = collections.deque()
        self._woken = False
        self._connections: set[_Connection] = set()
        self._groups: dict[tuple, _Group] = {}
        self._fired: dict[_Group, None] = {}   # groups to answer at the next fan-out
        self._last_fanout = 0.0
        self._streams = 0
        self._next_keepalive = 0.0
        #: Requests answered, by (route, status).
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self._count_lock = threading.Lock()
        #: Messages delivered to clients (one message to ten clients: ten).
        self.delivered = 0
        self._takers: collections.deque[_Connection] = collections.deque()
        self._taker_watch: Callable[[], None] | None = None
        self._parked = 0
        self._timers: list[tuple[float, int, _Connection]] = []
        self._timer_ids = itertools.count()
        self._stale = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "longpoll-worker")
        self._loop_thread: int | None = None
        self._stopped = threading.Event()
        self._stopped.set()
        self._shutdown_request = False
        self._closed_all: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._next_sweep = 0.0
        self._next_prune = 0.0
        self._date = (0, "")

    # -- public surface ---------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:5000``."""
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    @property
    def waiting(self) -> int:
        """How many requests are parked right now."""
        return self._parked

    def metrics_text(self) -> str:
        """The server's counters in Prometheus text format."""
        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
            lines.append(f"# HELP longpoll_{name} {help_text}")
            lines.append(f"# TYPE longpoll_{name} {kind}")
            lines.extend(f"longpoll_{name}{labels} {value}" for labels, value in samples)

        lines: list[str] = []
        metric("waiting_clients", "gauge", "Requests parked right now (polls and streams).",
               [("", self.waiting)])
        metric("connections", "gauge", "Open client connections.", [("", len(self._connections))])
        metric("channels", "gauge", "Channels the hub holds.", [("", self.hub.channel_count)])
        metric("messages_published_total", "counter", "Messages published.",
               [("", self.hub.published)])
        metric("messages_delivered_total", "counter",
               "Messages delivered to clients, once per client.", [("", self.delivered)])
        metric("requests_total", "counter", "Requests answered, by route and status.",
               [(f'{{route="{route}",status="{status}"}}', count)
                for (route, status), count in sorted(self.requests.items())])
        metric("rate_limited_total", "counter", "Requests refused with 429.",
               [("", self.rate_limited)])
        metric("store_failures_total", "counter",
               "Times the store (sqlite, Redis) failed a request (answered 503).",
               [("", self.hub.store.failures)])
        metric("uptime_seconds", "gauge", "Seconds since the server started.",
               [("", round(time.monotonic() - self.started, 3))])
        return "\n".join(lines) + "\n"

    def date(self) -> str:
        """The Date header's value, formatted once a second."""
        now = int(time.time())
        if now != self._date[0]:
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        return self._date[1]

    def start(self) -> "Server":
        """Serve from a daemon thread; return self (so ``make_server().start()``)."""
        self._stopped.clear()
        self._thread = threading.Thread(target=self.serve_forever,
                                        name="longpoll-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, poll_interval: float = 1.0) -> None:
        """Run the loop in this thread until ``shutdown()`` or ``close()``."""
        self._stopped.clear()
        self._loop_thread = threading.get_ident()
        self._shutdown_request = False
        selector = self._selector
        selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        if self._accepting:
            selector.register(self.socket, selectors.EVENT_READ, self._accept)
        try:
            while not self._shutdown_request:
                events = selector.select(self._select_timeout(poll_interval))
                for count, (key, mask) in enumerate(events, 1):
                    self._on_event(key.data, mask)
                    if not count & 255 and (self._pending or self._fired):
                        # A long round (thousands of re-polls): let a
                        # publish made meanwhile reach its subscribers now.
                        self._run_pending()
                        self._fan_out()
                self._run_pending()
                if self._fired:
                    self._fan_out()
                self._run_timers()
                if self._closed_all is not None and not self._connections:
                    self._closed_all.set()
        finally:
            for sock in (self._wake_r, self.socket):
                try:
                    selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
            self._loop_thread = None
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop the loop and wait for it (connections stay open: ``close()``)."""
        self._shutdown_request = True
        self._call_soon(lambda: None)
        if self._loop_thread not in (None, threading.get_ident()):
            self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket and every connection, at once."""
        for conn in list(self._connections):
            self._close(conn)
        if self._taker_watch is not None:
            self._taker_watch()
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self, timeout: float = 2.0) -> None:
        """Stop: answer every parked request (with ``Connection: close``),
        close idle connections, release the port. Returns within about
        *timeout* seconds. Closes the hub, which wakes its other waiters."""
        deadline = time.monotonic() + timeout
        self.closing = True
        self.hub.close()  # parked polls: their answers are queued to the loop
        if self._loop_thread is not None:
            self._closed_all = threading.Event()
            self._call_soon(self._close_idle)
            self._closed_all.wait(max(0.0, deadline - time.monotonic()))
            self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- parking (called by handlers, on the loop) --------------------------------

    def poll(self, handler: Handler, names: tuple[str, ...], since: str | None,
             timeout: float, limit: int) -> None:
        """Answer a long-poll now if there is something to say, else park it."""
        hub = self.hub
        position = hub.locate(since)
        batch = hub.read_checked(names, position, limit)
        if timeout <= 0 or hub.closed or self.closing or handler.conn is None:
            self.delivered += len(batch.messages)
            handler.respond(HTTPStatus.OK, batch.to_json())
            return
        ready = bool(batch.messages or batch.gap)
        if ready and time.monotonic() >= self._last_fanout + self.coalesce:
            self.delivered += len(batch.messages)
            handler.respond(HTTPStatus.OK, batch.to_json())
            return
        # Nothing yet: park until a publish. Or a burst is on: join the next
        # fan-out (within `coalesce` seconds), to take a batch.
        self.admit(handler)
        group = self._join(handler.conn, (names, position, limit))
        self._park(handler.conn, timeout)
        if ready:
            self._fired[group] = None

    def stream(self, handler: Handler, names: tuple[str, ...], since: str | None) -> None:
        """Start an event stream: what is there after *since*, then every
        message as it comes, until the client goes (or the server closes)."""
        position = self.hub.locate(since)
        self.admit(handler)
        conn = handler.conn
        live = not (self.closing or self.hub.closed or conn is None)
        if live:  # joined before the head is written: it may refuse (503)
            group = self._join(conn, (names, position, MAX_LIMIT))
        head = _response(HTTPStatus.OK, b"", "text/event-stream; charset=utf-8", self.date(),
                         (("X-Accel-Buffering", "no"), *handler.cors_headers()), "close",
                         head_only=True)
        head = head.replace(b"Content-Length: 0\r\n", b"")  # the body ends at the close
        handler.close_connection = True
        handler.wfile.write(head + b": connected\n\n")
        handler.log_request(200, 0)
        if not live:
            return
        conn.stream = True
        self._streams += 1
        self._park(conn, None)
        self._fired[group] = None  # send what is already there at the next fan-out

    def _join(self, conn: _Connection, key: tuple) -> "_Group":
        """Put *conn* in the group waiting at *key* (made, and watched, if new)."""
        group = self._groups.get(key)
        if group is None:
            names, position, _ = key
            group = _Group(key)
            group.cancel = self.hub.watch(names, functools.partial(  # may refuse: 503
                self._call_soon, functools.partial(self._wake, group)), since=position)
            self._groups[key] = group
        group.conns[conn] = None
        conn.group = group
        return group

    def take(self, handler: Handler, channel: str, timeout: float) -> None:
        """``/receive``: hand over the next untaken message, or park."""
        head = self.hub.locate(None)
        msg = self.hub.take(channel, timeout=0)
        if msg is not None or timeout <= 0 or self.hub.closed or self.closing:
            handler.respond_json(HTTPStatus.OK, {"message": None if msg is None else msg.message})
            return
        self.admit(handler)
        handler.conn.taking = True
        self._takers.append(handler.conn)
        self._park(handler.conn, timeout)
        if self._taker_watch is None:
            self._taker_watch = self.hub.watch(
                channel, functools.partial(self._call_soon, self._serve_takers), since=head)

    def admit(self, handler: Handler) -> None:
        """503 with Retry-After when the server, or this client, has as many
        requests parked as it may."""
        key = handler.client_key()
        if self._parked >= self.max_waiting or (
                key is not None and self._parked_by[key] >= self.max_waiting_per_client):
            raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE,
                                "too many waiting requests: try again shortly",
                                {"Retry-After": "5"})
        if handler.conn is not None:
            handler.conn.owner = key

    def _park(self, conn: _Connection, timeout: float | None) -> None:
        if conn.owner is not None:
            self._parked_by[conn.owner] += 1
        conn.handler.parked = True
        conn.deadline = None
        self._parked += 1
        self._set_timer(conn, None if timeout is None else time.monotonic() + timeout)

    def _unpark(self, conn: _Connection) -> None:
        group = conn.group
        if group is not None:
            conn.group = None
            group.conns.pop(conn, None)
            if not group.conns and self._groups.get(group.key) is group:
                del self._groups[group.key]
                group.cancel()
        elif conn.taking:
            conn.taking = False
            try:
                self._takers.remove(conn)
            except ValueError:
                pass
        else:
            return
        self._parked -= 1
        self._release(conn)
        conn.handler.parked = False
        self._set_timer(conn, None)

    def _release(self, conn: _Connection) -> None:
        """One parked request of this client's is over."""
        if conn.owner is not None:
            self._parked_by[conn.owner] -= 1
            if not self._parked_by[conn.owner]:
                del self._parked_by[conn.owner]

    def _wake(self, group: _Group) -> None:
        """A publish reached the channels of *group*: answer it at the next fan-out."""
        if self._groups.get(group.key) is group:
            self._fired[group] = None

    def _fan_out(self) -> None:
        """Answer the woken groups, at most once per ``coalesce`` seconds."""
        now = time.monotonic()
        if now < self._last_fanout + self.coalesce:
            return
        self._last_fanout = now
        fired, self._fired = self._fired, {}
        for group in fired:
            self._answer(group)

    def _answer(self, group: _Group) -> None:
        """Answer every poll of *group*: read and encode once, write to each."""
        if self._groups.get(group.key) is not group:
            return  # answered or abandoned meanwhile
        names, position, limit = group.key
        batch = self.hub.read_checked(names, position, limit)
        if not (batch.messages or batch.gap or self.hub.closed):
            group.cancel = self.hub.watch(names, functools.partial(
                self._call_soon, functools.partial(self._wake, group)), since=position)
            return
        group.cancel()
        del self._groups[group.key]
        body, date, responses = batch.to_json(), self.date(), {}
        conns = list(group.conns)
        group.conns.clear()
        self._parked -= len(conns)
        self.delivered += len(batch.messages) * len(conns)
        polls = len(conns) - self._streams_in(conns) if self._streams else len(conns)
        with self._count_lock:
            self.requests["poll", 200] += polls
        log = logger.isEnabledFor(logging.INFO)
        events: bytes | None = None
        for conn in conns:  # the hot loop of every fan-out: kept lean
            conn.group = None
            if conn.owner is not None:
                self._release(conn)
            if conn.timer is not None:
                self._stale += 1
                conn.timer = None
            handler = conn.handler
            if conn.stream:  # an event stream: send the events, wait at the next position
                if events is None:
                    events = _sse_events(batch)
                    after = (names, self.hub.locate(batch.cursor), limit)
                self._answered(conn, events, final=False)
                if self.closing or self.hub.closed:
                    conn.close_after = True
                    if not conn.outbuf:
                        self._close(conn)
                elif not conn.closed:
                    self._join(conn, after)
                    self._parked += 1
                    if conn.owner is not None:
                        self._parked_by[conn.owner] += 1
                continue
            handler.parked = False
            variant = (handler.connection_header(),
                       handler.cors_headers() if self.cors_origins else ())
            data = responses.get(variant)
            if data is None:
                data = responses[variant] = _response(
                    HTTPStatus.OK, body, "application/json", date, variant[1], variant[0])
            if log:
                handler.log_line(200, len(body))
            self._answered(conn, data)
        deadline = time.monotonic() + self.read_timeout
        for conn in conns:
            if conn.stream:
                continue
            if conn.inbuf or conn.closed or conn.outbuf or conn.close_after:
                self._process(conn)  # pipelined input, or something unusual
            else:
                conn.deadline = deadline  # idle until its next poll

    @staticmethod
    def _streams_in(conns: list[_Connection]) -> int:
        return sum(1 for conn in conns if conn.stream)

    def _serve_takers(self) -> None:
        self._taker_watch = None
        head = self.hub.locate(None)
        while self._takers:
            msg = self.hub.take(DEFAULT_CHANNEL, timeout=0)
            if msg is None and not self.hub.closed:
                break
            conn = self._takers[0]
            self._unpark(conn)
            conn.handler.respond_json(HTTPStatus.OK,
                                      {"message": None if msg is None else msg.message})
            self._answered(conn, conn.handler.take_output())
            self._process(conn)
        if self._takers:
            self._taker_watch = self.hub.watch(
                DEFAULT_CHANNEL, functools.partial(self._call_soon, self._serve_takers),
                since=head)

    def _expire(self, conn: _Connection) -> None:
        """A parked request's hold has ended: answer it as it stands."""
        handler = conn.handler
        if conn.group is not None:
            names, position, limit = conn.group.key
            self._unpark(conn)
            batch = self.hub.read_checked(names, position, limit)
            self.delivered += len(batch.messages)
            handler.respond(HTTPStatus.OK, batch.to_json())
        elif conn.taking:
            self._unpark(conn)
            handler.respond_json(HTTPStatus.OK, {"message": None})
        self._answered(conn, handler.take_output())
        self._process(conn)

    # -- the loop -----------------------------------------------------------------

    def _call_soon(self, callback: Callable[[], None]) -> None:
        """Run *callback* on the loop; safe from any thread."""
        self._pending.append(callback)
        if threading.get_ident() != self._loop_thread and not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass  # full (it is awake anyway) or closed (it is gone)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _run_pending(self) -> None:
        self._woken = False
        pending = self._pending
        while pending:
            try:
                pending.popleft()()
            except Exception:
                logger.exception("error in the server loop")

    def _on_event(self, data: Any, mask: int) -> None:
        if not isinstance(data, _Connection):
            data()  # the listening socket or the wake-up socket
            return
        try:
            if mask & selectors.EVENT_READ:
                self._on_readable(data)
            if mask & selectors.EVENT_WRITE and not data.closed:
                self._on_writable(data)
        except Exception:  # a bug must cost one connection, never the server
            logger.exception("error on a connection from %s", data.handler.client_address[0])
            self._close(data)

    def _select_timeout(self, poll_interval: float) -> float:
        if self._pending:
            return 0.0
        now = time.monotonic()
        timeout = min(poll_interval, max(0.0, self._next_sweep - now))
        if self._fired:
            timeout = min(timeout, max(0.0, self._last_fanout + self.coalesce - now))
        if self._streams:
            timeout = min(timeout, max(0.0, self._next_keepalive - now))
        timers = self._timers
        while timers and timers[0][2].timer != timers[0][1]:
            heapq.heappop(timers)  # cancelled
            self._stale -= 1
        if timers:
            timeout = min(timeout, max(0.0, timers[0][0] - now))
        return timeout

    def _set_timer(self, conn: _Connection, deadline: float | None) -> None:
        """Arm (or with None, cancel) the one hold timer of *conn*."""
        if conn.timer is not None:
            self._stale += 1
            conn.timer = None
        if deadline is not None:
            conn.timer = next(self._timer_ids)
            heapq.heappush(self._timers, (deadline, conn.timer, conn))
        if self._stale > 1024 and self._stale > len(self._timers) // 2:
            self._timers = [t for t in self._timers if t[2].timer == t[1]]
            heapq.heapify(self._timers)
            self._stale = 0

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, timer, conn = heapq.heappop(timers)
            if conn.timer != timer:
                self._stale -= 1
                continue
            conn.timer = None
            self._expire(conn)
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval
            self._sweep(now)
            self.service_actions()
        if self._streams and now >= self._next_keepalive:
            self._next_keepalive = now + self.keepalive
            for conn in [c for c in self._connections if c.stream]:
                self._answered(conn, b": keepalive\n\n", final=False)

    def _sweep(self, now: float) -> None:
        """Close connections past their deadline: idle ones, slow requests,
        clients that do not read their answer, finished lingering."""
        for conn in [c for c in self._connections if c.deadline is not None and c.deadline < now]:
            if conn.partial and not conn.outbuf and not conn.linger and not conn.busy:
                conn.handler.raw_requestline = bytes(conn.inbuf[:80])
                conn.inbuf.clear()
                conn.handler.refuse(HTTPStatus.REQUEST_TIMEOUT,
                                    "the request was not received in time")
                self._answered(conn, conn.handler.take_output())
            else:
                self._close(conn)

    def service_actions(self) -> None:
        """Housekeeping, about once a second, on the loop."""
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + 10.0
            self.hub.prune()
            for limiter in (self.publish_limit, self.request_limit):
                if limiter is not None:
                    limiter.prune()

    def _accept(self) -> None:
        for _ in range(512):  # a burst at a time, so the loop keeps serving others
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.warning("cannot accept more connections (%s) with %d open; "
                                   "pausing for a second (raise `ulimit -n`)",
                                   exc.strerror, len(self._connections))
                    self._pause_accepting(1.0)
                return
            if self.closing:
                sock.close()
                continue
            sock.setblocking(False)
            try:  # without it a small answer can wait 40 ms for a delayed ACK
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if self.ssl_context is not None:
                try:
                    sock = self.ssl_context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False)
                except OSError:
                    sock.close()
                    continue
            conn = _Connection(sock)
            conn.handler = self.handler_class(self, address, conn)
            conn.deadline = time.monotonic() + self.read_timeout  # the handshake's too
            conn.handshaking = self.ssl_context is not None
            self._connections.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _handshake(self, conn: _Connection) -> None:
        """Take a TLS handshake one step further, as the socket allows."""
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            return
        except (OSError, ValueError) as exc:  # not TLS, an untrusted client, a reset
            logger.debug("TLS handshake with %s failed: %s",
                         conn.handler.client_address[0], exc)
            if getattr(exc, "reason", None) == "HTTP_REQUEST":  # plain HTTP: say so, in it
                conn.handshaking = False
                conn.handler.refuse(HTTPStatus.BAD_REQUEST,
                                    "this port speaks HTTPS: use an https:// URL")
                try:
                    socket.socket.send(conn.sock, conn.handler.take_output())
                except OSError:
                    pass
                conn.linger = 1 << 16
                self._finish(conn)
            else:
                self._close(conn)
            return
        conn.handshaking = False
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
        self._on_readable(conn)  # the first request may have come with the handshake

    def _pause_accepting(self, seconds: float) -> None:
        if self._accepting:
            self._accepting = False
            self._selector.unregister(self.socket)
            timer = threading.Timer(seconds, self._call_soon, (self._resume_accepting,))
            timer.daemon = True
            timer.start()

    def _resume_accepting(self) -> None:
        if not self._accepting and not self.closing:
            self._accepting = True
            self._selector.register(self.socket, selectors.EVENT_READ, self._accept)

    def _on_readable(self, conn: _Connection) -> None:
        if conn.handshaking:
            self._handshake(conn)
            return
        try:
            data = conn.sock.recv(65536)
            if self.ssl_context is not None:
                while data and conn.sock.pending():  # decrypted, so select() will not tell
                    data += conn.sock.recv(65536)
        except _WOULD_BLOCK:
            return
        except (OSError, ValueError):
            self._close(conn)
            return
        if not data:  # the client has gone (a parked one too)
            self._close(conn)
            return
        if conn.linger:  # draining a refused body before closing
            conn.linger -= len(data)
            if conn.linger <= 0:
                self._close(conn)
            return
        conn.inbuf += data
        if conn.busy or conn.handler.parked or conn.outbuf or conn.close_after:
            if len(conn.inbuf) > self.max_head + self.max_body:
                self._close(conn)  # pipelining far ahead of the answers
            return
        self._process(conn)

    def _on_writable(self, conn: _Connection) -> None:
        if conn.handshaking:
            self._handshake(conn)
            return
        try:
            sent = conn.sock.send(conn.outbuf)
        except _WOULD_BLOCK:
            return
        except (OSError, ValueError):
            self._close(conn)
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
            if conn.close_after:
                self._finish(conn)
            else:
                self._process(conn)

    def _process(self, conn: _Connection) -> None:
        """Handle the requests waiting in *conn*'s input, one at a time."""
        while not (conn.closed or conn.busy or conn.handler.parked or conn.outbuf
                   or conn.close_after):
            raw = self._frame(conn)
            if raw is None:
                break
            conn.partial = 0.0
            conn.continue_sent = False
            # POST, PUT, PATCH: a large body to decode, or a store across the
            # network to wait for, on a worker, so the loop never stalls.
            if raw[:1] == b"P" and (len(raw) > self.inline_body_limit or self.hub.store.shared):
                conn.busy = True
                conn.deadline = None
                self._pool.submit(self._handle_on_worker, conn, raw)
                return
            self._answered(conn, conn.handler.handle_buffered(raw))
        if not (conn.closed or conn.busy or conn.handler.parked or conn.outbuf or conn.linger):
            # Idle: from now. A request under way: from its first byte, so a
            # client trickling bytes (slow loris) cannot push it back.
            conn.deadline = (conn.partial or time.monotonic()) + self.read_timeout

    def _frame(self, conn: _Connection) -> bytes | None:
        """Cut one whole request (head and body) off *conn*'s input, or None
        while it is incomplete. What cannot be framed goes to the handler
        to be refused, and the connection closes after the answer."""
        buf = conn.inbuf
        if not buf:
            return None
        if not conn.partial:
            conn.partial = time.monotonic()
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if buf.find(b"\n", 0, Handler.max_request_line + 1) < 0 < len(buf) - Handler.max_request_line:
                return self._take_all(conn)  # the handler answers 414
            if len(buf) > self.max_head:
                conn.close_after = True
                handler = conn.handler
                handler.raw_requestline = bytes(buf[:buf.find(b"\n") + 1])
                handler.refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                               "request header section too large")
                buf.clear()
                self._answered(conn, handler.take_output())
            return None
        head_end = end + 4
        head = bytes(buf[:head_end])
        lower = head.lower()
        if b"content-length" not in lower and b"transfer-encoding" not in lower:
            del buf[:head_end]
            return head
        lengths, encoding, expect = set(), None, False
        for line in lower.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip(), value.strip()
            if name == b"content-length":
                lengths.add(value)
            elif name == b"transfer-encoding":
                encoding = value
            elif name == b"expect":
                expect = value == b"100-continue"
        if encoding is None and not lengths:
            del buf[:head_end]  # "content-length" was only in the path or a value
            return head
        if encoding is not None:
            if encoding != b"chunked":
                return self._take_all(conn)  # refused as unsupported
            size = _chunked_size(buf, head_end)
            if size is None:
                if len(buf) - head_end > self.max_body + 64 * 1024:
                    return self._take_all(conn)  # the handler answers 413
                self._send_continue(conn, expect)
                return None
            if size < 0:
                return self._take_all(conn)  # malformed: the handler answers 400
            total = head_end + size
        else:
            length = lengths.pop() if len(lengths) == 1 else b""
            if not length.isdigit() or int(length) > self.max_body:
                del buf[:head_end]
                return head  # the handler answers 400 or 413 without the body
            total = head_end + int(length)
            if len(buf) < total:
                self._send_continue(conn, expect)
                return None
        raw = bytes(buf[:total])
        del buf[:total]
        return raw

    def _take_all(self, conn: _Connection) -> bytes:
        raw = bytes(conn.inbuf)
        conn.inbuf.clear()
        conn.close_after = True
        return raw

    def _send_continue(self, conn: _Connection, expect: bool) -> None:
        if expect and not conn.continue_sent:
            conn.continue_sent = True
            self._answered(conn, b"HTTP/1.1 100 Continue\r\n\r\n", final=False)

    def _handle_on_worker(self, conn: _Connection, raw: bytes) -> None:
        try:
            out = conn.handler.handle_buffered(raw)
        except Exception:
            logger.exception("error serving a request from %s", conn.handler.client_address[0])
            out, conn.handler.close_connection = b"", True
        self._call_soon(functools.partial(self._worker_done, conn, out))

    def _worker_done(self, conn: _Connection, out: bytes) -> None:
        conn.busy = False
        if not conn.closed:
            self._answered(conn, out)
            self._process(conn)

    def _answered(self, conn: _Connection, data: bytes, final: bool = True) -> None:
        """Send what a handler wrote; if it asked to close, close after it."""
        if conn.closed:
            return
        if final and conn.handler.close_connection and not conn.handler.parked:
            conn.close_after = True
            if conn.handler._body_unread and not conn.linger:
                conn.linger = 16 << 20  # read and drop what the client still sends
        if data:
            if conn.outbuf:
                conn.outbuf += data
                return
            try:
                sent = conn.sock.send(data)
            except _WOULD_BLOCK:
                sent = 0
            except (OSError, ValueError):
                self._close(conn)
                return
            if sent < len(data):
                conn.outbuf += memoryview(data)[sent:]
                conn.deadline = time.monotonic() + self.read_timeout  # a slow reader
                self._selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
                return
        if final and conn.close_after:
            self._finish(conn)

    def _finish(self, conn: _Connection) -> None:
        """The last answer is out: close, after draining a refused body (a
        "lingering close", so the client reads our answer, not a reset)."""
        if conn.linger:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(conn)
                return
            conn.inbuf.clear()
            conn.deadline = time.monotonic() + 2.0
        else:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        if conn.stream:
            conn.stream = False
            self._streams -= 1
        self._unpark(conn)
        conn.closed = True
        self._connections.discard(conn)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _close_idle(self) -> None:
        """Part of close(): stop accepting; close connections with nothing
        under way (the others close once their answer is out)."""
        if self._accepting:
            self._accepting = False
            self._selector.unregister(self.socket)
        for conn in list(self._connections):
            if conn.taking:
                self._expire(conn)
            elif conn.stream and not conn.outbuf:
                self._close(conn)
            elif not (conn.busy or conn.group or conn.outbuf or conn.linger):
                self._close(conn)


def _chunked_size(buf: bytearray, start: int) -> int | None:
    """Bytes of the chunked body starting at *start* (trailers included),
    None while incomplete, -1 if malformed."""
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None if len(buf) - pos < 1024 else -1
        try:
            size = int(bytes(buf[pos:eol]).split(b";")[0].strip(), 16)
        except ValueError:
            return -1
        if size < 0:
            return -1
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)
            if end < 0:
                return None
            return end + 4 - start
        pos = eol + 2 + size + 2
        if pos > len(buf):
            return None


def make_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                hub: Hub | None = None, *, certfile: str | None = None,
                keyfile: str | None = None, **options: Any) -> Server:
    """Bind a ``Server`` (port 0 picks a free port: read ``server.url``).

    With *certfile* (a PEM certificate chain, and the key in it or in
    *keyfile*) it serves HTTPS. Other options go to ``Server``.
    """
    if certfile:
        options["ssl_context"] = _tls_context(certfile, keyfile)
    return Server((host, port), hub, **options)


def _tls_context(certfile: str, keyfile: str | None = None) -> Any:
    """A server's TLS context: TLS 1.2 or later, HTTP/1.1 by ALPN."""
    if ssl is None:
        raise LongpollError(None, "this Python has no ssl module, so no TLS")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)  # keeps send/recv simple
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise LongpollError(None, f"cannot load the certificate {certfile}"
                            f"{' and key ' + keyfile if keyfile else ''}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    return context


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
        # Not HTTPSHandler.__init__: from Python 3.12 it loads the system's
        # CA certificates each time, and a client makes one of these a request.
        self._context = context
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
                 token: str | None = None, cafile: str | None = None) -> None:
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
        #: Verifies https:// servers: the system's CAs, or those in *cafile*.
        self.ssl_context = (ssl.create_default_context(cafile=cafile)
                            if ssl and (cafile or any(u.startswith("https:") for u in self.urls))
                            else None)
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
                  timeout: float | None = None,
                  on_connection: Callable[[bool, LongpollError | None], None] | None = None
                  ) -> "Subscription":
        """An endless iterator of messages (dicts); see ``Subscription``."""
        return Subscription(self, channels, since,
                            self.timeout if timeout is None else timeout, on_connection)

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
        opener = urllib.request.build_opener(
            _TrackedHandler(cutoff or _Cutoff(), self.ssl_context))
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
            untrusted = ssl is not None and isinstance(reason, ssl.SSLCertVerificationError)
            error = LongpollError(None, f"{url}: {reason}" + (
                " (give the server's CA certificate: --cafile)" if untrusted else ""))
            error.refused = isinstance(reason, ConnectionRefusedError)
            error.untrusted = untrusted  # retrying cannot help
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
        if getattr(error, "untrusted", False):
            return False
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
    backoff; *on_connection(connected, error)*, if given, is called when
    the connection is lost and when it is back. When the server reports that
    messages were lost (retention dropped them, or it restarted), the next
    message carries ``"gap": True`` and ``self.gaps`` counts it. Other
    errors (e.g. 403) are raised. ``batches()`` gives each server answer
    whole instead. Usable as a context manager.
    """

    def __init__(self, client: Client, channels: str | Iterable[str],
                 since: str | None, timeout: float,
                 on_connection: Callable[[bool, LongpollError | None], None] | None = None
                 ) -> None:
        self.client = client
        self.channels = _check_channels(channels)
        #: Where the next poll starts: pass it as ``since`` to resume later.
        self.cursor = since
        #: How many times the server reported lost messages.
        self.gaps = 0
        self.timeout = timeout
        self.on_connection = on_connection
        self._stop = threading.Event()
        self._cutoff = _Cutoff()

    def batches(self) -> Iterator[dict[str, Any]]:
        """Each server answer that says something, as received:
        ``{"messages": [...], "cursor": ..., "gap"?: true}``. The cursor
        moves past an answer when the next one is asked for."""
        client, failures, connected, gap_pending = self.client, 0, None, False
        while not self._stop.is_set():
            path = client._poll_path(self.channels, self.cursor, self.timeout, None)
            try:
                answer = client._request("GET", path, None,
                                         client._socket_timeout(self.timeout), self._cutoff)
            except LongpollError as error:
                if self._stop.is_set():
                    break
                if not client._retryable(error, safe=True):
                    raise
                if connected is not False and self.on_connection is not None:
                    self.on_connection(False, error)
                connected = False
                failures += 1
                client._failover(error)
                self._stop.wait(client._delay(failures, _retry_after(error)))
                continue
            finally:
                self._cutoff.sockets.clear()
            if connected is False and self.on_connection is not None:
                self.on_connection(True, None)
            connected, failures = True, 0
            messages = answer.setdefault("messages", [])
            if answer.get("gap"):
                self.gaps += 1
                gap_pending = True
                logger.warning("messages on %s were lost before they could be read",
                               ",".join(self.channels))
            if messages or answer.get("gap"):
                if gap_pending and messages:
                    messages[0]["gap"], gap_pending = True, False
                yield answer
            self.cursor = answer["cursor"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for answer in self.batches():
            for message in answer["messages"]:
                if len(self.channels) == 1:  # a message id is a cursor too
                    self.cursor = message["id"]
                yield message
                if self._stop.is_set():
                    return

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
Watch:     open HOST/?channel=NAME in a browser
"""

# The live page: watch a channel, publish to it. No build step, no outside
# asset; every message is shown with textContent, never parsed as HTML.
INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>longpoll</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; }
header { display: flex; gap: .75rem; align-items: center; flex-wrap: wrap; }
h1 { font-size: 1.3rem; margin: 0; }
input, button { font: inherit; padding: .3rem .5rem; }
#state { margin-left: auto; font-size: .85rem; padding: .1rem .6rem; border-radius: 1rem;
         background: #ddd; }
#state.connected { background: #c9efc9; } #state.reconnecting { background: #ffe2a8; }
#state.offline, #state.error { background: #f6c0c0; }
form { display: flex; gap: .5rem; margin: 1rem 0; } #message { flex: 1; }
ol { list-style: none; padding: 0; margin: 0; }
li { border-bottom: 1px solid #eee; padding: .45rem 0; overflow-wrap: anywhere; }
time { color: #888; font-size: .85rem; margin-right: .6rem; }
.title { font-weight: 600; margin-right: .5rem; } .notice { color: #9a5800; font-style: italic; }
</style></head>
<body>
<header><h1>longpoll</h1>
  <label>Channel <input id="channel" size="16" autocomplete="off"></label>
  <span id="state">connecting</span></header>
<form id="publish">
  <input id="title" placeholder="title (optional)" size="14">
  <input id="message" placeholder="message" required autocomplete="off">
  <button>Publish</button></form>
<ol id="log"></ol>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let channel = params.get("channel") || "news";
const auth = params.get("token") ? {Authorization: `Bearer ${params.get("token")}`} : {};
let cursor = null;      // where the next poll starts: null is "from now on"
let generation = 0;     // switching channel ends the loop of the old one
$("channel").value = channel;

function setState(name, text) { $("state").className = name; $("state").textContent = text || name; }

function add(...parts) {            // newest first; text only, never HTML
  const li = document.createElement("li");
  li.append(...parts);
  $("log").prepend(li);
  return li;
}

function span(className, text) {
  const node = document.createElement(className === "time" ? "time" : "span");
  if (className !== "time") node.className = className;
  node.textContent = text;
  return node;
}

function showMessage(m) {
  const parts = [span("time", new Date(m.time * 1000).toLocaleTimeString())];
  if (m.title) parts.push(span("title", m.title));
  parts.push(span("body", typeof m.message === "string" ? m.message : JSON.stringify(m.message)));
  add(...parts);
}

function notice(text) { add(span("notice", text)); }

async function poll(mine) {         // the long-poll loop: cursor kept, backoff on errors
  let failures = 0;
  while (mine === generation) {
    const query = new URLSearchParams({timeout: "30"});
    if (cursor !== null) query.set("since", cursor);
    if (failures === 0) setState("connected");
    try {
      const r = await fetch(`/channels/${encodeURIComponent(channel)}?${query}`,
                            {cache: "no-store", headers: auth});
      const answer = await r.json();
      if (mine !== generation) return;
      if (r.status >= 400 && r.status < 500 && r.status !== 429) {
        setState("error", answer.error); return;
      }
      if (!r.ok) throw new Error(answer.error);
      if (answer.gap) notice("Some messages were lost before they could be shown " +
                             "(they expired, or the server restarted).");
      answer.messages.forEach(showMessage);
      cursor = answer.cursor;
      failures = 0;
    } catch (error) {
      failures += 1;
      setState(navigator.onLine === false ? "offline" : "reconnecting");
      const ceiling = Math.min(30000, 500 * 2 ** Math.min(failures, 6));
      await new Promise((done) => setTimeout(done, ceiling / 2 + Math.random() * ceiling / 2));
    }
  }
}

$("publish").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {message: $("message").value};
  if ($("title").value) body.title = $("title").value;
  try {
    const r = await fetch(`/channels/${encodeURIComponent(channel)}`, {method: "POST",
      headers: {"Content-Type": "application/json", ...auth}, body: JSON.stringify(body)});
    if (!r.ok) throw new Error((await r.json()).error);
    $("message").value = "";
  } catch (error) { notice(`Not published: ${error.message}`); }
});

$("channel").addEventListener("change", () => {
  channel = $("channel").value.trim() || "news";
  cursor = null;
  generation += 1;
  $("log").replaceChildren();
  params.set("channel", channel);
  history.replaceState(null, "", `?${params}`);
  poll(generation);
});

poll(generation);
</script>
</body></html>
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
    if args.keyfile and not args.certfile:
        logger.error("--keyfile needs --certfile (the certificate it is the key of)")
        return 2
    try:
        hub = Hub(retention=args.retention, max_age=args.max_age or None,
                  max_channels=args.max_channels, store=args.store)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    try:
        auth = Auth.from_file(args.auth) if args.auth else None
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    try:
        server = make_server(args.host, args.port, hub, timeout=args.timeout,
                             max_timeout=args.max_timeout, max_body=args.max_body,
                             cors_origins=args.cors_origin, auth=auth,
                             publish_rate=args.publish_rate or None,
                             publish_burst=args.publish_burst,
                             request_rate=args.request_rate or None,
                             request_burst=args.request_burst, max_waiting=args.max_waiting,
                             max_waiting_per_client=args.max_waiting_per_client,
                             trust_proxy=args.trust_proxy, certfile=args.certfile,
                             keyfile=args.keyfile)
        server.keepalive = args.keepalive
    except LongpollError as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", args.host, args.port, exc.strerror or exc)
        return 1
    raise_open_file_limit()
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    def on_hangup(signum: int, frame: Any) -> None:
        if args.auth:
            try:
                server.auth = Auth.from_file(args.auth)
                logger.warning("reloaded %s", args.auth)
            except ValueError as exc:
                logger.error("kept the previous auth rules: %s", exc)
        if args.certfile:  # a renewed certificate, for the connections to come
            try:
                server.ssl_context = _tls_context(args.certfile, args.keyfile)
                logger.warning("reloaded %s", args.certfile)
            except LongpollError as exc:
                logger.error("kept the previous certificate: %s", exc)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if (args.auth or args.certfile) and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hangup)
    server.start()
    logger.warning("longpoll %s listening on %s (%sCtrl-C to stop)", __version__, server.url,
                   "" if hub.store.url == "memory:" else f"store {hub.store.url}; ")
    stop.wait()
    logger.warning("shutting down: answering %d waiting clients", server.waiting)
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
    client = Client(args.url or [DEFAULT_URL], token=args.token, cafile=args.cafile)
    result = client.publish(args.channel, message, title=args.title, priority=args.priority)
    print(result["id"], flush=True)
    return 0


def _subscribe(args: Any) -> int:
    client = Client(args.url or [DEFAULT_URL], token=args.token, cafile=args.cafile)
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
        p.add_argument("--cafile", metavar="PEM",
                       help="trust https:// servers whose certificate this CA (or "
                            "self-signed certificate) issued, besides the system's")
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
    serve.add_argument("--store", default="memory:", metavar="URL",
                       help="where messages are kept: memory: (default; lost on restart), "
                            "sqlite:PATH (survives restarts) or redis://host:port/db "
                            "(several servers share channels)")
    serve.add_argument("--max-channels", type=int, default=DEFAULT_MAX_CHANNELS, metavar="N",
                       help="channels held at once; a new one past it gets 503 "
                            f"(default {DEFAULT_MAX_CHANNELS})")
    serve.add_argument("--max-body", type=int, default=MAX_BODY,
                       help="largest request body in bytes (default 1048576)")
    serve.add_argument("--auth", metavar="FILE",
                       help="JSON file of tokens and the channels they may read and write "
                            "(reloaded on SIGHUP); without it the server is open to anyone "
                            "who can reach it")
    for kind, plural, rate, burst in (
            ("publish", "publishes", DEFAULT_PUBLISH_RATE, DEFAULT_PUBLISH_BURST),
            ("request", "requests", DEFAULT_REQUEST_RATE, DEFAULT_REQUEST_BURST)):
        serve.add_argument(f"--{kind}-rate", type=float, default=rate, metavar="PER_SECOND",
                           help=f"{plural} per second per client, 0 for no limit "
                                f"(default {rate:g})")
        serve.add_argument(f"--{kind}-burst", type=int, default=burst, metavar="N",
                           help=f"{plural} a client may make at once (default {burst})")
    serve.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING, metavar="N",
                       help=f"parked requests in all before 503 (default {DEFAULT_MAX_WAITING})")
    serve.add_argument("--max-waiting-per-client", type=int, metavar="N",
                       default=DEFAULT_MAX_WAITING_PER_CLIENT,
                       help="parked requests per client before 503 "
                            f"(default {DEFAULT_MAX_WAITING_PER_CLIENT})")
    serve.add_argument("--trust-proxy", action="store_true",
                       help="take the client address from X-Forwarded-For (only behind "
                            "your own proxy)")
    serve.add_argument("--keepalive", type=float, default=Server.keepalive, metavar="SECONDS",
                       help="seconds between keepalive comments on event streams (default 15)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="let pages from ORIGIN (e.g. https://example.com) publish and "
                            "subscribe; repeatable; * for any")
    serve.add_argument("--certfile", metavar="PEM",
                       help="serve HTTPS with this certificate chain (key included, or "
                            "--keyfile)")
    serve.add_argument("--keyfile", metavar="PEM", help="the certificate's private key")
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
