"""longpoll: real-time push over plain HTTP, in one file, standard library only.

Start a server, publish with curl, and wait for the next message::

    python3 -m longpoll serve                         # http://127.0.0.1:5000
    curl -d 'build done' localhost:5000/channels/ci   # publish
    curl 'localhost:5000/channels/ci?since=0&timeout=0'   # what the channel holds
    curl localhost:5000/channels/ci                   # wait for the next message

or from Python, in the same process or over HTTP::

    server = longpoll.make_server(port=0).start()
    server.hub.publish("ci", {"status": "green"}, title="Build")
    for msg in longpoll.Client(server.url).subscribe("ci", since="0"): print(msg)

The module holds these parts, each usable alone: the ``Hub`` (channels of
messages with cursors, no HTTP), its stores (memory, ``sqlite3``, Redis),
the ``Server`` (the wire protocol: a strict HTTP/1.1 ``RequestReader``, a
``selectors`` loop, the routes and the waiting layer), the same routes as
an ASGI or WSGI app to mount in FastAPI, Django or Flask (``asgi_app``,
``wsgi_app``), the browser client it serves (``/longpoll.js``), the
``Client`` (``urllib``), and the command line.

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
    "ASGIApp",
    "Auth",
    "Batch",
    "Client",
    "Draft",
    "Handler",
    "Hub",
    "LongpollError",
    "Message",
    "OPTIONS",
    "Position",
    "RedisStore",
    "Request",
    "RequestReader",
    "Server",
    "SqliteStore",
    "Store",
    "Subscription",
    "WSGIApp",
    "asgi_app",
    "main",
    "make_server",
    "open_store",
    "wsgi_app",
]

import base64
import bisect
import collections
import concurrent.futures
import datetime
import email.header
import email.utils
import errno
import fnmatch
import functools
import hashlib
import heapq
import hmac
import http.client
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, NamedTuple

if TYPE_CHECKING:  # (imported where an ASGI server runs the ASGI app: see ASGIApp)
    import asyncio

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
MAX_HEAD = 64 << 10             # bytes in a request head (request line and headers)
MAX_TITLE = 256                 # characters in a title
MAX_TTL = 366 * 86400.0         # seconds: the longest expiry a message may be given
DEFAULT_MAX_DELAY = 3 * 86400.0  # seconds ahead a message may be scheduled (ntfy's: 3 days)
DEFAULT_MAX_SCHEDULED = 10_000  # messages scheduled and not yet published, in all
DEFAULT_MAX_SCHEDULED_PER_CLIENT = 100  # ... from one client (address or token)
DEFAULT_MAX_EXPECTATIONS = 1000  # channels watched for silence (``Hub.expect``)
#: The tag of the messages a silence alert publishes: they do not count as
#: the channel speaking.
SILENCE_TAG = "longpoll-silence"
MAX_CHANNELS_PER_REQUEST = 32
DEFAULT_CHANNEL = "default"     # where /send publishes and /receive takes
# Per-client limits: generous enough that no honest client notices.
DEFAULT_PUBLISH_RATE, DEFAULT_PUBLISH_BURST = 50.0, 200      # publishes/s, at once
DEFAULT_REQUEST_RATE, DEFAULT_REQUEST_BURST = 500.0, 1000    # requests/s, at once
DEFAULT_MAX_WAITING, DEFAULT_MAX_WAITING_PER_CLIENT = 100_000, 1000
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 256
DEFAULT_MAX_CHANNELS = 100_000  # channels a hub holds at once (503 beyond)
DEFAULT_IDEMPOTENCY_WINDOW = 600.0  # seconds a publish's Idempotency-Key is remembered
MAX_IDEMPOTENCY_KEYS = 100_000  # keys a hub remembers at once (the oldest go first)
IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,128}\Z")

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
PATTERN_RE = re.compile(r"[A-Za-z0-9_.\-*?\[\]!]{1,64}\Z")  # (see check_pattern)
# A cursor names the hub's history and a position in it: "<history>-<seq>".
CURSOR_RE = re.compile(r"([A-Za-z0-9]{1,32})-([0-9]{1,19})\Z")
PRIORITY_NAMES = {"min": 1, "low": 2, "default": 3, "high": 4, "max": 5, "urgent": 5}


class Option(NamedTuple):
    """A setting of ``serve`` and ``make_server``: its keyword, default and
    meaning. The command line's ``--name-with-dashes`` is made from it."""

    name: str
    default: Any
    help: str
    part: str = "server"    # "hub": a setting of the Hub
    metavar: str = "N"


#: Every setting, in one place: ``serve``'s options, ``make_server``'s and
#: ``Server``'s keywords, and the documented defaults all come from here.
OPTIONS = (
    Option("timeout", DEFAULT_TIMEOUT, "seconds a poll is held when the client names none",
           metavar="SECONDS"),
    Option("max_timeout", MAX_TIMEOUT, "the longest hold a client may ask for",
           metavar="SECONDS"),
    Option("retention", DEFAULT_RETENTION, "messages kept per channel", "hub"),
    Option("max_age", DEFAULT_MAX_AGE, "seconds a message is kept, 0 for no limit", "hub",
           "SECONDS"),
    Option("max_channels", DEFAULT_MAX_CHANNELS,
           "channels held at once; a new one past it gets 503", "hub"),
    Option("idempotency_window", DEFAULT_IDEMPOTENCY_WINDOW, "seconds a publish's "
           "Idempotency-Key is remembered: a repeat within it is answered, not stored",
           "hub", "SECONDS"),
    Option("max_delay", DEFAULT_MAX_DELAY, "how far ahead a message may be scheduled "
           "(Delay, At)", "hub", "SECONDS"),
    Option("max_scheduled", DEFAULT_MAX_SCHEDULED, "messages scheduled and not yet "
           "published, in all; one more gets 503", "hub"),
    Option("max_scheduled_per_client", DEFAULT_MAX_SCHEDULED_PER_CLIENT, "messages one "
           "client (address or token) may have scheduled; one more gets 429", "hub"),
    Option("max_expectations", DEFAULT_MAX_EXPECTATIONS, "channels watched for silence "
           "(POST /channels/NAME/expect); one more gets 503", "hub"),
    Option("store", "memory:", "where messages are kept: memory: (lost on restart), "
           "sqlite:PATH (survives restarts) or redis://host:port/db (several servers "
           "share channels)", "hub", "URL"),
    Option("max_body", MAX_BODY, "largest request body, or message a client sends on a "
           "WebSocket, in bytes (413, or close code 1009, beyond)", metavar="BYTES"),
    Option("max_answer", 1 << 20, "bytes of messages in one poll answer or stream write; "
           "the rest follows at once (one message always goes, whatever its size)",
           metavar="BYTES"),
    Option("max_queued", 4 << 20, "bytes waiting to be sent to one client; one that "
           "leaves more unread is cut, and resumes by its cursor", metavar="BYTES"),
    Option("read_timeout", 30.0, "seconds a connection may idle, take to send a request, "
           "or leave an answer unread, before it is closed", metavar="SECONDS"),
    Option("linger_time", 30.0, "seconds a refused request's body is read and dropped "
           "after the answer, so the client reads the answer", metavar="SECONDS"),
    Option("publish_rate", DEFAULT_PUBLISH_RATE,
           "publishes per second per client, 0 for no limit", metavar="PER_SECOND"),
    Option("publish_burst", DEFAULT_PUBLISH_BURST, "publishes a client may make at once"),
    Option("request_rate", DEFAULT_REQUEST_RATE,
           "requests per second per client, 0 for no limit", metavar="PER_SECOND"),
    Option("request_burst", DEFAULT_REQUEST_BURST, "requests a client may make at once"),
    Option("max_waiting", DEFAULT_MAX_WAITING, "parked requests in all before 503"),
    Option("max_waiting_per_client", DEFAULT_MAX_WAITING_PER_CLIENT,
           "parked requests per client before 503"),
    Option("max_connections_per_client", DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
           "connections one address may hold (its idle ones go first), 0 for no limit; "
           "loopback is exempt, and so is everyone with --trust-proxy"),
    Option("max_lease", 3600.0, "the longest lease /receive?lease= may ask for",
           metavar="SECONDS"),
    Option("keepalive", 15.0, "seconds between keepalives on event streams (a comment) "
           "and WebSockets (a ping)",
           metavar="SECONDS"),
    Option("workers", 4, "threads that decode large bodies and wait on a networked store"),
)
_OPTION_PARTS = {option.name: option.part for option in OPTIONS}


def _settings(part: str, given: dict[str, Any]) -> dict[str, Any]:
    """The settings of *part* ("server" or "hub"): those *given*, else the
    defaults of ``OPTIONS``; a TypeError names one it does not know."""
    for name in given:
        if _OPTION_PARTS.get(name) != part:
            raise TypeError(f"unknown option {name!r}")
    return {option.name: given.get(option.name, option.default)
            for option in OPTIONS if option.part == part}


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


def _speaks(msg: "Message") -> bool:
    """Whether *msg* is its channel speaking (a silence alert is not)."""
    return SILENCE_TAG not in (msg.extra or {}).get("tags", ())


def check_channel(name: str) -> str:
    """Return *name* if it is a valid channel name, else raise a 400 error."""
    if not isinstance(name, str) or not CHANNEL_RE.match(name):
        if isinstance(name, str) and is_pattern(name):
            raise _bad_request(f"{name[:64]!r} is a pattern, which only subscribers may "
                               "use: name one channel")
        raise _bad_request(
            f"invalid channel name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return name


def is_pattern(name: str) -> bool:
    """Whether *name*, in a list of channels to read, is a pattern: it holds
    one of fnmatch's wildcards (``*``, ``?``, ``[``), which no channel
    name can hold."""
    return "*" in name or "?" in name or "[" in name


def check_pattern(name: str) -> str:
    """Return *name* if it is a valid channel name or pattern, else raise a
    400 error. A pattern is an ``fnmatch`` glob over channel names, matched
    case-sensitively: ``*`` any run of characters, ``?`` one, ``[abc]`` and
    ``[!abc]`` one of (or none of) a set; 1-64 characters."""
    if not isinstance(name, str) or not is_pattern(name):
        return check_channel(name)
    if not PATTERN_RE.match(name):
        raise _bad_request(f"invalid pattern {name[:80]!r}: use 1-64 of A-Z a-z 0-9 _ . - "
                           "and the wildcards * ? [ ] !")
    return name


@functools.lru_cache(maxsize=1024)
def _pattern_matcher(pattern: str) -> Callable[[str], Any]:
    """A compiled pattern's ``match`` (case-sensitive, whole names)."""
    return re.compile(fnmatch.translate(pattern)).match


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
        check_pattern(name)
    return tuple(dict.fromkeys(names))  # drop repeats, keep order


# ---------------------------------------------------------------------------
# Messages and channels (no HTTP in this part)
# ---------------------------------------------------------------------------

#: A message's optional fields besides title and priority, by ntfy's names:
#: ``tags`` (up to 16 strings of up to 64 characters), ``click`` (the URL a
#: click opens), ``icon`` (an http(s) URL), ``actions`` (up to 3 buttons:
#: ntfy's view, broadcast and http actions) and ``markdown`` (true: the
#: text is Markdown).
EXTRA_FIELDS = ("tags", "click", "icon", "actions", "markdown", "sequence_id")
MAX_TAGS = 16
#: A sequence id (ntfy's ``X-Sequence-ID``): messages of a channel that
#: carry the same one update one notification in place.
SEQUENCE_ID_RE = re.compile(r"[-_A-Za-z0-9]{1,64}")
MAX_ACTIONS = 3
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_UNSAFE_SCHEMES = frozenset({"javascript", "data", "vbscript", "file", "blob"})
#: Each action's fields, and what they hold (ntfy's action buttons).
_ACTION_FIELDS = {"action": str, "label": str, "url": str, "clear": bool, "method": str,
                  "headers": dict, "body": str, "intent": str, "extras": dict}


def _check_url(value: Any, what: str, web_only: bool = False) -> str:
    """A link a client may open: a string with a scheme (http or https with
    *web_only*), never one a browser would run (javascript:, data:...)."""
    match = _URL_SCHEME.match(value) if isinstance(value, str) else None
    scheme = match.group(1).lower() if match else ""
    if (not match or len(value) > 2048 or scheme in _UNSAFE_SCHEMES
            or web_only and scheme not in ("http", "https")):
        kind = "an http(s) URL" if web_only else "a URL (http, https, mailto, geo, ...)"
        raise _bad_request(f"{what} must be {kind} of at most 2048 characters")
    return value


def _check_extra(extra: dict[str, Any] | None) -> dict[str, Any] | None:
    """A message's extra fields, checked and in order; None if it has none."""
    if not extra:
        return None
    unknown = set(extra) - set(EXTRA_FIELDS)
    if unknown:
        raise TypeError(f"unknown message fields: {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {}
    tags = extra.get("tags")
    if tags:
        if (not isinstance(tags, list) or len(tags) > MAX_TAGS or not all(
                isinstance(t, str) and 0 < len(t) <= 64 for t in tags)):
            raise _bad_request(f"tags must be at most {MAX_TAGS} strings of 1-64 characters")
        checked["tags"] = tags
    if extra.get("click"):
        checked["click"] = _check_url(extra["click"], "click")
    if extra.get("icon"):
        checked["icon"] = _check_url(extra["icon"], "icon", web_only=True)
    actions = extra.get("actions")
    if actions:
        if not isinstance(actions, list) or len(actions) > MAX_ACTIONS:
            raise _bad_request(f"actions must be a list of at most {MAX_ACTIONS} buttons")
        checked["actions"] = [_check_action(a) for a in actions]
    if extra.get("markdown"):
        if extra["markdown"] is not True:
            raise _bad_request("markdown must be true or absent")
        checked["markdown"] = True
    sequence_id = extra.get("sequence_id")
    if sequence_id:
        if not isinstance(sequence_id, str) or not SEQUENCE_ID_RE.fullmatch(sequence_id):
            raise _bad_request("sequence_id must be 1-64 of A-Z a-z 0-9 _ -")
        checked["sequence_id"] = sequence_id
    try:
        _encode(checked).encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") from a JSON body
        raise _bad_request("a message's fields must be valid Unicode text") from None
    return checked or None


def _check_action(action: Any) -> dict[str, Any]:
    """One action button (ntfy's: view, broadcast or http), checked."""
    if not isinstance(action, dict):
        raise _bad_request("each action is an object with action, label and url")
    checked = {}
    for name, value in action.items():
        kind = _ACTION_FIELDS.get(name)
        if kind is None or value is None:
            continue  # (ntfy's id, and fields a client fills with null)
        if not isinstance(value, kind) or kind is dict and not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise _bad_request(f"action field {name} must be a {kind.__name__}")
        checked[name] = value
    kind = str(checked.get("action", "")).lower()
    if kind not in ("view", "broadcast", "http"):
        raise _bad_request("an action is view, broadcast or http")
    checked["action"] = kind
    if not checked.get("label") or len(checked["label"]) > 128:
        raise _bad_request("an action needs a label of at most 128 characters")
    if kind in ("view", "http"):
        checked["url"] = _check_url(checked.get("url"), f"a {kind} action's url",
                                    web_only=kind == "http")
    if "method" in checked:
        checked["method"] = checked["method"].upper()
    return checked


_SCHEDULING = threading.Lock()  # (the memory store's scheduled messages and expectations)


def _check_expect_room(hub: "Hub", count: int) -> None:
    if count >= hub.max_expectations:
        raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"{count} channels are watched for silence, the most this server "
                            "watches", {"Retry-After": "60"})


def _silence_verdict(entry: dict[str, Any], spoke: float, now: float) -> str | None:
    """Move an expectation on (in place): "alert" when its channel has been
    silent ``every`` seconds and no alert went yet, "back" when it spoke
    after the alert, else None. ``last`` is the channel's last message (or
    when the expectation began); ``alerted`` when the alert went."""
    entry["last"] = max(entry["last"], spoke)
    if entry["alerted"] is None:
        if now >= entry["last"] + entry["every"]:
            entry["alerted"] = now
            return "alert"
    elif spoke >= entry["alerted"]:  # (a message at the alert's own time came after it)
        entry["alerted"] = None
        return "back"
    return None


def _check_schedule_room(hub: "Hub", total: int, client: str | None, of_client: int) -> None:
    """503 when *hub* has ``max_scheduled`` messages scheduled; 429 when
    *client* has ``max_scheduled_per_client`` of them."""
    if total >= hub.max_scheduled:
        raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"{total} messages are scheduled, the most this server keeps: "
                            "try again later", {"Retry-After": "60"})
    if client is not None and of_client >= hub.max_scheduled_per_client:
        raise LongpollError(HTTPStatus.TOO_MANY_REQUESTS,
                            f"you have {of_client} messages scheduled, the most one client "
                            "may: wait for some to be published", {"Retry-After": "60"})


def _extra_of(fields: dict[str, Any]) -> dict[str, Any] | None:
    """The extra fields of a message as its JSON holds them (``expires``
    too, which the hub sets from a publish's ``ttl``)."""
    extra = {name: fields[name] for name in _STORED_FIELDS if name in fields}
    return extra or None


_STORED_FIELDS = (*EXTRA_FIELDS, "expires")
# What a publish may give besides title and priority: ttl, and when (see Hub.schedule).
_PUBLISH_FIELDS = (*EXTRA_FIELDS, "ttl", "delay", "at")


class Message:
    """One published message. ``json`` is its wire form, encoded once; the
    message value is decoded from it only when asked for (``message``), so
    a message costs its wire text and a small record, whatever its shape."""

    __slots__ = ("seq", "id", "channel", "time", "title", "priority", "extra", "json", "born",
                 "_start", "_end", "replayed", "receipt")

    def __init__(self, seq: int, id: str, channel: str, message: Any,
                 title: str | None, priority: int | None,
                 payload: str | bytes | None = None, at: float | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.seq = seq
        self.id = id
        self.channel = channel
        if at is None:  # published now, to the millisecond
            at = time.time_ns() // 1_000_000 / 1000
            self.born = time.monotonic()   # for age-based retention
            head = ('{"id":"%s","channel":"%s","time":%.3f,"message":'  # (%.3f: cheaper
                    % (id, channel, at)).encode()                      # than repr, the same)
        else:  # published before (a store gives it back)
            self.born = time.monotonic() - max(0.0, time.time() - at)
            head = ('{"id":"%s","channel":"%s","time":%r,"message":' % (id, channel, at)).encode()
        self.time = at
        self.title = title
        self.priority = priority
        #: Its other fields (``EXTRA_FIELDS``: tags, click, icon, actions,
        #: markdown), checked; None when it has none.
        self.extra = extra
        #: True when ``Hub.publish`` answers a repeated Idempotency-Key with
        #: the message published the first time (nothing new was stored).
        self.replayed = False
        #: ``Hub.take(..., lease=)``: what ``Hub.ack`` takes to keep it taken.
        self.receipt: str | None = None
        if payload is None:
            payload = _encode(message)
        if isinstance(payload, str):
            payload = payload.encode()
        if title is None and priority is None and not extra:  # (most messages)
            self.json = head + payload + b"}"
        else:
            fields = ""
            if title is not None:
                fields += ',"title":' + _encode(title)
            if priority is not None:
                fields += f',"priority":{priority}'
            if extra:
                fields += "".join(f',"{name}":{_encode(value)}' for name, value in extra.items())
            self.json = b"".join((head, payload, fields.encode(), b"}"))
        self._start = start = len(head)
        self._end = start + len(payload)

    @property
    def expires(self) -> float | None:
        """When it expires (a Unix time), if it was published with a ``ttl``."""
        return self.extra.get("expires") if self.extra else None

    @property
    def payload(self) -> bytes:
        """The message value as JSON text (UTF-8), as the wire carries it."""
        return self.json[self._start:self._end]

    @property
    def message(self) -> Any:
        """The message value (any JSON value), decoded afresh on each access."""
        return json.loads(self.payload)

    def summary(self) -> bytes:
        """``{"id", "channel", "time"}`` as JSON (a publish's answer), cut
        from the wire form rather than encoded again."""
        return self.json[:self._start - 11] + b"}\n"  # (the head ends in ,"message":)

    def as_dict(self) -> dict[str, Any]:
        """The message as every response carries it (PROTOCOL.md)."""
        d = {"id": self.id, "channel": self.channel, "time": self.time,
             "message": self.message}
        if self.title is not None:
            d["title"] = self.title
        if self.priority is not None:
            d["priority"] = self.priority
        if self.extra:
            d.update(self.extra)
        return d

    def __repr__(self) -> str:
        return f"<Message {self.id} on {self.channel}: {self.payload[:40]!r}>"


class Draft(NamedTuple):
    """A message on its way to a store, before it has a number."""
    channel: str
    message: Any
    title: str | None
    priority: int | None
    payload: bytes  # the message as JSON, encoded once
    key: str | None  # the publish's idempotency key
    extra: dict[str, Any] | None = None  # (see Message.extra)


def _constructor(cls: type) -> Callable[[tuple], Any]:
    """``cls(*fields)`` for a NamedTuple, all fields given as one tuple,
    without the Python frame of its ``__new__`` (for the publish path)."""
    return functools.partial(tuple.__new__, cls)


_new_draft = _constructor(Draft)


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
                + b'],"cursor":"' + self.cursor.encode() + b'"' + gap + b"}\n")


_seq_of = lambda m: m.seq  # noqa: E731 (the key for bisect and merge)

def _make_encode() -> Callable[[Any], str]:
    """JSON text of a value, on one line, UTF-8 left as it is; NaN and
    Infinity refused. ``JSONEncoder.encode`` builds its C encoder afresh on
    every call; this builds it once (no check for circular values: they end
    in ``RecursionError``, which callers treat like any value that is not
    plain JSON). Where the C encoder is missing, or takes other arguments,
    ``JSONEncoder.encode`` itself."""
    plain = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    try:
        chunks = make(None, plain.default, json.encoder.encode_basestring, None, ":", ",",
                      False, False, False)
        if "".join(chunks({"a": [1, 2.5, "é"]}, 0)) != '{"a":[1,2.5,"é"]}':
            raise TypeError
    except (TypeError, ValueError):
        return plain.encode

    def encode(obj: Any) -> str:
        return "".join(chunks(obj, 0))
    return encode


_encode = _make_encode()


class Position(NamedTuple):
    """A ``since`` placed in a hub's history (see ``Hub.locate``).

    Hashable, so a server can group the requests waiting at one position.
    """

    after: int            # messages with a larger seq come next
    everything: bool      # since=0: what is held, with no gap for what is not
    unplaceable: bool     # another history's cursor: answer with a gap
    history: str | None = None  # the history it was placed in (None: any)


class Channel:
    """A bounded log of messages, oldest first, and who waits on it."""

    __slots__ = ("name", "messages", "dropped", "waiters", "taken", "queue", "expiring")

    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: list[Message] = []
        self.expiring = 0      # messages held that have an expiry (``ttl``)
        self.dropped = 0       # seq of the newest message retention dropped
        self.waiters: set[Callable[[], None]] = set()
        self.taken = 0         # seq of the last message /receive handed out
        self.queue: WorkQueue | None = None  # given back, and out on lease

    def hand_out(self, lease: float | None, now: float) -> Message | None:
        """``/receive``'s next message of this channel: one given back, else
        the one after ``taken``; with *lease*, a copy with a ``receipt``."""
        queue, msg = self.queue, None
        if queue is not None:
            queue.expire(now)
            while queue.returned and msg is None:
                msg = self.held(queue.returned.pop(0))  # (retention may have dropped it)
        if msg is None:
            pending = self.read_after(self.taken)
            if pending:
                msg = pending[0]
                self.taken = msg.seq
        if msg is not None and lease is not None:
            msg = Message(msg.seq, msg.id, self.name, None, msg.title, msg.priority,
                          msg.payload, msg.time, msg.extra)
            msg.receipt = secrets.token_hex(8)
            self.queue = self.queue or WorkQueue()
            self.queue.leases[msg.receipt] = (msg.seq, now + lease)
        return msg

    def queue_json(self) -> str | None:
        return self.queue.to_json() if self.queue is not None else None

    def held(self, seq: int) -> Message | None:
        """Message *seq*, if this channel still holds it."""
        i = bisect.bisect_left(self.messages, seq, key=_seq_of)
        return self.messages[i] if i < len(self.messages) and self.messages[i].seq == seq \
            else None

    def read_after(self, seq: int) -> list[Message]:
        """The messages published after position *seq*, oldest first."""
        return self.messages[bisect.bisect_right(self.messages, seq, key=_seq_of):]

    def trim(self, retention: int, max_age: float | None) -> list[Message] | tuple[()]:
        """Drop messages beyond the count limit or older than *max_age*;
        return them."""
        messages = self.messages
        drop = len(messages) - retention
        if max_age and messages and messages[0].born < time.monotonic() - max_age:
            cutoff = time.monotonic() - max_age
            old = 0
            for m in messages:
                if m.born >= cutoff:
                    break
                old += 1
            drop = max(drop, old)
        if drop <= 0:
            return ()
        gone = self.messages[:drop]
        self.dropped = gone[-1].seq
        del self.messages[:drop]
        if self.expiring:
            self.expiring -= sum(m.expires is not None for m in gone)
        return gone

    def expire(self, now: float) -> list[Message]:
        """Drop the messages whose expiry has passed (they leave no ``gap``:
        gone by design); return them."""
        gone = [m for m in self.messages if m.expires is not None and m.expires <= now]
        if gone:
            self.messages = [m for m in self.messages if m.expires is None or m.expires > now]
            self.expiring -= len(gone)
        return gone


class WorkQueue:
    """What ``/receive`` handed out of a channel beyond its ``taken`` mark:
    messages given back, handed out again first (oldest first), and
    messages out on lease ({receipt: (seq, until)}, wall-clock seconds),
    which come back once their lease ends unless acknowledged. Kept as
    JSON by the stores."""

    __slots__ = ("returned", "leases")

    def __init__(self, returned: Iterable[int] = (),
                 leases: dict[str, tuple[int, float]] | None = None) -> None:
        self.returned = sorted(set(returned))
        self.leases = {r: (int(seq), float(until)) for r, (seq, until) in (leases or {}).items()}

    def expire(self, now: float) -> None:
        """Leases that ended give their message back."""
        for receipt, (seq, until) in list(self.leases.items()):
            if until <= now:
                del self.leases[receipt]
                self.give_back(seq)

    def ack(self, receipt: str, now: float) -> bool:
        """The lease *receipt* ends for good; False if it had ended already."""
        self.expire(now)
        return self.leases.pop(receipt, None) is not None

    def give_back(self, seq: int) -> None:
        i = bisect.bisect_left(self.returned, seq)
        if i == len(self.returned) or self.returned[i] != seq:
            self.returned.insert(i, seq)
        for receipt, (leased, _) in list(self.leases.items()):
            if leased == seq:
                del self.leases[receipt]

    def to_json(self) -> str:
        return _encode({"returned": self.returned, "leases": self.leases})

    @classmethod
    def from_json(cls, text: str | None) -> "WorkQueue | None":
        if not text:
            return None
        data = json.loads(text)
        return cls(data.get("returned", ()), data.get("leases"))


class IdempotencyKeys:
    """Publishes' idempotency keys, oldest first: key -> (wall time it was
    used, seq, channel, message time), for *window* seconds, at most
    ``MAX_IDEMPOTENCY_KEYS`` (the oldest go first)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._keys: dict[str, tuple[float, int, str, float]] = {}

    def get(self, key: str, now: float) -> tuple[float, int, str, float] | None:
        known = self._keys.get(key)
        return known if known is not None and known[0] >= now - self.window else None

    def remember(self, key: str, at: float, seq: int, channel: str, when: float) -> None:
        self._keys.pop(key, None)  # (re)inserted last: the dict stays oldest first
        self._keys[key] = (at, seq, channel, when)
        if len(self._keys) > MAX_IDEMPOTENCY_KEYS:
            del self._keys[next(iter(self._keys))]

    def prune(self, now: float) -> None:
        keys = self._keys
        while keys:
            key = next(iter(keys))
            if keys[key][0] >= now - self.window:
                break
            del keys[key]


class Log:
    """A hub's state and the rules that change it, under one lock: the
    channels as bounded logs, the one sequence that numbers every message,
    the history's name, the marks that tell where a cursor's messages may be
    missing (retention, channels forgotten, a shared store's loss),
    idempotency keys and ``/receive``'s queues. ``Hub`` builds the public
    API on it: arguments checked, blocking waits, watches, closing.

    A store reaches a hub only through what is marked "for stores" here
    (``number``, ``replayed``, ``admit``, ``follow``, ``adopt``,
    ``hand_out``, ``acknowledge``, ``requeue``) and ``head``, ``history``,
    ``cursor_for`` and ``closed``; the log tells its store what retention
    drops (``Store.dropped``).
    """

    def __init__(self, store: "Store", retention: int, max_age: float | None,
                 max_channels: int, idempotency_window: float) -> None:
        #: Messages kept per channel; older ones are dropped first.
        self.retention = retention
        #: Seconds a message is kept (None or 0: no age limit).
        self.max_age = max_age
        #: Channels held at once (with messages, or waited on); a new one
        #: past it is refused with 503 until retention frees room.
        self.max_channels = max_channels
        #: Where messages are kept besides memory (see ``Store``, ``open_store``).
        self.store = store
        self._keys = IdempotencyKeys(idempotency_window)
        #: The wall clock (``time.time``) that stamps messages, and by which
        #: they expire and are scheduled; tests may set another.
        self.clock: Callable[[], float] = time.time
        self._pruned = 0.0
        self._forgotten = 0  # newest message dropped from a channel since forgotten
        self._unreported: dict[str, int] = {}  # channels forgotten, for the store's next prune
        self._lost = 0  # a shared store lost what followed this seq (Redis lost its data)
        #: Names this hub's history in every cursor it hands out.
        self.history = secrets.token_hex(4)
        self._lock = threading.Lock()
        self._channels: dict[str, Channel] = {}
        # Pattern subscriptions: who waits on each pattern; which of those
        # patterns each channel matches (worked out on its first publish
        # after a pattern comes or goes); and each pattern's channels, worked
        # out again when a channel comes or goes (``_generation`` counts).
        self._patterns: dict[str, set[Callable[[], None]]] = {}
        self._matched: dict[str, tuple[str, ...]] = {}
        self._expanded: dict[str, tuple[int, list[str]]] = {}
        self._generation = 0
        # Channels watched for silence (``Hub.expect``), and when each last
        # had a message of its own (a silence alert's do not count).
        self._expected: frozenset[str] = frozenset()
        self._spoke: dict[str, float] = {}
        self._seq = 0
        self._closed = False
        self._positions: dict[str, Position] = {}  # settled cursors, placed once
        #: Messages published since the hub started (through this hub).
        self.published = 0

    # -- state ----------------------------------------------------------------------

    @property
    def cursor(self) -> str:
        """The head: a cursor that sees only messages published from now on."""
        return self.cursor_for(self._seq)

    @property
    def head(self) -> int:
        """The sequence number of the newest message this hub has."""
        return self._seq

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def closed(self) -> bool:
        return self._closed

    def cursor_for(self, seq: int) -> str:
        """The cursor (and message id) of position *seq* in this history."""
        return f"{self.history}-{seq}"

    def _channel(self, name: str) -> Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = Channel(name)
            self._generation += 1
        return channel

    def _matching(self, pattern: str) -> list[str]:
        """Under the lock: the channels *pattern* matches now."""
        known = self._expanded.get(pattern)
        if known is not None and known[0] == self._generation:
            return known[1]
        match = _pattern_matcher(pattern)
        names = [name for name in self._channels if match(name)]
        if len(self._expanded) >= 1024:
            self._expanded.clear()
        self._expanded[pattern] = (self._generation, names)
        return names

    def _resolve(self, names: tuple[str, ...]) -> tuple[list[Channel], bool]:
        """Under the lock: the channels *names* stand for now (patterns
        expanded; each channel once), and whether one of them may have held
        messages that are gone with it: a named channel not held, or for a
        pattern any channel forgotten (it may have matched)."""
        channels, missing, patterns = [], False, False
        for name in names:
            ch = self._channels.get(name)
            if ch is not None:
                channels.append(ch)
            elif is_pattern(name):
                channels.extend(map(self._channels.__getitem__, self._matching(name)))
                missing = patterns = True
            else:
                missing = True
        if patterns:  # each once, if named and matched, or matched twice
            channels = list({ch.name: ch for ch in channels}.values())
        return channels, missing

    def _expire(self, ch: Channel) -> None:
        """Under the lock: drop *ch*'s expired messages, here and in the store."""
        gone = ch.expire(self.clock())
        if gone:
            self.store.expired(gone)

    def _pattern_waiters(self, channel: str) -> set[Callable[[], None]]:
        """Under the lock: take the waiters of the patterns *channel* matches
        (one-shot, like a channel's)."""
        patterns = self._matched.get(channel)
        if patterns is None:
            if len(self._matched) >= 4096:
                self._matched.clear()
            patterns = self._matched[channel] = tuple(
                p for p in self._patterns if _pattern_matcher(p)(channel))
        woken: set[Callable[[], None]] = set()
        for pattern in patterns:
            waiters = self._patterns.get(pattern)
            if waiters:
                woken |= waiters
                waiters.clear()
        return woken

    def _every_waiter(self) -> set[Callable[[], None]]:
        """Under the lock: take every waiter, of channels and of patterns."""
        waiters: set[Callable[[], None]] = set()
        for ch in self._channels.values():
            waiters |= ch.waiters
            ch.waiters = set()
        for pattern_waiters in self._patterns.values():
            waiters |= pattern_waiters
            pattern_waiters.clear()
        return waiters

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

    # -- numbering (for stores) -----------------------------------------------------

    def admit(self, channel: str) -> None:
        """For stores that number messages themselves, before they do:
        raise a 503 ``LongpollError`` if the hub is closed or has no room
        for *channel*."""
        with self._lock:
            if self._closed:
                raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE, "the hub is closed")
            self._make_room((channel,))

    def number(self, draft: "Draft",
               keep: Callable[[Message, str | None], None] | None) -> Message:
        """For stores (``Store.publish``): number *draft* here, have *keep*
        (if given) keep it (raise to refuse it), then apply it and wake its
        waiters, all under the lock; or, for a key used within the window,
        return the first publish's message (``replayed``)."""
        channel, message, title, priority, payload, key, extra = draft
        with self._lock:
            if self._closed:
                raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE, "the hub is closed")
            if key is not None:
                known = self._keys.get(key, time.time())
                if known is not None:
                    return self.replayed(*known[1:])
            if len(self._channels) >= self.max_channels:
                self._make_room((channel,))
            seq = self._seq + 1
            msg = Message(seq, f"{self.history}-{seq}", channel, message, title, priority,
                          payload, None if self.clock is time.time else round(self.clock(), 3),
                          extra)
            if keep is not None:
                keep(msg, key)  # kept before it is acknowledged; may raise
            self._seq = seq
            self.published += 1
            waiters = self._apply(msg)
            if key is not None:
                self._keys.remember(key, time.time(), seq, channel, msg.time)
        for wake in waiters:
            wake()
        return msg

    def replayed(self, seq: int, channel: str, at: float) -> Message:
        """For stores: the answer to a repeated key, the message numbered
        *seq* (its body too, while this hub holds it)."""
        ch = self._channels.get(channel)
        first = ch.held(seq) if ch is not None else None
        if first is not None:
            msg = Message(seq, first.id, channel, None, first.title, first.priority,
                          first.payload, first.time, first.extra)
        else:
            msg = Message(seq, self.cursor_for(seq), channel, None, None, None, b"null", at)
        msg.replayed = True
        return msg

    def _apply(self, msg: Message) -> set[Callable[[], None]]:
        """Under the lock: append *msg* to its channel; return who to wake."""
        ch = self._channels.get(msg.channel) or self._channel(msg.channel)
        ch.messages.append(msg)
        if msg.extra is not None and "expires" in msg.extra:
            ch.expiring += 1
        if msg.channel in self._expected and _speaks(msg):
            self._spoke[msg.channel] = max(self._spoke.get(msg.channel, 0.0), msg.time)
        gone = ch.trim(self.retention, self.max_age)
        if gone and self.store._drops:
            self.store.dropped(gone)
        # Waiters are one-shot: a woken waiter reads and registers again.
        waiters, ch.waiters = ch.waiters, set()
        if self._patterns:
            waiters |= self._pattern_waiters(msg.channel)
        return waiters

    def follow(self, messages: Iterable[Message], head: int = 0,
                marks: dict[str, tuple[int, int]] | None = None, forgotten: int = 0,
                lost: int = 0,
                keys: Iterable[tuple[str, float, int, str, float]] = (),
                queues: dict[str, WorkQueue] | None = None) -> None:
        """For stores: apply messages published before (a store reopened)
        or through other hubs sharing this one's store, in order; move the
        head to at least *head*, and each channel's dropped and taken marks
        (*marks*: {name: (dropped, taken)}) and the forgotten watermark up
        to at least what is given; *lost*: messages after it may be missing
        (Redis lost its data), so older cursors get ``gap``; *keys*:
        idempotency keys kept, as (key, at, seq, channel, time), oldest
        first; *queues*: ``/receive``'s queues kept. With ``adopt``, the only
        ways a store changes a hub."""
        waiters: set[Callable[[], None]] = set()
        with self._lock:
            for name, queue in (queues or {}).items():
                self._channel(name).queue = queue
            for key, at, seq, channel, when in keys:
                self._keys.remember(key, at, seq, channel, when)
            self._forgotten = max(self._forgotten, forgotten)
            self._lost = max(self._lost, lost)
            for name, (dropped, taken) in (marks or {}).items():
                ch = self._channel(name)
                ch.dropped, ch.taken = max(ch.dropped, dropped), max(ch.taken, taken)
            for msg in messages:
                if msg.seq > self._seq:
                    self._seq = msg.seq
                    waiters |= self._apply(msg)
            self._seq = max(self._seq, head)
        for wake in waiters:
            wake()

    def adopt(self, history: str) -> None:
        """For shared stores: the store's history was replaced (Redis lost
        its data and another server began anew). Take its name and forget
        every message held, which belong to the old one; every waiter is
        woken, and every cursor of the old history is answered with ``gap``
        from the oldest message of the new one. The store then brings the
        new history's messages through ``follow``."""
        with self._lock:
            logger.warning("history %s replaced by %s: cursors from before get a gap",
                           self.history, history)
            self.history = history
            self._seq = self._forgotten = self._lost = 0
            self._positions.clear()
            for ch in self._channels.values():
                ch.messages, ch.dropped, ch.taken, ch.queue = [], 0, 0, None
            waiters = self._every_waiter()
        for wake in waiters:
            wake()

    # -- reading --------------------------------------------------------------------

    def locate(self, since: "str | None | Position") -> Position:
        """Place *since* in this hub's history; raise a 400 error if it is
        malformed. None ("from now on") is fixed at the head, now."""
        if isinstance(since, Position):
            return since
        if since is None:
            return Position(self._seq, False, False, self.history)
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
        if match.group(1) != self.history or seq > self._seq and not self.store.lag:
            return Position(0, False, True)  # another history: answer from the oldest
        if seq > self._seq:  # another server's news, not here yet: see settle()
            return Position(seq, False, False, self.history)
        if len(self._positions) >= 1024:  # a cursor of ours never changes place
            self._positions.clear()
        position = self._positions[since] = Position(seq, False, False, self.history)
        return position

    def ahead(self, position: Position) -> bool:
        """Whether *position* lies past every message this hub has seen. With
        a shared store that is another server's news, which this hub's feed
        brings within milliseconds, or a position no server handed out."""
        return position.after > self._seq

    def settle(self, position: Position) -> Position:
        """*position* after a wait: one still ahead of this hub was handed out
        by no server (the feed would have brought it), so it is unplaceable
        and is answered from the oldest held message with ``gap``. Placing
        it this way costs no call to the store."""
        if position.after > self._seq or self._stale(position):
            return Position(0, False, True)
        return position

    def _stale(self, position: Position) -> bool:
        """Placed in a history this hub has since left (see ``adopt``)."""
        return position.history is not None and position.history != self.history

    def _read(self, names: tuple[str, ...], position: Position, limit: int,
              max_bytes: int | None = None) -> Batch:
        """Read under the lock: messages after *position* in *names*, merged;
        at most *limit* of them and, past the first, *max_bytes* of JSON."""
        after, everything, gap, history = position
        if history is not None and history != self.history:  # placed before adopt()
            after, everything, gap = 0, False, True
        if self._lost > after and not everything:
            gap = True  # the shared store lost messages after this position
        runs = []
        channels, missing = self._resolve(names)
        if missing and self._forgotten > after and not everything:
            gap = True  # it may have been one of the channels forgotten
        for ch in channels:
            if ch.expiring:
                self._expire(ch)
            gone = ch.trim(self.retention, self.max_age)
            if gone:
                self.store.dropped(gone)
            if ch.dropped > after and not everything:
                gap = True
            run = ch.read_after(after)
            if run:
                runs.append(run)
        if not runs:  # (a shared store's cursor can be ahead of this hub, for a moment)
            return Batch([], self.cursor_for(max(self._seq, after)), gap)
        if len(runs) == 1:
            available = runs[0]
        else:
            available = list(heapq.merge(*runs, key=_seq_of))
        if max_bytes is not None:  # the rest comes on the next read
            size = 0
            for count, msg in enumerate(itertools.islice(available, limit)):
                size += len(msg.json) + 1
                if size > max_bytes and count:
                    limit = count
                    break
        if len(available) > limit:  # the rest comes on the next read
            messages = available[:limit]
            return Batch(messages, messages[-1].id, gap)
        return Batch(available, self.cursor_for(max(self._seq, after)), gap)

    def position_at(self, names: Iterable[str], when: float | None = None) -> Position:
        """The position just before the first message of *names* published
        at or after *when* (a Unix time), or with no *when*, before the
        newest of them; the head if there is none. (ntfy's ``since=`` with
        a time, a duration or ``latest``.) Messages retention dropped after
        it make a read from it report ``gap``."""
        with self._lock:
            first = None
            for ch in self._resolve(tuple(names))[0]:
                if not ch.messages:
                    continue
                if when is None:
                    seq = ch.messages[-1].seq
                    first = seq if first is None else max(first, seq)
                    continue
                index = bisect.bisect_left(ch.messages, when, key=lambda m: m.time)
                if index < len(ch.messages):
                    seq = ch.messages[index].seq
                    first = seq if first is None else min(first, seq)
            after = self._seq if first is None else first - 1
            return Position(after, False, False, self.history)

    def at_head(self, position: Position) -> bool:
        """Whether a read at *position* is sure to find nothing (no message
        after it, and no gap to report)."""
        return position.after == self._seq and not position.unplaceable and (
            position.history is None or position.history == self.history)

    def read_checked(self, names: tuple[str, ...], position: Position, limit: int,
                     max_bytes: int | None = None) -> Batch:
        """``read`` for servers that have checked *names* and *limit* and
        placed *position* already: the hot path of every poll. With
        *max_bytes*, stop before the message that would pass it (the first
        one always comes)."""
        if self.at_head(position):
            return Batch([], self.cursor_for(position.after))  # nothing newer
        with self._lock:
            return self._read(names, position, limit, max_bytes)

    # -- /receive's queues (for stores) ---------------------------------------------
    # Kept here for stores that leave them to the hub (the default
    # ``Store.take``, ``ack`` and ``give_back``): *keep* is called under the
    # lock with each change, as (channel, taken mark, queue JSON).

    def hand_out(self, channel: str, lease: float | None,
                 keep: Callable[[str, int, str | None], None]) -> Message | None:
        """For stores: the next message of *channel*'s queue, or None."""
        with self._lock:
            self._make_room((channel,))
            ch = self._channel(channel)
            if ch.expiring:
                self._expire(ch)
            msg = ch.hand_out(lease, time.time())
            if msg is not None or ch.queue is not None:
                keep(channel, ch.taken, ch.queue_json())
            return msg

    def acknowledge(self, channel: str, receipt: str,
                    keep: Callable[[str, int, str | None], None]) -> bool:
        """For stores: end *receipt*'s lease with its message taken for good."""
        with self._lock:
            ch = self._channels.get(channel)
            if ch is None or ch.queue is None or not ch.queue.ack(receipt, time.time()):
                return False
            keep(channel, ch.taken, ch.queue_json())
            return True

    def requeue(self, channel: str, seq: int,
                keep: Callable[[str, int, str | None], None]) -> None:
        """For stores: put message *seq* back at the head of *channel*'s queue."""
        with self._lock:
            ch = self._channel(channel)
            ch.queue = ch.queue or WorkQueue()
            ch.queue.give_back(seq)
            keep(channel, ch.taken, ch.queue.to_json())

    # -- housekeeping ---------------------------------------------------------------

    def _prune(self) -> None:
        self._pruned = time.monotonic()
        self._keys.prune(time.time())
        for name, ch in list(self._channels.items()):
            if ch.expiring:
                self._expire(ch)
            gone = ch.trim(self.retention, self.max_age)
            if gone:
                self.store.dropped(gone)
            if not (ch.messages or ch.waiters):
                del self._channels[name]
                self._generation += 1
                self._forgotten = max(self._forgotten, ch.dropped)
                self._unreported[name] = ch.dropped
        for pattern, waiters in list(self._patterns.items()):
            if not waiters:  # nobody waits on it now: forget it
                del self._patterns[pattern]
                self._matched.clear()


class Hub(Log):
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
                 store: "Store | str | None" = None,
                 idempotency_window: float = DEFAULT_IDEMPOTENCY_WINDOW,
                 max_delay: float = DEFAULT_MAX_DELAY,
                 max_scheduled: int = DEFAULT_MAX_SCHEDULED,
                 max_scheduled_per_client: int = DEFAULT_MAX_SCHEDULED_PER_CLIENT,
                 max_expectations: int = DEFAULT_MAX_EXPECTATIONS) -> None:
        if retention < 1:
            raise ValueError("retention must be at least 1 message")
        super().__init__(open_store(store) if isinstance(store, str) else store or Store(),
                         retention, max_age, max_channels, idempotency_window)
        #: Seconds ahead a message may be scheduled (``schedule``).
        self.max_delay = max_delay
        #: Messages scheduled and not yet published, in all and per client.
        self.max_scheduled, self.max_scheduled_per_client = max_scheduled, \
            max_scheduled_per_client
        #: Channels that may be watched for silence at once (``expect``).
        self.max_expectations = max_expectations
        self._ticking = threading.RLock()  # (one tick at a time; none past close)
        self._ticker: threading.Thread | None = None
        self._stop_ticking = threading.Event()
        self._waiting = 0
        self.store.open(self)  # gives back what was stored: history, sequence, messages

    @property
    def waiting(self) -> int:
        """How many blocking ``wait``/``take`` calls are parked now (a
        server's parked requests are counted by ``Server.waiting``)."""
        return self._waiting

    @property
    def idempotency_window(self) -> float:
        """Seconds a publish's idempotency key is remembered."""
        return self._keys.window

    # -- publishing -----------------------------------------------------------------

    def publish(self, channel: str, message: Any, *, title: str | None = None,
                priority: int | None = None, key: str | None = None,
                **extra: Any) -> Message:
        """Append *message* (any JSON value) to *channel* and wake its waiters.

        *extra*: the message's other fields, as ntfy names them (``tags``,
        ``click``, ``icon``, ``actions``, ``markdown``; see ``EXTRA_FIELDS``),
        and ``ttl``: seconds, or a duration such as ``"10m"``, after which
        the message expires: it is never delivered after that, and is
        dropped from history without a ``gap`` (its ``expires`` field says
        when; see ``Message.expires``).

        With *key* (an idempotency key: 1-128 printable ASCII characters),
        a publish repeated with the same key within ``idempotency_window``
        seconds stores nothing and returns the first one's message, with
        ``replayed`` set (its id, channel and time; its body too while the
        hub holds it). The sqlite and Redis stores keep the keys, so this
        holds across restarts and across servers.
        """
        # Who numbers it is the store's choice: by default this hub does
        # (``number`` below); a store shared by several servers numbers it
        # itself (``admit`` first) and brings it back through ``follow``.
        return self.store.publish(self, self._draft(channel, message, title, priority, key,
                                                    extra))

    def publish_later(self, channel: str, message: Any,
                      then: Callable[["Message | LongpollError"], None], *,
                      title: str | None = None, priority: int | None = None,
                      key: str | None = None, **extra: Any) -> None:
        """``publish`` for a server's loop thread: *then* gets the message,
        or the ``LongpollError`` that refused it, on that thread; at once,
        or when a store the loop drives (``Store.loop``) has kept it, so
        the loop never waits on the network. Bad arguments raise at once."""
        self.store.publish_later(self, self._draft(channel, message, title, priority, key,
                                                   extra), then)

    def _draft(self, channel: str, message: Any, title: str | None, priority: int | None,
               key: str | None, extra: dict[str, Any] | None = None) -> Draft:
        """Check a publish's arguments; encode the message once."""
        if type(channel) is not str or channel not in self._channels:  # (a channel's
            # name was checked when it was made)
            check_channel(channel)
        if key is not None and not IDEMPOTENCY_KEY_RE.match(key):
            raise _bad_request("an idempotency key is 1-128 printable ASCII characters")
        if title is not None and (not isinstance(title, str)
                                  or len(title) > MAX_TITLE):
            raise _bad_request(f"title must be a string of at most {MAX_TITLE} characters")
        if priority is not None and (type(priority) is not int
                                     or not 1 <= priority <= 5):
            raise _bad_request("priority must be an integer from 1 (min) to 5 (urgent)")
        try:  # encoded once, outside the lock; refuses what is not plain JSON
            if type(message) is _Verbatim:  # (its text, checked: see _decode_publish)
                message, payload = message.value, message.text.encode()
            else:
                payload = _encode(message).encode()
            if title is not None:
                title.encode()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") is no text
            raise _bad_request("message and title must be valid Unicode text "
                               "(no lone surrogates)") from None
        except (TypeError, ValueError, RecursionError) as exc:
            raise _bad_request(f"message is not plain JSON: {exc}") from None
        ttl = None
        if extra and "ttl" in extra:
            extra = dict(extra)
            ttl = extra.pop("ttl")
        checked = _check_extra(extra) if extra else None
        if ttl is not None:
            seconds = parse_duration(ttl, "ttl")
            if not 0 < seconds <= MAX_TTL:
                raise _bad_request(f"ttl must be more than 0 and at most {MAX_TTL:.0f} seconds "
                                   "(366 days)")
            checked = {**(checked or {}), "expires": round(self.clock() + seconds, 3)}
        return _new_draft((channel, message, title, priority, payload, key, checked))

    # -- scheduling -----------------------------------------------------------------

    def schedule(self, channel: str, message: Any, at: float, *, title: str | None = None,
                 priority: int | None = None, key: str | None = None,
                 client: str | None = None, **extra: Any) -> dict[str, Any]:
        """Publish *message* to *channel* at *at* (a Unix time, by ``clock``),
        with ``publish``'s arguments, checked now; return what was scheduled:
        ``{"id", "channel", "at", ...}``. The store keeps it (sqlite and
        Redis: across restarts; Redis: it is published once, by one of the
        servers sharing it), and ``tick()`` publishes it when it is due
        (servers tick every second). A ``ttl`` counts from then.

        *at* must lie ahead, at most ``max_delay`` seconds (400). With *key*
        (an idempotency key), a repeat schedules nothing and returns the
        first one's entry. At most ``max_scheduled`` are waiting in all (a
        503 past it) and ``max_scheduled_per_client`` from one *client* (a
        429 past it)."""
        if type(message) is _Verbatim:  # (kept as a value, encoded when it is published)
            message = message.value
        self._draft(channel, message, title, priority, key, extra)  # (a 400 now, not then)
        now = self.clock()
        if not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(at):
            raise _bad_request("a scheduled time is a Unix time")
        if at <= now:
            raise _bad_request("that time has passed: schedule a message for a time ahead")
        if at > now + self.max_delay:
            raise _bad_request(f"a message may be scheduled at most {self.max_delay:.0f} "
                               f"seconds ahead, not {at - now:.0f}")
        ident = ("s" + hashlib.sha256(key.encode()).hexdigest()[:20] if key is not None
                 else "s" + secrets.token_hex(10))
        entry = {"id": ident, "channel": channel, "at": round(at, 3), "message": message,
                 "title": title, "priority": priority, "key": key, "extra": extra,
                 "client": client}
        return self.store.schedule(self, entry)

    def start_ticking(self, interval: float = 1.0) -> None:
        """``tick()`` every *interval* seconds on a thread of the hub's own,
        until it closes (for a hub that no server ticks: one used alone, or
        mounted in an app). Once; later calls do nothing."""
        if self._ticker is not None or self._closed:
            return

        def run() -> None:
            while not self._stop_ticking.wait(interval):
                try:
                    self.tick()
                except Exception:  # a bug must not end the scheduling
                    logger.exception("error publishing scheduled messages")
        self._ticker = threading.Thread(target=run, name="longpoll-tick", daemon=True)
        self._ticker.start()

    # -- silence alerts -------------------------------------------------------------

    def expect(self, channel: str, every: float | str, to: str | None = None) -> dict[str, Any]:
        """Expect a message on *channel* at least every *every* seconds (or a
        duration such as ``"26h"``): when none has come for that long,
        ``tick()`` publishes an alert (priority 4, "No message on backups for
        26 h") to *to* (default: *channel*), once; and when messages resume,
        "backups is back", once. Alerts are tagged ``SILENCE_TAG`` and do not
        count as the channel speaking. The time counts from now; the store
        keeps it (sqlite, Redis: across restarts; Redis: each alert is
        published by one server). Replaces an expectation *channel* had.
        Returns its state (``expectation``)."""
        check_channel(channel)
        check_channel(to if to is not None else channel)
        seconds = parse_duration(every, "every")
        if not 1 <= seconds <= MAX_TTL:
            raise _bad_request("every must be from 1 second to 366 days")
        entry = {"channel": channel, "every": seconds, "to": to or channel,
                 "last": round(self.clock(), 3), "alerted": None}
        self.store.expect(self, entry)
        with self._lock:
            self._expected = self._expected | {channel}
        return self._state(entry)

    def expectation(self, channel: str) -> dict[str, Any] | None:
        """*channel*'s expectation: ``{"channel", "every", "to", "last",
        "due", "silent"}`` (``last``: its last message, or when the
        expectation began or an alert went; ``silent``: an alert went and
        no message came since), or None."""
        check_channel(channel)
        entry = self.store.expectations(self).get(channel)
        return self._state(entry) if entry is not None else None

    def unexpect(self, channel: str) -> bool:
        """Stop expecting messages on *channel*; False if nothing was."""
        check_channel(channel)
        return self.store.unexpect(self, channel)

    @staticmethod
    def _state(entry: dict[str, Any]) -> dict[str, Any]:
        return {"channel": entry["channel"], "every": entry["every"], "to": entry["to"],
                "last": entry["last"], "due": round(entry["last"] + entry["every"], 3),
                "silent": entry["alerted"] is not None}

    def _check_silences(self) -> list[Message]:
        """``tick``'s part: alert the channels silent too long, and those
        that spoke after an alert, each once (the store decides who)."""
        expectations = self.store.expectations(self)
        with self._lock:
            for name in expectations.keys() - self._expected:  # (held from before: a restart)
                ch = self._channels.get(name)
                spoken = [m.time for m in ch.messages if _speaks(m)] if ch is not None else []
                self._spoke[name] = max([self._spoke.get(name, 0.0), *spoken])
            self._expected = frozenset(expectations)
            spoke = {name: self._spoke.get(name, 0.0) for name in expectations}
        published = []
        for channel, entry in expectations.items():
            now = round(self.clock(), 3)  # (to the millisecond, as messages' times are)
            verdict = self.store.expect_check(self, channel, spoke[channel], now)
            if verdict is None:
                continue
            hours = _human_seconds(entry["every"])
            if verdict == "alert":
                msg = self.publish(
                    entry["to"], f"{channel} has had no message for {hours}", priority=4,
                    title=f"No message on {channel} for {hours}", tags=["warning", SILENCE_TAG])
            else:
                msg = self.publish(
                    entry["to"], f"{channel} has messages again", priority=3,
                    title=f"{channel} is back", tags=["white_check_mark", SILENCE_TAG])
            published.append(msg)
        return published

    def tick(self) -> list[Message]:
        """Publish the scheduled messages that are due; return them. Servers
        call it every second; a program that uses a hub alone and schedules
        messages calls it itself. Safe from any thread, and from several
        servers sharing a store: each message is published once."""
        published: list[Message] = []
        with self._ticking:
            if self._closed:
                return published
            try:
                due = self.store.claim_due(self, self.clock())
            except LongpollError as error:  # the store is down: the next tick tries again
                logger.debug("scheduled messages not claimed: %s", error)
                return published
            for entry in due:
                try:
                    published.append(self.publish(
                        entry["channel"], entry["message"], title=entry["title"],
                        priority=entry["priority"], key=entry["key"], **entry["extra"]))
                except LongpollError as error:
                    logger.warning("the message scheduled as %s for %s was not published: %s",
                                   entry["id"], entry["channel"], error)
            try:
                published += self._check_silences()
            except LongpollError as error:
                logger.debug("silences not checked: %s", error)
        return published

    # -- reading --------------------------------------------------------------------

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
            with self._lock:
                batch = self._read(names, position, limit)
            return bool(batch.messages or batch.gap), batch

        return self._block(names, attempt, timeout)

    # -- the work queue (/receive) --------------------------------------------------

    def take(self, channel: str = DEFAULT_CHANNEL, timeout: float = DEFAULT_TIMEOUT, *,
             lease: float | None = None) -> Message | None:
        """Work queue: the oldest message of *channel* no other taker got
        (messages given back first). Returns None on timeout or close.

        Each message is taken once (the ``/receive`` route); broadcast
        readers still see every message. With *lease* (seconds), the
        message carries a ``receipt`` and comes back to the queue after
        *lease* seconds unless ``ack(receipt)`` is called first.
        """
        check_channel(channel)
        if lease is not None and not 0 < lease <= 86400:
            raise _bad_request("a lease is from 0 to 86400 seconds")

        def attempt() -> tuple[bool, Message | None]:
            msg = self.store.take(self, channel, lease)  # (the store decides who hands out)
            return msg is not None, msg

        return self._block((channel,), attempt, timeout)

    def ack(self, receipt: str, channel: str = DEFAULT_CHANNEL) -> bool:
        """Keep a leased message taken for good; False if its lease ended
        (it went back to the queue) or it was acknowledged already."""
        check_channel(channel)
        return self.store.ack(self, channel, receipt)

    def give_back(self, msg: Message) -> None:
        """Put a message ``take`` handed out back at the head of its queue
        (its taker never got it); waiting takers are woken."""
        self.store.give_back(self, msg.channel, msg.seq)
        with self._lock:
            ch = self._channel(msg.channel)
            waiters, ch.waiters = ch.waiters, set()
        for wake in waiters:
            wake()

    def _block(self, names: tuple[str, ...],
               attempt: Callable[[], tuple[bool, Any]], timeout: float) -> Any:
        """Call *attempt* until it is done, time
        runs out or the hub closes, and return its last answer. Between
        attempts, sleep until ``watch`` says *names* changed: the watch is
        set before each attempt, so no publish between the two is missed.
        The one waiting mechanism of ``wait`` and ``take``, on every store."""
        deadline = time.monotonic() + max(0.0, timeout)
        parked = False
        try:
            while True:
                woken = threading.Event()
                cancel = self.watch(names, woken.set)
                try:
                    done, result = attempt()
                    remaining = deadline - time.monotonic()
                    if done or self._closed or remaining <= 0:
                        return result
                    if not parked:
                        with self._lock:
                            self._waiting += 1
                        parked = True
                    woken.wait(remaining)
                finally:
                    cancel()
        finally:
            if parked:
                with self._lock:
                    self._waiting -= 1

    # -- watching (for servers that park requests without a thread) -----------------

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
                    waiters = self._patterns.get(name) if is_pattern(name) else (
                        ch.waiters if (ch := self._channels.get(name)) else None)
                    if waiters is not None:
                        waiters.discard(once)

        def once() -> None:
            if guard.acquire(blocking=False):  # the first call wins
                cancel()
                wake()

        with self._lock:
            ready = self._closed
            if since is not None and not ready:
                position = self.locate(since)
                ready = self._stale(position) or any(
                    ch.messages and ch.messages[-1].seq > position.after
                    for ch in self._resolve(names)[0])
            if not ready:
                plain = tuple(name for name in names if not is_pattern(name))
                self._make_room(plain)
                for name in plain:
                    self._channel(name).waiters.add(once)
                for name in names:
                    if name not in plain:
                        if name not in self._patterns:
                            self._patterns[name] = set()
                            self._matched.clear()  # (a channel's patterns are worked out anew)
                        self._patterns[name].add(once)
                return cancel
        once()
        return cancel

    # -- housekeeping ---------------------------------------------------------------

    def prune(self) -> None:
        """Apply age retention everywhere and forget channels that hold
        nothing and that nobody waits on (a read of one with a cursor from
        before its last message expired still gets ``gap``). Servers call
        this now and then."""
        with self._lock:
            self._prune()
            forgotten, self._unreported = self._unreported, {}
            head, watermark = self._seq, self._forgotten
        self.store.pruned(head, watermark, forgotten)  # not under the lock: it may wait on I/O

    def close(self) -> None:
        """Wake every waiter; from now on waits return at once and publishing
        raises a 503 ``LongpollError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiters = self._every_waiter()
        for wake in waiters:
            wake()
        self._stop_ticking.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join(10)
        with self._ticking:  # a server's tick under way ends first: then none begins
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

    A store is also the hub's strategy for sharing: how messages get their
    numbers and how ``/receive`` hands them out. ``publish(hub, draft)``,
    ``take(hub, channel, lease)``, ``ack(hub, channel, receipt)`` and
    ``give_back(hub, channel, seq)`` (not under the lock) leave it to the
    hub by default: it numbers each message and keeps the queues, under
    its lock, and calls the store to keep them:
    ``append(msg, key)`` before a publish is acknowledged (raise to refuse
    it), with its idempotency key (keep it for ``hub.idempotency_window``
    seconds and give it back through ``follow`` on open);
    ``took(channel, taken, queue)`` when ``/receive``'s queue changes (its
    mark, and the ``WorkQueue`` as JSON, or None).
    A store shared by several servers overrides those four to number and
    hand out messages itself, feeds every message to ``hub.follow`` in
    order (from any server), and sets ``lag``.

    A hub also calls, under its lock: ``open(hub)`` once, to give back what
    was kept (``hub.history``, then messages, sequence and marks through
    ``hub.follow``); ``dropped(messages)`` when retention drops some; and
    ``close()``. Not under the lock, from ``Hub.prune`` now and then:
    ``pruned(head, watermark, forgotten)`` with the hub's head, its
    forgotten-channel watermark and the channels forgotten since the last
    call ({name: newest dropped seq}).

    Scheduled messages (``Hub.schedule``): ``schedule(hub, entry)`` keeps
    one until it is due (or returns the entry kept before under the same
    ``id``), refusing past ``hub.max_scheduled`` (503) or, for its
    ``client``, ``hub.max_scheduled_per_client`` (429); ``claim_due(hub,
    now)`` takes out those due by *now* and returns them, each to one
    caller only, across every server sharing the store. Here they are
    kept in memory (lost on restart); entries are JSON-safe dicts.

    A server makes every call that may wait on the network (``remote``)
    on a worker thread, never on its loop; or, once it has called
    ``attach(loop, pool)``, a store that sets ``loop`` takes publishes
    from the loop thread (``publish_later``) and answers them when the
    network does, without waiting.
    """

    #: Seconds another server's message may take to reach this hub (a
    #: shared store's feed): a cursor ahead of the hub is waited for that
    #: long before it is answered as unplaceable. 0: the hub numbers every
    #: message, so a cursor ahead of it was never handed out.
    lag = 0.0
    #: True when calls wait on the network (a server makes them off its loop).
    remote = False
    #: The server loop that drives the store's publishes (``attach``), or None.
    loop: "Loop | None" = None
    #: What ``open_store`` was given (passwords masked).
    url = "memory:"
    #: Requests the store failed (counted by ``_unavailable``; in /metrics).
    failures = 0
    #: Whether this class has its own ``append`` and ``dropped`` (memory:
    #: neither, and the hub makes no call per publish to do nothing).
    _keeps = _drops = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._keeps = cls.append is not Store.append
        cls._drops = cls.dropped is not Store.dropped

    def open(self, hub: "Hub") -> None:
        pass

    def publish(self, hub: "Hub", draft: Draft) -> Message:
        return hub.number(draft, self.append if self._keeps else None)

    def publish_later(self, hub: "Hub", draft: Draft,
                      then: Callable[["Message | LongpollError"], None]) -> None:
        """``publish`` from a server's loop thread: *then* gets the message,
        or the ``LongpollError`` that refused it, on that thread. Here at
        once; a store a loop drives sends its request and returns, and calls
        *then* when the answer comes."""
        try:
            msg: Message | LongpollError = self.publish(hub, draft)
        except LongpollError as error:
            msg = error
        then(msg)

    def attach(self, loop: "Loop", pool: Any) -> None:
        """A server will call ``publish_later`` from *loop*'s thread (and
        ``tick`` about once a second); a store across the network may then
        drive its requests from that loop (and *pool*'s workers, for what
        must wait), and set ``loop``. Only the first server does."""

    def tick(self) -> None:
        pass

    def take(self, hub: "Hub", channel: str, lease: float | None) -> Message | None:
        return hub.hand_out(channel, lease, self.took)

    def ack(self, hub: "Hub", channel: str, receipt: str) -> bool:
        return hub.acknowledge(channel, receipt, self.took)

    def give_back(self, hub: "Hub", channel: str, seq: int) -> None:
        hub.requeue(channel, seq, self.took)

    def append(self, msg: Message, key: str | None = None) -> None:
        pass

    def took(self, channel: str, taken: int, queue: str | None) -> None:
        pass

    def _kept(self) -> tuple[dict[str, dict[str, Any]], list[tuple[float, str]],
                             dict[str, dict[str, Any]]]:
        """What this store keeps in memory for ``schedule`` and ``expect``:
        the scheduled messages by id, their (at, id) heap, and the silence
        watches by channel; made on first use, so that a store subclassing
        this one without calling its ``__init__`` has them too."""
        if "_scheduled" not in self.__dict__:
            self._scheduled: dict[str, dict[str, Any]] = {}
            self._due: list[tuple[float, str]] = []
            self._expected: dict[str, dict[str, Any]] = {}
        return self._scheduled, self._due, self._expected

    def schedule(self, hub: "Hub", entry: dict[str, Any]) -> dict[str, Any]:
        with _SCHEDULING:
            scheduled, due, _ = self._kept()
            known = scheduled.get(entry["id"])
            if known is not None:
                return known
            _check_schedule_room(hub, len(scheduled), entry["client"], sum(
                e["client"] == entry["client"] for e in scheduled.values()))
            scheduled[entry["id"]] = entry
            heapq.heappush(due, (entry["at"], entry["id"]))
            return entry

    def claim_due(self, hub: "Hub", now: float) -> list[dict[str, Any]]:
        """(See the class's docstring; also ``expect``, ``expectations``,
        ``unexpect`` and ``expect_check`` for ``Hub.expect``: the last says,
        once per event across every server sharing the store, whether a
        channel's silence is to be alerted now ("alert") or its return
        ("back"), by ``_silence_verdict``'s rule.)"""
        claimed = []
        with _SCHEDULING:
            scheduled, due, _ = self._kept()
            while due and due[0][0] <= now:
                entry = scheduled.pop(heapq.heappop(due)[1], None)
                if entry is not None:
                    claimed.append(entry)
        return claimed

    def expect(self, hub: "Hub", entry: dict[str, Any]) -> None:
        with _SCHEDULING:
            expected = self._kept()[2]
            if entry["channel"] not in expected:
                _check_expect_room(hub, len(expected))
            expected[entry["channel"]] = entry

    def expectations(self, hub: "Hub") -> dict[str, dict[str, Any]]:
        with _SCHEDULING:
            return {name: dict(e) for name, e in self._kept()[2].items()}

    def unexpect(self, hub: "Hub", channel: str) -> bool:
        with _SCHEDULING:
            return self._kept()[2].pop(channel, None) is not None

    def expect_check(self, hub: "Hub", channel: str, spoke: float, now: float) -> str | None:
        with _SCHEDULING:
            entry = self._kept()[2].get(channel)
            return _silence_verdict(entry, spoke, now) if entry is not None else None

    def dropped(self, messages: list[Message]) -> None:
        pass

    def expired(self, messages: list[Message]) -> None:
        """*messages* expired (their ``ttl`` passed): delete them if this
        store can; they leave no mark (a reader past them gets no gap). A
        hub never delivers an expired message, whether or not it is
        deleted, so a store may leave them to retention."""

    def pruned(self, head: int, watermark: int, forgotten: dict[str, int]) -> None:
        pass

    def close(self) -> None:
        pass


def _unavailable(store: Store, what: str, exc: Exception) -> LongpollError:
    store.failures += 1
    logger.error("%s: %s", what, exc)
    return LongpollError(HTTPStatus.SERVICE_UNAVAILABLE, f"{what}: {exc}", {"Retry-After": "1"})


def _result_of(call: Callable[[], Any], store: Store) -> Any:
    """What *call* (which asks *store*) returns, or the ``LongpollError``
    it raised (a 500 for anything else, logged)."""
    try:
        return call()
    except LongpollError as error:
        return error
    except Exception:
        logger.exception("error asking the store %s", store.url)
        return LongpollError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error")


def _on_worker(pool: Any, loop: "Loop", call: Callable[[], Any], then: Callable[[Any], None],
               store: Store) -> None:
    """Run *call* on one of *pool*'s workers; hand ``_result_of`` it to
    *then* on *loop*'s thread."""
    pool.submit(lambda: loop.call_soon(functools.partial(then, _result_of(call, store))))


class SqliteStore(Store):
    """``sqlite:PATH``: every acknowledged message is in the file (WAL mode;
    a commit per publish survives ``kill -9``; synchronous=NORMAL, so a
    power cut may lose the last ones). Cursors stay valid across restarts."""

    def __init__(self, path: str) -> None:
        self.path, self.url = path, f"sqlite:{path}"
        self._gone: list[tuple[int]] = []  # messages dropped, to delete at the next prune
        self._dropped: dict[str, int] = {}  # and each channel's newest of them
        self._db_lock = threading.Lock()  # a prune's transaction is not shared with a publish

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
                    dropped INTEGER DEFAULT 0, taken INTEGER DEFAULT 0, queue TEXT);
                CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, at REAL,
                    seq INTEGER, channel TEXT, time REAL);
                CREATE TABLE IF NOT EXISTS scheduled (id TEXT PRIMARY KEY, at REAL,
                    client TEXT, entry TEXT);
                CREATE TABLE IF NOT EXISTS expectations (channel TEXT PRIMARY KEY, entry TEXT);
                CREATE INDEX IF NOT EXISTS scheduled_at ON scheduled (at);""")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('history', ?)", (hub.history,))
            meta = dict(db.execute("SELECT key, value FROM meta"))
            hub.history = meta["history"]
            messages = []
            for seq, wire in db.execute("SELECT seq, json FROM messages ORDER BY seq"):
                d = json.loads(wire)  # as the wire carried it
                messages.append(Message(seq, hub.cursor_for(seq), d["channel"], d["message"],
                                        d.get("title"), d.get("priority"), None, d["time"],
                                        _extra_of(d)))
            columns = [row[1] for row in db.execute("PRAGMA table_info(channels)")]
            if "queue" not in columns:  # a file from before leases
                db.execute("ALTER TABLE channels ADD COLUMN queue TEXT")
            marks, queues = {}, {}
            for name, dropped, taken, queue in db.execute(
                    "SELECT name, dropped, taken, queue FROM channels"):
                marks[name] = (dropped, taken)
                if queue:
                    queues[name] = WorkQueue.from_json(queue)
            self._window = hub.idempotency_window
            keys = db.execute("SELECT key, at, seq, channel, time FROM keys WHERE at >= ? "
                              "ORDER BY at", (time.time() - self._window,)).fetchall()
            hub.follow(messages, int(meta.get("seq", 0)), marks,
                        int(meta.get("forgotten", 0)), keys=keys, queues=queues)
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open the store {self.path}: {exc}") from None

    def append(self, msg: Message, key: str | None = None) -> None:
        db = self.db
        try:
            with self._db_lock:
                if key is None:
                    db.execute("INSERT INTO messages VALUES (?, ?)", (msg.seq, msg.json))
                    return
                try:  # the message and its key, in one transaction
                    db.execute("BEGIN")
                    db.execute("INSERT INTO messages VALUES (?, ?)", (msg.seq, msg.json))
                    db.execute("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?, ?)",
                               (key, time.time(), msg.seq, msg.channel, msg.time))
                    db.execute("COMMIT")
                except self._error:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
        except self._error as exc:
            raise _unavailable(self, "cannot store the message", exc) from None

    def took(self, channel: str, taken: int, queue: str | None) -> None:
        try:
            with self._db_lock:
                self.db.execute("INSERT INTO channels (name, taken, queue) VALUES (?, ?, ?) ON "
                                "CONFLICT (name) DO UPDATE SET taken = excluded.taken, "
                                "queue = excluded.queue", (channel, taken, queue))
        except self._error as exc:
            raise _unavailable(self, "cannot store the take", exc) from None

    def dropped(self, messages: list[Message]) -> None:
        self._gone.extend((m.seq,) for m in messages)
        self._dropped[messages[-1].channel] = messages[-1].seq

    def expired(self, messages: list[Message]) -> None:
        self._gone.extend((m.seq,) for m in messages)  # (deleted at the next prune; no mark)

    def schedule(self, hub: "Hub", entry: dict[str, Any]) -> dict[str, Any]:
        db = self.db
        try:
            with self._db_lock:
                known = db.execute("SELECT entry FROM scheduled WHERE id = ?",
                                   (entry["id"],)).fetchone()
                if known is not None:
                    return json.loads(known[0])  # type: ignore[no-any-return]
                total, = db.execute("SELECT COUNT(*) FROM scheduled").fetchone()
                of_client, = db.execute("SELECT COUNT(*) FROM scheduled WHERE client = ?",
                                        (entry["client"],)).fetchone()
                _check_schedule_room(hub, total, entry["client"], of_client)
                db.execute("INSERT INTO scheduled VALUES (?, ?, ?, ?)",
                           (entry["id"], entry["at"], entry["client"], json.dumps(entry)))
        except self._error as exc:
            raise _unavailable(self, "cannot schedule the message", exc) from None
        return entry

    def expect(self, hub: "Hub", entry: dict[str, Any]) -> None:
        db = self.db
        try:
            with self._db_lock:
                known = db.execute("SELECT 1 FROM expectations WHERE channel = ?",
                                   (entry["channel"],)).fetchone()
                if known is None:
                    _check_expect_room(hub, db.execute(
                        "SELECT COUNT(*) FROM expectations").fetchone()[0])
                db.execute("INSERT OR REPLACE INTO expectations VALUES (?, ?)",
                           (entry["channel"], json.dumps(entry)))
        except self._error as exc:
            raise _unavailable(self, "cannot keep the expectation", exc) from None

    def expectations(self, hub: "Hub") -> dict[str, dict[str, Any]]:
        with self._db_lock:
            return {name: json.loads(entry) for name, entry in
                    self.db.execute("SELECT channel, entry FROM expectations")}

    def unexpect(self, hub: "Hub", channel: str) -> bool:
        with self._db_lock:
            return self.db.execute("DELETE FROM expectations WHERE channel = ?",
                                   (channel,)).rowcount > 0

    def expect_check(self, hub: "Hub", channel: str, spoke: float, now: float) -> str | None:
        with self._db_lock:
            row = self.db.execute("SELECT entry FROM expectations WHERE channel = ?",
                                  (channel,)).fetchone()
            if row is None:
                return None
            entry = json.loads(row[0])
            before = dict(entry)
            verdict = _silence_verdict(entry, spoke, now)
            if entry != before:
                self.db.execute("UPDATE expectations SET entry = ? WHERE channel = ?",
                                (json.dumps(entry), channel))
            return verdict

    def claim_due(self, hub: "Hub", now: float) -> list[dict[str, Any]]:
        db = self.db
        try:
            with self._db_lock:
                rows = db.execute("SELECT id, entry FROM scheduled WHERE at <= ? ORDER BY at "
                                  "LIMIT 1000", (now,)).fetchall()
                if rows:
                    db.executemany("DELETE FROM scheduled WHERE id = ?",
                                   [(ident,) for ident, _ in rows])
        except self._error as exc:
            raise _unavailable(self, "cannot read the scheduled messages", exc) from None
        return [json.loads(entry) for _, entry in rows]

    def pruned(self, head: int, watermark: int, forgotten: dict[str, int]) -> None:
        """Delete what retention dropped, in one transaction."""
        db = self.db
        with self._db_lock:  # one transaction at a time on this connection
            gone, self._gone = self._gone, []
            dropped, self._dropped = self._dropped, {}
            try:
                db.execute("BEGIN")
                db.executemany("DELETE FROM messages WHERE seq = ?", gone)
                db.executemany("INSERT INTO channels (name, dropped) VALUES (?, ?) ON CONFLICT "
                               "(name) DO UPDATE SET dropped = excluded.dropped",
                               dropped.items())
                db.executemany("DELETE FROM channels WHERE name = ?",
                               ((name,) for name in forgotten))
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                               (("seq", str(head)), ("forgotten", str(watermark))))
                db.execute("DELETE FROM keys WHERE at < ?", (time.time() - self._window,))
                db.execute("COMMIT")
            except self._error as exc:
                logger.error("cannot prune the store %s: %s", self.path, exc)
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self._gone[:0] = gone  # the next prune tries again
                for name, seq in dropped.items():
                    self._dropped[name] = max(seq, self._dropped.get(name, 0))

    def close(self) -> None:
        with self._db_lock:  # (never while another thread's statement runs: that can crash)
            self.db.close()


# Redis keys (one database per deployment): the sequence and history, a
# stream per channel, the feed every server follows, and per-channel
# marks of what retention dropped and what /receive handed out.
_R_SEQ, _R_HISTORY, _R_FEED = "longpoll:seq", "longpoll:history", "longpoll:feed"
_R_STREAM, _R_DROPPED, _R_TAKEN = "longpoll:channel:", "longpoll:dropped", "longpoll:taken"
_R_FORGOTTEN = "longpoll:forgotten"  # the newest message of a channel since forgotten
_R_LOST = "longpoll:lost"  # Redis lost its data: messages up to here may be missing
_R_QUEUE = "longpoll:queue"  # per channel: /receive's messages given back, and leased
_R_KEY = "longpoll:key:"  # + an idempotency key: the message it published (expires)
_R_FEED_LENGTH = 10_000  # feed entries kept; a server further behind reads the streams
# Scheduled messages: ids by when they are due, each entry (JSON), its
# client, and how many each client has waiting.
_R_SCHEDULED, _R_SCHEDULED_ENTRY = "longpoll:scheduled", "longpoll:scheduled:entry"
_R_SCHEDULED_CLIENT, _R_SCHEDULED_COUNT = ("longpoll:scheduled:client",
                                           "longpoll:scheduled:count")
_R_SCHEDULED_KEYS = [_R_SCHEDULED, _R_SCHEDULED_ENTRY, _R_SCHEDULED_CLIENT,
                     _R_SCHEDULED_COUNT]
# ARGV: id, at, entry, client ("" for none), max in all, max per client.
# Returns {0} kept, {1, entry} kept before, {2} full, {3, n} the client's full.
_R_SCHEDULE = """
local known = redis.call('HGET', KEYS[2], ARGV[1])
if known then return {1, known} end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[5]) then return {2} end
if ARGV[4] ~= '' then
  local n = tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0')
  if n >= tonumber(ARGV[6]) then return {3, n} end
  redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return {0}
"""
_R_EXPECT = "longpoll:expect"  # channel -> its expectation (JSON; see Hub.expect)
# ARGV: channel, entry, the most. Returns 1 kept, 0 full.
_R_EXPECT_SET = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
# ARGV: channel, when it last spoke (here), now. _silence_verdict's rule, atomically.
_R_EXPECT_CHECK = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return '' end
local e = cjson.decode(raw)
local spoke, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local last = math.max(e['last'], spoke)
local verdict = ''
if e['alerted'] == cjson.null or e['alerted'] == nil then
  if now >= last + e['every'] then e['alerted'] = now; verdict = 'alert' end
elseif spoke >= e['alerted'] then
  e['alerted'] = cjson.null; verdict = 'back'
end
if last ~= e['last'] or verdict ~= '' then
  e['last'] = last
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(e))
end
return verdict
"""
# ARGV: now, how many at most. Takes the due entries out (one caller gets each).
_R_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[2], id)
  local client = redis.call('HGET', KEYS[3], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  if client then
    redis.call('HDEL', KEYS[3], id)
    if redis.call('HINCRBY', KEYS[4], client, -1) <= 0 then redis.call('HDEL', KEYS[4], client) end
  end
  if entry then out[#out + 1] = entry end
end
return out
"""

# Redis lost its data (a restart without persistence, a FLUSHDB): the first
# server to notice re-seeds it with its history, and every server of that
# history raises the sequence to what it has seen (numbers are never reused)
# and marks everything up to there as possibly lost. Returns the history
# Redis holds: another one means another server began anew first.
_R_RESEED_FUNCTION = """
local function reseed(history_key, seq_key, lost_key, ours, head)
  local history = redis.call('GET', history_key)
  if not history then
    redis.call('SET', history_key, ours)
    history = ours
  end
  if history == ours and tonumber(redis.call('GET', seq_key) or '0') < tonumber(head) then
    redis.call('SET', seq_key, head)  -- never reuse a number this server has seen
    if tonumber(redis.call('GET', lost_key) or '0') < tonumber(head) then
      redis.call('SET', lost_key, head)
    end
  end
  return history
end
"""
_R_RESEED = _R_RESEED_FUNCTION + """
local history = reseed(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
return {history, redis.call('GET', KEYS[2]) or '0'}
"""
_R_PUBLISH = _R_RESEED_FUNCTION + """
if reseed(KEYS[5], KEYS[1], KEYS[6], ARGV[8], ARGV[9]) ~= ARGV[8] then
  return redis.error_reply('this Redis database holds another history')
end
if ARGV[10] ~= '' then  -- an idempotency key seen within the window: answer, store nothing
  local known = redis.call('HMGET', KEYS[7], 's', 'c', 't')
  if known[1] then return {known[1], known[2], known[3]} end
end
local seq = redis.call('INCR', KEYS[1])
local id = seq .. '-0'
local fields = {'t', ARGV[2], 'm', ARGV[3], 'ti', ARGV[4], 'pr', ARGV[5]}
if ARGV[12] ~= '' then  -- tags, click, icon, actions, markdown: as JSON
  table.insert(fields, 'x')
  table.insert(fields, ARGV[12])
end
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
if ARGV[10] ~= '' then
  redis.call('HSET', KEYS[7], 's', seq, 'c', ARGV[1], 't', ARGV[2])
  redis.call('EXPIRE', KEYS[7], ARGV[11])
end
return {seq}
"""
# /receive's queue per channel: the taken mark (KEYS[2]) and, as JSON like
# WorkQueue's, the messages given back and out on lease (KEYS[3]); the same
# rules as Hub._hand_out, ack and give_back. ARGV: channel, now, then lease
# seconds and receipt ('' for none) / the receipt / the seq.
_R_QUEUE_FUNCTIONS = """
local function load(key, channel, now)
  local raw = redis.call('HGET', key, channel)
  local q = raw and cjson.decode(raw) or {}
  q.returned, q.leases = q.returned or {}, q.leases or {}
  for receipt, lease in pairs(q.leases) do
    if tonumber(lease[2]) <= now then
      table.insert(q.returned, lease[1])
      q.leases[receipt] = nil
    end
  end
  table.sort(q.returned)
  return q
end
local function save(key, channel, q)
  if #q.returned == 0 and next(q.leases) == nil then
    redis.call('HDEL', key, channel)
  else
    redis.call('HSET', key, channel, cjson.encode(q))
  end
end
"""
_R_TAKE = _R_QUEUE_FUNCTIONS + """
local q = load(KEYS[3], ARGV[1], tonumber(ARGV[2]))
local entry = nil
while #q.returned > 0 and not entry do
  local seq = table.remove(q.returned, 1)
  local found = redis.call('XRANGE', KEYS[1], seq .. '-0', seq .. '-0')
  if #found > 0 then entry = found[1] end
end
if not entry then
  local taken = redis.call('HGET', KEYS[2], ARGV[1]) or '0'
  local following = redis.call('XRANGE', KEYS[1], '(' .. taken .. '-0', '+', 'COUNT', 1)
  if #following > 0 then
    entry = following[1]
    redis.call('HSET', KEYS[2], ARGV[1], string.match(entry[1], '^%d+'))
  end
end
if entry and ARGV[3] ~= '' then
  q.leases[ARGV[4]] = {tonumber(string.match(entry[1], '^%d+')), tonumber(ARGV[2]) + tonumber(ARGV[3])}
end
save(KEYS[3], ARGV[1], q)
if not entry then return false end
return entry
"""
_R_ACK = _R_QUEUE_FUNCTIONS + """
local q = load(KEYS[1], ARGV[1], tonumber(ARGV[2]))
local held = q.leases[ARGV[3]] ~= nil
q.leases[ARGV[3]] = nil
save(KEYS[1], ARGV[1], q)
return held and 1 or 0
"""
_R_GIVE_BACK = _R_QUEUE_FUNCTIONS + """
local q = load(KEYS[1], ARGV[1], tonumber(ARGV[2]))
local seq = tonumber(ARGV[3])
for receipt, lease in pairs(q.leases) do
  if tonumber(lease[1]) == seq then q.leases[receipt] = nil end
end
local present = false
for _, returned in ipairs(q.returned) do if tonumber(returned) == seq then present = true end end
if not present then table.insert(q.returned, seq) end
save(KEYS[1], ARGV[1], q)
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
  redis.call('HDEL', KEYS[5], ARGV[1])
  if tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[2]) then
    redis.call('SET', KEYS[4], ARGV[2])
  end
end
"""


class _RedisError(Exception):
    """Redis could not be reached, or its connection broke."""


class _RedisReplyError(_RedisError):
    """Redis answered a command with an error."""


class _RedisClient:
    """A small Redis client, all ``RedisStore`` needs: ``call(*args)`` sends a
    command (RESP2) and returns its reply (bytes, int, None or a list), and
    ``script(source)`` gives a function that runs a Lua script (``EVALSHA``,
    loading it on ``NOSCRIPT``). Thread-safe: a call borrows an idle
    connection or opens one; a connection that fails is dropped.

    *url*: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` the
    same over TLS (the server's certificate is checked against the system's
    CAs), or ``unix:///path/to/socket?db=N&password=P``.
    """

    def __init__(self, url: str, timeout: float, connect_timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL: {parts.scheme}://")
        self._unix = parts.path if parts.scheme == "unix" else None
        self._tls = parts.scheme == "rediss"
        self._host, self._port = parts.hostname or "localhost", parts.port or 6379
        path_db = "" if self._unix else parts.path.strip("/")
        try:
            self._db = int(path_db or query.get("db", ["0"])[0])
        except ValueError:
            raise ValueError(f"not a database number: {path_db or query['db'][0]!r}") from None
        password = (urllib.parse.unquote(parts.password) if parts.password is not None
                    else query.get("password", [None])[0])
        username = urllib.parse.unquote(parts.username) if parts.username else None
        # (AUTH with a user name: Redis 6 accepts any password for a user
        # without one, as redis-py's clients expect)
        self._auth = ("AUTH", username or "default", password) if password else None
        self.timeout, self._connect_timeout = timeout, connect_timeout
        self._idle: list[tuple[socket.socket, Any]] = []
        self._lock = threading.Lock()

    def _connect(self) -> tuple[socket.socket, Any]:
        if self._unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._connect_timeout)
            try:
                sock.connect(self._unix)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((self._host, self._port), self._connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls:
                if ssl is None:
                    raise OSError("this Python has no ssl module for rediss://")
                sock = ssl.create_default_context().wrap_socket(
                    sock, server_hostname=self._host)
        sock.settimeout(self.timeout)
        conn = (sock, sock.makefile("rb"))
        try:
            if self._auth is not None:
                self._exchange(conn, self._auth)
            if self._db:
                self._exchange(conn, ("SELECT", self._db))
        except BaseException:
            self._close(conn)
            raise
        return conn

    @staticmethod
    def _idle_and_open(conn: tuple[socket.socket, Any]) -> bool:
        """Whether an idle connection is still open: one that reads as
        ready holds an end of file (or stray bytes), and is not reused."""
        try:
            return not select.select([conn[0]], [], [], 0)[0]
        except (OSError, ValueError):
            return False

    @staticmethod
    def _close(conn: tuple[socket.socket, Any]) -> None:
        conn[1].close()
        conn[0].close()

    @staticmethod
    def _encode(args: Iterable[Any]) -> bytes:
        out = [b"*%d\r\n" % len(args)]  # type: ignore[arg-type]
        for arg in args:
            if not isinstance(arg, bytes):
                arg = str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        return b"".join(out)

    def _exchange(self, conn: tuple[socket.socket, Any], args: tuple[Any, ...]) -> Any:
        conn[0].sendall(self._encode(args))
        reply = self._read(conn[1])
        if isinstance(reply, _RedisReplyError):
            raise reply
        return reply

    def _read(self, f: Any) -> Any:
        line = f.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = f.read(size + 2)
            if len(data) != size + 2:
                raise ConnectionError("Redis closed the connection")
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._read(f) for _ in range(count)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return _RedisReplyError(rest.decode(errors="replace"))
        raise ConnectionError(f"not a Redis reply: {line[:40]!r}")

    def call(self, *args: Any) -> Any:
        """Send one command; return its reply. Raises ``_RedisReplyError``
        for an error reply, ``_RedisError`` when Redis cannot be reached."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None and not self._idle_and_open(conn):
            self._close(conn)  # Redis closed it meanwhile (a restart, its idle timeout)
            conn = None
        try:
            if conn is None:
                conn = self._connect()
            reply = self._exchange(conn, args)
        except _RedisReplyError:
            if conn is not None:  # (the reply was read whole: the connection is good)
                with self._lock:
                    self._idle.append(conn)
            raise
        except (OSError, ValueError) as exc:  # (a timeout is an OSError)
            if conn is not None:
                self._close(conn)
            raise _RedisError(str(exc) or type(exc).__name__) from None
        with self._lock:
            self._idle.append(conn)
        return reply

    def script(self, source: str) -> Callable[[list[Any], list[Any]], Any]:
        """A function ``run(keys, args)`` that runs the Lua *source*."""
        sha = hashlib.sha1(source.encode()).hexdigest()

        def run(keys: list[Any], args: list[Any]) -> Any:
            try:
                return self.call("EVALSHA", sha, len(keys), *keys, *args)
            except _RedisReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                return self.call("EVAL", source, len(keys), *keys, *args)  # (and keeps it)
        return run

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self._close(conn)


def _parse_reply(data: bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 reply from *data* at *pos*: (reply, the position after
    it); an error reply is a ``_RedisReplyError`` value. Raises IndexError
    while the reply is not all there, ValueError for what is no reply."""
    end = data.find(b"\r\n", pos)
    if end < 0:
        raise IndexError("incomplete")
    kind, rest = data[pos:pos + 1], bytes(data[pos + 1:end])
    pos = end + 2
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None, pos
        if len(data) < pos + size + 2:
            raise IndexError("incomplete")
        return bytes(data[pos:pos + size]), pos + size + 2
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = _parse_reply(data, pos)
            items.append(item)
        return items, pos
    if kind == b":":
        return int(rest), pos
    if kind == b"+":
        return rest, pos
    if kind == b"-":
        return _RedisReplyError(rest.decode(errors="replace")), pos
    raise ValueError(f"not a Redis reply: {(bytes(kind) + rest)[:40]!r}")


class _RedisLink:
    """One connection to Redis that a server's ``Loop`` drives: commands are
    written from the loop thread without waiting, and each reply goes to
    its command's callback when the loop finds it readable, in order
    (pipelined). It is opened on a worker (connecting and AUTH may wait) and
    commands sent meanwhile wait in line. When the connection fails, or the
    oldest reply is later than the client's timeout, every command in line
    gets a ``_RedisError``; the next command opens a new connection."""

    def __init__(self, client: _RedisClient, loop: "Loop", pool: Any) -> None:
        self.client, self.loop, self.pool = client, loop, pool
        self.sock: socket.socket | None = None
        self._writing: bool | None = None  # what the loop watches it for (None: nothing)
        self._opening = False
        self._out = bytearray()
        self._in = bytearray()
        self._line: collections.deque[tuple[float, Callable[[Any], None]]] = \
            collections.deque()  # (deadline, then), oldest first

    def call(self, args: tuple[Any, ...], then: Callable[[Any], None]) -> None:
        """From the loop thread: send *args*; *then(reply)* comes on the loop
        (an error reply as ``_RedisReplyError``, a failure as ``_RedisError``)."""
        if self.sock is not None and not self._line \
                and not self.client._idle_and_open((self.sock, None)):
            self._fail(_RedisError("closed"))  # by Redis while idle (a restart): a new one
        self._out += self.client._encode(args)
        self._line.append((time.monotonic() + self.client.timeout, then))
        if self.sock is not None:
            self._flush()
        elif not self._opening:
            self._opening = True
            self.pool.submit(self._open)

    def _open(self) -> None:
        """On a worker: connect (and AUTH, SELECT), then hand it to the loop."""
        try:
            sock, f = self.client._connect()
            f.close()  # (the socket stays open)
            result: socket.socket | Exception = sock
        except Exception as exc:  # (the loop fails the commands in line)
            result = exc
        self.loop.call_soon(functools.partial(self._opened, result))

    def _opened(self, result: "socket.socket | Exception") -> None:
        self._opening = False
        if isinstance(result, Exception):
            self._fail(_RedisError(str(result) or type(result).__name__))
            return
        result.setblocking(False)
        self.sock = result
        self._flush()

    def _flush(self) -> None:
        sock = self.sock
        try:
            while self._out:
                del self._out[:sock.send(self._out)]
        except _WOULD_BLOCK:
            pass
        except OSError as exc:
            self._fail(_RedisError(str(exc) or type(exc).__name__))
            return
        if self._writing is not bool(self._out):  # (an epoll change only when needed)
            self._writing = bool(self._out)
            self.loop.watch(sock, self._on_event, write=self._writing)

    def _on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and self.sock is not None:
            self._receive()

    def _receive(self) -> None:
        sock = self.sock
        try:
            while True:
                data = sock.recv(262144)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                self._in += data
                if not (ssl is not None and isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    break
        except _WOULD_BLOCK:
            pass
        except OSError as exc:
            self._fail(_RedisError(str(exc) or type(exc).__name__))
            return
        pos = 0
        try:
            while self._line:
                reply, pos = _parse_reply(self._in, pos)
                self._answer(self._line.popleft()[1], reply)
        except IndexError:
            pass  # the rest comes with the next read
        except ValueError as exc:
            self._fail(_RedisError(str(exc)))
            return
        del self._in[:pos]
        if self._in and not self._line:
            self._fail(_RedisError("Redis sent a reply nobody asked for"))

    def check(self, now: float) -> None:
        """From the loop, now and then: a reply overdue fails the connection."""
        if self._line and self._line[0][0] < now:
            self._fail(_RedisError("timed out"))

    def _fail(self, error: "_RedisError") -> None:
        if self.sock is not None:
            self.loop.unwatch(self.sock)
            self.sock.close()
            self.sock = None
            self._writing = None
        self._out.clear()
        self._in.clear()
        line, self._line = self._line, collections.deque()
        for _, then in line:
            self._answer(then, error)

    @staticmethod
    def _answer(then: Callable[[Any], None], reply: Any) -> None:
        try:
            then(reply)
        except Exception:  # a bug must cost one request, never the loop
            logger.exception("error handling a reply from Redis")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _AnotherHistory(Exception):
    """Redis holds a history other than the hub's (see ``RedisStore._adopt``)."""


class RedisStore(Store):
    """``redis://host:port/db``: several servers share channels. Redis
    numbers the messages (one sequence, one history, so any server's cursor
    is good on all), keeps a stream per channel (``XADD`` with ``MAXLEN``),
    and appends each message to a feed that one thread per server follows
    (``XREAD BLOCK``) into its hub: parked clients cost no Redis
    connection, and reads are answered from memory. Needs nothing but
    Redis 6.2 or later (its own small client, ``_RedisClient``)."""

    lag = 1.0
    remote = True

    def __init__(self, url: str) -> None:
        self.url = re.sub(r"([?&]password=)[^&]*", r"\1***",  # passwords masked
                          re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url))
        self.client = _RedisClient(url, timeout=5, connect_timeout=2)
        self._feed_client = _RedisClient(url, timeout=10, connect_timeout=5)
        self._dropped: dict[str, int] = {}  # per channel: dropped here, to trim in Redis
        self._publish = self.client.script(_R_PUBLISH)
        self._publish_sha = hashlib.sha1(_R_PUBLISH.encode()).hexdigest()
        self._take = self.client.script(_R_TAKE)
        self._ack = self.client.script(_R_ACK)
        self._give_back = self.client.script(_R_GIVE_BACK)
        self._trim = self.client.script(_R_TRIM)
        self._reseed = self.client.script(_R_RESEED)
        self._schedule = self.client.script(_R_SCHEDULE)
        self._claim = self.client.script(_R_CLAIM)
        self._expect_set = self.client.script(_R_EXPECT_SET)
        self._expect_check = self.client.script(_R_EXPECT_CHECK)
        self._checked = 0.0  # when the feed thread last checked Redis's history
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._feed_lock = threading.Lock()  # one reader of the feed applies at a time
        self._last = 0  # the last message of the feed applied
        self._feed_id: int | None = None  # the feed connection's id, to unblock it
        self._retry_at = 0.0  # after a failure, when to ask Redis again
        self._link: _RedisLink | None = None  # publishes from a server's loop (attach)
        self._pool: Any = None

    def open(self, hub: "Hub") -> None:
        try:
            hub.history = self._reseed(keys=[_R_HISTORY, _R_SEQ, _R_LOST],
                                       args=[hub.history, 0])[0].decode()
            self._catch_up(hub)
            self._feed_id = self._feed_client.call("CLIENT", "ID")
        except _RedisError as exc:
            raise ValueError(f"cannot use the store {self.url}: {exc}") from None
        self._thread = threading.Thread(target=self._follow, args=(hub,),
                                        name="longpoll-redis-feed", daemon=True)
        self._thread.start()

    def _ask(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call Redis; after a failure, refuse at once (503) for a second,
        so an unreachable Redis cannot hold up the server's loop each time."""
        self._refuse_while_down()
        try:
            return call(*args, **kwargs)
        except _RedisReplyError as exc:
            if "another history" in str(exc):
                raise _AnotherHistory() from None
            self._retry_at = time.monotonic() + 1.0
            raise _unavailable(self, "the store is unavailable", exc) from None
        except _RedisError as exc:
            self._retry_at = time.monotonic() + 1.0
            raise _unavailable(self, "the store is unavailable", exc) from None

    def _refuse_while_down(self) -> None:
        """After a failure, refuse at once (503) for a second."""
        if time.monotonic() < self._retry_at:
            self.failures += 1
            raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE, "the store is unavailable",
                                {"Retry-After": "1"})

    def schedule(self, hub: "Hub", entry: dict[str, Any]) -> dict[str, Any]:
        reply = self._ask(self._schedule, _R_SCHEDULED_KEYS, [
            entry["id"], repr(entry["at"]), json.dumps(entry), entry["client"] or "",
            hub.max_scheduled, hub.max_scheduled_per_client])
        if reply[0] == 1:  # a repeated key: the first one
            return json.loads(reply[1])  # type: ignore[no-any-return]
        if reply[0] == 2:
            _check_schedule_room(hub, hub.max_scheduled, None, 0)
        if reply[0] == 3:
            _check_schedule_room(hub, 0, entry["client"], int(reply[1]))
        return entry

    def claim_due(self, hub: "Hub", now: float) -> list[dict[str, Any]]:
        return [json.loads(entry) for entry in self._ask(self._claim, _R_SCHEDULED_KEYS,
                                                         [repr(now), 1000])]

    def expect(self, hub: "Hub", entry: dict[str, Any]) -> None:
        if not self._ask(self._expect_set, [_R_EXPECT], [entry["channel"], json.dumps(entry),
                                                         hub.max_expectations]):
            _check_expect_room(hub, hub.max_expectations)

    def expectations(self, hub: "Hub") -> dict[str, dict[str, Any]]:
        raw = self._ask(self.client.call, "HGETALL", _R_EXPECT)
        return {raw[i].decode(): json.loads(raw[i + 1]) for i in range(0, len(raw), 2)}

    def unexpect(self, hub: "Hub", channel: str) -> bool:
        return bool(self._ask(self.client.call, "HDEL", _R_EXPECT, channel))

    def expect_check(self, hub: "Hub", channel: str, spoke: float, now: float) -> str | None:
        verdict = self._ask(self._expect_check, [_R_EXPECT], [channel, repr(spoke), repr(now)])
        return verdict.decode() if verdict else None

    def publish(self, hub: "Hub", draft: Draft) -> Message:
        hub.admit(draft.channel)
        at = round(hub.clock(), 3)
        for attempt in range(2):
            try:
                reply = self._ask(self._publish, *self._publish_call(hub, draft, at))
                break
            except _AnotherHistory:  # Redis lost its data and another server began anew
                if attempt:
                    raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE,
                                        "the store's history is changing: try again",
                                        {"Retry-After": "1"}) from None
                self._adopt(hub)
        return self._kept(hub, draft, at, reply)  # type: ignore[return-value]

    @staticmethod
    def _publish_call(hub: "Hub", draft: Draft, at: float) -> tuple[list[Any], list[Any]]:
        """The publish script's keys and arguments."""
        channel, _, title, priority, payload, key, extra = draft
        return ([_R_SEQ, _R_STREAM + channel, _R_FEED, _R_DROPPED, _R_HISTORY, _R_LOST,
                 _R_KEY + (key or "")],
                [channel, repr(at), payload, _encode(title), _encode(priority), hub.retention,
                 _R_FEED_LENGTH, hub.history, hub.head, key or "",
                 max(1, math.ceil(hub.idempotency_window)), _encode(extra) if extra else ""])

    def _kept(self, hub: "Hub", draft: Draft, at: float, reply: list[Any],
              wait: bool = True) -> Message | None:
        """The message the publish script numbered (*reply*), applied to the
        hub first, so that a read on this server sees it. Without *wait*,
        None when that needs the feed read up to it."""
        channel, message, title, priority, payload, key, extra = draft
        seq = int(reply[0])
        if len(reply) > 1:  # the key was used within the window
            return hub.replayed(seq, reply[1].decode(), float(reply[2]))
        if self._feed_lock.acquire(wait):  # the feed's next message: apply it now
            try:
                if seq == self._last + 1 and not hub.closed:
                    self._last = seq
                    hub.follow([Message(seq, hub.cursor_for(seq), channel, None, title,
                                        priority, payload, at, extra)])
            finally:
                self._feed_lock.release()
        for _ in range(3):  # else read the feed up to it
            if hub.head >= seq or hub.closed:
                break
            if not wait:
                return None
            try:
                self._read_feed(hub, self.client, None)
            except _RedisError:
                break  # it is taken; the feed thread brings it when it can
        hub.published += 1
        return Message(seq, hub.cursor_for(seq), channel, message, title, priority, payload, at,
                       extra)

    def attach(self, loop: "Loop", pool: Any) -> None:
        if self.loop is None:
            self.loop, self._pool = loop, pool
            self._link = _RedisLink(self.client, loop, pool)

    def tick(self) -> None:
        if self._link is not None:
            self._link.check(time.monotonic())

    def publish_later(self, hub: "Hub", draft: Draft,
                      then: Callable[["Message | LongpollError"], None]) -> None:
        """The publish script sent from the loop, through ``_RedisLink``;
        what would wait (adopting a new history, reading the feed up to the
        message) goes on to a worker."""
        link = self._link
        if link is None:
            return super().publish_later(hub, draft, then)
        try:
            hub.admit(draft.channel)
            self._refuse_while_down()
        except LongpollError as error:
            return then(error)
        at = round(hub.clock(), 3)
        keys, args = self._publish_call(hub, draft, at)

        def slow(call: Callable[[], Any]) -> None:
            _on_worker(self._pool, self.loop, call, then, self)

        def answered(reply: Any, loaded: bool = False) -> None:
            if isinstance(reply, _RedisReplyError) and str(reply).startswith("NOSCRIPT") \
                    and not loaded:
                link.call(("EVAL", _R_PUBLISH, len(keys), *keys, *args),
                          functools.partial(answered, loaded=True))
            elif isinstance(reply, _RedisReplyError) and "another history" in str(reply):
                slow(functools.partial(self.publish, hub, draft))  # adopts it, publishes again
            elif isinstance(reply, _RedisError):
                self._retry_at = time.monotonic() + 1.0
                then(_unavailable(self, "the store is unavailable", reply))
            else:
                msg = self._kept(hub, draft, at, reply, wait=False)
                if msg is None:
                    slow(functools.partial(self._kept, hub, draft, at, reply))
                else:
                    then(msg)

        link.call(("EVALSHA", self._publish_sha, len(keys), *keys, *args), answered)

    def take(self, hub: "Hub", channel: str, lease: float | None) -> Message | None:
        receipt = secrets.token_hex(8) if lease is not None else ""
        entry = self._ask(self._take, keys=[_R_STREAM + channel, _R_TAKEN, _R_QUEUE],
                          args=[channel, time.time(), "" if lease is None else lease, receipt])
        if not entry:
            return None
        msg = self._message(hub, channel, *entry)
        msg.receipt = receipt or None
        return msg

    def ack(self, hub: "Hub", channel: str, receipt: str) -> bool:
        return bool(self._ask(self._ack, keys=[_R_QUEUE], args=[channel, time.time(), receipt]))

    def give_back(self, hub: "Hub", channel: str, seq: int) -> None:
        self._ask(self._give_back, keys=[_R_QUEUE], args=[channel, time.time(), seq])

    def dropped(self, messages: list[Message]) -> None:
        self._dropped[messages[-1].channel] = messages[-1].seq

    def pruned(self, head: int, watermark: int, forgotten: dict[str, int]) -> None:
        """Apply age retention to the streams too (any server may: it is
        idempotent), and delete the streams of forgotten channels."""
        gone = forgotten
        dropped, self._dropped = self._dropped, {}
        trims = {**dropped, **gone}
        try:
            for name, seq in list(trims.items()):
                self._ask(self._trim, keys=[_R_STREAM + name, _R_DROPPED, _R_TAKEN, _R_FORGOTTEN,
                                            _R_QUEUE],
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
                    self.client.call("CLIENT", "UNBLOCK", self._feed_id)
            except _RedisError:
                pass
            thread.join(0.05)
        self._feed_client.close()
        self.client.close()
        if self._link is not None:
            self._link.close()

    # -- following the feed ---------------------------------------------------

    @staticmethod
    def _message(hub: "Hub", channel: str, entry_id: bytes,
                 fields: dict[bytes, bytes] | list[bytes]) -> Message:
        if isinstance(fields, list):  # a script's reply: [name, value, ...]
            fields = dict(zip(fields[::2], fields[1::2]))
        seq = int(entry_id.split(b"-")[0])
        extra = fields.get(b"x")
        return Message(seq, hub.cursor_for(seq), channel, None,
                       json.loads(fields[b"ti"]), json.loads(fields[b"pr"]), fields[b"m"],
                       float(fields[b"t"]), json.loads(extra) if extra else None)

    def _catch_up(self, hub: "Hub") -> None:
        """Read every channel's stream past the hub's head (at start, and
        when the feed has moved on beyond what this server saw)."""
        call = self.client.call
        after, head = hub.head, int(call("GET", _R_SEQ) or 0)
        messages: list[Message] = []
        cursor = b"0"
        while True:  # every channel's stream
            cursor, keys = call("SCAN", cursor, "MATCH", _R_STREAM + "*", "COUNT", 1000)
            for key in keys:
                channel = key.decode()[len(_R_STREAM):]
                for entry_id, fields in call("XRANGE", key, f"({after}-0", f"{head}-0"):
                    messages.append(self._message(hub, channel, entry_id, fields))
            if cursor == b"0":
                break
        dropped = call("HGETALL", _R_DROPPED)
        marks = {k.decode(): (int(v), 0) for k, v in zip(dropped[::2], dropped[1::2])
                 if int(v) > after}
        messages.sort(key=_seq_of)
        history, seq, lost, forgotten = call("MGET", _R_HISTORY, _R_SEQ, _R_LOST, _R_FORGOTTEN)
        lost = int(lost or 0)
        if history is None or history.decode() != hub.history or int(seq or 0) < head:
            lost = max(lost, head)  # Redis lost its data while this read it: assume the worst
        hub.follow(messages, head, marks, int(forgotten or 0), lost)
        self._last = max(head, after)  # (head is lower if Redis lost its data)

    def _check_history(self, hub: "Hub", idle: bool) -> None:
        """From the feed thread, once a second: if Redis lost its data,
        re-seed it with this hub's history (so a server starting now joins
        it rather than beginning another); if another server re-seeded it
        first with a history of its own, adopt that one. If the feed was
        *idle* and Redis is numbered past this hub, the feed lost what this
        hub had not read yet: catch up (and learn what is lost)."""
        history, seq = self._reseed(keys=[_R_HISTORY, _R_SEQ, _R_LOST],
                                    args=[hub.history, hub.head])
        if history.decode() != hub.history:
            self._adopt(hub)
        elif idle and int(seq) > hub.head:
            with self._feed_lock:
                self._catch_up(hub)

    def _adopt(self, hub: "Hub") -> None:
        """Follow the history Redis holds now, from its beginning."""
        with self._feed_lock:
            history = self.client.call("GET", _R_HISTORY)
            if history is not None and history.decode() != hub.history:
                logger.warning("%s holds another history (it lost its data and another "
                               "server began anew): following that one", self.url)
                hub.adopt(history.decode())
                self._last = 0
                self._catch_up(hub)

    def _read_feed(self, hub: "Hub", client: Any, block: int | None) -> int | None:
        """Apply the feed's next messages, in order (from the feed thread,
        or from a publisher that wants its own message applied now); return
        how many were new here (0: all applied already, by their publisher
        on this server), or None if the feed had none."""
        block_args = () if block is None else ("BLOCK", block)
        reply = client.call("XREAD", "COUNT", 1000, *block_args, "STREAMS", _R_FEED,
                            f"{self._last}-0") or ()
        with self._feed_lock:
            messages = []
            for _, entries in reply:
                for entry_id, fields in entries:
                    seq = int(entry_id.split(b"-")[0])
                    if seq <= self._last:
                        continue  # the other reader applied it
                    if seq != self._last + 1:  # the feed was trimmed past us
                        hub.follow(messages)
                        self._catch_up(hub)
                        return len(messages) + 1
                    fields = dict(zip(fields[::2], fields[1::2]))
                    messages.append(self._message(hub, fields[b"c"].decode(),
                                                  entry_id, fields))
                    self._last = seq
            hub.follow(messages)
        return len(messages) if reply else None

    def _follow(self, hub: "Hub") -> None:
        """The feed thread: apply each new message in order; after a lost
        connection, resume where it stopped (or catch up from the streams)."""
        failures = 0
        while not self._stop.is_set():
            try:
                if failures:  # a new connection
                    self._feed_id = self._feed_client.call("CLIENT", "ID")
                new = self._read_feed(hub, self._feed_client, 1000)
                if new == 0:  # all this server's own: while it publishes, read in batches
                    self._stop.wait(0.01)
                if time.monotonic() >= self._checked + 1.0 and not self._stop.is_set():
                    self._checked = time.monotonic()
                    self._check_history(hub, idle=new is None)

                if failures:
                    logger.warning("following %s again", self.url)
                failures = 0
            except Exception as exc:
                if self._stop.is_set():
                    return  # close() cut the connection
                if not isinstance(exc, _RedisError):
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
        """Whether *rules* let one *action* *channel*, a name or, to read, a
        pattern. A pattern is allowed by a rule that is the same pattern, or
        by a rule whose only wildcard is ``*`` and that matches the pattern
        as text: ``ci-*`` allows ``ci-*``, ``ci-main-*`` and ``ci-?``, which
        match only channels that ``ci-*`` matches, and not ``*`` or ``c*``.
        (A rule with ``?`` or ``[...]`` allows only itself as a pattern.)"""
        patterns = rules.get(action, ())
        if not is_pattern(channel):
            return any(fnmatch.fnmatchcase(channel, p) for p in patterns)
        return any(p == channel or "?" not in p and "[" not in p
                   and fnmatch.fnmatchcase(channel, p) for p in patterns)

    def identify(self, token: str | None) -> dict[str, list[str]] | None:
        """The rules of *token* (None for no token); a 401 ``LongpollError``
        for a token this file does not know."""
        if not token:
            return None
        given, rules = token.encode(), None
        for known, known_rules in self.tokens:  # every one compared: constant time
            if hmac.compare_digest(given, known):
                rules = known_rules
        if rules is None:
            raise LongpollError(HTTPStatus.UNAUTHORIZED, "invalid token",
                                {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return rules

    def permit(self, rules: dict[str, list[str]] | None, action: str,
               channels: Iterable[str]) -> None:
        """Raise a 401 or 403 ``LongpollError`` unless anyone, or a token
        with *rules*, may *action* all *channels*."""
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

    def check(self, token: str | None, action: str, channels: Iterable[str]) -> None:
        """Raise a 401 or 403 ``LongpollError`` unless *token* may *action* all *channels*."""
        self.permit(self.identify(token), action, channels)


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
# HTTP/1.1 requests from bytes (no sockets in this part)
# ---------------------------------------------------------------------------

def _json_body(obj: Any) -> bytes:
    """*obj* as a JSON answer: one line, ending in a newline (a shell's
    prompt then starts on a line of its own after ``curl``)."""
    return _encode(obj).encode() + b"\n"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for all requests (json.loads with options builds one per call).
_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def _decode(text: str) -> Any:
    """``json.loads(text)``, NaN and Infinity refused. A text that is one
    value with nothing around it (a body, usually) goes to the decoder's
    scanner directly; anything else, errors included, to ``decode``."""
    try:
        value, end = _decoder.scan_once(text, 0)
    except (StopIteration, ValueError):
        end = -1
    return value if end == len(text) else _decoder.decode(text)


class _Verbatim:
    """A message with the JSON text a publish's body gave it, which becomes
    its wire form as it is (``Hub`` takes it where it takes a message, and
    does not encode the value again; see ``_decode_publish``)."""

    __slots__ = ("value", "text")

    def __init__(self, value: Any, text: str) -> None:
        self.value, self.text = value, text


def _verbatim(value: Any, text: str) -> Any:
    """*value* as a ``_Verbatim`` with its JSON *text*, unless something in
    the text keeps it from being the wire form as it is: a line break (an
    event stream's line), a ``\\u`` escape (perhaps a lone surrogate, which
    is no text), a number that may lie past a float's range (which decodes
    to Infinity: not JSON). Then *value*, to be encoded afresh. (Plain
    ``in`` tests first: a regular expression over every text would cost
    more than encoding it.)"""
    if "\n" in text or "\r" in text or "\\u" in text or (
            ("e" in text or "E" in text) and _EXPONENT.search(text)) or (
            len(text) > 199 and _LONG_NUMBER.search(text)):
        return value
    return _Verbatim(value, text)


# (Past a float: 1e309; 1 with 210 digits more, e99: integer digits and
# exponent add up to 309. Either may be half of it in a text that is only
# close: that is encoded afresh, which is merely slower.)
_EXPONENT = re.compile(r"[0-9.][eE][-+]?[0-9]{3}")
_LONG_NUMBER = re.compile(r"[0-9]{200}")


def _decode_publish(text: str) -> Any:
    """A JSON publish body, as ``_decode`` reads it, but where the message's
    own text can be kept, as a ``_Verbatim``: a body that is the message
    itself, or an envelope whose ``"message"`` comes first (as the Python
    client and longpoll.js write it). So a publish is decoded once, to check
    it, and never encoded again."""
    if not text.startswith('{"message":'):
        value = _decode(text)
        if isinstance(value, dict) and "message" in value or (
                text[:1] in _SPACE or text[-1:] in _SPACE):
            return value
        return _verbatim(value, text)
    start = 12 if text.startswith(" ", 11) else 11
    try:
        value, end = _decoder.scan_once(text, start)
    except (StopIteration, ValueError):
        return _decode(text)  # (its error, worded by the decoder)
    if text[end:] == "}":
        envelope = {}
    elif text.startswith(",", end):
        try:
            envelope = _decode("{" + text[end + 1:])  # the other fields
        except (ValueError, RecursionError):
            return _decode(text)  # (its error, where the whole body has it)
        if "message" in envelope:  # twice: the last one counts
            return _decode(text)
    else:
        return _decode(text)
    envelope["message"] = _verbatim(value, text[start:end])
    return envelope


_SPACE = frozenset(" \t\r\n")

# RFC 9112: a request line, a header line, a chunk size; and what a field
# value may not hold (controls other than tab; RFC 9110 5.5).
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):(.*)", re.DOTALL)
_TOKEN_NAME = re.compile(_TOKEN.decode())
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_IN_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # CR, LF checked apart
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_ABSOLUTE_FORM = re.compile(r"https?://[^/?#]*", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def _header_name(raw: str) -> str | None:
    """A header name, lower-cased; None if it is not a token (RFC 9110 5.1:
    no space before the colon). Cached: the same few names come every time."""
    return raw.lower() if _TOKEN_NAME.fullmatch(raw) else None


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


class Request:
    """One HTTP request: its head as the reader found it, then its body, and
    what the server decided about it (route, client key, CORS)."""

    __slots__ = ("method", "target", "path", "query_string", "version", "headers",
                 "keep_alive", "expect_continue", "has_body", "body", "client", "started",
                 "route", "names", "token", "key", "rules", "cors", "refusal", "_query", "memo")

    def __init__(self, method: str, target: str, version: str,
                 headers: dict[str, str], known: tuple | None = None,
                 memo: dict[str, Any] | None = None) -> None:
        self.method = method
        self.target = target
        self.version = version          # "HTTP/1.1" or "HTTP/1.0"
        self.headers = headers          # lower-case names; repeats joined with ", "
        if known is not None:  # (what follows, from a request with the same head)
            self.path, self.query_string, self.keep_alive, self.expect_continue = known
        else:
            self.path, _, self.query_string = target.partition("?")
            connection = headers.get("connection", "").lower()
            if version == "HTTP/1.1":
                self.keep_alive = "close" not in connection
            else:
                self.keep_alive = "keep-alive" in connection and "close" not in connection
            self.expect_continue = (version == "HTTP/1.1" and
                                    headers.get("expect", "").lower() == "100-continue")
        self.has_body = False
        self.body = b""
        self.client = ""                # the client's address (see Handler.decide)
        self.started = time.monotonic()
        self.route = "invalid"          # which route answers it, for /metrics
        self.names: tuple[str, ...] = ()
        self.token: str | None = None
        self.key: str | None = None     # whom the limits count it against
        self.rules: dict[str, list[str]] | None = None
        self.cors: tuple[tuple[str, str], ...] = ()
        self.refusal: LongpollError | None = None  # answer this once the body is in
        self._query: dict[str, str] | None = None
        #: What routes derive from the head alone, shared by the requests
        #: whose heads are the same bytes (``RequestReader`` keeps it with the
        #: parsed head): never anything of one request or one client.
        self.memo: dict[str, Any] = {} if memo is None else memo

    @property
    def query(self) -> dict[str, str]:
        """The query parameters, decoded (the last of repeated names wins)."""
        if self._query is None:
            self._query = _parse_query(self.query_string)
        return self._query

    def loggable(self) -> str:
        """The request line for a log: tokens masked, controls escaped."""
        target = self.target
        if "token" in self.query:  # however it was spelled (?%74oken=)
            path, _, query = target.partition("?")
            target = path + "?" + "&".join(
                part.partition("=")[0] + "=***"
                if urllib.parse.unquote_plus(part.partition("=")[0]) == "token" else part
                for part in query.split("&"))
        return _printable(" ".join(filter(None, (self.method, target, self.version))))

    def __repr__(self) -> str:
        return f"<Request {self.loggable()}>"


def _keep(cache: dict[Any, Any], key: bytes | str, value: Any, longest: int) -> None:
    """Keep *value* under *key* if the key is at most *longest* long; a
    cache of 256 is emptied first (256 x *longest* bytes at most)."""
    if len(key) <= longest:
        if len(cache) >= 256:
            cache.clear()
        cache[key] = value


def _printable(text: str) -> str:
    """*text* with control characters escaped, safe in a log line."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: f"\\x{ord(m.group()):02x}", text)


class RequestReader:
    """Bytes in, requests out: the one reader of a connection's requests.

    Strict where RFC 9112 says MUST (sections 2-7): every line ends in
    CRLF; the request line is ``method SP target SP HTTP/1.x``; header
    names are tokens with no space before the colon; no folded lines; no
    control characters in values; exactly one ``Host`` in HTTP/1.1; a body
    is framed by one rule, ``Transfer-Encoding: chunked`` (HTTP/1.1 only)
    or one ``Content-Length``, never both. Whatever breaks a rule raises a
    ``LongpollError`` (400, 413, 414, 431, 501, 505) as soon as the bytes
    that break it are in, and the connection must then close: after a
    framing error nobody can tell where the next request would begin.

    ``feed(data)``, then ``read_head()`` until it returns a ``Request``,
    then (if ``request.has_body``) ``read_body()`` until it returns the
    de-chunked body. Holds at most one head and one body, both bounded.
    """

    def __init__(self, max_head: int = MAX_HEAD, max_body: int = MAX_BODY,
                 max_line: int = 8192, max_headers: int = 100,
                 heads: dict[bytes, Any] | None = None,
                 blocks: dict[bytes, dict[str, str]] | None = None) -> None:
        self.max_head, self.max_body = max_head, max_body
        self.max_line, self.max_headers = max_line, max_headers
        self.buffer = bytearray()
        self._length = 0           # Content-Length bytes still to come
        self._chunked = False
        self._chunk = 0            # bytes left in this chunk; -1: its CRLF is next
        self._trailers = False     # past the last chunk, reading trailer lines
        self._parts: list[bytes] = []
        self._size = 0             # body bytes so far
        #: The first line of the last head refused (for the log), at most 200 bytes.
        self.first_line = b""
        # What small heads, and header sections, parsed to, by their bytes;
        # shared by the readers of one server (each kept at most 256). A
        # client polling on a keep-alive connection sends the same header
        # lines each time, with only its cursor changed, and after a publish
        # its subscribers' re-polls are the same bytes (the same cursor).
        # Equal header lines give the one same (never changed) dict.
        self.heads = {} if heads is None else heads
        self.blocks = {} if blocks is None else blocks

    def feed(self, data: bytes) -> None:
        self.buffer += data

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    # -- the head ----------------------------------------------------------------

    def read_head(self) -> Request | None:
        """The next request's head, or None while it is incomplete."""
        buf = self.buffer
        if buf.startswith(b"\r\n"):  # RFC 9112 2.2: ignore empty lines before a request
            skip = 0
            while buf[skip:skip + 2] == b"\r\n" and skip < self.max_line:
                skip += 2
            del buf[:skip]
        end = buf.find(b"\r\n\r\n", 0, self.max_head + 4)
        head = bytes(buf[:end + 2]) if end >= 0 else bytes(buf[:200])
        try:
            if end < 0:
                self._check_partial_head()
                return None
            del buf[:end + 4]
            return self._parse_head(head)
        except LongpollError:
            self.first_line = head[:200].partition(b"\n")[0].rstrip(b"\r")
            raise

    def _check_partial_head(self) -> None:
        """Refuse at once what can never become a valid head."""
        buf = self.buffer
        eol = buf.find(b"\n")
        if eol < 0:
            if len(buf) > self.max_line:
                raise LongpollError(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
        else:
            self._request_line(bytes(buf[:eol + 1]))
        if len(buf) > self.max_head:
            raise LongpollError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                "request header section too large")
        tail = len(buf) - 1 if buf.endswith(b"\r") else len(buf)  # its LF may be coming
        self._check_line_ends(buf, tail)

    @staticmethod
    def _check_line_ends(data: bytes | bytearray, end: int) -> None:
        crlf = data.count(b"\r\n", 0, end)
        if data.count(b"\n", 0, end) != crlf:
            raise _bad_request("a line of the request ends in a bare LF: use CRLF")
        if data.count(b"\r", 0, end) != crlf:
            raise _bad_request("the request holds a bare CR")

    def _request_line(self, line: bytes) -> tuple[str, str, str]:
        if len(line) > self.max_line + 2:
            raise LongpollError(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
        if not line.endswith(b"\r\n"):
            raise _bad_request("the request line ends in a bare LF: use CRLF")
        match = _REQUEST_LINE.fullmatch(line, 0, len(line) - 2)
        if match is None:
            version = line.rstrip(b"\r\n").rpartition(b" ")[2]
            if re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version):
                raise _bad_request("malformed request line: use METHOD /path HTTP/1.1")
            raise _bad_request("malformed request line (HTTP/0.9 is not supported): "
                               "use METHOD /path HTTP/1.1")
        if match.group(3) != b"1":
            raise LongpollError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                                "only HTTP/1.0 and HTTP/1.1 are supported")
        method, target = match.group(1).decode("ascii"), match.group(2).decode("ascii")
        version = "HTTP/1.1" if match.group(4) != b"0" else "HTTP/1.0"
        if not target.startswith("/"):
            absolute = _ABSOLUTE_FORM.match(target)  # RFC 9112 3.2.2: accept it
            if absolute is not None:
                target = "/" + target[absolute.end():].lstrip("/")
            elif not (target == "*" and method == "OPTIONS"):
                raise _bad_request(f"invalid request target {target[:80]!r}")
        return method, target, version

    def _parse_head(self, head: bytes) -> Request:
        known = self.heads.get(head)
        if known is not None:  # the same bytes as a head read before
            request = Request(*known)  # (a request's headers are never changed: shared)
            chunked, self._length = request.memo["framing"]  # (checked when it was read)
            if chunked:
                self._chunked = True
                self._chunk, self._trailers, self._size = 0, False, 0
            request.has_body = chunked or self._length > 0
            return request
        eol = head.find(b"\r\n") + 2
        line, block = head[:eol], head[eol:]
        headers = self.blocks.get(block)
        if headers is not None and not (  # header lines read before: the request line is new
                b"\n" in line[:-2] or b"\r" in line[:-2] or _CONTROL_IN_HEAD.search(line)):
            method, target, version = self._request_line(line)
        else:
            method, target, version, headers = self._parse_whole(head)
            _keep(self.blocks, block, headers, 4096)
        if version == "HTTP/1.1" and "host" not in headers:
            raise _bad_request("an HTTP/1.1 request needs a Host header")
        request = Request(method, target, version, headers)
        self._frame(request)
        request.memo["framing"] = (self._chunked, self._length)
        _keep(self.heads, head, (method, target, version, headers, (
            request.path, request.query_string, request.keep_alive, request.expect_continue),
            request.memo), 2048)
        return request

    def _parse_whole(self, head: bytes) -> tuple[str, str, str, dict[str, str]]:
        self._check_line_ends(head, len(head))
        if _CONTROL_IN_HEAD.search(head):
            raise _bad_request("the request head holds a control character")
        lines = head.decode("latin-1").split("\r\n")
        lines.pop()  # "" after the last CRLF
        method, target, version = self._request_line(lines[0].encode("latin-1") + b"\r\n")
        if len(lines) - 1 > self.max_headers:
            raise LongpollError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                f"more than {self.max_headers} header lines")
        headers: dict[str, str] = {}
        for line in itertools.islice(lines, 1, None):
            raw, colon, value = line.partition(":")
            name = _header_name(raw) if colon else None
            if name is None:
                if line[:1] in (" ", "\t"):
                    raise _bad_request("folded header lines (obs-fold) are not accepted")
                raise _bad_request(f"malformed header line {_printable(line[:40])!r}")
            value = value.strip(" \t")
            seen = headers.get(name)
            if seen is None:
                headers[name] = value
            elif name == "host":
                raise _bad_request("more than one Host header")
            elif name == "content-length":
                if seen != value:
                    raise _bad_request("Content-Length must be one whole number")
            else:
                headers[name] = seen + ", " + value
        return method, target, version, headers

    def _frame(self, request: Request) -> None:
        """RFC 9112 6.3: where this request's body ends."""
        headers = request.headers
        coding, length = headers.get("transfer-encoding"), headers.get("content-length")
        if coding is not None:
            if request.version == "HTTP/1.0":
                raise _bad_request("Transfer-Encoding is not allowed in HTTP/1.0")
            if length is not None:
                raise _bad_request("a request may not have both Content-Length and "
                                   "Transfer-Encoding")
            codings = [c.strip().lower() for c in coding.split(",")]
            if codings[-1] != "chunked" or codings.count("chunked") > 1:
                raise _bad_request(f"unsupported Transfer-Encoding: {coding[:40]}")
            if len(codings) > 1:
                raise LongpollError(HTTPStatus.NOT_IMPLEMENTED,
                                    f"unsupported Transfer-Encoding: {coding[:40]}")
            request.has_body = self._chunked = True
            self._chunk, self._trailers, self._size = 0, False, 0
        elif length is not None:
            if not (length.isascii() and length.isdigit()):
                raise _bad_request("Content-Length must be one whole number")
            if len(length) > 18 or int(length) > self.max_body:
                raise LongpollError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
            self._length = int(length)
            request.has_body = self._length > 0

    def _too_large(self) -> str:
        return f"body too large: the limit is {self.max_body} bytes"

    # -- the body ----------------------------------------------------------------

    def read_body(self) -> bytes | None:
        """The body of the request whose head came last, whole and de-chunked,
        or None while it is incomplete."""
        if self._chunked:
            return self._read_chunked()
        buf = self.buffer
        if len(buf) < self._length:
            return None
        body = bytes(buf[:self._length])
        del buf[:self._length]
        self._length = 0
        return body

    def _read_chunked(self) -> bytes | None:
        buf = self.buffer
        while True:
            if self._chunk > 0:  # inside a chunk's data
                take = min(self._chunk, len(buf))
                if not take:
                    return None
                self._parts.append(bytes(buf[:take]))
                del buf[:take]
                self._chunk -= take
                if self._chunk:
                    return None
                self._chunk = -1
            if self._chunk < 0:  # the CRLF after a chunk's data
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise _bad_request("malformed chunked body: a chunk must end in CRLF")
                del buf[:2]
                self._chunk = 0
            eol = buf.find(b"\r\n", 0, self.max_line)
            if eol < 0:
                if len(buf) >= self.max_line or b"\n" in buf:
                    raise _bad_request("malformed chunked body: a bad line")
                return None
            line = bytes(buf[:eol])
            del buf[:eol + 2]
            if self._trailers:
                self._size += len(line) + 2
                if self._size > self.max_body + self.max_head:
                    raise LongpollError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                        "trailer section too large")
                if not line:  # the end of the body
                    body = b"".join(self._parts)
                    self._parts, self._chunked, self._trailers = [], False, False
                    return body
                if _HEADER_LINE.fullmatch(line) is None or _CONTROL.search(line):
                    raise _bad_request("malformed chunked body: a bad trailer line")
                continue
            size, _, extension = line.partition(b";")
            size = size.rstrip(b" \t")
            if not _HEX.fullmatch(size) or _CONTROL.search(extension):
                raise _bad_request("malformed chunked body: a chunk size is hex digits")
            if len(size) > 16:
                raise LongpollError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
            self._chunk = int(size, 16)
            self._size += self._chunk
            if self._size > self.max_body:
                raise LongpollError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large())
            if not self._chunk:
                self._trailers = True


# ---------------------------------------------------------------------------
# Routes: each request to an outcome
# ---------------------------------------------------------------------------

class Response(NamedTuple):
    """An outcome: answer now with these bytes."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


_new_response = _constructor(Response)


class Poll(NamedTuple):
    """An outcome: answer with what *names* hold after *position*, waiting
    up to *timeout* seconds for it (a long-poll)."""

    names: tuple[str, ...]
    position: Position
    timeout: float
    limit: int


class Form(NamedTuple):
    """How a stream is written: its content type (None: a WebSocket), the
    bytes it opens with, each batch of messages (``encode``, a function of
    the batch alone: a fan-out encodes once per form for all the streams
    waiting at one position), and a keepalive."""

    content_type: str | None
    opening: bytes
    encode: Callable[["Batch"], bytes]
    keepalive: Callable[[], bytes]


_new_poll = _constructor(Poll)


class Stream(NamedTuple):
    """An outcome: a stream of *names* from *position* on, written in
    *form*; a WebSocket if *websocket* is given (its
    ``Sec-WebSocket-Accept``)."""

    names: tuple[str, ...]
    position: Position
    form: Form
    websocket: str | None = None


class Take(NamedTuple):
    """An outcome: hand over *channel*'s next untaken message (``/receive``),
    waiting up to *timeout* seconds for one; on a lease of *lease* seconds."""

    channel: str
    timeout: float
    lease: float | None = None


def _error_response(error: LongpollError) -> Response:
    status = HTTPStatus(error.status or HTTPStatus.INTERNAL_SERVER_ERROR)
    return Response(status, _json_body({"error": error.message}),
                    headers=tuple(error.headers.items()))


def _shaped(request: Request, response: Response) -> Response:
    """*response* as *request*'s client reads it: an error to one of ntfy's
    routes in ntfy's shape."""
    if response.status >= 400 and request.route.startswith("ntfy_"):
        return _ntfy_error(response)
    return response


def _ntfy_error(response: Response) -> Response:
    """An error answer as ntfy's clients read one: ``{"code", "http", "error"}``."""
    try:
        message = json.loads(response.body)["error"]
    except (ValueError, KeyError, TypeError):
        return response
    status = response.status
    return response._replace(body=_json_body(
        {"code": status * 100 if status == 400 else status * 100 + 1, "http": status,
         "error": message}))


def _decode_header(value: str, name: str) -> str:
    """Header values arrive as Latin-1; give back the UTF-8 text (RFC 2047
    encoded words too, ``=?UTF-8?B?...?=``, as some clients send it)."""
    try:
        if "=?" in value:
            return str(email.header.make_header(email.header.decode_header(value)))
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeError, ValueError, LookupError, email.errors.HeaderParseError):
        raise _bad_request(f"the {name} header is not valid UTF-8") from None


def _parse_actions(text: str) -> list[dict[str, Any]]:
    """ntfy's action buttons from a header or parameter: a JSON array, or
    its short form, ``view, Open, https://x; http, Close, https://y,
    method=PUT, body='{"a": 1}'``: actions split by ``;``, fields by ``,``,
    each ``key=value`` or, in order, action, label and url; values may be
    quoted with ``"`` or ``'``. Checked by ``_check_action`` afterwards."""
    text = text.strip()
    if text.startswith("["):
        try:
            actions = json.loads(text)
        except ValueError as exc:
            raise _bad_request(f"actions are not valid JSON: {exc}") from None
        if not isinstance(actions, list):
            raise _bad_request("actions must be a list")
        return actions
    actions: list[dict[str, Any]] = []
    fields: list[tuple[str, str]] = []
    for match in _ACTION_PART.finditer(text):
        quote, end = match.group("quote"), match.group("end")
        if quote:
            value = match.group("quoted").replace("\\" + quote, quote)
        else:
            value = match.group("plain").strip()
        fields.append((match.group("key") or "", value))
        if end in (";", ""):
            if any(key or value for key, value in fields):
                actions.append(_action_from_fields(fields))
            fields = []
            if not end:
                break
    return actions


_ACTION_PART = re.compile(r"""\s*(?:(?P<key>[-.\w]+)\s*=\s*)?"""
                          r"""(?:(?P<quote>["'])(?P<quoted>(?:\\.|(?!(?P=quote)).)*)(?P=quote)"""
                          r"""|(?P<plain>[^,;]*))\s*(?P<end>[,;]|$)""", re.S)


def _action_from_fields(fields: list[tuple[str, str]]) -> dict[str, Any]:
    action: dict[str, Any] = {}
    for index, (key, value) in enumerate(fields):
        if not key:
            key = {0: "action", 1: "label", 2: "url"}.get(index, "")
            if not key:
                raise _bad_request(f"action term {value[:40]!r} has no name (write key=value)")
        if key.startswith(("headers.", "extras.")):
            group, _, name = key.partition(".")
            action.setdefault(group, {})[name] = value
        elif key == "clear":
            if value.lower() not in ("true", "yes", "1", "false", "no", "0"):
                raise _bad_request("an action's clear is true or false")
            action["clear"] = value.lower() in ("true", "yes", "1")
        elif key in _ACTION_FIELDS:
            action[key] = value
        else:
            raise _bad_request(f"unknown action field {key[:40]!r}")
    return action


_HTTP_PRIORITY = re.compile(r"\s*(u=|i\s*(,|$))")


def _parse_priority(value: str) -> int:
    text = value.strip().lower()
    if text in PRIORITY_NAMES:
        return PRIORITY_NAMES[text]
    if text in ("1", "2", "3", "4", "5"):
        return int(text)
    raise _bad_request(
        "priority must be 1-5 or one of min, low, default, high, max, urgent")


def _tokens(value: str | None) -> list[str]:
    """A comma-separated header value's tokens, lower-case."""
    return [part.strip().lower() for part in (value or "").split(",")]


_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
_HEADER_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z, \t-]{0,1024}")


class Handler:
    """The routes of PROTOCOL.md: each request to an outcome (a ``Response``,
    or a ``Poll``, ``Stream`` or ``Take`` for the waiting layer). It never
    touches a socket. Reaches the hub and the settings as ``self.server``.

    ``decide(request)`` runs once the head is in, before the body is read
    and before any ``100 Continue``: route, method, rate limits, auth and
    CORS, decided once, in that order. ``handle(request)`` runs with the
    body and calls the route's ``handle_<route>`` method. Requests that
    publish with a large body, or through a store across the network, run
    on a worker thread (``on_worker``), the rest on the loop: they must not
    block.

    To add a route, extend ``routes`` ({path: {method: route}}) and write
    its ``handle_<route>(request)``; ``actions`` says which routes read or
    write channels (checked against ``--auth``).
    """

    #: path -> {method: route}.
    routes = {
        "/": {"GET": "index", "HEAD": "index"},
        "/health": {"GET": "health", "HEAD": "health"},
        "/metrics": {"GET": "metrics"},
        "/send": {"POST": "send"},
        "/receive": {"GET": "receive"},
        "/receive/ack": {"POST": "ack"},
        "/longpoll.js": {"GET": "script", "HEAD": "script"},
        "/longpoll.mjs": {"GET": "script", "HEAD": "script"},
        "/page.js": {"GET": "script", "HEAD": "script"},
    }
    #: Methods of /channels/{names}, /channels/{names}/events and .../ws.
    channel_routes = {"GET": "poll", "POST": "publish", "PUT": "publish"}
    stream_routes = {"GET": "events"}
    socket_routes = {"GET": "ws"}
    #: /channels/{name}/expect: silence alerts (``Hub.expect``).
    expect_routes = {"GET": "expect_get", "POST": "expect_set", "PUT": "expect_set",
                     "DELETE": "expect_delete"}
    #: What each route does to its channels (for auth); /send and /receive
    #: act on the ``default`` channel.
    actions = {"poll": "read", "events": "read", "ws": "read", "receive": "read",
               "ack": "read", "publish": "write", "send": "write",
               "ntfy_publish": "write", "ntfy_post": "write", "ntfy_json": "read",
               "ntfy_sse": "read", "ntfy_raw": "read", "ntfy_ws": "read", "ntfy_auth": "read",
               "expect_get": "read", "expect_set": "write", "expect_delete": "write"}
    #: Routes that no rate limit counts (monitoring must always get through).
    unlimited = frozenset({"health", "metrics", "ntfy_health"})
    #: Routes that publish (``publish_arguments`` reads them; ``later``).
    publishing = frozenset({"publish", "send", "ntfy_publish", "ntfy_post"})
    ntfy_publishing = frozenset({"ntfy_publish", "ntfy_post"})  # (answered as ntfy does)
    #: Other routes that ask the store (on a worker, when it is across the network).
    store_routes = frozenset({"ack", "expect_get", "expect_set", "expect_delete"})
    #: ntfy's paths (``ntfy_route``), with ``--ntfy`` (the default).
    ntfy_topic_routes = {"POST": "ntfy_publish", "PUT": "ntfy_publish", "GET": "ntfy_page"}
    ntfy_root_routes = {"GET": "index", "HEAD": "index", "POST": "ntfy_post", "PUT": "ntfy_post"}

    def __init__(self, server: "Server") -> None:
        self.server = server
        # A poll's parameters by its query string: after a publish, its
        # subscribers come back with the same one (the same cursor).
        self._polls: dict[str, tuple[str | None, float, int]] = {}
        self._methods: dict[str, Callable[[Request], Any]] = {}  # route: handle_<route>

    # -- deciding, once per request -----------------------------------------------

    def decide(self, request: Request, previous: tuple | None = None) -> tuple | None:
        """Route *request* and decide whether it may proceed, from its head
        alone; raise a ``LongpollError`` (404, 405, 400, 401, 403, 429) if not.

        Returns what was decided. Given back as *previous* for the next
        request on the connection, it is reused when that one has the same
        method, path, token and headers that decide (``Origin``,
        ``X-Forwarded-For``, ``Accept``, ``Upgrade``), and the auth rules
        are the same: a re-poll, whose cursor alone changed, or the next
        publish to the same channel, whatever its length. Only the rate
        limits are taken again."""
        server, headers = self.server, request.headers
        signature = request.memo.get("decide")  # (what of the head decides: per head)
        if signature is None:
            signature = request.memo["decide"] = (
                request.method, request.path, self.token(request), headers.get("origin"),
                headers.get("x-forwarded-for"), headers.get("accept"), headers.get("upgrade"))
        token = signature[2]
        if previous is not None and previous[1] is server._auth and previous[0] == signature:
            (request.client, request.cors, request.route, request.names, request.rules,
             request.key, action) = previous[2]
            request.token = token
            if request.key is not None:  # (loopback is exempt from the limits)
                if request.route not in self.unlimited:
                    self.limit(request, server.request_limit, "requests")
                if action == "write":
                    self.limit(request, server.publish_limit, "publishes")
            return previous
        request.client = self.client_address(request)
        if server.cors_origins:
            request.cors = self.cors_headers(request)
        methods, names = self.route(request.path)
        if request.method == "OPTIONS" and request.cors:
            request.route = "preflight"
            return
        route = methods.get(request.method)
        if route is None:
            allow = ", ".join(methods)
            raise LongpollError(HTTPStatus.METHOD_NOT_ALLOWED,
                                f"{request.method} is not allowed here; use {allow}",
                                {"Allow": allow})
        if route == "poll":
            if "websocket" in request.headers.get("upgrade", "").lower():
                route = "ws"
            elif "text/event-stream" in request.headers.get("accept", ""):
                route = "events"
        request.route = route
        action = self.actions.get(route)
        if route in ("send", "receive", "ack"):
            names = (DEFAULT_CHANNEL,)
        elif route == "publish":
            if len(names) != 1:
                raise _bad_request("publish to one channel at a time")
            check_channel(names[0])  # (not a pattern)
        request.names = names
        request.token = token
        if action is not None and server.auth is not None:
            request.rules = server.auth.identify(request.token)  # 401 for an unknown token
        request.key = self.client_key(request)
        if route not in self.unlimited:
            self.limit(request, server.request_limit, "requests")
        if action is not None:
            if server.auth is not None:
                server.auth.permit(request.rules, action, names)
            if action == "write":
                self.limit(request, server.publish_limit, "publishes")
        return (signature, server._auth, (request.client, request.cors, route, names,
                                          request.rules, request.key, action))

    def route(self, path: str) -> tuple[dict[str, str], tuple[str, ...]]:
        """Map *path* to {method: route} and the channel names it holds."""
        if path.startswith("/channels/"):
            names, slash, rest = path[10:].partition("/")
            if not slash:
                return self.channel_routes, _channels_in_path(names)
            if rest == "events":
                return self.stream_routes, _channels_in_path(names)
            if rest == "ws":
                return self.socket_routes, _channels_in_path(names)
            if rest == "expect":
                return self.expect_routes, _channels_in_path(names)
        else:
            methods = self.routes.get(path)
            if methods is not None:
                if path == "/" and self.server.ntfy:
                    return self.ntfy_root_routes, ()
                return methods, ()
            if self.server.ntfy:
                found = self.ntfy_route(path)
                if found is not None:
                    return found
        raise LongpollError(HTTPStatus.NOT_FOUND, f"no such path: {_printable(path[:200])}")

    def ntfy_route(self, path: str) -> tuple[dict[str, str], tuple[str, ...]] | None:
        """ntfy's paths: ``/<topic>`` (publish), ``/<topic>/publish`` (by
        GET too), ``/<topics>/json|sse|raw|ws`` (subscribe),
        ``/<topics>/auth``, ``/v1/health``; None for another path."""
        parts = path[1:].split("/")
        if len(parts) == 1 and NTFY_TOPIC_RE.match(urllib.parse.unquote(parts[0])):
            if urllib.parse.unquote(parts[0]) in NTFY_RESERVED:  # (say so to a publish)
                return {"POST": "ntfy_reserved", "PUT": "ntfy_reserved", "GET": "invalid"}, ()
            return self.ntfy_topic_routes, _ntfy_topics(parts[0])
        if len(parts) != 2:
            return None
        first, kind = parts
        if first == "v1" and kind == "health":
            return {"GET": "ntfy_health"}, ()
        if kind in ("json", "sse", "raw", "ws", "auth"):
            return {"GET": "ntfy_" + kind}, _ntfy_topics(first)
        if kind in ("publish", "send", "trigger"):
            topics = _ntfy_topics(first)
            if len(topics) != 1:
                raise _bad_request("publish to one topic at a time")
            return {"GET": "ntfy_publish", "POST": "ntfy_publish", "PUT": "ntfy_publish"}, topics
        return None

    def where(self, request: Request) -> str | None:
        """Where *request* is handled: None for at once, on the calling
        thread; ``"later"`` for a publish the loop sends to a store across
        the network and answers when the store does (``publish_later``);
        ``"worker"`` for a worker thread: a publish with a large body to
        decode, or through a store across the network that the loop does
        not drive."""
        route = request.route
        if route in self.publishing:
            server = self.server
            store = server.hub.store
            if len(request.body) > server.inline_body_limit:
                return "worker"
            if store.loop is not None and store.loop is getattr(server, "loop", None):
                return "later"
            return "worker" if store.remote else None
        return "worker" if route in self.store_routes and self.server.hub.store.remote else None

    def token(self, request: Request) -> str | None:
        """The credentials sent: ``Authorization: Bearer <token>``, or
        ``Basic`` with the token as the password (any user: as ntfy's
        clients send one); else ``?token=``, or ntfy's ``?auth=`` (that
        header's value, in base64url)."""
        header = request.headers.get("authorization", "")
        query = request.query_string
        if not header and not ("token" in query or "auth" in query or "%" in query):
            return None  # (the usual request: no credentials, decided at once)
        if not header and "auth" in query:
            try:
                header = base64.urlsafe_b64decode(
                    request.query.get("auth", "") + "==").decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                raise _bad_request("auth must be an Authorization header in base64url") from None
        if header[:7].lower() == "bearer ":
            return header[7:].strip()
        if header[:6].lower() == "basic ":
            try:
                user, _, password = base64.b64decode(header[6:].strip()).decode(
                    "utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                raise _bad_request("malformed Basic credentials") from None
            return password or user or None
        if "token" not in query and "%" not in query:  # (%74oken is token too)
            return None
        return request.query.get("token")

    def client_address(self, request: Request) -> str:
        """The client's address: the socket's, or with --trust-proxy the
        last one X-Forwarded-For names."""
        if self.server.trust_proxy:
            forwarded = request.headers.get("x-forwarded-for", "")
            return forwarded.rsplit(",", 1)[-1].strip() or request.client
        return request.client

    def client_key(self, request: Request) -> str | None:
        """Whom the limits count *request* against: a token that ``--auth``
        knows, else the address; None for loopback, which is exempt. A token
        nobody checked never counts: inventing tokens lifts no limit."""
        if request.rules is not None:
            return "token:" + hashlib.sha256(request.token.encode()).hexdigest()[:16]
        return None if request.client in _LOOPBACK else request.client

    def limit(self, request: Request, limiter: "RateLimit | None", what: str) -> None:
        """429 with Retry-After when this client has spent its budget."""
        if limiter is not None and request.key is not None:
            wait = limiter.take(request.key)
            if wait:
                self.server.metrics.rate_limited += 1
                raise LongpollError(HTTPStatus.TOO_MANY_REQUESTS, f"too many {what}: slow down",
                                    {"Retry-After": str(max(1, math.ceil(wait)))})

    def cors_headers(self, request: Request) -> tuple[tuple[str, str], ...]:
        """CORS headers for this request's Origin, if the server allows it."""
        allowed = self.server.cors_origins
        origin = request.headers.get("origin")
        if not origin:
            return ()
        if "*" in allowed:
            return (("Access-Control-Allow-Origin", "*"),)
        if origin in allowed:
            return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
        return ()

    # -- answering ------------------------------------------------------------------

    def handle(self, request: Request) -> Response | Poll | Stream | Take:
        """The outcome of *request* (its errors rendered as responses)."""
        try:
            method = self._methods.get(request.route)
            if method is None:  # (looked up once per route)
                method = self._methods[request.route] = getattr(self, "handle_" + request.route)
            return method(request)
        except LongpollError as error:
            return _error_response(error)
        except Exception:
            logger.exception("error serving %s", request.loggable())
            return _error_response(LongpollError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                                 "internal server error"))

    @staticmethod
    def json(status: int, obj: Any) -> Response:
        return Response(status, _json_body(obj))

    def param_timeout(self, request: Request) -> float:
        """The ``timeout`` parameter, clamped to the server's maximum."""
        server = self.server
        text = request.query.get("timeout")
        if text is None:
            return min(server.timeout, server.max_timeout)
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value >= 0:  # also refuses NaN
            raise _bad_request(f"timeout must be a number of seconds >= 0, not {text!r}")
        return min(value, server.max_timeout)

    def param_limit(self, request: Request) -> int:
        text = request.query.get("limit")
        if text is None:
            return DEFAULT_LIMIT
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
            raise _bad_request(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {text!r}")
        return int(text)

    def publish_body(self, request: Request) -> tuple[Any, str | None, int | None,
                                                     dict[str, Any]]:
        """(message, title, priority, extra) from a publish, by the one rule
        of docs/protocol.md ("What a publish body means"):

        - ``Content-Type: application/json``: an object with a ``"message"``
          field is an envelope (``"title"``, ``"priority"`` and the fields of
          ``EXTRA_FIELDS`` beside it); any other JSON value is the message.
        - ``application/x-www-form-urlencoded`` holding a ``message`` field
          (a browser form, jQuery's ``$.post``; Flask's ``request.form``):
          that field, and ``title`` and ``priority`` fields. Any other body
          of that type is text: ``curl -d hello`` sends that type too.
        - Anything else: the body, as UTF-8 text, is the message.

        What the body does not give comes from headers, then the query, by
        ntfy's names (``publish_params``). An empty body is refused: there
        is nothing to publish.
        """
        body = request.body
        if not body:
            raise _bad_request("the body is empty: send the message as the body")
        ctype, title, priority, extra = (request.memo.get("publish")  # (kept: no call)
                                         or self.publish_head(request))
        given = None
        if ctype == "application/json":
            try:
                message = _decode_publish(body.decode("utf-8"))
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError too
                raise _bad_request(f"body is not valid JSON: {exc}") from None
            if isinstance(message, dict) and "message" in message:  # the envelope
                if len(message) > 1:
                    given = {name: message[name] for name in _PUBLISH_FIELDS if name in message}
                if message.get("title") is not None:
                    title = message["title"]
                if message.get("priority") is not None:
                    priority = message["priority"]
                message = message["message"]
        else:
            try:
                message = body.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad_request("body is not valid UTF-8") from None
            if ctype == "application/x-www-form-urlencoded" and "message=" in message:
                try:
                    form = urllib.parse.parse_qs(message, keep_blank_values=True,
                                                 errors="strict", max_num_fields=100)
                except ValueError:  # (a field that is not UTF-8 too)
                    raise _bad_request("malformed form body") from None
                if "message" in form:
                    message = form["message"][0]
                    title = form["title"][0] if "title" in form else title
                    priority = form["priority"][0] if "priority" in form else priority
        if isinstance(priority, str):  # a header, a form field, or a name in JSON
            priority = _parse_priority(priority)
        if given:  # (the body's own fields win)
            extra = {**extra, **given}
        return message, title, priority, extra

    def publish_head(self, request: Request) -> tuple[str, str | None, str | None,
                                                      dict[str, Any]]:
        """What a publish's head says, the same for every request with the
        same head bytes (kept in ``request.memo``): the body's content type,
        and the title, priority and extra fields its headers and query give."""
        head = request.memo.get("publish")
        if head is None:
            params = self.publish_params(request)
            head = (request.headers.get("content-type", "").split(";", 1)[0].strip().lower(),
                    params.get("title"), params.get("priority"),
                    {name: params[name] for name in _PUBLISH_FIELDS if name in params})
            request.memo["publish"] = head
        return head

    #: ntfy's names for a publish's parameters, as headers (any case) and
    #: query parameters, first found wins: the same on both APIs.
    publish_names = {
        "title": ("x-title", "title", "t"),
        "priority": ("x-priority", "priority", "prio", "p"),
        "tags": ("x-tags", "tags", "tag", "ta"),
        "click": ("x-click", "click"),
        "icon": ("x-icon", "icon"),
        "actions": ("x-actions", "actions", "action"),
        "markdown": ("x-markdown", "markdown", "md"),
        "sequence_id": ("x-sequence-id", "sequence-id", "sequence_id"),
        "message": ("x-message", "message", "m"),
        "ttl": ("x-ttl", "ttl"),
        "delay": ("x-delay", "delay", "x-in", "in"),
        "at": ("x-at", "at"),
    }
    #: What ntfy has and this server does not: a publish naming one is
    #: refused (400), never published without it.
    unsupported = {
        "attachments": ("x-attach", "attach", "a", "x-filename", "filename", "file", "f"),
        "e-mail notifications": ("x-email", "x-e-mail", "email", "e-mail", "mail", "e"),
        "phone calls": ("x-call", "call"),
        "templates": ("x-template", "template", "tpl"),
        "UnifiedPush": ("x-unifiedpush", "unifiedpush", "up"),
        "poll requests": ("x-poll-id", "poll-id"),
    }

    _param_names = frozenset(itertools.chain(*publish_names.values(), *unsupported.values(),
                                             ("x-cache", "cache")))

    def publish_params(self, request: Request) -> dict[str, Any]:
        """A publish's parameters from its headers and query, by ntfy's
        names (``publish_names``): title, priority, tags, click, icon,
        actions, markdown, message; 400 for one this server does not have."""
        headers, names = request.headers, self._param_names
        params: dict[str, Any] = {}
        if not names.isdisjoint(headers) or request.query_string and not names.isdisjoint(
                request.query):  # (the usual publish names none of them: nothing to look up)
            for what, names in self.unsupported.items():
                if self.param(request, names) is not None:
                    raise _bad_request(f"{what} are not supported by this server")
            cache = self.param(request, ("x-cache", "cache"))
            if cache is not None and cache.lower() in ("no", "0", "false"):
                raise _bad_request("Cache: no is not supported by this server: every "
                                   "message is kept (see --retention and --max-age)")
            for name, names in self.publish_names.items():
                value = self.param(request, names)
                if value is not None:
                    params[name] = value
            if "tags" in params:
                params["tags"] = [t.strip() for t in params["tags"].split(",") if t.strip()]
            if "actions" in params:
                params["actions"] = _parse_actions(params["actions"])
        markdown = params.pop("markdown", "").lower()
        if markdown in ("1", "yes", "true") or headers.get("content-type", "").split(
                ";")[0].strip().lower() == "text/markdown":
            params["markdown"] = True
        elif markdown not in ("", "0", "no", "false"):
            raise _bad_request("markdown is yes or no")
        return params

    @staticmethod
    def param(request: Request, names: tuple[str, ...]) -> str | None:
        """The first of *names* a header gives (decoded), else the query (as
        ntfy reads its parameters); None if none does."""
        headers = request.headers
        for name in names:
            value = headers.get(name)
            if name == "priority" and value and _HTTP_PRIORITY.match(value):
                value = None  # RFC 9218's "Priority: u=1, i", which browsers send
            if value:
                return _decode_header(value, name).strip()
        if request.query_string:
            query = request.query
            for name in names:
                value = query.get(name)
                if value:
                    return value.strip()
        return None

    def handle_preflight(self, request: Request) -> Response:
        """A CORS preflight from an allowed origin: 204 with what may follow."""
        methods, _ = self.route(request.path)
        asked = request.headers.get("access-control-request-headers")
        if asked is None or not _HEADER_LIST.fullmatch(asked):
            asked = ("Content-Type, Authorization, Last-Event-ID, Title, Priority, "
                     "X-Title, X-Priority, Idempotency-Key")
        return Response(HTTPStatus.NO_CONTENT, b"", headers=(
            ("Access-Control-Allow-Methods", ", ".join([*methods, "OPTIONS"])),
            ("Access-Control-Allow-Headers", asked),
            ("Access-Control-Max-Age", "86400")))

    def handle_publish(self, request: Request) -> Response:
        channel, message, options = self.publish_arguments(request)
        if "delay" in options or "at" in options:  # (inline: every publish asks)
            at = self.publish_time(options)
            if at is not None:
                return self.schedule(request, channel, message, at, options)
        return self.published(request, self.server.hub.publish(channel, message, **options))

    def publish_later(self, request: Request, then: Callable[[Response], None]) -> None:
        """``handle_publish`` (or ``handle_send``) for the loop thread: *then*
        gets the answer when the store has kept the message (``later``). A
        message to schedule goes to a worker (the store may wait)."""
        def done(msg: Message | LongpollError) -> None:
            then(_error_response(msg) if isinstance(msg, LongpollError)
                 else self.published(request, msg))

        try:
            channel, message, options = self.publish_arguments(request)
            if "delay" in options or "at" in options:  # (a message to schedule)
                self.server.pool.submit(lambda: then(self.handle(request)))
            else:
                self.server.hub.publish_later(channel, message, done, **options)
        except LongpollError as error:
            then(_error_response(error))

    def publish_time(self, options: dict[str, Any]) -> float | None:
        """When a publish is to be published (``Delay``, ``In``, ``At``; taken
        out of *options*), or None for now."""
        delay, at = options.pop("delay", None), options.pop("at", None)
        if delay is None and at is None:
            return None
        if delay is not None and at is not None:
            raise _bad_request("give Delay or At, not both")
        if delay is not None:
            return self.server.hub.clock() + parse_duration(delay, "Delay")
        return parse_time(at)

    def schedule(self, request: Request, channel: str, message: Any, at: float,
                 options: dict[str, Any]) -> Response:
        """Schedule a publish: ``202`` with the scheduled message's id and
        when it will be published (ntfy's routes: its message event)."""
        entry = self.server.hub.schedule(channel, message, at, client=request.key, **options)
        if request.route in self.ntfy_publishing:
            return Response(HTTPStatus.OK, _encode({
                "id": entry["id"], "time": int(entry["at"]), "event": "message",
                "topic": channel, "message": message if isinstance(message, str)
                else _encode(message)}).encode() + b"\n")
        if request.route == "send":
            return self.json(HTTPStatus.ACCEPTED, {"status": "Message scheduled.",
                                                   "id": entry["id"], "at": entry["at"]})
        return self.json(HTTPStatus.ACCEPTED, {"id": entry["id"], "channel": channel,
                                               "at": entry["at"], "scheduled": True})

    def publish_arguments(self, request: Request) -> tuple[str, Any, dict[str, Any]]:
        if request.route in self.ntfy_publishing:
            return self.ntfy_arguments(request)
        message, title, priority, extra = self.publish_body(request)
        return (request.names[0] if request.route == "publish" else DEFAULT_CHANNEL, message,
                {"title": title, "priority": priority,
                 "key": request.headers.get("idempotency-key"), **extra})

    def published(self, request: Request, msg: Message) -> Response:
        if request.route == "send":  # (the Flask tutorial's answer)
            return self.json(HTTPStatus.OK, {"status": "Message sent."})
        if request.route in self.ntfy_publishing:  # (ntfy's: the message event)
            return Response(HTTPStatus.OK, _ntfy_event(msg) + b"\n")
        return _new_response((_OK if msg.replayed else _CREATED, msg.summary(),
                              "application/json", ()))

    def _expected_channel(self, request: Request) -> str:
        if len(request.names) != 1:
            raise _bad_request("expect messages on one channel at a time")
        return check_channel(request.names[0])

    def handle_expect_set(self, request: Request) -> Response:
        """Expect a message on the channel at least ``every`` (query, or a
        JSON body ``{"every", "to"}``); an alert goes to ``to`` (the channel
        itself by default) when none comes for that long."""
        channel = self._expected_channel(request)
        given: dict[str, Any] = {}
        if request.body:
            try:
                given = _decode(request.body.decode("utf-8"))
            except (ValueError, RecursionError):
                given = None  # type: ignore[assignment]
            if not isinstance(given, dict):
                raise _bad_request('the body is JSON: {"every": "26h", "to": "alerts"}')
        every = given.get("every", request.query.get("every"))
        to = given.get("to", request.query.get("to")) or None
        if every is None:
            raise _bad_request("say how often a message should come: ?every=26h")
        if to is not None and self.server.auth is not None:
            self.server.auth.permit(request.rules, "write", (check_channel(to),))
        return self.json(HTTPStatus.OK, self.server.hub.expect(channel, every, to))

    def handle_expect_get(self, request: Request) -> Response:
        channel = self._expected_channel(request)
        state = self.server.hub.expectation(channel)
        if state is None:
            raise LongpollError(HTTPStatus.NOT_FOUND, f"no message is expected on {channel}")
        return self.json(HTTPStatus.OK, state)

    def handle_expect_delete(self, request: Request) -> Response:
        channel = self._expected_channel(request)
        if not self.server.hub.unexpect(channel):
            raise LongpollError(HTTPStatus.NOT_FOUND, f"no message is expected on {channel}")
        return self.json(HTTPStatus.OK, {"deleted": True})

    def handle_poll(self, request: Request) -> Poll:
        query = request.query_string
        params = self._polls.get(query)
        if params is None:
            since = request.query.get("since") or None  # an empty since means absent
            params = (since, self.param_timeout(request), self.param_limit(request))
            _keep(self._polls, query, params, 512)
        since, timeout, limit = params
        return _new_poll((request.names, self.server.hub.locate(since), timeout, limit))

    def handle_events(self, request: Request) -> Stream:
        """Server-Sent Events: resume from Last-Event-ID, else ``since``."""
        since = request.headers.get("last-event-id") or request.query.get("since") or None
        return Stream(request.names, self.server.hub.locate(since), _SSE)

    def handle_ws(self, request: Request) -> Stream:
        """A WebSocket (RFC 6455 4.2): its handshake checked, then a stream
        of text frames from ``since``: an open frame with the cursor it
        starts from (where a client that loses the socket before any
        message resumes), then one frame per message."""
        since = request.query.get("since") or None
        position = self.server.hub.locate(since)
        opened: dict[str, Any] = {"event": "open"}
        if position.everything:
            opened["cursor"] = "0"
        elif not position.unplaceable:
            opened["cursor"] = self.server.hub.cursor_for(position.after)
        form = Form(None, _ws_frame(_encode(opened).encode()), _ws_frames, _ws_ping)
        return Stream(request.names, position, form, self.handshake(request))

    def handshake(self, request: Request) -> str:
        """Check a WebSocket handshake (RFC 6455 4.2.1); its
        ``Sec-WebSocket-Accept``. A browser applies CORS to every other
        request but not to a WebSocket, so the server checks ``Origin``
        itself: its own origin (as ``Host`` names it), or one that
        ``--cors-origin`` allows."""
        headers = request.headers
        if "websocket" not in headers.get("upgrade", "").lower():
            raise LongpollError(HTTPStatus.UPGRADE_REQUIRED,
                                "this is a WebSocket: connect with Upgrade: websocket",
                                {"Upgrade": "websocket"})
        if request.version != "HTTP/1.1" or "upgrade" not in _tokens(headers.get("connection")):
            raise _bad_request("a WebSocket handshake is an HTTP/1.1 GET with "
                               "Connection: Upgrade")
        if headers.get("sec-websocket-version") != "13":
            raise LongpollError(HTTPStatus.UPGRADE_REQUIRED, "WebSocket version 13 only",
                                {"Sec-WebSocket-Version": "13"})
        key = headers.get("sec-websocket-key", "")
        if not _WS_KEY.fullmatch(key):
            raise _bad_request("Sec-WebSocket-Key must be 16 bytes in base64")
        origin = headers.get("origin")
        if origin is not None and not (  # (decide() has set cors for an allowed origin)
                request.cors or urllib.parse.urlsplit(origin).netloc.lower()
                == headers.get("host", "").lower()):
            raise LongpollError(HTTPStatus.FORBIDDEN, f"WebSockets from {_printable(origin[:100])}"
                                " are not allowed here: start the server with --cors-origin "
                                "for that origin")
        return base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()

    handle_send = handle_publish  # (to DEFAULT_CHANNEL, answered as the Flask tutorial's)

    # -- ntfy's API ---------------------------------------------------------------

    handle_ntfy_publish = handle_ntfy_post = handle_publish  # (see ntfy_arguments)

    def ntfy_arguments(self, request: Request) -> tuple[str, Any, dict[str, Any]]:
        """A publish by ntfy's rules: ``PUT``/``POST /<topic>`` with the body
        as the text and the fields in headers or the query, or ``POST /``
        with ntfy's JSON (``{"topic": ..., "message": ..., "title": ...}``).
        No text at all is ntfy's "triggered"."""
        if request.route == "ntfy_post":
            return self._ntfy_json_publish(request)
        params = self.publish_params(request)
        try:
            text = request.body.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise _bad_request("attachments are not supported by this server: the body "
                               "must be UTF-8 text") from None
        message = text or params.pop("message", "").replace("\\n", "\n") or "triggered"
        params.pop("message", None)
        title, priority = params.pop("title", None), params.pop("priority", None)
        return request.names[0], message, {
            "title": title, "priority": _parse_priority(priority) if priority else None,
            "key": request.headers.get("idempotency-key"), **params}

    #: Fields of ntfy's JSON publish this server takes (the others are
    #: refused, as in ``unsupported``).
    ntfy_json_fields = frozenset({"topic", "message", "title", "priority", "tags", "click",
                                  "icon", "actions", "markdown", "sequence_id", "firebase"})

    def _ntfy_json_publish(self, request: Request) -> tuple[str, Any, dict[str, Any]]:
        try:
            data = json.loads(request.body.decode("utf-8") or "null")
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("topic"), str):
            raise _bad_request('publish to / with ntfy\'s JSON: {"topic": "...", '
                               '"message": "...", "title": "..."}')
        topic = _ntfy_topics(data["topic"])[0] if "," not in data["topic"] else ""
        if not topic:
            raise _bad_request("publish to one topic at a time")
        if self.server.auth is not None:
            self.server.auth.permit(request.rules, "write", (topic,))
        for name, value in data.items():
            if name not in self.ntfy_json_fields and value not in (None, "", [], False):
                if name == "cache" and str(value).lower() not in ("no", "0", "false"):
                    continue
                raise _bad_request(f"{name} is not supported by this server")
        message = data.get("message") or "triggered"
        title, priority = data.get("title") or None, data.get("priority") or None
        if not isinstance(message, str):
            raise _bad_request("message must be a string")
        if isinstance(priority, str):
            priority = _parse_priority(priority)
        extra = {name: data[name] for name in EXTRA_FIELDS if data.get(name)}
        return topic, message, {"title": title, "priority": priority,
                                "key": request.headers.get("idempotency-key"), **extra}

    def ntfy_position(self, request: Request) -> tuple[Position, bool]:
        """Where an ntfy subscription starts, and whether it is a poll: by
        ``since`` (``all``, ``latest``, ``none``, a message id, a Unix time
        or a duration such as ``10m``) and ``poll=1``; ntfy's filters are
        not supported (400)."""
        poll = (self.param(request, ("x-poll", "poll", "po")) or "").lower() in (
            "1", "yes", "true")
        for names in (("x-id", "id"), ("x-message", "message", "m"), ("x-title", "title", "t"),
                      ("x-priority", "priority", "prio", "p"), ("x-tags", "tags", "tag", "ta")):
            if self.param(request, names):
                raise _bad_request(f"filters ({names[1]}=) are not supported by this server")
        since, hub = self.param(request, ("x-since", "since", "si")), self.server.hub
        if not since:
            return hub.locate("0" if poll else None), poll
        if since == "all":
            return hub.locate("0"), poll
        if since == "none":
            return hub.locate(None), poll
        if since == "latest":
            return hub.position_at(request.names), poll
        if CURSOR_RE.match(since):
            return hub.locate(since), poll
        if since.isdigit():
            return hub.position_at(request.names, int(since)), poll
        seconds = _go_duration(since)
        if seconds is None:
            raise _bad_request(f"invalid since {since[:40]!r}: all, latest, none, a message "
                               "id, a Unix time or a duration (30s, 10m, 1h30m)")
        return hub.position_at(request.names, time.time() - seconds), poll

    def ntfy_stream(self, request: Request, kind: str) -> Stream | Response:
        """An ntfy subscription (json, sse, raw or ws); with ``poll=1`` the
        messages held, at once, up to --max-answer bytes."""
        position, poll = self.ntfy_position(request)
        form = _ntfy_form(kind, ",".join(request.names))
        if not poll:
            return Stream(request.names, position, form,
                          self.handshake(request) if kind == "ws" else None)
        if kind == "ws":
            raise _bad_request("poll=1 is for /json, /sse and /raw")
        hub, parts, size = self.server.hub, [], 0
        while size < self.server.max_answer:
            batch = hub.read(request.names, position, MAX_LIMIT)
            if not batch.messages:
                break
            parts.append(form.encode(batch))
            size += len(parts[-1])
            position = batch.cursor
        return Response(HTTPStatus.OK, b"".join(parts), form.content_type)

    def handle_ntfy_json(self, request: Request) -> Stream | Response:
        return self.ntfy_stream(request, "json")

    def handle_ntfy_sse(self, request: Request) -> Stream | Response:
        return self.ntfy_stream(request, "sse")

    def handle_ntfy_raw(self, request: Request) -> Stream | Response:
        return self.ntfy_stream(request, "raw")

    def handle_ntfy_ws(self, request: Request) -> Stream | Response:
        return self.ntfy_stream(request, "ws")

    def handle_ntfy_reserved(self, request: Request) -> Response:
        raise _reserved(urllib.parse.unquote(request.path[1:]))

    def handle_invalid(self, request: Request) -> Response:
        raise LongpollError(HTTPStatus.NOT_FOUND, f"no such path: {_printable(request.path)}")

    def handle_ntfy_auth(self, request: Request) -> Response:
        """ntfy's "may I read these topics?" (decide() has checked it)."""
        return self.json(HTTPStatus.OK, {"success": True})

    def handle_ntfy_health(self, request: Request) -> Response:
        return self.json(HTTPStatus.OK, {"healthy": True})

    def handle_ntfy_page(self, request: Request) -> Response:
        """A topic's page (ntfy's web app), for a browser: the live page, on
        that channel. Anyone else gets a 404 that says how to subscribe."""
        if "text/html" not in request.headers.get("accept", ""):
            raise LongpollError(HTTPStatus.NOT_FOUND, f"no such path: {request.path}; to "
                                f"subscribe to the topic, GET {request.path}/json")
        return Response(HTTPStatus.FOUND, b"", "text/plain",  # (relative: mounted too)
                        (("Location", "./?channel=" + request.names[0]),))

    def handle_receive(self, request: Request) -> Take:
        text, lease = request.query.get("lease"), None
        if text is not None:
            try:
                lease = float(text)
            except ValueError:
                lease = -1.0
            if not 0 < lease <= self.server.max_lease:
                raise _bad_request(f"lease must be seconds from 0 to {self.server.max_lease:g}, "
                                   f"not {text!r}")
        return Take(DEFAULT_CHANNEL, self.param_timeout(request), lease)

    def handle_ack(self, request: Request) -> Response:
        """``POST /receive/ack`` with ``{"receipt": ...}`` (or ``?receipt=``):
        a leased message stays taken for good."""
        receipt = request.query.get("receipt")
        if receipt is None:
            try:
                receipt = _decode(request.body.decode("utf-8")).get("receipt")
            except (ValueError, AttributeError, RecursionError):
                raise _bad_request('give the receipt: {"receipt": "..."}') from None
        if not isinstance(receipt, str) or not receipt:
            raise _bad_request('give the receipt: {"receipt": "..."}')
        if not self.server.hub.ack(receipt):
            raise LongpollError(HTTPStatus.CONFLICT, "no such lease: it ended, and the message "
                                "went back to the queue, or it was acknowledged already")
        return self.json(HTTPStatus.OK, {"acknowledged": True})

    def handle_health(self, request: Request) -> Response:
        server = self.server
        return self.json(HTTPStatus.OK, {
            "status": "ok", "waiting": server.waiting, "channels": server.hub.channel_count,
            "uptime": round(time.monotonic() - server.started, 3)})

    def handle_metrics(self, request: Request) -> Response:
        """Prometheus text exposition format, version 0.0.4."""
        return Response(HTTPStatus.OK, self.server.metrics_text().encode(),
                        "text/plain; version=0.0.4; charset=utf-8")

    def handle_index(self, request: Request) -> Response:
        """The live page for browsers; a short help text for curl and friends."""
        if "text/html" in request.headers.get("accept", ""):
            return Response(HTTPStatus.OK, INDEX_HTML.encode(), "text/html; charset=utf-8", (
                ("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; "
                                            "object-src 'none'; base-uri 'none'"),))
        return Response(HTTPStatus.OK, INDEX_TEXT.format(version=__version__).encode(),
                        "text/plain; charset=utf-8")

    def handle_script(self, request: Request) -> Response:
        """longpoll.js, its ES module, and the live page's script: cached by
        browsers and revalidated by their ETag (a 304 when unchanged). Any
        origin may load them (public code: a module from another origin is
        fetched with CORS)."""
        body, etag = _SCRIPT_FILES[request.path]
        headers: tuple[tuple[str, str], ...] = (("ETag", etag), ("Cache-Control", "no-cache"))
        if not request.cors:
            headers += (("Access-Control-Allow-Origin", "*"),)
        asked = request.headers.get("if-none-match", "")
        status = HTTPStatus.NOT_MODIFIED if asked == "*" or etag in (
            tag.strip().removeprefix("W/") for tag in asked.split(",")) else HTTPStatus.OK
        return Response(status, body, "text/javascript; charset=utf-8", headers)


# ---------------------------------------------------------------------------
# The loop: sockets, timers, TLS and bounded buffers (no HTTP, no channels)
# ---------------------------------------------------------------------------

class _States:
    """What a connection is doing: one of these at a time, set by the loop
    and the HTTP layer as things happen (the deadline comes with it).

    ``State``, the one instance, holds them as instance attributes: on
    Python 3.10 and 3.11 reading a class attribute (``State.IDLE`` of a
    class) is a type lookup each time, and the loop reads them on every
    request; an instance attribute is read from a cache."""

    def __init__(self) -> None:
        self.HANDSHAKE = "handshake"   # TLS handshake under way
        self.IDLE = "idle"             # between requests (keep-alive)
        self.READING = "reading"       # a request is arriving
        self.BUSY = "busy"             # a worker thread handles its request
        self.PARKED = "parked"         # a long-poll or /receive waits for a message
        self.STREAMING = "streaming"   # an event stream (SSE): answered until it closes
        self.SENDING = "sending"       # an answer is being written; then IDLE
        self.CLOSING = "closing"       # the last answer is being written; then close
        self.LINGERING = "lingering"   # answered and half-closed: input is read and dropped
        self.CLOSED = "closed"


State = _States()


class Connection:
    """The loop's record of one client connection."""

    __slots__ = ("sock", "address", "state", "deadline", "reader", "request", "output",
                 "queued", "timer", "entry", "linger", "group", "owner", "handed", "decided",
                 "websocket", "form", "first")

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address          # the peer's IP address
        self.state = State.IDLE
        self.deadline: float | None = None  # close (or answer 408) past it
        self.reader: RequestReader
        self.request: Request | None = None  # the request under way
        self.output: collections.deque[bytes | memoryview] = collections.deque()
        self.queued = 0                 # bytes in output
        self.timer: float | None = None  # when its hold ends (see HoldTimers)
        self.entry: tuple | None = None  # its entry in the hold-timer heap
        self.linger = False             # after the last answer: drain input, then close
        self.group: Any = None          # the waiting layer's record, while parked
        self.owner: str | None = None   # the client key its parked request counts against
        self.handed: Message | None = None  # /receive: taken, answer not yet all written
        self.decided: Any = None        # the HTTP layer's last decision, for a re-poll
        self.websocket: WebSocketReader | None = None  # once upgraded: its frames
        self.form: Form | None = None   # a stream's: how it is written
        self.first = False              # Loop.prefer asked (once: a call per publish cost 3 %)

    def __repr__(self) -> str:
        return f"<Connection {self.address} {self.state}>"


class ConnectionCap:
    """Connections per client address, capped (``--max-connections-per-client``;
    0: no cap). Loopback is exempt. At the cap, the address's longest-idle
    keep-alive connection makes room; if none is idle, the new one is refused."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._by_address: dict[str, dict[Connection, None]] = {}
        #: Connections refused: their address held its maximum.
        self.refused = 0

    def admit(self, host: str, close: Callable[[Connection], None]) -> bool:
        """Room for one more connection from *host*? (*close* makes room.)"""
        mine = self._by_address.get(host)
        if mine is None or len(mine) < self.cap:
            return True
        idle = [c for c in mine if c.state is State.IDLE]
        if not idle:
            self.refused += 1
            logger.debug("refused a connection from %s: it holds %d already", host, self.cap)
            return False
        close(min(idle, key=lambda c: c.deadline or 0.0))
        return True

    def add(self, conn: Connection) -> None:
        if self.cap and conn.address not in _LOOPBACK:
            self._by_address.setdefault(conn.address, {})[conn] = None

    def remove(self, conn: Connection) -> None:
        mine = self._by_address.get(conn.address)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self._by_address[conn.address]


class HoldTimers:
    """Each connection's one hold timer: ``conn.timer`` is when it is due
    (None: it holds nothing), and ``conn.entry`` its entry in a heap.

    Ending a hold and starting the next touch only ``conn.timer``: the
    entry stays, and when it comes up it is dropped (no hold), pushed again
    for the later time (held again meanwhile), or due. A re-poll, which
    ends one hold and starts another, so costs an assignment, not a push.
    Entries left behind are swept out at once when they are most of the
    heap."""

    def __init__(self) -> None:
        #: (time due, tie-breaker, connection), soonest first; the loop
        #: skips the timers while it is empty.
        self.heap: list[tuple[float, int, Connection]] = []
        self._ids = itertools.count()
        self._stale = 0  # entries whose connection holds nothing, or has a newer entry

    def hold(self, conn: Connection, seconds: float | None) -> None:
        if seconds is None:
            if conn.timer is not None:
                conn.timer = None
                self._stale += 1
            return
        due = time.monotonic() + seconds
        entry = conn.entry
        if entry is not None and conn.timer is None:
            self._stale -= 1  # its entry is live again
        conn.timer = due
        if entry is None or due < entry[0]:  # (an entry due later would be too late)
            if entry is not None:
                self._stale += 1
            conn.entry = entry = (due, next(self._ids), conn)
            heapq.heappush(self.heap, entry)
            if self._stale > 1024 and self._stale > len(self.heap) // 2:
                self._sweep()

    def _sweep(self) -> None:
        kept = []
        for entry in self.heap:
            conn = entry[2]
            if conn.entry is entry:
                if conn.timer is not None:
                    kept.append(entry)
                    continue
                conn.entry = None
        heapq.heapify(kept)
        self.heap, self._stale = kept, 0

    def _settle(self, now: float) -> Connection | None:
        """The first entry's connection, if its hold is due by *now*. Entries
        that come up stale on the way (their hold ended, or moved later) are
        dropped or pushed again: only when they come up, so a re-poll, which
        moves its hold later, costs no heap operation of its own."""
        heap = self.heap
        while heap:
            at, _, conn = entry = heap[0]
            if at > now:
                return None
            if conn.entry is not entry:
                heapq.heappop(heap)  # replaced by a sooner one
                self._stale -= 1
            elif conn.timer is None:
                heapq.heappop(heap)  # its hold ended
                conn.entry = None
                self._stale -= 1
            elif conn.timer > at:  # held again since: due later
                conn.entry = (conn.timer, next(self._ids), conn)
                heapq.heapreplace(heap, conn.entry)
            else:
                heapq.heappop(heap)
                conn.entry = conn.timer = None
                return conn
        return None

    def next_due(self) -> float | None:
        """When to look at the holds next: never later than the first hold
        due, and early when the first entry is stale (``expired`` then finds
        nothing due, and sets the entry right)."""
        return self.heap[0][0] if self.heap else None

    def expired(self, now: float) -> list[Connection]:
        """The connections whose holds are due by *now* (their timers ended)."""
        due = []
        while (conn := self._settle(now)) is not None:
            due.append(conn)
        return due


def _listen(address: tuple[str, int], backlog: int) -> socket.socket:
    """A non-blocking socket listening on *address* (IPv4 or IPv6)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class _Epoll:
    """The loop's selector on Linux: ``selectors``' ``register``, ``modify``
    and ``unregister`` (the same errors) over ``select.epoll``, and
    ``ready(timeout)``: the ready (data, mask) pairs straight from epoll.
    ``selectors``' ``select`` builds a key object and makes a method call
    for every event, which on a busy keep-alive connection costs about as
    much as reading the request; the loop needs only the data and mask."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._table: dict[int, tuple[Any, int, Any]] = {}  # fd: (data, events, socket)
        self._first: set[int] = set()  # fds whose events come first (prefer)

    def _fd(self, sock: Any) -> int:
        fd = sock.fileno()
        if fd < 0:  # closed already: found by the object, as selectors does
            for fd, (_, _, known) in self._table.items():
                if known is sock:
                    return fd
            raise KeyError(f"{sock!r} is not registered")
        return fd

    def register(self, sock: Any, events: int, data: Any) -> None:
        fd = sock.fileno()
        if fd < 0:
            raise ValueError(f"invalid file descriptor: {sock!r}")
        if fd in self._table:
            raise KeyError(f"{sock!r} is already registered")
        self._epoll.register(fd, _EPOLL_EVENTS[events])
        self._table[fd] = (data, events, sock)

    def modify(self, sock: Any, events: int, data: Any) -> None:
        fd = self._fd(sock)
        if self._table[fd][1] != events:  # (KeyError: not registered)
            self._epoll.modify(fd, _EPOLL_EVENTS[events])
        self._table[fd] = (data, events, sock)

    def prefer(self, sock: Any) -> None:
        """Give *sock*'s events before the others' from now on."""
        self._first.add(self._fd(sock))

    def unregister(self, sock: Any) -> None:
        fd = self._fd(sock)
        del self._table[fd]
        self._first.discard(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:  # closed already: epoll forgot it by itself
            pass

    def ready(self, timeout: float) -> list[tuple[Any, int]]:
        """What is ready within *timeout* seconds, as (data, mask); an error
        or hang-up counts as both readable and writable, as in selectors."""
        ready, early = [], []
        table, first = self._table, self._first
        # All that is ready, as selectors asks for (past 1,023 connections
        # too): a publish behind thousands of re-polls is seen in this turn.
        events = (self._epoll.poll(timeout) if len(table) < 1024
                  else self._epoll.poll(timeout, len(table)))
        for fd, event in events:
            entry = table.get(fd)
            if entry is not None:
                if event != select.EPOLLIN:
                    event = (((event & ~select.EPOLLIN) and _WRITE)
                             | ((event & ~select.EPOLLOUT) and _READ)) & entry[1]
                if fd in first:
                    early.append((entry[0], event))
                else:
                    ready.append((entry[0], event))  # (EPOLLIN is EVENT_READ: 1)
        if early:
            early += ready
            return early
        return ready

    def close(self) -> None:
        self._epoll.close()
        self._table.clear()


class _Selector:
    """The loop's selector where there is no epoll: ``selectors``' best,
    with ``_Epoll``'s ``ready`` and ``prefer``."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self.register = self._selector.register
        self.modify = self._selector.modify
        self.close = self._selector.close
        self._first: set[Any] = set()  # sockets whose events come first (prefer)

    def prefer(self, sock: Any) -> None:
        self._first.add(sock)

    def unregister(self, sock: Any) -> None:
        self._first.discard(sock)
        self._selector.unregister(sock)

    def ready(self, timeout: float) -> list[tuple[Any, int]]:
        ready = self._selector.select(timeout)
        if self._first:
            ready.sort(key=lambda event: event[0].fileobj not in self._first)  # (stable)
        return [(key.data, mask) for key, mask in ready]


if hasattr(select, "epoll"):
    _EPOLL_EVENTS = {_READ: select.EPOLLIN, _WRITE: select.EPOLLOUT,
                     _READ | _WRITE: select.EPOLLIN | select.EPOLLOUT}
    _LoopSelector: type = _Epoll
else:
    _LoopSelector = _Selector


class Loop:
    """One thread's ``selectors`` loop that owns every socket: accepts (with
    a cap per client address), drives TLS handshakes, reads, writes through
    a bounded output queue, keeps hold timers and deadlines, and closes
    lingering. It knows no HTTP and no channels: what arrives goes to the
    *protocol*'s hooks, all called on the loop thread:

    ``connection_made(conn)`` (give it a reader), ``received(conn)`` (new
    bytes in ``conn.reader``), ``drained(conn)`` (its output is all sent),
    ``expired(conn)`` (its hold timer ran out), ``timed_out(conn)`` (its
    deadline passed), ``connection_lost(conn)``; and ``refusal(tls=False)``,
    the bytes a connection over the per-address cap (or a plain-text request
    on a TLS port) is sent before it is closed.
    """

    #: Listen backlog: room for thousands of clients reconnecting at once.
    request_queue_size = 4096
    #: Seconds between sweeps for connections past their deadline.
    sweep_interval = 1.0

    def __init__(self, address: tuple[str, int], protocol: Any, *, ssl_context: Any,
                 read_timeout: float, linger_time: float, max_queued: int, max_input: int,
                 max_connections_per_client: int, housekeeping: Callable[[], None]) -> None:
        self.protocol = protocol
        self.ssl_context = ssl_context
        self.read_timeout, self.linger_time = read_timeout, linger_time
        self.max_queued, self.max_input = max_queued, max_input
        self.per_address = ConnectionCap(max_connections_per_client)
        self.housekeeping = housekeeping
        #: Seconds the loop has spent waiting in select (the rest is work):
        #: read by the waiting layer to tell a saturated loop from an idle one.
        self.idle = 0.0
        #: When the last select() returned: the clock of the loop's turn, for
        #: deadlines that need no finer time than that.
        self.now = time.monotonic()
        self.socket = _listen(address, self.request_queue_size)
        self.server_address = self.socket.getsockname()
        self.connections: set[Connection] = set()
        #: Connections cut: the client left more than max_queued bytes unread.
        self.cut = 0
        self._selector = _LoopSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pending: collections.deque[Callable[[], None]] = collections.deque()
        self._woken = False
        self.timers = HoldTimers()
        #: ``hold(conn, seconds)`` arms (with None, cancels) the one hold
        #: timer of *conn*: at its end the protocol's ``expired(conn)`` runs.
        self.hold = self.timers.hold
        self._thread_id: int | None = None
        self._stopped = threading.Event()
        self._stopped.set()
        self._shutdown_request = False
        self._accepting = True
        self._next_sweep = 0.0
        #: Set when the last connection is gone (``Server.close`` waits on it).
        self.emptied: threading.Event | None = None
        #: Run at each turn of the loop, after I/O (the waiting layer's fan-out).
        self.after_io: Callable[[], None] = lambda: None
        #: The earliest moment the loop must wake up for ``after_io``.
        self.wake_at: Callable[[float], float] = lambda timeout: timeout

    # -- running ------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 1.0) -> None:
        """Run the loop in this thread until ``shutdown()``."""
        self._stopped.clear()
        self._thread_id = threading.get_ident()
        self._shutdown_request = False
        selector = self._selector
        selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        if self._accepting:
            selector.register(self.socket, selectors.EVENT_READ, self._accept)
        try:
            monotonic, pending, ready = time.monotonic, self._pending, selector.ready
            timers = self.timers
            while not self._shutdown_request:
                waited = monotonic()
                # How long to wait: until the next sweep, fan-out, keepalive
                # or hold, at most poll_interval; not at all with callbacks
                # pending. (Comparisons, not min() and max(): on Python
                # 3.10-3.12 these parse their keyword arguments per call.)
                if pending:
                    timeout = 0.0
                else:
                    timeout = self._next_sweep - waited
                    if timeout > poll_interval:
                        timeout = poll_interval
                    timeout = self.wake_at(timeout)
                    if timers.heap:
                        due = timers.next_due()
                        if due is not None and due - waited < timeout:
                            timeout = due - waited
                    if timeout < 0.0:
                        timeout = 0.0  # (select.select refuses one below 0)
                events = ready(timeout)
                self.now = now = monotonic()
                self.idle += now - waited
                for count, (data, mask) in enumerate(events, 1):
                    if type(data) is not Connection:
                        data(mask)  # the listening socket, the wake-up socket, a store's (watch)
                    else:  # (self._on_event(data, mask), without the call)
                        try:
                            if mask & _READ:
                                self._readable(data)
                            if mask & _WRITE and data.state is not State.CLOSED:
                                self._writable(data)
                        except Exception:  # a bug must cost one connection, never the server
                            logger.exception("error on a connection from %s", data.address)
                            self.close(data)
                    if not count & 255:
                        # A long round (thousands of re-polls): let a
                        # publish made meanwhile reach its subscribers now.
                        self._run_pending()
                        self.after_io()
                if pending:
                    self._run_pending()
                self.after_io()
                if timers.heap and timers.heap[0][0] <= now or now >= self._next_sweep:
                    self._run_timers(now)
                if self.emptied is not None and not self.connections:
                    self.emptied.set()
        finally:
            for sock in (self._wake_r, self.socket):
                try:
                    selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
            self._thread_id = None
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop the loop and wait for it (connections stay open)."""
        self._shutdown_request = True
        self.call_soon(lambda: None)
        if self._thread_id not in (None, threading.get_ident()):
            self._stopped.wait()

    @property
    def running(self) -> bool:
        return self._thread_id is not None

    def server_close(self) -> None:
        """Close the listening socket and every connection, at once."""
        for conn in list(self.connections):
            self.close(conn)
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def prefer(self, conn: Connection) -> None:
        """Read *conn* before the other ready connections in every turn
        from now on. The protocol prefers a connection that publishes: in
        a busy turn its publish then reaches the parked subscribers before
        the re-polls queued with it are read (and those, read after it, are
        answered at once)."""
        try:
            self._selector.prefer(conn.sock)
        except (KeyError, ValueError):
            pass  # (closed meanwhile)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run *callback* on the loop; safe from any thread."""
        self._pending.append(callback)
        if threading.get_ident() != self._thread_id and not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass  # full (it is awake anyway) or closed (it is gone)

    def _drain_wake(self, mask: int = 0) -> None:
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

    # -- timers -------------------------------------------------------------------

    def _run_timers(self, now: float) -> None:
        """Expire the holds due by *now* (the turn's time, from after its
        select); once a sweep interval, time out slow connections. (The
        loop calls it only when one of the two is due: most turns, neither.)"""
        if self.timers.heap:
            for conn in self.timers.expired(now):
                self.protocol.expired(conn)
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval
            for conn in [c for c in self.connections
                         if c.deadline is not None and c.deadline < now]:
                self.protocol.timed_out(conn)
            self.housekeeping()

    # -- accepting ------------------------------------------------------------------

    def _accept(self, mask: int = 0) -> None:
        for _ in range(512):  # a burst at a time, so the loop keeps serving others
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.warning("cannot accept more connections (%s) with %d open; "
                                   "pausing for a second (raise `ulimit -n`)",
                                   exc.strerror, len(self.connections))
                    self._pause_accepting(1.0)
                return
            host = address[0]
            admitted = self.per_address.admit(host, self.close)
            if not admitted and self.ssl_context is not None:
                sock.close()  # (no plain-text answer on a TLS port)
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
            conn = Connection(sock, host)
            conn.state = State.HANDSHAKE if self.ssl_context is not None else State.IDLE
            conn.deadline = time.monotonic() + self.read_timeout  # the handshake's too
            self.connections.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            if not admitted:  # told why, then closed (lingering briefly, so it reads it)
                self.send(conn, self.protocol.refusal())
                self.finish(conn, linger=True, seconds=2.0)
                continue
            self.per_address.add(conn)
            self.protocol.connection_made(conn)

    def watch(self, sock: socket.socket, on_event: Callable[[int], None],
              write: bool = False) -> None:
        """Call *on_event(mask)* on the loop when *sock* (not a client's: a
        store's connection) is readable, or also writable with *write*."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self._selector.modify(sock, events, on_event)
        except KeyError:
            self._selector.register(sock, events, on_event)

    def unwatch(self, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _pause_accepting(self, seconds: float) -> None:
        if self._accepting:
            self.stop_accepting()
            timer = threading.Timer(seconds, self.call_soon, (self.resume_accepting,))
            timer.daemon = True
            timer.start()

    def resume_accepting(self) -> None:
        if not self._accepting and self.emptied is None:
            self._accepting = True
            self._selector.register(self.socket, selectors.EVENT_READ, self._accept)

    def stop_accepting(self) -> None:
        if self._accepting:
            self._accepting = False
            self._selector.unregister(self.socket)

    def _handshake(self, conn: Connection) -> None:
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
            logger.debug("TLS handshake with %s failed: %s", conn.address, exc)
            if getattr(exc, "reason", None) == "HTTP_REQUEST":  # plain HTTP: say so, in it
                try:
                    socket.socket.send(conn.sock, self.protocol.refusal(tls=True))
                except OSError:
                    pass
                self.finish(conn, linger=True)
            else:
                self.close(conn)
            return
        conn.state = State.IDLE
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
        self._readable(conn)  # the first request may have come with the handshake

    # -- reading and writing ----------------------------------------------------------

    def _readable(self, conn: Connection) -> None:
        if conn.state is State.HANDSHAKE:
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
            self.close(conn)
            return
        if not data:  # the client has gone (a parked one too)
            self.close(conn)
            return
        if conn.state is State.LINGERING:
            return  # read and dropped
        buffer = conn.reader.buffer
        buffer += data  # (RequestReader.feed, without the call)
        if len(buffer) > self.max_input:
            logger.debug("closing %s: it sends far ahead of the answers", conn.address)
            self.close(conn)
            return
        self.protocol.received(conn)

    def send(self, conn: Connection, data: bytes) -> None:
        """Write *data* to *conn*, queueing what the socket does not take.
        A client that already has ``max_queued`` bytes waiting is cut at
        once: it resumes by its cursor like after any disconnect."""
        if conn.state is State.CLOSED or not data:
            return
        if conn.output:
            if conn.queued >= self.max_queued:
                self.cut += 1
                logger.info("cut %s: %d bytes unread", conn.address, conn.queued)
                self.close(conn)
                return
            conn.output.append(data)
            conn.queued += len(data)
            return
        try:
            sent = conn.sock.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except (OSError, ValueError):
            self.close(conn)
            return
        if sent < len(data):
            rest = memoryview(data)[sent:]
            conn.output.append(rest)
            conn.queued = len(rest)
            conn.deadline = time.monotonic() + self.read_timeout  # a slow reader
            self._selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _writable(self, conn: Connection) -> None:
        if conn.state is State.HANDSHAKE:
            self._handshake(conn)
            return
        output = conn.output
        while output:
            data = output[0]
            try:
                sent = conn.sock.send(data)
            except _WOULD_BLOCK:
                return
            except (OSError, ValueError):
                self.close(conn)
                return
            conn.queued -= sent
            conn.deadline = time.monotonic() + self.read_timeout  # it reads: more time
            if sent < len(data):
                output[0] = memoryview(data)[sent:]
                return
            output.popleft()
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)
        self.protocol.drained(conn)

    # -- closing ----------------------------------------------------------------------

    def finish(self, conn: Connection, linger: bool, seconds: float | None = None) -> None:
        """The last answer is out: close; with *linger*, half-close and read
        and drop what the client still sends for up to ``linger_time`` (or
        *seconds*), so it reads our answer, not a reset, as nginx's
        lingering close does."""
        if not linger:
            self.close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        conn.state = State.LINGERING  # what arrives now is dropped
        conn.deadline = time.monotonic() + (self.linger_time if seconds is None else seconds)

    def close(self, conn: Connection) -> None:
        if conn.state is State.CLOSED:
            return
        conn.state = State.CLOSED
        conn.deadline = None
        if conn.timer is not None:
            self.hold(conn, None)
        self.connections.discard(conn)
        self.per_address.remove(conn)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.output.clear()
        conn.queued = 0
        self.protocol.connection_lost(conn)


# ---------------------------------------------------------------------------
# HTTP over the loop: one request at a time per connection, in order
# ---------------------------------------------------------------------------

_STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}"
                 for status in HTTPStatus}


def _response(status: int, body: bytes, content_type: str, date: str,
              headers: Iterable[tuple[str, str]] = (), connection: str | None = None,
              head_only: bool = False) -> bytes:
    """A whole HTTP/1.1 response as bytes, ready for one send."""
    headers = tuple(headers)
    key = (status, content_type, date, headers, connection)
    parts = _HEADS.get(key)  # the head around Content-Length, built once a second
    if parts is None:
        lines = [_STATUS_LINES[status],
                 f"Server: longpoll/{__version__}",
                 f"Date: {date}",
                 f"Content-Type: {content_type}",
                 "Content-Length: "]
        after = ["", *[f"{k}: {v}" for k, v in headers]]
        if not any(k == "Cache-Control" for k, _ in headers):
            after.insert(1, "Cache-Control: no-store")
        if connection:
            after.append(f"Connection: {connection}")
        parts = ("\r\n".join(lines).encode("latin-1"),
                 ("\r\n".join(after) + "\r\n\r\n").encode("latin-1"))
        if len(_HEADS) >= 64:
            _HEADS.clear()
        _HEADS[key] = parts
    head = parts[0] + str(len(body)).encode() + parts[1]
    return head if head_only else head + body


_HEADS: dict[tuple, tuple[bytes, bytes]] = {}  # (see _response)
# (An HTTPStatus member read from its class costs a descriptor call on
# Python 3.10-3.12: the answers of the hot paths use these.)
_OK, _CREATED, _NOT_MODIFIED = HTTPStatus.OK, HTTPStatus.CREATED, HTTPStatus.NOT_MODIFIED


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HTTPProtocol:
    """Between the loop and the routes: feeds each connection's bytes to its
    ``RequestReader``, has the ``Handler`` decide on each head and answer
    each whole request, and writes the answers in order, one request at a
    time (pipelined ones wait in the reader). Owns the connection state
    changes that HTTP makes: IDLE, READING, BUSY, SENDING, CLOSING."""

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.handler: Handler = server.handler
        self.loop: Loop
        self.waiters: "Waiters"
        self._date, self._date_until = "", 0.0
        self._answered = server.metrics.on_loop
        self._heads: dict[bytes, Any] = {}  # parsed heads and header lines, by their
        self._blocks: dict[bytes, dict[str, str]] = {}  # bytes (see RequestReader)

    def date(self) -> str:
        """The Date header's value, formatted once a second. The second is
        the one the loop's turn began in (``Loop.now``): as in nginx, which
        reads the clock once per turn of its loop, no clock is read per
        answer."""
        if self.loop.now >= self._date_until:
            self._next_date()
        return self._date

    def _next_date(self) -> None:
        now = time.time()
        self._date = email.utils.formatdate(int(now), usegmt=True)
        self._date_until = time.monotonic() + 1.0 - now % 1.0  # (the next second's start)

    # -- the loop's hooks ---------------------------------------------------------------

    def connection_made(self, conn: Connection) -> None:
        server = self.server
        conn.reader = RequestReader(server.max_head, server.max_body, heads=self._heads,
                                    blocks=self._blocks)

    def received(self, conn: Connection) -> None:
        """Handle the requests waiting in *conn*'s input while it is free."""
        if conn.websocket is not None:  # no HTTP past the upgrade
            self.waiters.socket_input(conn)
            return
        while conn.state is State.IDLE or conn.state is State.READING:
            if conn.state is State.IDLE:
                if not conn.reader.buffer:
                    return
                # A request begins. Its deadline runs from its first byte: a
                # client trickling bytes (slow loris) cannot push it back.
                conn.state = State.READING
                conn.deadline = self.loop.now + self.loop.read_timeout
            request = conn.request
            try:
                if request is None:
                    request = conn.reader.read_head()
                    if request is None:
                        return
                    request.client = conn.address
                    conn.request = request
                    try:  # decided from its head alone
                        conn.decided = self.handler.decide(request, conn.decided)
                    except LongpollError as error:
                        if request.has_body and request.expect_continue:
                            self._refuse(conn, request, error)  # the body need never come
                            return
                        request.refusal = error  # answered once its body is read and dropped
                    else:
                        if request.has_body and request.expect_continue:
                            self.loop.send(conn, _CONTINUE)
                if request.has_body:
                    body = conn.reader.read_body()
                    if body is None:
                        return
                    request.body = body
            except LongpollError as error:  # not HTTP as RFC 9112 frames it
                self._refuse(conn, request, error)
                return
            conn.request = None
            self._dispatch(conn, request)

    def drained(self, conn: Connection) -> None:
        conn.handed = None  # a /receive answer is all written: the message is the client's
        if conn.state is State.SENDING:
            self.idle(conn)
            self.resume(conn)
        elif conn.state is State.CLOSING:
            self.loop.finish(conn, conn.linger)
        elif conn.state in (State.STREAMING, State.PARKED, State.BUSY):
            conn.deadline = None  # no longer a slow reader

    def expired(self, conn: Connection) -> None:
        self.waiters.expire(conn)

    def timed_out(self, conn: Connection) -> None:
        if conn.state is State.READING:
            self._refuse(conn, conn.request, LongpollError(
                HTTPStatus.REQUEST_TIMEOUT, "the request was not received in time"))
        else:
            self.loop.close(conn)

    def connection_lost(self, conn: Connection) -> None:
        self.waiters.forget(conn)

    def refusal(self, tls: bool = False) -> bytes:
        if tls:  # a plain-text request on the TLS port
            return _response(HTTPStatus.BAD_REQUEST, _json_body(
                {"error": "this port speaks HTTPS: use an https:// URL"}),
                "application/json", self.date(), (), "close")
        return _response(HTTPStatus.SERVICE_UNAVAILABLE, _json_body(
            {"error": "too many connections from your address: close some"}),
            "application/json", self.date(), (("Retry-After", "5"),), "close")

    # -- requests ---------------------------------------------------------------------

    def _dispatch(self, conn: Connection, request: Request) -> None:
        if request.refusal is not None:
            self.respond(conn, request, _error_response(request.refusal))
        else:
            if not conn.first and request.route in self.handler.publishing:
                conn.first = True
                self.loop.prefer(conn)  # its next publishes overtake re-polls
            where = self.handler.where(request)
            if where is None:
                outcome = self.handler.handle(request)
                if isinstance(outcome, Response):  # (self.apply, without the call)
                    self.respond(conn, request, outcome)
                else:
                    self.waiters.start(conn, request, outcome)
                return
            conn.state = State.BUSY
            conn.deadline = None
            if where == "later":  # answered when the store answers
                self.handler.publish_later(request, functools.partial(self._later, conn, request))
            else:
                self.server.pool.submit(self._work, conn, request)

    def _work(self, conn: Connection, request: Request) -> None:
        """On a worker thread: the outcome, handed back to the loop."""
        self._later(conn, request, self.handler.handle(request))

    def _later(self, conn: Connection, request: Request, outcome: Any) -> None:
        """Carry out *outcome* on the loop (from a worker, or a store's answer)."""
        self.loop.call_soon(functools.partial(self._worked, conn, request, outcome))

    def _worked(self, conn: Connection, request: Request, outcome: Any) -> None:
        if conn.state is State.BUSY:
            self.apply(conn, request, outcome)
            self.resume(conn)

    def apply(self, conn: Connection, request: Request, outcome: Any) -> None:
        """Carry out what the route decided."""
        if isinstance(outcome, Response):
            self.respond(conn, request, outcome)
        else:
            self.waiters.start(conn, request, outcome)

    def _refuse(self, conn: Connection, request: Request | None, error: LongpollError) -> None:
        """Answer a request that cannot go on, then close: lingering, since
        the client may still be sending what we will never read."""
        if request is None:  # no head: the line it began with, for the log
            request = Request(conn.reader.first_line.decode("latin-1"), "", "", {})
            request.client = conn.address
        conn.request = None
        self.respond(conn, request, _error_response(error), close=True, linger=True)

    # -- answers ----------------------------------------------------------------------

    def respond(self, conn: Connection, request: Request, response: Response, *,
                close: bool = False, linger: bool = False) -> None:
        """Write *response* to *request*; keep the connection if both sides may."""
        status = response.status
        if status >= 400 and request.route.startswith("ntfy_"):
            response = _ntfy_error(response)  # (see _shaped)
        keep = (request.keep_alive and not close and status < 500
                and not self.server.closing)
        headers = response.headers + request.cors if request.cors else response.headers
        if self.loop.now >= self._date_until:  # (self.date(), without the call)
            self._next_date()
        data = _response(status, response.body, response.content_type, self._date, headers,
                         None if keep and request.version == "HTTP/1.1"
                         else self.connection_header(request, keep),
                         status == _NOT_MODIFIED or request.method == "HEAD")
        self.reply(conn, data, keep, linger)
        # Sent now: counted in the loop's own counter (no lock), and logged.
        self._answered[request.route, status] += 1
        if logger.isEnabledFor(logging.INFO):
            _access_log(request, status, len(response.body))

    @staticmethod
    def connection_header(request: Request, keep: bool) -> str | None:
        """The Connection header an answer needs, if any."""
        if not keep:
            return "close"
        return "keep-alive" if request.version == "HTTP/1.0" else None

    def reply(self, conn: Connection, data: bytes, keep: bool, linger: bool = False) -> None:
        """Send the answer to the request under way, and move *conn* on:
        to IDLE or SENDING if it stays open, else to its close. It does not
        read the next request: the caller does that (``resume``)."""
        loop = self.loop
        conn.request = None
        loop.send(conn, data)
        if conn.state is State.CLOSED:
            return
        if not conn.output:
            conn.handed = None  # the answer is all written
        if conn.output:
            conn.state = State.SENDING if keep else State.CLOSING
            conn.linger = linger
        elif keep:  # (self.idle(conn), without the call)
            conn.state = State.IDLE
            conn.deadline = loop.now + loop.read_timeout
        else:
            loop.finish(conn, linger)

    def idle(self, conn: Connection) -> None:
        conn.state = State.IDLE
        conn.deadline = self.loop.now + self.loop.read_timeout

    def resume(self, conn: Connection) -> None:
        """Go on with what *conn* sent meanwhile (pipelined requests)."""
        if conn.state is State.IDLE and conn.reader.buffer:
            self.received(conn)


def _log_answer(metrics: "Metrics", request: Request, status: int, size: int) -> None:
    """Count an answer (for /metrics) and write its access-log line."""
    metrics.answered(request.route, status)
    if logger.isEnabledFor(logging.INFO):
        _access_log(request, status, size)


def _access_log(request: Request, status: int, size: int) -> None:
    logger.info('%s "%s" %d %s %.1fms', request.client, request.loggable(), status,
                size, (time.monotonic() - request.started) * 1000)


# ---------------------------------------------------------------------------
# The waiting layer: parked polls, /receive takers and event streams
# ---------------------------------------------------------------------------

def _check_room(service: "_Service", parked: int, parked_by: collections.Counter[str],
                key: str | None) -> None:
    """503 with Retry-After when *service*, or the client *key*, has as many
    requests parked as it may (``max_waiting``, ``max_waiting_per_client``)."""
    if parked >= service.max_waiting or (
            key is not None and parked_by[key] >= service.max_waiting_per_client):
        raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE,
                            "too many waiting requests: try again shortly",
                            {"Retry-After": "5"})


class _Group:
    """Parked polls (and streams) with the same channels, position and
    limit: they get the same answer, so it is read and encoded once."""

    __slots__ = ("key", "conns", "cancel")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.conns: dict[Connection, None] = {}
        self.cancel: Callable[[], None] = lambda: None




def _sse_events(batch: Batch) -> bytes:
    """A batch as Server-Sent Events: a gap event, then one event per message."""
    parts = [b"event: gap\ndata: {}\n\n"] if batch.gap else []
    parts += [b"id: " + m.id.encode() + b"\ndata: " + m.json + b"\n\n" for m in batch.messages]
    return b"".join(parts)


_SSE_KEEPALIVE = b": keepalive\n\n"


# -- WebSocket (RFC 6455): a subscriber's socket, one way ---------------------------

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_WS_KEY = re.compile(r"[A-Za-z0-9+/]{21}[AQgw]==")  # base64 of 16 bytes


def _ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One whole, unmasked frame, as a server sends it (RFC 6455 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, size) + payload


def _ws_close(code: int, reason: str = "") -> bytes:
    """A close frame: *code*, then *reason* (cut to fit 125 bytes)."""
    return _ws_frame(struct.pack("!H", code) + reason.encode()[:123], 0x8)


def _ws_frames(batch: Batch) -> bytes:
    """A batch as WebSocket text frames: a gap frame, then one per message."""
    parts = [_WS_GAP] if batch.gap else []
    parts += [_ws_frame(m.json) for m in batch.messages]
    return b"".join(parts)


_WS_GAP = _ws_frame(b'{"event":"gap"}')
_WS_PING = _ws_frame(b"", 0x9)
_ws_ping = (lambda: _WS_PING)  # noqa: E731 (a WebSocket's keepalive)
#: Server-Sent Events (GET /channels/{names}/events).
_SSE = Form("text/event-stream; charset=utf-8", b": connected\n\n", _sse_events,
            lambda: _SSE_KEEPALIVE)


# -- ntfy's API: its paths, names and event objects over the same channels ---------

NTFY_TOPIC_RE = re.compile(r"[-_A-Za-z0-9]{1,64}\Z")
#: Names that cannot be topics: this server's own paths, and ntfy's.
NTFY_RESERVED = frozenset({"channels", "health", "metrics", "send", "receive", "v1",
                           "docs", "static", "file", "app", "account", "settings",
                           "signup", "login"})
_NTFY_CONTENT_TYPES = {"json": "application/x-ndjson; charset=utf-8",
                       "sse": "text/event-stream; charset=utf-8",
                       "raw": "text/plain; charset=utf-8", "ws": None}


def _ntfy_topics(text: str) -> tuple[str, ...]:
    """The topics of an ntfy path (``a`` or ``a,b``), checked."""
    names = urllib.parse.unquote(text).split(",")
    for name in names:
        if not NTFY_TOPIC_RE.match(name):
            raise _bad_request(f"invalid topic {name[:80]!r}: use 1-64 of A-Z a-z 0-9 _ -")
        if name in NTFY_RESERVED:
            raise _reserved(name)
    return _check_channels(names)


def _reserved(name: str) -> LongpollError:
    return _bad_request(f"{name} is a reserved name, not a topic (reserved: "
                        f"{', '.join(sorted(NTFY_RESERVED))})")


def _ntfy_event(msg: Message, gap: bool = False) -> bytes:
    """*msg* as ntfy's message event: its id (our cursor), a Unix time in
    whole seconds, the topic, the message as text, and the fields it has."""
    event: dict[str, Any] = {
        "id": msg.id, "time": int(msg.time), "event": "message", "topic": msg.channel,
        "message": _ntfy_text(msg)}
    if msg.title is not None:
        event["title"] = msg.title
    if msg.priority is not None:
        event["priority"] = msg.priority
    extra = msg.extra or {}
    for name in ("tags", "click", "icon", "sequence_id"):
        if name in extra:
            event[name] = extra[name]
    if "actions" in extra:
        event["actions"] = [{"id": f"{msg.id}-{index}", "clear": False, **action}
                            for index, action in enumerate(extra["actions"], 1)]
    if extra.get("markdown"):
        event["content_type"] = "text/markdown"
    if gap:  # (not ntfy's: it has no way to say messages were lost)
        event["gap"] = True
    return _encode(event).encode()


def _ntfy_text(msg: Message) -> str:
    """A message as ntfy's text: a string as it is, any other value as its JSON."""
    value = json.loads(msg.payload)
    return value if isinstance(value, str) else msg.payload.decode()


def _ntfy_other(event: str, topics: str) -> bytes:
    """ntfy's open and keepalive events."""
    return _encode({"id": secrets.token_hex(6), "time": int(time.time()), "event": event,
                    "topic": topics}).encode()


def _ntfy_events(batch: Batch) -> list[bytes]:
    return [_ntfy_event(m, batch.gap and not index) for index, m in enumerate(batch.messages)]


def _ntfy_json(batch: Batch) -> bytes:
    """A batch as ntfy's JSON stream: one event object a line."""
    return b"".join(event + b"\n" for event in _ntfy_events(batch))


def _ntfy_sse(batch: Batch) -> bytes:
    """A batch as ntfy's event stream (with ``id:``, so a browser resumes)."""
    return b"".join(b"id: " + m.id.encode() + b"\ndata: " + event + b"\n\n"
                    for m, event in zip(batch.messages, _ntfy_events(batch)))


def _ntfy_raw(batch: Batch) -> bytes:
    """A batch as ntfy's raw stream: each message's text on a line."""
    return b"".join(_ntfy_text(m).replace("\r", " ").replace("\n", " ").encode() + b"\n"
                    for m in batch.messages)


def _ntfy_ws(batch: Batch) -> bytes:
    """A batch as ntfy's WebSocket messages: one event object a frame."""
    return b"".join(_ws_frame(event) for event in _ntfy_events(batch))


def _ntfy_form(kind: str, topics: str) -> Form:
    """How an ntfy subscription of *kind* (json, sse, raw, ws) is written."""
    if kind == "json":
        return Form(_NTFY_CONTENT_TYPES[kind], _ntfy_other("open", topics) + b"\n", _ntfy_json,
                    lambda: _ntfy_other("keepalive", topics) + b"\n")
    if kind == "sse":
        return Form(_NTFY_CONTENT_TYPES[kind],
                    b"event: open\ndata: " + _ntfy_other("open", topics) + b"\n\n", _ntfy_sse,
                    lambda: b"event: keepalive\ndata: " + _ntfy_other("keepalive", topics)
                    + b"\n\n")
    if kind == "raw":
        return Form(_NTFY_CONTENT_TYPES[kind], b"\n", _ntfy_raw, lambda: b"\n")
    return Form(None, _ws_frame(_ntfy_other("open", topics)), _ntfy_ws, _ws_ping)


_GO_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?(?:ns|us|µs|ms|s|m|h|d))+\Z")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
             "d": 86400.0}


def _go_duration(text: str) -> float | None:
    """Seconds in a duration as ntfy (Go) writes one: 10m, 1h30m, 90s (and
    1d, a day); None if *text* is not one."""
    if not _GO_DURATION.match(text):
        return None
    return sum(float(number) * _GO_UNITS[unit]
               for number, unit in re.findall(r"([0-9.]+)(ns|us|µs|ms|s|m|h|d)", text))


_WORDY_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
                "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_WORDY_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?) *(seconds?|secs?|s|minutes?|mins?|m|hours?|h|"
                         r"days?|d)")
_WORDY_DURATION = re.compile(r"(?: *" + _WORDY_PART.pattern + r")+ *")


def _human_seconds(seconds: float) -> str:
    """A duration for people: 26 h, 90 min, 45 s, 3 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size or seconds == size and unit != "days":
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def parse_time(value: Any) -> float:
    """A Unix time from *value*: a number (or its text), or an RFC 3339
    time with its offset (``2026-12-24T18:00:00Z``, ``...+01:00``); a 400
    ``LongpollError`` otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds: float | None = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                when = datetime.datetime.fromisoformat(re.sub(r"[zZ]$", "+00:00", text))
            except ValueError:
                when = None
            seconds = when.timestamp() if when is not None and when.tzinfo else None
    else:
        seconds = None
    if seconds is None or not math.isfinite(seconds):
        raise _bad_request("At is a Unix time or an RFC 3339 time with its offset, such as "
                           f"2026-12-24T18:00:00Z, not {str(value)[:40]!r}")
    return seconds


def parse_duration(value: Any, what: str = "a duration") -> float:
    """Seconds in *value*: a number of seconds (a JSON number, or text such
    as ``"90"``), or a duration such as ``90s``, ``10m``, ``1h30m``, ``2d``;
    a 400 ``LongpollError`` naming *what* otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds: float | None = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _go_duration(text)
            if seconds is None and _WORDY_DURATION.fullmatch(text):  # ntfy's: 30min, 2 hours
                seconds = sum(float(n) * _WORDY_UNITS[u.rstrip("s") or "s"]
                              for n, u in _WORDY_PART.findall(text))
    else:
        seconds = None
    if seconds is None or not math.isfinite(seconds):
        raise _bad_request(f"{what} is a number of seconds or a duration such as 90s, 10m, "
                           f"2h or 1d, not {str(value)[:40]!r}")
    return seconds
_WS_GOING_AWAY = _ws_close(1001, "the server is closing")
#: Close codes (RFC 6455 7.4.1) a client may send; others are a protocol error.
_WS_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                       1014)) | frozenset(range(3000, 5000))


class WebSocketClosed(Exception):
    """The client's frames end the socket: close with *code* and *reason*."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code, self.reason = code, reason


class WebSocketReader:
    """Reads a client's frames from a connection's input (RFC 6455 5):
    pings to answer, a close to echo, data messages to check and drop (a
    subscriber's socket carries messages one way: publish with POST).
    What the RFC refuses raises ``WebSocketClosed`` with the code to close
    with: an unmasked frame, reserved bits, an unknown opcode, a fragmented
    or oversized control frame, a continuation with no message or a message
    inside another (1002), text that is not UTF-8 (1007), a message over
    *max_message* bytes, told from the frame's header before its payload
    comes (1009). No I/O here, like ``RequestReader``."""

    __slots__ = ("max_message", "_parts", "_size", "_text")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._parts: list[bytes] | None = None  # a fragmented message under way
        self._size = 0
        self._text = False

    def read(self, buf: bytearray) -> Iterator[tuple[int, bytes]]:
        """The control frames (opcode, payload) whole in *buf*, taken out
        of it one by one; data frames are checked and dropped on the way."""
        while len(buf) >= 2:
            first, second = buf[0], buf[1]
            fin, opcode, size = first & 0x80, first & 0x0F, second & 0x7F
            if first & 0x70:
                raise WebSocketClosed(1002, "reserved bits set: no extension was agreed")
            if opcode in (0x3, 0x4, 0x5, 0x6, 0x7) or opcode > 0xA:
                raise WebSocketClosed(1002, f"unknown opcode {opcode}")
            if not second & 0x80:
                raise WebSocketClosed(1002, "a client's frames must be masked")
            if opcode >= 0x8 and (not fin or size > 125):
                raise WebSocketClosed(1002, "a control frame is one frame of at most "
                                            "125 bytes")
            start = 2
            if size == 126:
                if len(buf) < 4:
                    return
                size, start = struct.unpack_from("!H", buf, 2)[0], 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size, start = struct.unpack_from("!Q", buf, 2)[0], 10
            if opcode < 0x8:
                if opcode == 0x0 and self._parts is None:
                    raise WebSocketClosed(1002, "a continuation frame with no message "
                                                "to continue")
                if opcode != 0x0 and self._parts is not None:
                    raise WebSocketClosed(1002, "a new message before the last one ended")
                if (self._size if opcode == 0x0 else 0) + size > self.max_message:
                    raise WebSocketClosed(1009, f"a message over {self.max_message} bytes")
            end = start + 4 + size
            if len(buf) < end:
                return  # (the rest of the frame is coming)
            payload = _unmask(bytes(buf[start + 4:end]), bytes(buf[start:start + 4]))
            del buf[:end]
            if opcode >= 0x8:
                if opcode == 0x8:
                    self._check_close(payload)
                yield opcode, payload
            else:
                self._data(opcode, payload, fin)

    def _data(self, opcode: int, payload: bytes, fin: int) -> None:
        if opcode != 0x0:
            self._parts, self._size, self._text = [], 0, opcode == 0x1
        parts = self._parts
        parts.append(payload)
        self._size += len(payload)
        if fin:
            self._parts = None
            if self._text:
                try:
                    b"".join(parts).decode("utf-8")
                except UnicodeDecodeError:
                    raise WebSocketClosed(1007, "a text message that is not UTF-8") from None

    @staticmethod
    def _check_close(payload: bytes) -> None:
        if len(payload) == 1:
            raise WebSocketClosed(1002, "a close frame's code is two bytes")
        if payload:
            if struct.unpack_from("!H", payload)[0] not in _WS_CODES:
                raise WebSocketClosed(1002, "a close code a client may not send")
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise WebSocketClosed(1007, "a close reason that is not UTF-8") from None


def _unmask(data: bytes, mask: bytes) -> bytes:
    """XOR *data* with the 4-byte *mask*, repeated (RFC 6455 5.3)."""
    if not data:
        return data
    size = len(data)
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


class Waiters:
    """Parks what waits for a message, wakes it when one comes, and answers
    it: long-polls in groups (one read and one encoding per group), event
    streams, and ``/receive`` takers (``Takers``). Reaches connections only through the
    HTTP layer's ``reply`` and the loop's ``send``, ``hold`` and ``close``.

    A publish wakes a group through ``hub.watch`` (from any thread, handed
    to the loop); woken groups are answered together at the next fan-out,
    at most once per ``coalesce`` seconds, so a burst goes out in batches.
    """

    #: During a burst, parked polls are answered at most once per this many
    #: seconds, so each answer carries a batch instead of one message. 0
    #: turns it off.
    coalesce = 0.005
    #: While the loop is saturated (busy for most of the last window) the
    #: window doubles, up to this many seconds: bigger batches, so fewer
    #: answers and re-polls per message, and the loop catches up; it halves
    #: back to ``coalesce`` as the load falls. A poll is never held back
    #: longer than the window.
    max_coalesce = 0.05
    def __init__(self, server: "Server", protocol: HTTPProtocol, loop: Loop) -> None:
        self.server, self.hub = server, server.hub
        self.protocol, self.loop = protocol, loop
        self.groups: dict[tuple, _Group] = {}
        self._fired: dict[_Group, None] = {}   # groups to answer at the next fan-out
        self._last_fanout = 0.0
        self._window = self.coalesce  # the batching window now (see max_coalesce)
        self._idle_mark = 0.0  # the loop's idle time at the last fan-out
        self._head_mark = 0  # the hub's head at the last fan-out
        # Answers given at once, by (channels, position, limit), while the
        # hub's head is the same: when readers fall behind a burst, they come
        # back with the same cursors, and each is read and encoded once.
        self._recent: dict[tuple, tuple[int, str, bytes, int]] = {}
        self.streams: dict[Connection, None] = {}
        self._next_keepalive = 0.0
        #: Requests parked now, in all and per client key.
        self.parked = 0
        self.parked_by: collections.Counter[str] = collections.Counter()
        self.takers = Takers(self)  # /receive

    # -- starting -------------------------------------------------------------------

    def start(self, conn: Connection, request: Request, outcome: Poll | Stream | Take) -> None:
        """Carry out a route's Poll, Stream or Take (503 if over capacity)."""
        try:
            if isinstance(outcome, Poll):
                self.poll(conn, request, outcome)
            elif isinstance(outcome, Stream):
                self.stream(conn, request, outcome)
            else:
                self.takers.start(conn, request, outcome)
        except LongpollError as error:
            self.protocol.respond(conn, request, _error_response(error))

    def stopping(self) -> bool:
        return self.server.closing or self.hub.closed

    def poll(self, conn: Connection, request: Request, poll: Poll) -> None:
        """Answer a long-poll now if there is something to say, else park it."""
        names, position, timeout, limit = poll
        hub = self.hub
        key = (names, position, limit)
        if hub.at_head(position):  # nothing yet (the usual re-poll): wait
            if timeout > 0 and not (self.server.closing or hub.closed):  # (self.stopping())
                self.admit(conn, request)  # (self._wait, without the call)
                self._join(conn, key)
                self.park(conn, request, State.PARKED, timeout)
                return
        elif hub.ahead(position):  # wait for the feed, then settle (Hub.settle)
            timeout = max(timeout, hub.store.lag)
        due = time.monotonic() >= self._last_fanout + self._window  # (past the batching window)
        recent = self._recent.get(key)
        if due and recent is not None and recent[:2] == (hub.head, hub.history):
            body, count = recent[2], recent[3]  # the same answer, given moments ago
        else:
            batch = hub.read_checked(names, position, limit, self.server.max_answer)
            ready = bool(batch.messages or batch.gap)
            if not (timeout <= 0 or self.stopping() or ready and due):
                # Nothing yet: park until a publish. Or a burst is on: join
                # the next fan-out (within the window), to take a batch.
                group = self._wait(conn, request, key, timeout)
                if ready:
                    self._fired[group] = None
                return
            body, count = batch.to_json(), len(batch.messages)
            if ready:
                if len(self._recent) >= 1024:
                    self._recent.clear()
                self._recent[key] = (hub.head, hub.history, body, count)
        self.server.metrics.delivered += count
        self.protocol.respond(conn, request, _new_response((_OK, body, "application/json", ())))

    def _wait(self, conn: Connection, request: Request, key: tuple,
              timeout: float) -> _Group:
        """Park a poll in the group waiting at *key* (503 if over capacity)."""
        self.admit(conn, request)
        group = self._join(conn, key)
        self.park(conn, request, State.PARKED, timeout)
        return group

    def stream(self, conn: Connection, request: Request, stream: Stream) -> None:
        """Start an event stream: what is there after the position, then
        every message as it comes, until the client goes (or we close)."""
        names, position, form, accept = stream
        self.admit(conn, request)
        live = not self.stopping()
        if accept is not None and not live:
            raise LongpollError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is closing",
                                {"Retry-After": "5"})
        if live:  # joined before the head is written: it may refuse (503)
            group = self._join(conn, (names, position, MAX_LIMIT))
        conn.form = form
        if accept is not None:
            head = (f"HTTP/1.1 101 Switching Protocols\r\nServer: longpoll/{__version__}\r\n"
                    f"Date: {self.protocol.date()}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode()
            conn.websocket = WebSocketReader(self.server.max_body)
            _log_answer(self.server.metrics, request, 101, 0)
        else:
            head = _response(HTTPStatus.OK, b"", form.content_type, self.protocol.date(),
                             (("X-Accel-Buffering", "no"), *request.cors), "close",
                             head_only=True)
            head = head.replace(b"Content-Length: 0\r\n", b"")  # the body ends at the close
            _log_answer(self.server.metrics, request, 200, 0)
        first = form.opening
        if not live:
            self.protocol.reply(conn, head + first, keep=False)
            return
        if not self.streams:  # the first keepalive comes a whole interval after it opens
            self._next_keepalive = time.monotonic() + self.server.keepalive
        self.streams[conn] = None
        self.park(conn, request, State.STREAMING,
                   self.hub.store.lag if self.hub.ahead(position) else None)
        self._fired[group] = None  # send what is already there at the next fan-out
        self.loop.send(conn, head + first)
        if conn.websocket is not None and conn.reader.buffer:
            self.socket_input(conn)  # frames that came with the handshake

    def socket_input(self, conn: Connection) -> None:
        """A WebSocket's frames from its client: pong its pings, echo its
        close, and close with the code the RFC names for a bad frame."""
        try:
            for opcode, payload in conn.websocket.read(conn.reader.buffer):
                if opcode == 0x9:
                    self.loop.send(conn, _ws_frame(payload, 0xA))
                elif opcode == 0x8:
                    self.end_socket(conn, _ws_frame(payload[:2], 0x8))
                    return
        except WebSocketClosed as closed:
            logger.info("closing a WebSocket of %s: %d %s", conn.address, closed.code,
                        closed.reason)
            self.end_socket(conn, _ws_close(closed.code, closed.reason))

    def end_socket(self, conn: Connection, frame: bytes) -> None:
        """Send a WebSocket's close *frame*, then close it (reading, and
        dropping, what the client still sends: its own close)."""
        self.streams.pop(conn, None)
        self.unpark(conn)
        conn.websocket = None
        self.protocol.reply(conn, frame, keep=False, linger=True)

    def admit(self, conn: Connection, request: Request) -> None:
        """503 with Retry-After when the server, or this client, has as many
        requests parked as it may."""
        server = self.server
        if self.parked >= server.max_waiting or request.key is not None:  # (else room)
            _check_room(server, self.parked, self.parked_by, request.key)
        conn.owner = request.key

    def park(self, conn: Connection, request: Request, state: str,
              timeout: float | None) -> None:
        conn.request = request
        conn.state = state
        conn.deadline = None
        self.parked += 1
        if conn.owner is not None:
            self.parked_by[conn.owner] += 1
        if timeout is not None:
            self.loop.hold(conn, timeout)

    def _join(self, conn: Connection, key: tuple) -> _Group:
        """Put *conn* in the group waiting at *key* (made, and watched, if new)."""
        group = self.groups.get(key)
        if group is None:
            group = _Group(key)
            group.cancel = self.hub.watch(key[0], functools.partial(  # may refuse: 503
                self.loop.call_soon, functools.partial(self._wake, group)), since=key[1])
            self.groups[key] = group
        group.conns[conn] = None
        conn.group = group
        return group

    # -- ending -------------------------------------------------------------------------

    def unpark(self, conn: Connection) -> None:
        """Take *conn* out of whatever it waits in (no answer is written)."""
        group = conn.group
        if group is None:
            return
        conn.group = None
        if isinstance(group, Take):
            try:
                self.takers.queue.remove(conn)
            except ValueError:
                pass
        else:
            group.conns.pop(conn, None)
            if not group.conns and self.groups.get(group.key) is group:
                del self.groups[group.key]
                group.cancel()
        self.parked -= 1
        self._release(conn)
        if conn.timer is not None:
            self.loop.hold(conn, None)

    def _release(self, conn: Connection) -> None:
        """One parked request of this client's is over."""
        owner = conn.owner
        if owner is not None:
            conn.owner = None
            self.parked_by[owner] -= 1
            if not self.parked_by[owner]:
                del self.parked_by[owner]

    def forget(self, conn: Connection) -> None:
        """*conn* closed: free what it held here, and give back a message
        whose answer it never got whole."""
        self.unpark(conn)
        self.streams.pop(conn, None)
        if conn.handed is not None:
            msg, conn.handed = conn.handed, None
            self.takers.give_back(msg)

    def expire(self, conn: Connection) -> None:
        """A parked request's hold has ended: answer it as it stands."""
        group, request = conn.group, conn.request
        if group is None or request is None:
            return
        if conn.state is State.STREAMING:  # its position was ahead: settle it
            names, position, limit = group.key
            self.unpark(conn)
            conn.owner = request.key
            self.park(conn, request, State.STREAMING, None)
            self._fired[self._join(conn, (names, self.hub.settle(position), limit))] = None
            return
        self.unpark(conn)
        if isinstance(group, Take):
            self.takers.respond(conn, request, None)
        else:
            names, position, limit = group.key
            position = self.hub.settle(position)
            batch = self.hub.read_checked(names, position, limit, self.server.max_answer)
            self.server.metrics.delivered += len(batch.messages)
            self.protocol.respond(conn, request, Response(HTTPStatus.OK, batch.to_json()))
        self.protocol.resume(conn)

    # -- fan-out ------------------------------------------------------------------------

    def _wake(self, group: _Group) -> None:
        """A publish reached the channels of *group*: answer it at the next fan-out."""
        if self.groups.get(group.key) is group:
            self._fired[group] = None

    def wake_at(self, timeout: float) -> float:
        """The loop's select timeout, shortened for the next fan-out or keepalive."""
        if not (self._fired or self.streams):
            return timeout
        now = time.monotonic()
        if self._fired:
            timeout = min(timeout, max(0.0, self._last_fanout + self._window - now))
        if self.streams:
            timeout = min(timeout, max(0.0, self._next_keepalive - now))
        return timeout

    def fan_out(self) -> None:
        """Answer the woken groups, at most once per ``coalesce`` seconds;
        send stream keepalives when due."""
        if not (self._fired or self.streams):
            return  # (most turns of the loop)
        now = time.monotonic()
        if self._fired and now >= self._last_fanout + self._window:
            self._adapt(now)
            self._last_fanout = now
            fired, self._fired = self._fired, {}
            for group in fired:
                self._answer(group)
        if self.streams and now >= self._next_keepalive:
            self._next_keepalive = now + self.server.keepalive
            for conn in list(self.streams):
                self.loop.send(conn, conn.form.keepalive())

    def _adapt(self, now: float) -> None:
        """Size the batching window by how busy the loop was since the last
        fan-out: double it when the loop hardly waited while messages came
        several to a round, halve it when it mostly waited, and start afresh
        when messages come one at a time or after a quiet spell."""
        elapsed = now - self._last_fanout
        idle, self._idle_mark = self.loop.idle - self._idle_mark, self.loop.idle
        messages, self._head_mark = self.hub.head - self._head_mark, self.hub.head
        if elapsed > 10 * max(self._window, self.coalesce) or messages < 2:
            self._window = self.coalesce  # not a burst (one message a round): nothing to batch
        elif idle < 0.2 * elapsed:
            self._window = min(self._window * 2, self.max_coalesce)
        elif idle > 0.6 * elapsed:
            self._window = max(self._window / 2, self.coalesce)

    def _answer(self, group: _Group) -> None:
        """Answer every poll of *group*: read and encode once, write to each."""
        if self.groups.get(group.key) is not group:
            return  # answered or abandoned meanwhile
        hub, server = self.hub, self.server
        names, position, limit = group.key
        batch = hub.read_checked(names, position, limit, server.max_answer)
        if not (batch.messages or batch.gap or hub.closed):
            group.cancel = hub.watch(names, functools.partial(
                self.loop.call_soon, functools.partial(self._wake, group)), since=position)
            return
        group.cancel()
        del self.groups[group.key]
        conns = list(group.conns)
        group.conns.clear()
        self.parked -= len(conns)
        server.metrics.delivered += len(batch.messages) * len(conns)
        body, date, responses = batch.to_json(), self.protocol.date(), {}
        encoded: dict[Callable, bytes] = {}  # per form: once for all the group's streams
        after: tuple | None = None
        stopping, polls = self.stopping(), 0
        protocol, log = self.protocol, logger.isEnabledFor(logging.INFO)
        loop, hold = self.loop, self.loop.hold
        for conn in conns:  # the hot loop of every fan-out: kept lean
            conn.group = None
            if conn.owner is not None:
                self._release(conn)
            if conn.timer is not None:
                hold(conn, None)
            request = conn.request
            if conn.state is State.STREAMING:  # send the events, wait at the next position
                if after is None:
                    after = (names, hub.locate(batch.cursor), limit)
                encode = conn.form.encode
                data = encoded.get(encode)
                if data is None:
                    data = encoded[encode] = encode(batch)
                loop.send(conn, data)
                if stopping:
                    self.streams.pop(conn, None)
                    protocol.reply(conn, b"" if conn.websocket is None else _WS_GOING_AWAY,
                                   keep=False)
                elif conn.state is not State.CLOSED:
                    conn.owner = request.key
                    self._join(conn, after)
                    self.parked += 1
                    if conn.owner is not None:
                        self.parked_by[conn.owner] += 1
                continue
            polls += 1
            keep = request.keep_alive and not stopping
            variant = (keep, request.version, request.cors)
            data = responses.get(variant)
            if data is None:
                data = responses[variant] = _response(
                    HTTPStatus.OK, body, "application/json", date, request.cors,
                    protocol.connection_header(request, keep))
            if log:
                logger.info('%s "%s" 200 %s %.1fms', request.client, request.loggable(),
                            len(body), (time.monotonic() - request.started) * 1000)
            protocol.reply(conn, data, keep)
            if conn.reader.buffer:
                protocol.resume(conn)  # pipelined input
        server.metrics.answered("poll", 200, polls)

    def tick(self) -> None:
        """Once a second: forget the answers kept for re-polls (age retention
        may have changed them), and retry the parked takers."""
        self._recent.clear()
        self.takers.retry()

    # -- when the server changes or closes ----------------------------------------------

    def reauthorize(self, auth: "Auth | None") -> None:
        """Auth rules changed (SIGHUP): end the event streams that the new
        rules no longer allow to read their channels. (A parked poll ends
        within its hold, and its next poll is checked against the new rules.)"""
        if auth is None:
            return
        for conn in list(self.streams):
            request = conn.request
            try:
                auth.check(request.token, "read", request.names)
            except LongpollError as error:
                logger.info("ending a %s of %s: %s", request.route, request.client, error)
                if conn.websocket is not None:
                    self.end_socket(conn, _ws_close(1008, error.message))
                else:
                    self.loop.close(conn)

    def stop(self) -> None:
        """Part of ``Server.close``: answer the takers; end idle streams.
        (Parked polls are answered by the hub's close.)"""
        self.takers.stop()
        for conn in list(self.streams):
            self.streams.pop(conn, None)
            self.unpark(conn)
            self.protocol.reply(conn, b"" if conn.websocket is None else _WS_GOING_AWAY,
                                keep=False)


def _taken(msg: Message | None) -> Response:
    """``/receive``'s answer: ``{"message": X}`` (null on timeout), with the
    ``receipt`` of a lease."""
    body = b'{"message":' + (b"null" if msg is None else msg.payload)
    if msg is not None and msg.receipt is not None:
        body += b',"receipt":"' + msg.receipt.encode() + b'"'
    return Response(HTTPStatus.OK, body + b"}\n")


class Takers:
    """``/receive``'s takers: each gets the next message no one else got,
    or parks, first come first served, until a publish (or a message given
    back) lets the next one take. With a store across the network, takes
    and give-backs run on a worker (``_with_store``). Parks through its
    ``Waiters``, which owns every parked connection."""

    def __init__(self, waiters: "Waiters") -> None:
        self.waiters, self.hub = waiters, waiters.hub
        self.server, self.protocol, self.loop = waiters.server, waiters.protocol, waiters.loop
        self.queue: collections.deque[Connection] = collections.deque()  # parked, oldest first
        self._watch: Callable[[], None] | None = None
        self._taking = False  # a take for the parked takers is under way

    def start(self, conn: Connection, request: Request, take: Take) -> None:
        """``/receive``: hand over the next untaken message, or park."""
        head = self.hub.locate(None)
        if self.hub.store.remote:
            conn.state, conn.deadline = State.BUSY, None  # while the store answers
        self._with_store(functools.partial(self.hub.take, take.channel, timeout=0,
                                           lease=take.lease),
                         functools.partial(self._took, conn, request, take, head))

    def _took(self, conn: Connection, request: Request, take: Take, head: Position,
              msg: "Message | LongpollError | None") -> None:
        if conn.state is State.CLOSED:
            if isinstance(msg, Message):
                self.give_back(msg)
            return
        if isinstance(msg, LongpollError):
            self.protocol.respond(conn, request, _error_response(msg))
            self._resume_after_store(conn)
            return
        if msg is not None or take.timeout <= 0 or self.waiters.stopping():
            self.respond(conn, request, msg)
            self._resume_after_store(conn)
            return
        try:
            self.waiters.admit(conn, request)
        except LongpollError as error:
            self.protocol.respond(conn, request, _error_response(error))
            self._resume_after_store(conn)
            return
        conn.group = take  # a parked /receive: its Take
        self.queue.append(conn)
        self.waiters.park(conn, request, State.PARKED, take.timeout)
        if self._watch is None:
            self._watch = self.hub.watch(
                take.channel, functools.partial(self.loop.call_soon, self.serve),
                since=head)

    def _resume_after_store(self, conn: Connection) -> None:
        """Go on with *conn*'s pipelined requests after an answer that came
        from a worker (when the answer came at once, the HTTP layer's own
        loop goes on; resuming here too would recurse)."""
        if self.hub.store.remote:
            self.protocol.resume(conn)

    def respond(self, conn: Connection, request: Request, msg: Message | None) -> None:
        """Answer a taker. A message whose answer is not all written yet is
        the connection's (``conn.handed``) until it is: if the connection
        dies first, the message goes back to the queue (``forget``)."""
        conn.handed = msg  # (cleared by the HTTP layer once the answer is all written)
        self.protocol.respond(conn, request, _taken(msg))

    def give_back(self, msg: Message) -> None:
        """*msg*'s taker never got it: back to the head of the queue."""
        def done(result: Any) -> None:
            if isinstance(result, LongpollError):
                logger.error("could not give message %s back to the queue: %s", msg.id,
                             result.message)
            else:
                logger.info("a /receive taker left before its answer: message %s went back "
                            "to the queue", msg.id)

        self._with_store(functools.partial(self.hub.give_back, msg), done)

    def _with_store(self, call: Callable[[], Any], then: Callable[[Any], None]) -> None:
        """Run *call*, which may ask the store, and hand its result (or its
        ``LongpollError``) to *then* on the loop. With a store across the
        network it runs on a worker: a hung Redis must cost the requests
        that need it a prompt 503, and everyone else nothing."""
        store = self.hub.store
        if store.remote:
            _on_worker(self.server.pool, self.loop, call, then, store)
        else:
            then(_result_of(call, store))

    def serve(self) -> None:
        """A publish reached the queue: take for the parked takers, one
        message at a time (asking the store off the loop, if it is remote)."""
        self._watch = None
        if self.queue and not self._taking:
            self._taking = True
            first = self.queue[0]
            self._with_store(functools.partial(self.hub.take, first.group.channel, timeout=0,
                                               lease=first.group.lease),
                             functools.partial(self._handed, first, self.hub.locate(None)))

    def _handed(self, first: Connection, head: Position,
                msg: "Message | LongpollError | None") -> None:
        self._taking = False
        if isinstance(msg, LongpollError):
            msg = None  # the store failed: the takers wait on (until their hold ends)
        if msg is not None and (not self.queue or self.queue[0] is not first):
            self.give_back(msg)  # taken for a taker that left meanwhile (and its lease)
            self.loop.call_soon(self.serve)
        elif (msg is not None or self.hub.closed) and self.queue:
            conn = self.queue[0]
            request = conn.request
            self.waiters.unpark(conn)
            self.respond(conn, request, msg)
            self.protocol.resume(conn)
            self.loop.call_soon(self.serve)  # the next message, for the next taker
        elif self.queue and self._watch is None:
            self._watch = self.hub.watch(
                self.queue[0].group.channel, functools.partial(self.loop.call_soon, self.serve),
                since=head)

    def retry(self) -> None:
        """While takers are parked: take again. A lease that ends puts its
        message back without a publish, and with a shared store a message
        given back on another server wakes no one here."""
        if self.queue and not self._taking:
            if self._watch is not None:
                self._watch()  # (serve sets a new one if it finds nothing)
                self._watch = None
            self.serve()

    def stop(self) -> None:
        """Part of ``Server.close``: answer the parked takers."""
        if self._watch is not None:
            self._watch()
            self._watch = None
        for conn in list(self.queue):
            self.waiters.expire(conn)


# ---------------------------------------------------------------------------
# The server: options, wiring, start and close, metrics
# ---------------------------------------------------------------------------

class Metrics:
    """What /metrics reports, each counted in one place."""

    def __init__(self) -> None:
        self._requests: collections.Counter[tuple[str, int]] = collections.Counter()
        #: Requests the server's loop answered, by (route, status): counted
        #: by the loop's thread alone, without the lock (``requests`` adds
        #: them to the rest, each status as a plain int).
        self.on_loop: collections.Counter[tuple[str, int]] = collections.Counter()
        #: Messages delivered to clients (one message to ten clients: ten).
        self.delivered = 0
        #: Requests refused with 429.
        self.rate_limited = 0
        self._lock = threading.Lock()  # workers answer some requests too

    def answered(self, route: str, status: int, count: int = 1) -> None:
        with self._lock:
            self._requests[route, int(status)] += count

    @property
    def requests(self) -> collections.Counter[tuple[str, int]]:
        """Requests answered, by (route, status)."""
        with self._lock:
            requests = collections.Counter(self._requests)
        for (route, status), count in dict(self.on_loop).items():  # (copied in one step:
            requests[route, int(status)] += count                # the loop may add)
        return requests

    def text(self, server: "Server") -> str:
        """The server's counters in Prometheus text format."""
        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
            lines.append(f"# HELP longpoll_{name} {help_text}")
            lines.append(f"# TYPE longpoll_{name} {kind}")
            lines.extend(f"longpoll_{name}{labels} {value}" for labels, value in samples)

        lines: list[str] = []
        loop = server.loop  # (None when mounted in another app: its server has the connections)
        metric("waiting_clients", "gauge", "Requests parked right now (polls and streams).",
               [("", server.waiting)])
        if loop is not None:
            metric("connections", "gauge", "Open client connections.",
                   [("", len(loop.connections))])
        metric("channels", "gauge", "Channels the hub holds.", [("", server.hub.channel_count)])
        metric("messages_published_total", "counter", "Messages published.",
               [("", server.hub.published)])
        metric("messages_delivered_total", "counter",
               "Messages delivered to clients, once per client.", [("", self.delivered)])
        requests = sorted(self.requests.items())
        metric("requests_total", "counter", "Requests answered, by route and status.",
               [(f'{{route="{route}",status="{status}"}}', count)
                for (route, status), count in requests])
        metric("rate_limited_total", "counter", "Requests refused with 429.",
               [("", self.rate_limited)])
        if loop is not None:
            metric("connections_refused_total", "counter",
                   "Connections refused: the client address held its maximum.",
                   [("", loop.per_address.refused)])
            metric("slow_clients_cut_total", "counter",
                   "Connections cut because the client left too much unread.",
                   [("", loop.cut)])
        metric("store_failures_total", "counter",
               "Times the store (sqlite, Redis) failed a request (answered 503).",
               [("", server.hub.store.failures)])
        metric("uptime_seconds", "gauge", "Seconds since the server started.",
               [("", round(time.monotonic() - server.started, 3))])
        return "\n".join(lines) + "\n"


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


class _Service:
    """What every way of serving the protocol shares: the settings of
    ``OPTIONS`` (each an attribute of the same name), the hub, auth, CORS,
    rate limits, counters, and the ``Handler`` that routes, checks and
    answers each request. ``Server`` carries the outcomes out on its own
    loop; ``ASGIApp`` and ``WSGIApp`` on the server of the app they are
    mounted in."""

    #: Bodies larger than this are decoded by a worker, not the loop.
    inline_body_limit = 64 * 1024
    #: The loop that owns the connections (None: the host server's own).
    loop: Any = None

    def __init__(self, hub: Hub | None, *, auth: Auth | None, cors_origins: Iterable[str],
                 trust_proxy: bool, ntfy: bool, handler_class: type[Handler],
                 options: dict[str, Any]) -> None:
        for name, value in _settings("server", options).items():
            setattr(self, name, value)
        #: The hub holding this server's channels.
        self.hub = hub if hub is not None else Hub()
        #: Origins whose pages may call this server from a browser ("*": any).
        self.cors_origins = frozenset(cors_origins)
        #: Read the client's address from X-Forwarded-For (set by your proxy).
        self.trust_proxy = trust_proxy
        #: Speak ntfy's API too (its paths: /<topic>, /<topic>/json, ...).
        self.ntfy = ntfy
        self._auth = auth
        #: Token buckets per client (None: no limit); loopback is exempt.
        self.publish_limit = (RateLimit(self.publish_rate, self.publish_burst)
                              if self.publish_rate else None)
        self.request_limit = (RateLimit(self.request_rate, self.request_burst)
                              if self.request_rate else None)
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.closing = False
        self.handler = handler_class(self)

    @property
    def auth(self) -> Auth | None:
        """Who may read and write which channels (None: everyone, everything)."""
        return self._auth

    @auth.setter
    def auth(self, auth: Auth | None) -> None:
        self._auth = auth

    @property
    def requests(self) -> collections.Counter[tuple[str, int]]:
        """Requests answered, by (route, status)."""
        return self.metrics.requests

    @property
    def delivered(self) -> int:
        return self.metrics.delivered

    @property
    def rate_limited(self) -> int:
        return self.metrics.rate_limited

    def metrics_text(self) -> str:
        """The counters in Prometheus text format."""
        return self.metrics.text(self)


class Server(_Service):
    """A longpoll HTTP server around a ``Hub`` (``self.hub``).

    Wires four parts, each of which knows only its neighbours: the ``Loop``
    (sockets, timers, TLS, bounded buffers), the ``HTTPProtocol`` (one
    ``RequestReader`` per connection, answers in order), the ``Handler``
    (routes: each request to an outcome) and the ``Waiters`` (parked polls,
    streams and takers, woken by the hub). One thread runs the loop: a
    waiting client costs a socket and a small record, not a thread;
    publishes with large bodies or through a networked store run on a small
    worker pool. ``start()`` runs the loop in a daemon thread;
    ``serve_forever()`` in the calling one; ``close()`` answers every
    waiting client, closes every connection and frees the port.

    Settings are the keyword arguments of ``OPTIONS`` (the same table the
    command line is made from), each an attribute of the same name.
    Methods that may be overridden: ``service_actions`` (housekeeping, about
    once a second on the loop); *handler_class* adds routes.
    """

    #: Largest request head (request line and headers) in bytes; more is 431.
    max_head = MAX_HEAD

    def __init__(self, address: tuple[str, int] = (DEFAULT_HOST, DEFAULT_PORT),
                 hub: Hub | None = None, *, auth: Auth | None = None, ssl_context: Any = None,
                 cors_origins: Iterable[str] = (), trust_proxy: bool = False,
                 ntfy: bool = True, handler_class: type[Handler] = Handler,
                 **options: Any) -> None:
        super().__init__(hub, auth=auth, cors_origins=cors_origins, trust_proxy=trust_proxy,
                         ntfy=ntfy, handler_class=handler_class, options=options)
        self._next_prune = 0.0
        self._pruning: concurrent.futures.Future | None = None
        self._ticking: concurrent.futures.Future | None = None
        self.protocol = HTTPProtocol(self)
        # Behind a trusted proxy every client shares the proxy's address:
        # there, connections are not capped per address.
        self.loop = Loop(address, self.protocol, ssl_context=ssl_context,
                         read_timeout=self.read_timeout, linger_time=self.linger_time,
                         max_queued=self.max_queued, max_input=self.max_head + self.max_body,
                         max_connections_per_client=(0 if trust_proxy
                                                     else self.max_connections_per_client),
                         housekeeping=self.service_actions)
        self.waiters = Waiters(self, self.protocol, self.loop)
        self.protocol.loop, self.protocol.waiters = self.loop, self.waiters
        self.loop.after_io, self.loop.wake_at = self.waiters.fan_out, self.waiters.wake_at
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers, "longpoll-worker")
        self.hub.store.attach(self.loop, self.pool)  # (a store across the network: see later)
        self._thread: threading.Thread | None = None

    # -- public surface -----------------------------------------------------------------

    @property
    def server_address(self) -> tuple:
        return self.loop.server_address

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
        return self.waiters.parked

    @property
    def auth(self) -> Auth | None:
        """Who may read and write which channels (None: everyone, everything).
        Setting it (e.g. on SIGHUP) also ends the event streams the new
        rules no longer allow."""
        return self._auth

    @auth.setter
    def auth(self, auth: Auth | None) -> None:
        self._auth = auth
        if self.loop.running:
            self.loop.call_soon(functools.partial(self.waiters.reauthorize, auth))

    @property
    def ssl_context(self) -> Any:
        """The ``ssl.SSLContext`` new connections are served with (None: plain HTTP)."""
        return self.loop.ssl_context

    @ssl_context.setter
    def ssl_context(self, context: Any) -> None:
        self.loop.ssl_context = context

    @property
    def _connections(self) -> set[Connection]:
        return self.loop.connections

    @property
    def _parked_by(self) -> collections.Counter[str]:
        return self.waiters.parked_by

    def start(self) -> "Server":
        """Serve from a daemon thread; return self (so ``make_server().start()``)."""
        self._thread = threading.Thread(target=self.serve_forever,
                                        name="longpoll-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, poll_interval: float = 1.0) -> None:
        """Run the loop in this thread until ``shutdown()`` or ``close()``."""
        self.loop.serve_forever(poll_interval)

    def shutdown(self) -> None:
        """Stop the loop and wait for it (connections stay open: ``close()``)."""
        self.loop.shutdown()

    def server_close(self) -> None:
        """Close the listening socket and every connection, at once."""
        self.waiters.stop()
        self.loop.server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def close(self, timeout: float = 2.0) -> None:
        """Stop: answer every parked request (with ``Connection: close``),
        close idle connections, release the port. Returns within about
        *timeout* seconds. Closes the hub, which wakes its other waiters."""
        deadline = time.monotonic() + timeout
        self.closing = True
        self.hub.close()  # parked polls: their answers are queued to the loop
        if self.loop.running:
            self.loop.emptied = threading.Event()
            self.loop.call_soon(self._close_idle)
            self.loop.emptied.wait(max(0.0, deadline - time.monotonic()))
            self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _close_idle(self) -> None:
        """Part of close(): stop accepting; close the connections with
        nothing under way (the others close once their answer is out)."""
        self.loop.stop_accepting()
        self.waiters.stop()
        for conn in list(self.loop.connections):
            if conn.state in (State.IDLE, State.READING, State.HANDSHAKE, State.LINGERING):
                self.loop.close(conn)
            elif conn.state is State.SENDING:
                conn.state = State.CLOSING

    def service_actions(self) -> None:
        """Housekeeping, about once a second, on the loop."""
        now = time.monotonic()
        self.waiters.tick()
        if self.hub.store.loop is self.loop:
            self.hub.store.tick()
        if not self.hub.store.remote:  # scheduled messages that are due: published now
            self.hub.tick()
        elif self._ticking is None or self._ticking.done():  # (off the loop: it asks Redis)
            self._ticking = self.pool.submit(self.hub.tick)
        if now >= self._next_prune:
            self._next_prune = now + 10.0
            if not self.hub.store.remote:
                self.hub.prune()
            elif self._pruning is None or self._pruning.done():  # off the loop: it asks Redis
                self._pruning = self.pool.submit(self.hub.prune)
            for limiter in (self.publish_limit, self.request_limit):
                if limiter is not None:
                    limiter.prune()


def make_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                hub: Hub | None = None, *, certfile: str | None = None,
                keyfile: str | None = None, **options: Any) -> Server:
    """Bind a ``Server`` (port 0 picks a free port: read ``server.url``).

    With *certfile* (a PEM certificate chain, and the key in it or in
    *keyfile*) it serves HTTPS. The hub's options (``retention``,
    ``max_age``, ``max_channels``, ``store``) make a new ``Hub`` when none is
    given; the others go to ``Server`` (see ``OPTIONS``).
    """
    hub = _hub_of(hub, options)
    if certfile:
        options["ssl_context"] = _tls_context(certfile, keyfile)
    return Server((host, port), hub, **options)


def _hub_of(hub: Hub | None, options: dict[str, Any]) -> Hub | None:
    """*hub*, or a new one made of the hub's options in *options* (taken out)."""
    hub_options = {name: options.pop(name) for name in list(options)
                   if _OPTION_PARTS.get(name) == "hub"}
    if not hub_options:
        return hub
    if hub is not None:
        raise TypeError(f"give {', '.join(hub_options)} to the Hub, or give no hub")
    return Hub(**_settings("hub", hub_options))


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
# Mounted in another app: ASGI (FastAPI, Starlette, Django) and WSGI (Flask)
# ---------------------------------------------------------------------------

class _Mounted(_Service):
    """What the ASGI and WSGI apps share: a server's settings, checks and
    counters, without its loop. The ``Handler`` routes, checks and answers
    each request exactly as for ``serve``; the app carries its outcome out
    on the server of the app it is mounted in."""

    def __init__(self, hub: Hub | None = None, *, auth: Auth | None = None,
                 cors_origins: Iterable[str] = (), trust_proxy: bool = False,
                 ntfy: bool = True, handler_class: type[Handler] = Handler,
                 **options: Any) -> None:
        made = _hub_of(hub, options)
        #: Whether the app made its hub (then ``close`` closes it too).
        self.owns_hub = made is None or made is not hub
        super().__init__(made, auth=auth, cors_origins=cors_origins, trust_proxy=trust_proxy,
                         ntfy=ntfy, handler_class=handler_class, options=options)
        #: Requests waiting now (polls, streams, takers), in all and per client.
        self.waiting = 0
        self.parked_by: collections.Counter[str] = collections.Counter()
        self._counting = threading.Lock()  # (a WSGI server's threads count at once)
        self.hub.start_ticking()  # (no loop of ours to publish scheduled messages)

    def _request(self, method: str, path: str, query: str, version: str,
                 headers: dict[str, str], client: str) -> Request:
        target = urllib.parse.quote(path, safe="/,:@!$&'()*+;=~") + ("?" + query if query else "")
        request = Request(method, target, version, headers)
        request.client = client
        return request

    def _decide(self, request: Request, body: bytes | None) -> Response | None:
        """Route and check *request* (its *body* read, None if too large); an
        error answer if it may not go on."""
        try:
            if body is None:
                raise LongpollError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                    f"body too large: the limit is {self.max_body} bytes")
            request.body = body
            self.handler.decide(request)
        except LongpollError as error:
            return _error_response(error)
        return None

    def _admit(self, request: Request) -> None:
        """Count a request that will wait (503 if there is no room for it)."""
        with self._counting:
            _check_room(self, self.waiting, self.parked_by, request.key)
            self.waiting += 1
            if request.key is not None:
                self.parked_by[request.key] += 1

    def _leave(self, request: Request) -> None:
        with self._counting:
            self.waiting -= 1
            if request.key is not None:
                self.parked_by[request.key] -= 1
                if not self.parked_by[request.key]:
                    del self.parked_by[request.key]

    def _headers(self, request: Request, response: Response) -> list[tuple[str, str]]:
        """An answer's headers: its type and length, the route's own, CORS."""
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body)))]
        if not any(name == "Cache-Control" for name, _ in response.headers):
            headers.append(("Cache-Control", "no-store"))
        return headers + list(response.headers) + list(request.cors)

    def _stream_headers(self, request: Request, form: Form) -> list[tuple[str, str]]:
        return [("Content-Type", form.content_type or ""), ("Cache-Control", "no-store"),
                ("X-Accel-Buffering", "no"), *request.cors]

    def _next(self, names: tuple[str, ...], position: Position,
              form: Form) -> tuple[bytes, Position]:
        """A stream's next write in *form* (empty if nothing came after
        *position*), and the position after it."""
        batch = self.hub.read_checked(names, position, MAX_LIMIT, self.max_answer)
        if not (batch.messages or batch.gap):
            return b"", position
        self.metrics.delivered += len(batch.messages)
        return form.encode(batch), self.hub.locate(batch.cursor)

    def _redirect(self, root: str, query: str) -> Response:
        """The app's own root asked without its slash: the page's links are
        relative to it, so go there."""
        return Response(HTTPStatus.PERMANENT_REDIRECT, b"", "text/plain", (
            ("Location", root + "/" + ("?" + query if query else "")),))


def _ws_texts(data: bytes) -> list[str]:
    """The text payloads of whole server frames (as ``_ws_frame`` writes
    them), for a host that does its own framing (ASGI)."""
    texts, pos = [], 0
    while pos < len(data):
        opcode, size = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if size >= 126:
            width = 2 if size == 126 else 8
            size, pos = int.from_bytes(data[pos:pos + width], "big"), pos + width
        if opcode == 0x1:
            texts.append(data[pos:pos + size].decode())
        pos += size
    return texts


class _Watch:
    """The requests of an ASGI app waiting at one (channels, position): one
    watch on the hub for them all; a publish resolves every one's future,
    and the first to read after it keeps its answer for the others."""

    __slots__ = ("key", "waiters", "cancel", "fired", "answers")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.waiters: set["asyncio.Future"] = set()
        self.cancel: Callable[[], None] = lambda: None
        self.fired = False
        self.answers: dict[int, tuple[Batch, bytes]] = {}  # by limit, once fired


def _resolve(future: "asyncio.Future", *_: Any) -> None:
    if not future.done():
        future.set_result(None)


class ASGIApp(_Mounted):
    """longpoll's protocol as an ASGI 3 application, for FastAPI, Starlette,
    Django and any ASGI server (uvicorn, hypercorn, daphne): every route
    of docs/protocol.md (the WebSocket ones on ASGI's websocket scope),
    with ``serve``'s settings, auth, limits and CORS, checked and answered
    by the same ``Handler``. A waiting request is held on the host's event
    loop as a task, never on a thread. ``hub.publish()`` from anywhere (a
    sync or async route of the host app, another thread) wakes it.

    Mount it under a prefix as the framework does (``root_path``), e.g.
    ``app.mount("/push", longpoll.asgi_app(hub))``. ``close()`` (or the
    lifespan's shutdown, where the host passes it on) answers every
    waiting request and ends every stream. A store across the network
    (Redis) is asked from the default executor, never on the event loop.
    """

    def __init__(self, hub: Hub | None = None, **options: Any) -> None:
        super().__init__(hub, **options)
        self._watches: dict[tuple, _Watch] = {}
        self._loop: "asyncio.AbstractEventLoop | None" = None

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any],
                       send: Callable[[dict[str, Any]], Any]) -> None:
        import asyncio  # (here: the module imports it only where an ASGI server runs it)
        self._loop = asyncio.get_running_loop()
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    def close(self) -> None:
        """Answer every waiting request as at the end of its hold, end every
        stream and WebSocket (1001), and answer the next ones at once; a
        hub the app made is closed too. Safe from any thread."""
        self.closing = True
        if self._loop is not None:
            for watch in list(self._watches.values()):
                self._loop.call_soon_threadsafe(self._fire, watch)
        if self.owns_hub:
            self.hub.close()

    # -- requests ---------------------------------------------------------------------

    def _request_of(self, scope: dict[str, Any], method: str,
                    defaults: tuple[tuple[str, str], ...] = ()) -> Request | str:
        """The ``Request`` of an ASGI scope, or the app's root (a string)
        when it was asked without its slash."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = headers[name] + ", " + value if name in headers else value
        for name, value in defaults:
            headers.setdefault(name, value)
        path, root = scope.get("path") or "/", scope.get("root_path", "")
        if root and path.startswith(root):  # (a mount leaves the whole path there)
            path = path[len(root):]
            if not path:
                return root
        version = "HTTP/1.1" if defaults else f"HTTP/{scope.get('http_version', '1.1')}"
        client = scope.get("client")
        return self._request(method, path, scope.get("query_string", b"").decode("latin-1"),
                             version, headers, client[0] if client else "")

    async def _http(self, scope: dict[str, Any], receive: Callable[[], Any],
                    send: Callable[[dict[str, Any]], Any]) -> None:
        request = self._request_of(scope, scope["method"])
        if isinstance(request, str):
            query = scope.get("query_string", b"").decode("latin-1")
            bare = self._request(scope["method"], "/", "", "HTTP/1.1", {}, "")
            await self._respond(send, bare, self._redirect(request, query))
            return
        body, size = bytearray(), 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size <= self.max_body:
                body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        refused = self._decide(request, bytes(body) if size <= self.max_body else None)
        if refused is not None:
            await self._respond(send, request, refused)
            return
        handler = self.handler
        if handler.where(request):  # a large body, or a store across the network
            outcome = await self._loop.run_in_executor(None, handler.handle, request)
        else:
            outcome = handler.handle(request)
        try:
            if isinstance(outcome, Response):
                await self._respond(send, request, outcome)
            elif isinstance(outcome, Poll):
                await self._poll(request, outcome, receive, send)
            elif isinstance(outcome, Stream):
                await self._stream(request, outcome, receive, send)
            else:
                await self._take(request, outcome, receive, send)
        except LongpollError as error:  # no room to wait (503), or the store failed
            await self._respond(send, request, _error_response(error))

    async def _respond(self, send: Callable[[dict[str, Any]], Any], request: Request,
                       response: Response) -> None:
        response = _shaped(request, response)
        status = response.status
        await send({"type": "http.response.start", "status": int(status), "headers": [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in self._headers(request, response)]})
        empty = request.method == "HEAD" or status == HTTPStatus.NOT_MODIFIED
        await send({"type": "http.response.body", "body": b"" if empty else response.body})
        _log_answer(self.metrics, request, status, len(response.body))

    # -- waiting ----------------------------------------------------------------------

    async def _changed(self, names: tuple[str, ...], position: Position,
                       timeout: float | None, gone: "asyncio.Future") -> _Watch | None:
        """Wait for a publish to *names* after *position* (its watch), or
        until *timeout* passes or the client goes (*gone*) (None). Closing
        the app counts as a publish."""
        key = (names, position)
        watch = self._watches.get(key)
        if watch is None or watch.fired:
            watch = _Watch(key)
            self._watches[key] = watch
            watch.cancel = self.hub.watch(names, functools.partial(  # (may refuse: 503)
                self._loop.call_soon_threadsafe, self._fire, watch), since=position)
        mine = self._loop.create_future()
        watch.waiters.add(mine)
        timer = None if timeout is None else self._loop.call_later(timeout, _resolve, mine)
        done = functools.partial(_resolve, mine)
        gone.add_done_callback(done)
        try:
            await mine
            return watch if watch.fired else None
        finally:
            if timer is not None:
                timer.cancel()
            gone.remove_done_callback(done)
            watch.waiters.discard(mine)
            if not watch.waiters and not watch.fired:  # nobody waits there now
                if self._watches.get(key) is watch:
                    del self._watches[key]
                watch.cancel()

    def _fire(self, watch: _Watch) -> None:
        """On the loop: a publish reached *watch*'s channels (or the app closes)."""
        watch.fired = True
        if self._watches.get(watch.key) is watch:
            del self._watches[watch.key]
        for future in watch.waiters:
            _resolve(future)

    def _read(self, watch: _Watch | None, names: tuple[str, ...], position: Position,
              limit: int) -> tuple[Batch, bytes]:
        """What *names* hold after *position*, and its encoding: read once
        for all the requests a publish woke at one *watch*."""
        answer = watch.answers.get(limit) if watch is not None else None
        if answer is None:
            batch = self.hub.read_checked(names, position, limit, self.max_answer)
            answer = (batch, batch.to_json())
            if watch is not None and (batch.messages or batch.gap):
                watch.answers[limit] = answer
        return answer

    @staticmethod
    def _gone(receive: Callable[[], Any]) -> "asyncio.Future":
        """Done when the client disconnects (what else it sends is dropped)."""
        import asyncio
        async def listen() -> None:
            while (await receive())["type"] not in ("http.disconnect", "websocket.disconnect"):
                pass
        return asyncio.ensure_future(listen())

    async def _store(self, call: Callable[[], Any]) -> Any:
        """*call*, which may ask the store: off the loop if it is remote."""
        if self.hub.store.remote:
            return await self._loop.run_in_executor(None, call)
        return call()

    async def _poll(self, request: Request, poll: Poll, receive: Callable[[], Any],
                    send: Callable[[dict[str, Any]], Any]) -> None:
        names, position, timeout, limit = poll
        hub = self.hub
        if hub.ahead(position):  # wait for the feed, then settle (Hub.settle)
            timeout = max(timeout, hub.store.lag)
        batch, body = self._read(None, names, position, limit)
        if not (batch.messages or batch.gap or timeout <= 0 or self.closing):
            self._admit(request)
            gone, deadline = self._gone(receive), time.monotonic() + timeout
            try:
                while True:
                    woken = await self._changed(names, position, deadline - time.monotonic(),
                                                gone)
                    if gone.done():
                        return
                    if woken is None:
                        position = hub.settle(position)
                    batch, body = self._read(woken, names, position, limit)
                    if batch.messages or batch.gap or woken is None or self.closing:
                        break
            finally:
                gone.cancel()
                self._leave(request)
        self.metrics.delivered += len(batch.messages)
        await self._respond(send, request, Response(HTTPStatus.OK, body))

    async def _take(self, request: Request, take: Take, receive: Callable[[], Any],
                    send: Callable[[dict[str, Any]], Any]) -> None:
        hub, (channel, timeout, lease) = self.hub, take
        attempt = functools.partial(hub.take, channel, timeout=0, lease=lease)
        head = hub.locate(None)
        msg = await self._store(attempt)
        if msg is None and timeout > 0 and not self.closing:
            self._admit(request)
            gone, deadline = self._gone(receive), time.monotonic() + timeout
            try:
                while msg is None and not self.closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    # (a lease that ends gives a message back with no publish: look each second)
                    await self._changed((channel,), head, min(remaining, 1.0), gone)
                    if gone.done():
                        return
                    head = hub.locate(None)
                    msg = await self._store(attempt)
            finally:
                gone.cancel()
                self._leave(request)
        try:
            await self._respond(send, request, _taken(msg))
        except BaseException:
            if msg is not None:  # its taker never got it: back to the queue
                await self._store(functools.partial(hub.give_back, msg))
            raise

    async def _stream(self, request: Request, stream: Stream, receive: Callable[[], Any],
                      send: Callable[[dict[str, Any]], Any]) -> None:
        """An event stream (ours, or one of ntfy's): what is there after its
        position, then every message as it comes, with keepalives."""
        names, position, form, _ = stream
        self._admit(request)
        gone = self._gone(receive)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in self._stream_headers(request, form)]})
            _log_answer(self.metrics, request, 200, 0)
            more = {"type": "http.response.body", "more_body": True}
            await send({**more, "body": form.opening})
            try:
                async for data in self._batches(names, position, form, gone):
                    await send({**more, "body": data})
            except LongpollError as error:  # (no room for its channels: it resumes later)
                logger.warning("ended a stream of %s: %s", request.client, error.message)
            if not gone.done():
                await send({"type": "http.response.body", "body": b""})
        finally:
            gone.cancel()
            self._leave(request)

    async def _batches(self, names: tuple[str, ...], position: Position, form: Form,
                       gone: "asyncio.Future") -> Any:
        """A stream's writes in *form*: batches as they come, a keepalive
        after each quiet ``keepalive`` seconds; until the client goes or
        the app closes."""
        while not self.closing:
            data, position = self._next(names, position, form)
            if data:
                yield data
                continue
            woken = await self._changed(names, position, self.keepalive, gone)
            if gone.done():
                return
            if woken is None:
                position = self.hub.settle(position)
                yield form.keepalive()

    async def _websocket(self, scope: dict[str, Any], receive: Callable[[], Any],
                         send: Callable[[dict[str, Any]], Any]) -> None:
        """A WebSocket (the host did the handshake): the same checks and
        frames as ``serve``'s, each frame a text message."""
        if (await receive())["type"] != "websocket.connect":
            return
        request = self._request_of(scope, "GET", (  # (what the host's handshake checked)
            ("upgrade", "websocket"), ("connection", "upgrade"),
            ("sec-websocket-version", "13"), ("sec-websocket-key", "AAAAAAAAAAAAAAAAAAAAAA==")))
        if isinstance(request, str):
            request = self._request("GET", "/", "", "HTTP/1.1", {}, "")
        outcome = self._decide(request, b"") or self.handler.handle(request)
        if isinstance(outcome, Stream) and outcome.websocket is not None:
            try:
                self._admit(request)
            except LongpollError as error:
                outcome = _error_response(error)
        if not isinstance(outcome, Stream):
            if outcome.status < 400:
                outcome = _error_response(LongpollError(
                    HTTPStatus.NOT_FOUND, f"no WebSocket at {_printable(request.path[:200])}"))
            await self._refuse_socket(scope, send, request, _shaped(request, outcome))
            return
        names, position, form, _ = outcome
        await send({"type": "websocket.accept"})
        _log_answer(self.metrics, request, 101, 0)
        gone = self._gone(receive)
        try:
            for text in _ws_texts(form.opening):
                await send({"type": "websocket.send", "text": text})
            code = 1001  # (going away: the app closes)
            try:
                async for data in self._batches(names, position, form, gone):
                    for text in _ws_texts(data):  # (a keepalive is a ping: the host pings)
                        await send({"type": "websocket.send", "text": text})
            except LongpollError as error:  # (no room for its channels: try again later)
                logger.warning("ended a WebSocket of %s: %s", request.client, error.message)
                code = 1013
            if not gone.done():
                await send({"type": "websocket.close", "code": code})
        finally:
            gone.cancel()
            self._leave(request)

    async def _refuse_socket(self, scope: dict[str, Any], send: Callable[[dict[str, Any]], Any],
                             request: Request, response: Response) -> None:
        """Refuse a WebSocket with its HTTP answer where the host can send
        one (ASGI's websocket.http.response), else with a close (403)."""
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": int(response.status),
                        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1"))
                                    for name, value in self._headers(request, response)]})
            await send({"type": "websocket.http.response.body", "body": response.body})
        else:
            await send({"type": "websocket.close", "code": 1008})
        _log_answer(self.metrics, request, response.status, len(response.body))


class WSGIApp(_Mounted):
    """longpoll's protocol as a WSGI application, for Flask, Django and any
    WSGI server: publish, reads, long-polls, event streams, ``/send`` and
    ``/receive``, ``/health``, ``/metrics``, the page and ``/longpoll.js``,
    with ``serve``'s settings and checks (the same ``Handler``).
    WebSockets need an ASGI server (``501``).

    WSGI gives each request a thread (or greenlet) until it is answered: a
    long-poll holds one for its hold, an event stream for its whole life.
    Fine for a few dozen waiting clients under a threaded server; for
    more, mount ``ASGIApp``, or run ``serve`` beside the app. Mount it
    under a prefix as WSGI does (``SCRIPT_NAME``; Werkzeug's
    ``DispatcherMiddleware``)."""

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = self._request_of(environ)
        if isinstance(request, str):
            return self._answer(start_response, self._request("GET", "/", "", "HTTP/1.1", {}, ""),
                                self._redirect(request, environ.get("QUERY_STRING", "")))
        refused = self._decide(request, self._body(environ))
        if refused is None and request.route in ("ws", "ntfy_ws"):
            refused = _error_response(LongpollError(
                HTTPStatus.NOT_IMPLEMENTED, "WebSockets need an ASGI server: mount "
                "longpoll.asgi_app, or run longpoll serve"))
        if refused is not None:
            return self._answer(start_response, request, refused)
        outcome = self.handler.handle(request)
        try:
            if isinstance(outcome, Poll):
                outcome = self._poll(request, outcome)
            elif isinstance(outcome, Take):
                outcome = self._take(request, outcome)
            elif isinstance(outcome, Stream):
                return self._stream(start_response, request, outcome)
        except LongpollError as error:
            outcome = _error_response(error)
        return self._answer(start_response, request, outcome)

    def close(self) -> None:
        """Answer the next requests at once; close a hub the app made (which
        wakes its waiting requests)."""
        self.closing = True
        if self.owns_hub:
            self.hub.close()

    def _request_of(self, environ: dict[str, Any]) -> Request | str:
        headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
                   if key.startswith("HTTP_")}
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").lower()] = environ[key]
        path = environ.get("PATH_INFO", "")
        if not path:
            return environ.get("SCRIPT_NAME", "")  # the app's root without its slash
        version = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        return self._request(environ.get("REQUEST_METHOD", "GET"), path,
                             environ.get("QUERY_STRING", ""),
                             version if version in ("HTTP/1.0", "HTTP/1.1") else "HTTP/1.1",
                             headers, environ.get("REMOTE_ADDR", ""))

    def _body(self, environ: dict[str, Any]) -> bytes | None:
        """The body, or None past ``max_body``."""
        stream = environ.get("wsgi.input")
        length = environ.get("CONTENT_LENGTH") or ""
        if stream is None or not (length.isdigit() or environ.get("wsgi.input_terminated")):
            return b""
        body = stream.read(min(int(length), self.max_body + 1) if length.isdigit()
                           else self.max_body + 1)
        return body if len(body) <= self.max_body else None

    def _answer(self, start_response: Callable[..., Any], request: Request,
                response: Response) -> list[bytes]:
        response = _shaped(request, response)
        status = HTTPStatus(response.status)
        start_response(f"{status.value} {status.phrase}", self._headers(request, response))
        _log_answer(self.metrics, request, status, len(response.body))
        empty = request.method == "HEAD" or status == HTTPStatus.NOT_MODIFIED
        return [b"" if empty else response.body]

    def _poll(self, request: Request, poll: Poll) -> Response:
        """A long-poll, held on this thread until a message or its timeout."""
        names, position, timeout, limit = poll
        hub = self.hub
        if hub.ahead(position):
            timeout = max(timeout, hub.store.lag)

        def attempt() -> tuple[bool, Batch]:
            batch = hub.read_checked(names, position, limit, self.max_answer)
            return bool(batch.messages or batch.gap or self.closing), batch

        done, batch = attempt()
        if not done and timeout > 0:
            self._admit(request)
            try:
                batch = hub._block(names, attempt, timeout)
            finally:
                self._leave(request)
            if not (batch.messages or batch.gap):
                batch = hub.read_checked(names, hub.settle(position), limit, self.max_answer)
        self.metrics.delivered += len(batch.messages)
        return Response(HTTPStatus.OK, batch.to_json())

    def _take(self, request: Request, take: Take) -> Response:
        channel, timeout, lease = take
        if timeout <= 0 or self.closing:
            return _taken(self.hub.take(channel, 0, lease=lease))
        self._admit(request)
        try:
            return _taken(self.hub.take(channel, timeout, lease=lease))
        finally:
            self._leave(request)

    def _stream(self, start_response: Callable[..., Any], request: Request,
                stream: Stream) -> Iterable[bytes]:
        """An event stream: this thread writes it until the client goes."""
        names, position, form, _ = stream
        try:
            self._admit(request)
        except LongpollError as error:
            return self._answer(start_response, request, _error_response(error))
        start_response("200 OK", self._stream_headers(request, form))
        _log_answer(self.metrics, request, 200, 0)
        return self._events(request, names, position, form)

    def _events(self, request: Request, names: tuple[str, ...], position: Position,
                form: Form) -> Iterable[bytes]:
        hub = self.hub
        try:
            yield form.opening
            while not self.closing:
                data, position = self._next(names, position, form)
                if data:
                    yield data
                    continue
                woken = threading.Event()
                cancel = hub.watch(names, woken.set, since=position)
                try:
                    if not woken.wait(self.keepalive):
                        position = hub.settle(position)
                        yield form.keepalive()
                finally:
                    cancel()
        finally:  # (the client went: the server closes this generator)
            self._leave(request)


def asgi_app(hub: Hub | None = None, **options: Any) -> ASGIApp:
    """longpoll as an ASGI application over *hub* (a new one if not given:
    its options, such as ``store`` and ``retention``, may be given here),
    with ``serve``'s options (``OPTIONS``; ``auth=Auth(...)``,
    ``cors_origins``, ``trust_proxy``, ``ntfy``). See ``ASGIApp`` and
    docs/embedding.md."""
    return ASGIApp(hub, **options)


def wsgi_app(hub: Hub | None = None, **options: Any) -> WSGIApp:
    """longpoll as a WSGI application; as ``asgi_app``. See ``WSGIApp``."""
    return WSGIApp(hub, **options)


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


class _ClientSocket:
    """The client's end of a WebSocket: reads the server's handshake answer,
    then its frames as JSON events; answers pings; its own frames masked
    (RFC 6455 5.3). Errors are ``LongpollError`` (status None: retry)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self, size: int) -> None:
        while len(self.buffer) < size:
            try:
                data = self.sock.recv(65536)
            except OSError as exc:  # (a timeout too: nothing, not even a ping, came)
                raise LongpollError(None, f"the WebSocket failed: {exc}") from None
            if not data:
                raise LongpollError(None, "the server closed the WebSocket")
            self.buffer += data

    def handshake(self) -> tuple[int, dict[str, str], bytes]:
        """The answer to the upgrade: (status, headers, body if not 101)."""
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > MAX_HEAD:
                raise ValueError("the answer's head is too large")
            self._fill(len(self.buffer) + 1)
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer[:] = rest
        lines = head.decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
        status = int(status_line[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        if status != 101:
            length = min(int(headers.get("content-length", "0") or 0), 1 << 20)
            self._fill(length)
            body = bytes(self.buffer[:length])
        return status, headers, body

    def events(self) -> Iterator[dict[str, Any]]:
        """The server's text messages, decoded, until it closes."""
        parts: list[bytes] = []
        while True:
            self._fill(2)
            first, size = self.buffer[0], self.buffer[1] & 0x7F
            start = 2
            if size == 126:
                self._fill(4)
                size, start = struct.unpack_from("!H", self.buffer, 2)[0], 4
            elif size == 127:
                self._fill(10)
                size, start = struct.unpack_from("!Q", self.buffer, 2)[0], 10
            if size > 64 << 20:
                raise LongpollError(None, "a WebSocket frame over 64 MiB")
            self._fill(start + size)
            payload = bytes(self.buffer[start:start + size])
            del self.buffer[:start + size]
            opcode = first & 0x0F
            if opcode == 0x9:
                self.send(0xA, payload)
            elif opcode == 0x8:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
                reason = payload[2:].decode(errors="replace")
                self.send(0x8, payload[:2])
                if code == 1008:  # (no longer allowed: as a 403 would)
                    raise LongpollError(HTTPStatus.FORBIDDEN, reason or "policy violation")
                raise LongpollError(None, f"the server closed the WebSocket: {code} {reason}")
            elif opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if first & 0x80:
                    text, parts = b"".join(parts), []
                    try:
                        yield json.loads(text)
                    except ValueError:
                        raise LongpollError(None, "a WebSocket message that is not "
                                                  "JSON") from None

    def send(self, opcode: int, payload: bytes) -> None:
        mask = secrets.token_bytes(4)
        size = len(payload)
        head = (bytes((0x80 | opcode, 0x80 | size)) if size < 126
                else struct.pack("!BBH", 0x80 | opcode, 0xFE, size))
        try:
            self.sock.sendall(head + mask + _unmask(payload, mask))
        except OSError:
            pass  # (it is going anyway)

    def close(self) -> None:
        try:
            self.sock.close()
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
                priority: int | None = None, **extra: Any) -> dict[str, Any]:
        """Publish *message* (any JSON value); return ``{"id", "channel", "time"}``.
        *extra*: the message's other fields (``tags``, ``click``, ``icon``,
        ``actions``, ``markdown``: see ``EXTRA_FIELDS``), and ``ttl``
        (seconds, or a duration such as ``"10m"``: see ``Hub.publish``).

        Each publish carries an ``Idempotency-Key`` of its own, the same on
        every retry, so a retry after a lost answer (a cut connection, a
        timeout, 502/503/504, 429) is stored once: the server answers it
        with the first publish's id.
        """
        check_channel(channel)
        body = {"message": message}
        if title is not None:
            body["title"] = title
        if priority is not None:
            body["priority"] = priority
        unknown = set(extra) - set(_PUBLISH_FIELDS)
        if unknown:
            raise TypeError(f"unknown message fields: {', '.join(sorted(unknown))}")
        body.update((name, value) for name, value in extra.items() if value is not None)
        return self._call("POST", f"/channels/{channel}", _json_body(body),
                          self._socket_timeout(0), safe=False,
                          headers={"Idempotency-Key": secrets.token_hex(16)})

    def poll(self, channels: str | Iterable[str], since: str | None = None, *,
             timeout: float | None = None, limit: int | None = None) -> dict[str, Any]:
        """One long-poll: ``{"messages": [...], "cursor": ..., "gap"?: true}``."""
        hold = self.timeout if timeout is None else timeout
        return self._call("GET", self._poll_path(channels, since, hold, limit),
                          None, self._socket_timeout(hold))

    def subscribe(self, channels: str | Iterable[str], since: str | None = None, *,
                  timeout: float | None = None,
                  on_connection: Callable[[bool, LongpollError | None], None] | None = None,
                  transport: str = "poll") -> "Subscription":
        """An endless iterator of messages (dicts); see ``Subscription``.
        *transport* ``"ws"`` reads over a WebSocket, and long-polls instead
        where the server (or a proxy) refuses the upgrade."""
        if transport not in ("poll", "ws"):
            raise ValueError(f"transport is 'poll' or 'ws', not {transport!r}")
        return Subscription(self, channels, since,
                            self.timeout if timeout is None else timeout, on_connection,
                            transport)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health", None, self._socket_timeout(0))

    def expect(self, channel: str, every: float | str, to: str | None = None) -> dict[str, Any]:
        """Have the server alert when *channel* has no message for *every*
        (seconds, or ``"26h"``), to *to* or the channel (``Hub.expect``)."""
        body = {"every": every, **({"to": to} if to else {})}
        return self._call("POST", f"/channels/{check_channel(channel)}/expect",
                          _json_body(body), self._socket_timeout(0))

    def expectation(self, channel: str) -> dict[str, Any] | None:
        """The state of *channel*'s silence alert, or None if it has none."""
        try:
            return self._call("GET", f"/channels/{check_channel(channel)}/expect", None,
                              self._socket_timeout(0))
        except LongpollError as error:
            if error.status == HTTPStatus.NOT_FOUND:
                return None
            raise

    def unexpect(self, channel: str) -> bool:
        """End *channel*'s silence alert; False if it had none."""
        try:
            self._call("DELETE", f"/channels/{check_channel(channel)}/expect", None,
                       self._socket_timeout(0))
        except LongpollError as error:
            if error.status == HTTPStatus.NOT_FOUND:
                return False
            raise
        return True

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
        names = urllib.parse.quote(",".join(_check_channels(channels)), safe=",*!")
        return f"/channels/{names}?{urllib.parse.urlencode(query)}"

    def _socket(self, path: str, socket_timeout: float, cutoff: _Cutoff) -> "_ClientSocket":
        """Open a WebSocket to *path* on the current server (RFC 6455 4.1);
        raise ``LongpollError`` as ``_request`` does, with the status of an
        answer that is not ``101``."""
        url = self.urls[self._current] + path
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        target = parts.path + ("?" + parts.query if parts.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}",
                 "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13", f"User-Agent: longpoll/{__version__}"]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        sock = None
        try:
            sock = socket.create_connection((parts.hostname, port), timeout=socket_timeout)
            if secure:
                context = self.ssl_context or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=parts.hostname)
            cutoff.register(sock)
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            conn = _ClientSocket(sock)
            status, headers, body = conn.handshake()
            if status != 101:
                try:
                    detail = json.loads(body).get("error", body.decode(errors="replace"))
                except (ValueError, AttributeError):
                    detail = body.decode(errors="replace")[:200] or f"status {status}"
                raise LongpollError(status, str(detail), headers)
            expected = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest())
            if headers.get("sec-websocket-accept", "").encode() != expected:
                raise LongpollError(None, f"{url}: not a WebSocket answer")
            sock = None  # (the socket is conn's now)
            return conn
        except (OSError, ValueError) as exc:
            raise _unreachable(url, exc) from None
        finally:
            if sock is not None:
                sock.close()

    def _delay(self, failures: int, retry_after: float | None = None) -> float:
        """Exponential backoff with "equal jitter"; at least Retry-After."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** min(failures, 30))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        return max(delay, retry_after or 0.0)

    def _request(self, method: str, path: str, body: bytes | None,
                 socket_timeout: float, cutoff: _Cutoff | None = None,
                 extra: dict[str, str] | None = None) -> dict[str, Any]:
        """One HTTP exchange with the current server; raise LongpollError."""
        url = self.urls[self._current] + path
        headers = {"Accept": "application/json",
                   "User-Agent": f"longpoll/{__version__}", **(extra or {})}
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
            raise _unreachable(url, getattr(exc, "reason", exc)) from None

    def _call(self, method: str, path: str, body: bytes | None, socket_timeout: float,
              safe: bool = True, *, retries: float | None = None, cutoff: _Cutoff | None = None,
              stop: threading.Event | None = None,
              on_retry: Callable[[LongpollError], None] | None = None,
              headers: dict[str, str] | None = None,
              attempt: Callable[[], Any] | None = None) -> Any:
        """``_request`` (or *attempt*, which raises as it does) with retries
        (*retries*, default ``self.retries``), backoff and failover: the one
        retry loop of the client. With *stop*, waits end early when it is
        set, and then None is returned."""
        failures, retries = 0, self.retries if retries is None else retries
        since = time.monotonic()  # (when this outage began, once one has)
        while True:
            try:
                if attempt is not None:
                    return attempt()
                return self._request(method, path, body, socket_timeout, cutoff, headers)
            except LongpollError as error:
                if stop is not None and stop.is_set():
                    return None
                if not self._retryable(error, safe) or failures >= retries:
                    raise
                if not failures:
                    since = time.monotonic()
                failures += 1
                self._failover(error, time.monotonic() - since)
                if on_retry is not None:
                    on_retry(error)
                delay = self._delay(failures, _retry_after(error))
                if stop is None:
                    time.sleep(delay)
                elif stop.wait(delay):
                    return None
            finally:
                if cutoff is not None:
                    cutoff.sockets.clear()

    @staticmethod
    def _retryable(error: LongpollError, safe: bool) -> bool:
        if getattr(error, "untrusted", False):
            return False
        if safe:
            return error.status is None or error.status in _RETRY_STATUSES
        # A publish: its idempotency key makes a repeat harmless wherever the
        # answer was lost; a 500 is a bug a repeat will not mend.
        return error.status is None or error.status in (429, 502, 503, 504)

    #: Seconds an outage lasts before its retries are logged as warnings:
    #: a server's graceful restart (its connections closed, refused for a
    #: moment) is logged at INFO.
    quiet_outage = 5.0

    def _failover(self, error: LongpollError, outage: float) -> None:
        if error.status != 429:  # a rate limit is ours to wait out, not the server's fault
            self._current = (self._current + 1) % len(self.urls)
        logger.log(logging.INFO if outage < self.quiet_outage else logging.WARNING,
                   "%s; retrying%s", error,
                   f" on {self.urls[self._current]}" if len(self.urls) > 1 else "")


def _unreachable(url: str, reason: Any) -> LongpollError:
    """The error for a server that did not answer (status None)."""
    untrusted = ssl is not None and isinstance(reason, ssl.SSLCertVerificationError)
    error = LongpollError(None, f"{url}: {reason}" + (
        " (give the server's CA certificate: --cafile)" if untrusted else ""))
    error.refused = isinstance(reason, ConnectionRefusedError)
    error.untrusted = untrusted  # retrying cannot help
    return error


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
                 on_connection: Callable[[bool, LongpollError | None], None] | None = None,
                 transport: str = "poll") -> None:
        self.client = client
        #: "poll" or "ws"; a refused WebSocket upgrade turns "ws" into "poll".
        self.transport = transport
        self.channels = _check_channels(channels)
        #: Where the next poll starts: pass it as ``since`` to resume later.
        self.cursor = since
        #: How many times the server reported lost messages.
        self.gaps = 0
        self.timeout = timeout
        self.on_connection = on_connection
        self._stop = threading.Event()
        self._cutoff = _Cutoff()
        self._lost = False          # (see _retrying and _back)
        self._gap_pending = False   # a gap told, not yet marked on a message

    def batches(self) -> Iterator[dict[str, Any]]:
        """Each server answer that says something, as received:
        ``{"messages": [...], "cursor": ..., "gap"?: true}``. The cursor
        moves past an answer when the next one is asked for. Over a
        WebSocket each message is an answer of its own."""
        if self.transport == "ws":
            yield from self._socket_batches()
        if self.transport == "poll":
            yield from self._poll_batches()

    def _poll_batches(self) -> Iterator[dict[str, Any]]:
        client = self.client
        while not self._stop.is_set():
            path = client._poll_path(self.channels, self.cursor, self.timeout, None)
            answer = client._call("GET", path, None, client._socket_timeout(self.timeout),
                                  retries=math.inf, cutoff=self._cutoff, stop=self._stop,
                                  on_retry=self._retrying)
            if answer is None:
                break
            self._back()
            messages = answer.setdefault("messages", [])
            if answer.get("gap"):
                self._gap()
            if messages or answer.get("gap"):
                if self._gap_pending and messages:
                    messages[0]["gap"], self._gap_pending = True, False
                yield answer
            self.cursor = answer["cursor"]

    def _socket_batches(self) -> Iterator[dict[str, Any]]:
        """``batches`` over WebSockets, one after another: on a lost socket
        the next resumes from the cursor, with the same retries, backoff
        and failover as a poll (``Client._call``); where the upgrade is
        refused (404, 405, 426, or a 400 from a proxy or an older server)
        it sets ``transport`` to "poll" and returns, and ``batches`` goes
        on by long-poll."""
        client, names = self.client, ",".join(self.channels)
        timeout = client._socket_timeout(self.timeout)
        while not self._stop.is_set():
            query = "" if self.cursor is None else "?" + urllib.parse.urlencode(
                {"since": self.cursor})
            path = f"/channels/{names}/ws{query}"
            try:
                conn = client._call("GET", path, None, timeout, retries=math.inf,
                                    cutoff=self._cutoff, stop=self._stop,
                                    on_retry=self._retrying,
                                    attempt=lambda: client._socket(path, timeout, self._cutoff))
            except LongpollError as error:
                if error.status not in (400, 404, 405, 426):
                    raise
                logger.info("no WebSocket (%s); long-polling instead", error)
                self.transport = "poll"
                return
            if conn is None:
                return
            self._cutoff.register(conn.sock)  # (_call let go of it: close() must cut it)
            self._back()
            try:
                for event in conn.events():
                    kind = event.get("event")
                    if kind == "open":
                        if self.cursor is None and "cursor" in event:
                            self.cursor = event["cursor"]
                    elif kind == "gap":
                        self._gap()
                    elif kind is None:
                        if self._gap_pending:
                            event["gap"], self._gap_pending = True, False
                        yield {"messages": [event], "cursor": event["id"]}
                        self.cursor = event["id"]
                    if self._stop.is_set():
                        return
            except LongpollError as error:
                if error.status is not None:
                    raise  # (closed for good: 1008, as a 403 would)
                if self._stop.is_set():
                    return
                self._retrying(error)  # and open the next one at once
            finally:
                conn.close()
                self._cutoff.sockets.clear()

    def _retrying(self, error: LongpollError) -> None:
        """The connection is lost: tell *on_connection* once."""
        if not self._lost and self.on_connection is not None:
            self.on_connection(False, error)
        self._lost = True

    def _back(self) -> None:
        """A server answered: tell *on_connection* if it had been lost."""
        if self._lost and self.on_connection is not None:
            self.on_connection(True, None)
        self._lost = False

    def _gap(self) -> None:
        self.gaps += 1
        self._gap_pending = True
        logger.warning("messages on %s were lost before they could be read",
                       ",".join(self.channels))

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

Publish:   curl -d 'hello' HOST/channels/NAME           (or curl -T FILE: PUT)
Read:      curl 'HOST/channels/NAME?since=0&timeout=0'  (all held, at once)
Wait:      curl HOST/channels/NAME                      (holds until the next message)
Stream:    curl -N HOST/channels/NAME/events            (Server-Sent Events)
Several:   curl HOST/channels/NAME,OTHER                (one cursor for all)
Queue:     curl HOST/receive                            (each message to one taker)
Health:    curl HOST/health
Watch:     open HOST/?channel=NAME in a browser
Script:    <script src="HOST/longpoll.js">                (the browser client)
"""

# The live page: watch a channel, publish to it, through longpoll.js (its
# script is PAGE_JS). No build step, no outside asset, no inline script;
# every message is shown with textContent, never parsed as HTML.
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
<script src="longpoll.js"></script>
<script src="page.js"></script>
</body></html>
"""

# The browser client (docs/browser.md), served at /longpoll.js as a classic
# script and at /longpoll.mjs as an ES module.
LONGPOLL_JS = r"""/* longpoll.js: the browser client of a longpoll server, served by it at
 * /longpoll.js (a classic script: it defines `longpoll`) and /longpoll.mjs
 * (the same as an ES module). No dependency, no build step.
 *
 *   const sub = longpoll.subscribe("https://push.example", ["news"], {
 *     onmessage: (m) => console.log(m.message), ongap: () => reload(),
 *     onstate: ({state, error}) => show(state, error)});
 *   await longpoll.publish("https://push.example", "news", "hello", {title: "Hi"});
 *
 * It reads over a WebSocket, else Server-Sent Events, else long-polls, with
 * one cursor, so switching loses and repeats nothing. Every stream starts
 * with an event at once; one that stays silent past `firstEventTimeout` is
 * held back by a buffering proxy, and the next transport is taken (and the
 * choice remembered for that server for `remember` ms). The cursor is kept
 * in sessionStorage (`storage: "local"`, or null), so a reload resumes.
 * With `share: true` the tabs of one origin on the same channels hold one
 * connection (a Web Lock elects it; a BroadcastChannel carries its events).
 * The protocol: docs/protocol.md; this API: docs/browser.md. */
(function (root) {
  "use strict";
  const DEFAULTS = {transports: ["ws", "sse", "poll"], token: null, storage: "session",
                    share: false, timeout: 30, firstEventTimeout: 3000, remember: 600000,
                    silence: 45000};

  function base(url) { return String(url || root.location.origin).replace(/\/+$/, ""); }
  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined) q.set(k, v);
    const text = q.toString();
    return text ? "?" + text : "";
  }
  function storageOf(kind) {
    try { return kind === "local" ? root.localStorage : kind ? root.sessionStorage : null; }
    catch (e) { return null; }  // (storage blocked)
  }
  function seqOf(cursor) {  // "<history>-<seq>": the order of one server's cursors
    const at = typeof cursor === "string" ? cursor.lastIndexOf("-") : -1;
    return at < 0 ? null : [cursor.slice(0, at), Number(cursor.slice(at + 1))];
  }
  async function answerOf(response) {  // {status, body, retryAfter} of a fetch
    let body = null;
    try { body = await response.json(); } catch (e) { /* not JSON */ }
    return {status: response.status, body,
            retryAfter: Number(response.headers.get("Retry-After")) || 0};
  }
  function refusal(answer) {  // an answer that ends the subscription (4xx but 408, 429)
    const s = answer.status;
    return s >= 400 && s < 500 && s !== 408 && s !== 429;
  }

  class Subscription extends EventTarget {
    constructor(url, channels, options = {}) {
      super();
      this.url = base(url);
      this.channels = typeof channels === "string" ? channels.split(",") : Array.from(channels);
      this.options = Object.assign({}, DEFAULTS, options);
      if (!this.options.transports.length || this.options.transports.some((t) => !TRANSPORTS[t])) {
        throw new TypeError("transports: some of \"ws\", \"sse\" and \"poll\", in order");
      }
      this.path = "/channels/" + this.channels.map(encodeURIComponent).join(",");
      this.key = "longpoll:" + this.url + this.path;
      this.storage = storageOf(this.options.storage);
      this.cursor = options.since || this.load() || null;
      this.state = "connecting";
      this.transport = null;
      this.closed = false;
      this.leader = false;
      this.stop = () => {};
      for (const type of ["message", "gap", "state"]) {
        const listener = this.options["on" + type];
        if (listener) this.addEventListener(type, (event) => listener(event.detail));
      }
      this.dropped = () => this.stop();  // offline: the connection is gone, whatever it says
      root.addEventListener("offline", this.dropped);
      if (this.options.share && root.BroadcastChannel && root.navigator.locks) this.share();
      else { this.leader = true; this.run(); }
    }

    close() {  // for good: its connection (or its place in the tabs' queue) ends
      this.closed = true;
      this.state = "closed";
      root.removeEventListener("offline", this.dropped);
      this.stop();
      if (this.bus) this.bus.close();
      if (this.waiting) this.waiting.abort();
    }

    // -- what the subscriber sees ---------------------------------------------------
    emit(type, detail) {
      if (this.closed) return;
      this.dispatchEvent(new CustomEvent(type, {detail}));
      if (this.leader && this.bus) this.bus.postMessage({type, detail});
    }
    setState(state, error) {
      this.state = state;
      this.emit("state", {state, transport: this.transport, error: error || null});
    }
    deliver(message) {
      const now = seqOf(this.cursor), next = seqOf(message.id);
      if (now && next && now[0] === next[0] && next[1] <= now[1]) return;  // had it already
      this.at(message.id, true);
      this.emit("message", message);
    }
    at(cursor, quiet) {  // where the next read starts: kept, and told to the other tabs
      if (!cursor || cursor === this.cursor) return;
      this.cursor = cursor;
      try { if (this.storage) this.storage.setItem(this.key, cursor); } catch (e) { /* full */ }
      if (this.leader && this.bus && !quiet) this.bus.postMessage({type: "cursor", cursor});
    }
    load() {
      try { return this.storage && this.storage.getItem(this.key); } catch (e) { return null; }
    }
    connected(transport) {  // (the transports that failed before it: avoided a while)
      if (this.failed && this.failed.length) this.avoid(this.failed.splice(0));
      this.transport = transport;
      this.failures = 0;
      this.setState("connected");
    }

    // -- transports: which to use, remembered per server -------------------------------
    avoided() {
      try { return JSON.parse(root.localStorage.getItem("longpoll-avoid:" + this.url)) || {}; }
      catch (e) { return {}; }
    }
    avoid(transports) {
      const avoided = this.avoided(), until = Date.now() + this.options.remember;
      for (const t of transports) avoided[t] = until;
      try { root.localStorage.setItem("longpoll-avoid:" + this.url, JSON.stringify(avoided)); }
      catch (e) { /* not kept */ }
    }
    order() {
      const avoided = this.avoided(), now = Date.now();
      const all = this.options.transports;
      const usable = all.filter((t) => !(avoided[t] > now));
      return usable.length ? usable : all.slice(-1);
    }

    async run() {
      this.failures = 0;
      while (!this.closed) {
        let outcome = null;
        this.failed = [];
        for (const transport of this.order()) {  // the first that works; a silent or refused
          try { outcome = await TRANSPORTS[transport](this); }  // one: the next
          catch (e) { outcome = {}; }  // (an answer that is not the protocol's: a proxy's page)
          if (this.closed) return;
          if (!outcome.unusable) break;
          this.failed.push(transport);
        }
        const answer = outcome.answer;
        if (answer && refusal(answer)) {
          this.setState("error", (answer.body && answer.body.error) || "HTTP " + answer.status);
          return;
        }
        this.failures += 1;
        this.setState(root.navigator.onLine === false ? "offline" : "reconnecting",
                      answer && answer.body && answer.body.error);
        await this.backoff(answer ? answer.retryAfter : 0);
      }
    }
    backoff(retryAfter) {  // 0.5 s doubling to 30 s, jittered; at least Retry-After
      const ceiling = Math.min(30000, 500 * 2 ** Math.min(this.failures - 1, 6));
      const delay = Math.max(ceiling / 2 + Math.random() * ceiling / 2, retryAfter * 1000);
      return new Promise((done) => {
        const timer = setTimeout(end, delay);
        function end() { clearTimeout(timer); root.removeEventListener("online", end); done(); }
        root.addEventListener("online", end);  // back online: at once
        this.stop = end;
      });
    }
    headers(extra) {
      const token = this.options.token;
      return Object.assign(token ? {Authorization: "Bearer " + token} : {}, extra);
    }
    async get(path, params, signal) {  // the parsed answer, or null if nothing answered
      try {
        return await answerOf(await fetch(this.url + path + query(params), {
          headers: this.headers(), cache: "no-store", signal}));
      } catch (e) { return null; }
    }
    async head() {  // with no cursor yet: where "from now on" is, so a drop loses nothing
      if (this.cursor) return null;
      const answer = await this.get(this.path, {timeout: 0});
      if (!answer || answer.status !== 200) return answer || {status: 0};
      this.at(answer.body.cursor);
      return null;
    }

    // -- tabs sharing one connection ----------------------------------------------------
    share() {
      this.bus = new BroadcastChannel(this.key);
      this.bus.onmessage = ({data}) => {
        if (this.leader) {
          if (data.type === "hello") this.bus.postMessage({type: "state", cursor: this.cursor,
            detail: {state: this.state, transport: this.transport, error: null}});
          return;
        }
        if (data.type === "cursor" || data.type === "state") this.at(data.cursor);
        if (data.type === "message") this.deliver(data.detail);
        else if (data.type === "state") {
          this.state = data.detail.state;
          this.transport = data.detail.transport;
          this.dispatchEvent(new CustomEvent("state", {detail: data.detail}));
        } else if (data.type === "gap") this.dispatchEvent(new CustomEvent("gap", {detail: {}}));
      };
      this.waiting = new AbortController();
      root.navigator.locks.request(this.key, {signal: this.waiting.signal}, () => {
        if (this.closed) return null;
        this.leader = true;  // the tab that held the connection went: this one takes it on
        return this.run();
      }).catch(() => { /* closed while waiting */ });
      this.bus.postMessage({type: "hello"});
    }
  }

  // Each transport reads until its connection ends and says how:
  // {established} once it delivered its first event, {unusable} if it never
  // did (refused, or held back by a buffering proxy), {answer} for an HTTP
  // error answer, {} for a connection that failed.
  const TRANSPORTS = {
    ws(sub) {
      return new Promise((resolve) => {
        const url = sub.url.replace(/^http/, "ws") + sub.path + "/ws" +
                    query({since: sub.cursor, token: sub.options.token});
        let socket, established = false;
        try { socket = new WebSocket(url); } catch (e) { resolve({unusable: true}); return; }
        const timer = setTimeout(() => end({unusable: true}), sub.options.firstEventTimeout);
        const end = (outcome) => {
          clearTimeout(timer);
          socket.onmessage = socket.onclose = null;
          if (socket.readyState < 2) socket.close(1000);
          resolve(outcome);
        };
        sub.stop = () => end({});
        socket.onmessage = (event) => {
          const frame = JSON.parse(event.data);
          if (!established) { established = true; clearTimeout(timer); sub.connected("ws"); }
          if (frame.event === "open") sub.at(frame.cursor);
          else if (frame.event === "gap") sub.emit("gap", {});
          else sub.deliver(frame);
        };
        socket.onclose = (event) => {
          if (event.code === 1008) {  // the server's auth no longer lets this token read
            end({answer: {status: 403, body: {error: event.reason || "not allowed"}}});
          } else end(established ? {established} : {unusable: true});
        };
      });
    },

    async sse(sub) {
      const problem = await sub.head();
      if (problem) return problem.status ? {answer: problem} : {};
      if (sub.closed) return {};
      const control = new AbortController();
      let established = false, silent = false, timer = null;
      const wait = (ms) => {  // abort unless something comes within ms
        clearTimeout(timer);
        timer = setTimeout(() => { silent = !established; control.abort(); }, ms);
      };
      wait(sub.options.firstEventTimeout);
      sub.stop = () => control.abort();
      let response = null;
      try {
        response = await fetch(sub.url + sub.path + "/events" + query({since: sub.cursor}), {
          headers: sub.headers({Accept: "text/event-stream"}), cache: "no-store",
          signal: control.signal});
      } catch (e) { /* refused, or silent past the deadline */ }
      if (!response || !response.ok) {
        clearTimeout(timer);
        return response ? {answer: await answerOf(response)} : silent ? {unusable: true} : {};
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let text = "";
      try {
        for (;;) {
          const {value, done} = await reader.read();
          if (done) break;
          if (!established) { established = true; sub.connected("sse"); }
          wait(sub.options.silence);  // (keepalives come every 15 s: a dead stream is left)
          text += value;
          let end;
          while ((end = text.indexOf("\n\n")) >= 0) {  // an event (the server ends lines in LF)
            const lines = text.slice(0, end).split("\n");
            text = text.slice(end + 2);
            const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6));
            if (lines.includes("event: gap")) sub.emit("gap", {});
            else if (data.length) sub.deliver(JSON.parse(data.join("\n")));
          }
        }
      } catch (e) { /* aborted, or the connection broke */ }
      clearTimeout(timer);
      return established ? {established} : silent ? {unusable: true} : {};
    },

    async poll(sub) {
      let established = false;
      const problem = await sub.head();
      if (problem) return problem.status ? {answer: problem} : {};
      for (let wait = 0; !sub.closed; wait = sub.options.timeout) {  // the first answers at once
        const control = new AbortController();
        sub.stop = () => control.abort();
        const timer = setTimeout(() => control.abort(), (wait + 15) * 1000);  // a dead one
        const answer = await sub.get(sub.path, {since: sub.cursor, timeout: wait},
                                     control.signal);
        clearTimeout(timer);
        if (!answer) return established ? {established} : {};
        if (answer.status !== 200) return {answer, established};
        if (!established) { established = true; sub.connected("poll"); }
        if (answer.body.gap) sub.emit("gap", {});
        answer.body.messages.forEach((m) => sub.deliver(m));
        sub.at(answer.body.cursor);
      }
      return {established};
    },
  };

  async function publish(url, channel, message, options = {}) {
    const {token, key, ...fields} = options;
    const headers = {"Content-Type": "application/json"};
    if (token) headers.Authorization = "Bearer " + token;
    if (key) headers["Idempotency-Key"] = key;
    const response = await fetch(base(url) + "/channels/" + encodeURIComponent(channel), {
      method: "POST", headers, body: JSON.stringify(Object.assign({message}, fields))});
    const answer = await answerOf(response);
    if (!response.ok) {
      const error = new Error((answer.body && answer.body.error) || "HTTP " + response.status);
      error.status = response.status;
      throw error;
    }
    return answer.body;
  }

  root.longpoll = {
    subscribe: (url, channels, options) => new Subscription(url, channels, options),
    publish, Subscription, version: "1",
  };
})(globalThis);
"""

PAGE_JS = r"""// The live page at / (served at /page.js): watch a channel, publish to it,
// through longpoll.js. Every message is shown with textContent, never as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const token = params.get("token");
const server = new URL(".", location.href).href.replace(/\/$/, "");  // (mounted under a path too)
let channel = params.get("channel") || "news";
let subscription = null;
$("channel").value = channel;

function setState({state, transport, error}) {
  $("state").className = state;
  $("state").textContent = state === "error" ? error : state;
  $("state").dataset.transport = transport || "";
  $("state").title = transport ? `over ${transport}` : "";
}

function span(className, text) {
  const node = document.createElement(className === "time" ? "time" : "span");
  if (className !== "time") node.className = className;
  node.textContent = text;
  return node;
}

function add(...parts) {  // newest first
  const li = document.createElement("li");
  li.append(...parts);
  $("log").prepend(li);
}

function showMessage(m) {
  const parts = [span("time", new Date(m.time * 1000).toLocaleTimeString())];
  if (m.title) parts.push(span("title", m.title));
  parts.push(span("body", typeof m.message === "string" ? m.message : JSON.stringify(m.message)));
  add(...parts);
}

function notice(text) { add(span("notice", text)); }

function subscribe() {
  if (subscription) subscription.close();
  const options = {token, share: true, onmessage: showMessage, onstate: setState,
                   ongap: () => notice("Some messages were lost before they could be shown " +
                                       "(they expired, or the server restarted).")};
  if (params.get("transport")) options.transports = [params.get("transport")];
  try { subscription = longpoll.subscribe(server, [channel], options); }
  catch (error) { subscription = null; setState({state: "error", error: error.message}); }
}

$("publish").addEventListener("submit", async (event) => {
  event.preventDefault();
  const fields = {token};
  if ($("title").value) fields.title = $("title").value;
  try {
    await longpoll.publish(server, channel, $("message").value, fields);
    $("message").value = "";
  } catch (error) { notice(`Not published: ${error.message}`); }
});

$("channel").addEventListener("change", () => {
  channel = $("channel").value.trim() || "news";
  $("log").replaceChildren();
  params.set("channel", channel);
  history.replaceState(null, "", `?${params}`);
  subscribe();
});

subscribe();
"""

#: The scripts the server serves: {path: (text, content type)}.
SCRIPTS = {
    "/longpoll.js": LONGPOLL_JS,
    "/longpoll.mjs": LONGPOLL_JS + "export const {subscribe, publish, Subscription} = "
                                   "globalThis.longpoll;\nexport default globalThis.longpoll;\n",
    "/page.js": PAGE_JS,
}
_SCRIPT_FILES = {path: (text.encode(), '"%s"' % hashlib.sha256(text.encode()).hexdigest()[:20])
                 for path, text in SCRIPTS.items()}


# ---------------------------------------------------------------------------
# Load testing: python3 -m longpoll bench (bench/run.py's generator too)
# ---------------------------------------------------------------------------

#: What ``longpoll bench`` does at most unless told ``--no-caps``: a
#: mistyped number must not turn a check into a flood.
BENCH_CAPS = {"clients": 10_000, "messages": 10_000, "rate": 1_000.0, "publishes": 100_000,
              "duration": 300.0}
#: Messages a bench publishes expire this long after (``ttl``): the target
#: keeps no trace of a run for long.
BENCH_TTL = "10m"

_BENCH_SENT = re.compile(rb'"t":\s*([0-9.e+-]+),\s*"i":\s*(-?\d+)')
_BENCH_CURSOR = re.compile(rb'"cursor":\s*"([^"]*)"')
_BENCH_LENGTH = re.compile(rb"[Cc]ontent-[Ll]ength:\s*(\d+)")
_BENCH_GAP = re.compile(rb'"gap":true|event: gap\n|"event":"gap"')


def bench_target_allowed(host: str, addresses: Iterable[str] = ()) -> bool:
    """Whether ``longpoll bench`` may load *host* without
    ``--yes-i-own-this-server``: ``localhost``, a loopback or private
    address, or a name all of whose *addresses* (the caller resolves it)
    are. A public address, or a name that resolves to none, is not."""
    import ipaddress

    def private(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))
        except ValueError:
            return False
        return ip.is_loopback or ip.is_private or ip.is_link_local

    name = host.lower().rstrip(".").strip("[]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
        return private(name)
    except ValueError:
        found = list(addresses)
        return bool(found) and all(map(private, found))


class BenchTally:
    """What the subscribers of a bench received: each delivery's latency
    (the message carries the monotonic time it was sent: one clock for
    every process of this machine), repeats, gap notices, and per message
    the latest arrival (its fan-out completion)."""

    def __init__(self, expected: int = 0) -> None:
        self.expected = expected
        self.latencies: list[float] = []
        self.completion: dict[int, float] = {}   # message index -> slowest latency
        self.repeats = 0
        self.gaps = 0
        self.delivered = 0
        self.last = 0.0  # when the latest new delivery came (monotonic)
        self.done: Any = None  # an asyncio future its owner may set when all came

    def receive(self, body: bytes, seen: set[int]) -> None:
        """Count what *body* (an answer, events, frames) delivers to the
        subscriber that has seen the indexes in *seen*."""
        now = time.monotonic()
        for sent, index in _BENCH_SENT.findall(body):
            i = int(index)
            if i < 0:
                continue  # a warm-up message
            if i in seen:
                self.repeats += 1
                continue
            seen.add(i)
            latency = now - float(sent)
            self.latencies.append(latency)
            if latency > self.completion.get(i, -1.0):
                self.completion[i] = latency
        if len(self.latencies) > self.delivered:
            self.delivered, self.last = len(self.latencies), now
        self.gaps += len(_BENCH_GAP.findall(body))
        if (self.done is not None and self.delivered >= self.expected
                and not self.done.done()):
            self.done.set_result(now)


class BenchTarget(NamedTuple):
    """Where a bench connects, and as whom."""
    host: str
    port: int
    channel: str = "bench"
    tls: bool = False
    cafile: str | None = None
    token: str | None = None
    ttl: str | None = BENCH_TTL  # (None: messages without one, as bench/run.py's peers take)

    @classmethod
    def from_url(cls, url: str, channel: str, token: str | None = None,
                 cafile: str | None = None) -> "BenchTarget":
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LongpollError(HTTPStatus.BAD_REQUEST, f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), channel, tls, cafile,
                   token)

    def ssl_context(self) -> Any:
        if not self.tls:
            return None
        import ssl
        return ssl.create_default_context(cafile=self.cafile)

    def head(self, method: str, path: str, extra: bytes = b"") -> bytes:
        """A request head (without its blank line's end)."""
        auth = b"Authorization: Bearer %s\r\n" % self.token.encode() if self.token else b""
        return (b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n"
                % (method.encode(), path.encode(), self.host.encode(), auth, extra))

    def publish_request(self, index: int) -> bytes:
        """A publish of message *index*: its send time and index, and a
        ``ttl`` so that the target forgets it soon."""
        ttl = b',"ttl":"%s"' % self.ttl.encode() if self.ttl else b""
        payload = b'{"message":{"t":%r,"i":%d}%s}' % (time.monotonic(), index, ttl)
        return self.head("POST", f"/channels/{self.channel}",
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                         % len(payload)) + payload


def _bench_protocols() -> dict[str, type]:
    """The generator's connections (asyncio protocols, made on first use so
    that importing longpoll never imports asyncio): long-poll, SSE and
    WebSocket subscribers, a publisher, and a connect-storm client."""
    if _BENCH_PROTOCOLS:
        return _BENCH_PROTOCOLS
    import asyncio

    class HTTP(asyncio.Protocol):
        """A raw HTTP/1.1 keep-alive connection that hands on each body
        (Content-Length framed, as longpoll and its peers answer)."""

        def __init__(self, target: BenchTarget) -> None:
            self.target, self.buf, self.transport = target, bytearray(), None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Close with RST: thousands of client sockets leave no
                # TIME_WAIT behind to exhaust the ephemeral ports.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        def data_received(self, data: bytes) -> None:
            buf = self.buf
            buf += data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                found = _BENCH_LENGTH.search(buf, 0, end)
                length = int(found.group(1)) if found else 0
                if len(buf) < end + 4 + length:
                    return
                status = bytes(buf[9:12])
                body = bytes(buf[end + 4:end + 4 + length])
                del buf[:end + 4 + length]
                self.on_body(status, body)

        def on_body(self, status: bytes, body: bytes) -> None:
            raise NotImplementedError

    class Poller(HTTP):
        """A long-poll subscriber: each answer's cursor is the next poll's."""

        def __init__(self, target: BenchTarget, tally: BenchTally) -> None:
            super().__init__(target)
            self.tally, self.cursor, self.seen = tally, None, set()
            self.failed = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.poll()

        def poll(self) -> None:
            since = "" if self.cursor is None else "&since=" + self.cursor.decode()
            self.transport.write(self.target.head(
                "GET", f"/channels/{self.target.channel}?timeout=30&limit=1000{since}"))

        def on_body(self, status: bytes, body: bytes) -> None:
            if status != b"200":
                self.failed, self.refusal = self.failed + 1, _bench_refusal(status, body)
                self.transport.close()
                return
            self.tally.receive(body, self.seen)
            cursor = _BENCH_CURSOR.search(body)
            if cursor is not None:
                self.cursor = cursor.group(1)
            self.poll()

    class Stream(HTTP):
        """A subscriber on a stream: SSE events, or WebSocket text frames."""

        def __init__(self, target: BenchTarget, tally: BenchTally, kind: str) -> None:
            super().__init__(target)
            self.tally, self.kind, self.seen = tally, kind, set()
            self.started, self.chunked, self.failed = False, False, 0
            self.events_buf = bytearray()  # (de-chunked, when a proxy chunks the stream)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            path = f"/channels/{self.target.channel}/"
            if self.kind == "sse":
                transport.write(self.target.head("GET", path + "events",
                                                 b"Accept: text/event-stream\r\n"))
            else:
                transport.write(self.target.head(
                    "GET", path + "ws", b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n"))

        def data_received(self, data: bytes) -> None:
            buf = self.buf
            buf += data
            if not self.started:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                if buf[9:12] not in (b"200", b"101"):
                    self.failed += 1
                    self.refusal = _bench_refusal(bytes(buf[9:12]), bytes(buf[end + 4:]))
                    self.transport.close()
                    return
                self.chunked = b"chunked" in bytes(buf[:end]).lower()
                del buf[:end + 4]
                self.started = True
            if self.kind == "sse":
                self.events()
            else:
                self.frames()

        def events(self) -> None:
            buf = self.buf
            if self.chunked:  # (a proxy's framing: take whole chunks out)
                data = bytearray()
                while True:
                    eol = buf.find(b"\r\n")
                    if eol < 0:
                        break
                    size = int(bytes(buf[:eol]).split(b";")[0] or b"0", 16)
                    if len(buf) < eol + 2 + size + 2:
                        break
                    data += buf[eol + 2:eol + 2 + size]
                    del buf[:eol + 2 + size + 2]
                self.events_buf += data
                buf = self.events_buf
            end = buf.rfind(b"\n\n")
            if end >= 0:
                self.tally.receive(bytes(buf[:end + 2]), self.seen)
                del buf[:end + 2]

        def frames(self) -> None:
            buf, bodies = self.buf, []
            while len(buf) >= 2:
                size, start = buf[1] & 0x7F, 2
                if size == 126:
                    if len(buf) < 4:
                        break
                    size, start = int.from_bytes(buf[2:4], "big"), 4
                elif size == 127:
                    if len(buf) < 10:
                        break
                    size, start = int.from_bytes(buf[2:10], "big"), 10
                if len(buf) < start + size:
                    break
                if buf[0] & 0x0F == 0x1:
                    bodies.append(bytes(buf[start:start + size]))
                del buf[:start + size]
            if bodies:
                self.tally.receive(b"\n".join(bodies), self.seen)

    class Publisher(HTTP):
        """Publishes over one keep-alive connection, one at a time."""

        def __init__(self, target: BenchTarget) -> None:
            super().__init__(target)
            self.answers: Any = asyncio.Queue()

        def on_body(self, status: bytes, body: bytes) -> None:
            self.answers.put_nowait((status, body))

        async def publish(self, index: int) -> tuple[bytes, bytes]:
            self.transport.write(self.target.publish_request(index))
            return await self.answers.get()

    class Knock(HTTP):
        """The connect storm's client: connect, one request, its answer."""

        def __init__(self, target: BenchTarget, started: float, future: Any) -> None:
            super().__init__(target)
            self.started, self.future = started, future

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            transport.write(self.target.head(
                "GET", f"/channels/{self.target.channel}?timeout=0"))

        def on_body(self, status: bytes, body: bytes) -> None:
            if not self.future.done():
                self.future.set_result((status, time.monotonic() - self.started))
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.future.done():
                self.future.set_result((b"closed", time.monotonic() - self.started))

    _BENCH_PROTOCOLS.update(HTTP=HTTP, Poller=Poller, Stream=Stream, Publisher=Publisher,
                            Knock=Knock)
    return _BENCH_PROTOCOLS


_BENCH_PROTOCOLS: dict[str, type] = {}


async def bench_subscribe(target: BenchTarget, tally: BenchTally, count: int,
                          transport: str = "poll", wave: int = 250) -> list[Any]:
    """Connect *count* subscribers (``poll``, ``sse`` or ``ws``), in waves
    within the listen backlog; they count into *tally*."""
    import asyncio
    protocols = _bench_protocols()
    loop = asyncio.get_running_loop()

    def make() -> Any:
        if transport == "poll":
            return protocols["Poller"](target, tally)
        return protocols["Stream"](target, tally, transport)

    subscribers: list[Any] = []
    for start in range(0, count, wave):
        made = await asyncio.gather(*(
            loop.create_connection(make, target.host, target.port, ssl=target.ssl_context(),
                                   server_hostname=target.host if target.tls else None)
            for _ in range(start, min(count, start + wave))))
        subscribers += [protocol for _, protocol in made]
    return subscribers


async def bench_publisher(target: BenchTarget) -> Any:
    """A publisher on one keep-alive connection (``await p.publish(i)``)."""
    import asyncio
    _, publisher = await asyncio.get_running_loop().create_connection(
        lambda: _bench_protocols()["Publisher"](target), target.host, target.port,
        ssl=target.ssl_context(), server_hostname=target.host if target.tls else None)
    return publisher


def bench_publish_blocking(target: BenchTarget, count: int,
                           stop: threading.Event | None = None) -> tuple[float, float, int]:
    """Publish *count* messages back-to-back over one keep-alive connection
    with a plain blocking socket (an asyncio round trip costs about as much
    as the fastest server's work); return (start, end, published)."""
    sock: Any = socket.create_connection((target.host, target.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if target.tls:
        sock = target.ssl_context().wrap_socket(sock, server_hostname=target.host)
    buf, start, done = b"", 0.0, 0
    try:
        for index in range(-1, count):  # -1 warms the connection up, untimed
            if index == 0:
                start = time.monotonic()
            if stop is not None and stop.is_set():
                break
            sock.sendall(target.publish_request(index))
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            if head[9:12] not in (b"200", b"201"):
                raise ConnectionError(f"a publish was answered {head[9:12].decode()}: "
                                      f"{rest[:200].decode(errors='replace')}")
            length = int(_BENCH_LENGTH.search(head).group(1))
            while len(rest) < length:
                rest += sock.recv(65536)
            buf = rest[length:]
            done += index >= 0
    finally:
        sock.close()
    return start, time.monotonic(), done


def bench_close(protocols: Iterable[Any]) -> None:
    for protocol in protocols:
        if protocol.transport is not None:
            protocol.transport.close()


# -- the worker processes --------------------------------------------------------------

def _bench_worker(conn: Any, target: BenchTarget, job: dict[str, Any]) -> None:
    """A worker process: subscribers, a connect storm or a publisher, as
    *job* says; progress and the final tally go back through *conn*. The
    parent stops it (it ignores Ctrl-C: the parent decides)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import asyncio
    asyncio.run(_bench_work(conn, target, job))


async def _bench_work(conn: Any, target: BenchTarget, job: dict[str, Any]) -> None:
    import asyncio
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    halt = threading.Event()

    def command() -> None:
        try:
            conn.recv()
        except EOFError:
            pass
        stop.set()
        halt.set()

    loop.add_reader(conn.fileno(), command)
    tally, state = BenchTally(), {"connected": 0, "failed": 0}
    protocols: list[Any] = []
    result: dict[str, Any] = {}

    async def subscribe() -> None:
        for start in range(0, job["count"], 250):
            if stop.is_set():
                return
            try:
                protocols.extend(await bench_subscribe(
                    target, tally, min(250, job["count"] - start), job["transport"]))
            except OSError as exc:
                state["failed"] += 1
                result["error"] = f"cannot connect: {exc}"
                return
            state["connected"] = len(protocols)

    async def storm() -> None:
        knock = _bench_protocols()["Knock"]
        futures, started = [], time.monotonic()
        for _ in range(job["count"]):
            future = loop.create_future()
            futures.append(future)
            loop.create_task(_bench_knock(loop, knock, target, started, future))
        answers = []
        for future in futures:
            answers.append(await future)
            state["connected"] = len(answers)
        result["latencies"] = [t for status, t in answers if status == b"200"]
        result["statuses"] = dict(collections.Counter(s.decode() for s, _ in answers))

    async def publish() -> None:
        start, end, done = await loop.run_in_executor(
            None, bench_publish_blocking, target, job["count"], halt)
        result.update(start=start, end=end, published=done)

    work = loop.create_task({"subscribe": subscribe, "connect": storm,
                             "publish": publish}[job["mode"]]())

    def report() -> dict[str, Any]:
        refusals = [p.refusal for p in protocols if getattr(p, "refusal", None)]
        if refusals:
            result.setdefault("error", f"the server refused subscribers: {refusals[0]}")
        return {"connected": state["connected"], "delivered": tally.delivered,
                "failed": state["failed"] + sum(getattr(p, "failed", 0) for p in protocols),
                "cpu_time": time.process_time(), "at": time.monotonic()}

    while not stop.is_set():
        conn.send(("progress", report()))
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass
        if work.done() and job["mode"] != "subscribe":
            break
    if not work.done():
        work.cancel()
    try:
        await work
    except asyncio.CancelledError:
        pass
    except (OSError, ConnectionError) as exc:
        result["error"] = str(exc)
    bench_close(protocols)
    conn.send(("done", {**report(), **result, "latencies": result.get(
        "latencies", tally.latencies), "completion": tally.completion,
        "repeats": tally.repeats, "gaps": tally.gaps, "last": tally.last}))
    if job["mode"] != "subscribe":
        stop.clear()
        await stop.wait()  # (until the parent has read it and says stop)
    loop.remove_reader(conn.fileno())


async def _bench_knock(loop: Any, knock: type, target: BenchTarget, started: float,
                       future: Any) -> None:
    try:
        await loop.create_connection(lambda: knock(target, started, future), target.host,
                                     target.port, ssl=target.ssl_context(),
                                     server_hostname=target.host if target.tls else None)
    except OSError:
        if not future.done():
            future.set_result((b"refused", time.monotonic() - started))


class _Workers:
    """The parent's side of the worker processes."""

    def __init__(self, target: BenchTarget, jobs: list[dict[str, Any]]) -> None:
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        self.pipes, self.processes = [], []
        # Started with Ctrl-C ignored, which they keep from birth: a Ctrl-C
        # at the terminal reaches the whole process group, and the parent
        # alone decides (it stops them and reports).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for job in jobs:
                parent, child = context.Pipe()
                process = context.Process(target=_bench_worker, args=(child, target, job),
                                          daemon=True)
                process.start()
                child.close()
                self.pipes.append(parent)
                self.processes.append(process)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        self.progress: list[dict[str, Any]] = [{} for _ in jobs]
        self.first: list[dict[str, Any]] = [{} for _ in jobs]  # (their first word)
        self.results: list[dict[str, Any] | None] = [None for _ in jobs]

    def poll(self) -> None:
        """Take what the workers said since the last look."""
        for index, pipe in enumerate(self.pipes):
            try:
                while pipe.poll():
                    kind, data = pipe.recv()
                    self.first[index] = self.first[index] or data
                    if kind == "progress":
                        self.progress[index] = data
                    else:
                        self.results[index] = data
                        self.progress[index] = data
            except (EOFError, OSError):
                if self.results[index] is None:
                    self.results[index] = {"error": "the worker process died"}

    def total(self, name: str) -> int:
        """*name* (connected, delivered, failed) over the workers, now."""
        self.poll()
        return sum(p.get(name, 0) for p in self.progress)

    def mark(self, said: list[dict[str, Any]] | None = None) -> list[tuple[float, float]]:
        """Each worker's CPU time and clock, now or as *said* (see ``busiest``)."""
        if said is None:
            self.poll()
        return [(p.get("cpu_time", 0.0), p.get("at", 0.0)) for p in said or self.progress]

    def busiest(self, since: list[tuple[float, float]] | None = None) -> float:
        """The highest share of a core any worker used since *since*
        (``mark``; default: since it started): near 1, the load generator
        was the limit."""
        self.poll()
        if since is None:
            since = self.mark(self.first)
        shares = [(p.get("cpu_time", 0.0) - cpu) / (p.get("at", 0.0) - at)
                  for p, (cpu, at) in zip(self.progress, since) if p.get("at", 0.0) > at]
        return max(shares, default=0.0)

    def finished(self) -> bool:
        self.poll()
        return all(r is not None for r in self.results)

    async def stop(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Stop them; their final tallies (empty for one that never said)."""
        import asyncio
        for index, pipe in enumerate(self.pipes):
            if self.results[index] is None:
                try:
                    pipe.send("stop")
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        while not self.finished() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for pipe in self.pipes:
            try:
                pipe.send("stop")  # (a finished one waits for it to exit)
            except OSError:
                pass
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)
        return [r or {} for r in self.results]


# -- the scenarios -------------------------------------------------------------------------

class BenchRun:
    """One ``longpoll bench`` run: a scenario against a target, with its
    progress line, its caps, Ctrl-C, and the server's CPU when local."""

    def __init__(self, target: BenchTarget, scenario: str, *, clients: int = 1000,
                 messages: int = 50, rate: float = 10.0, publishes: int = 10_000,
                 subscribers: int = 0, transport: str = "poll", workers: int = 0,
                 drain: float = 30.0, server_pid: int | None = None,
                 server_cpu: Callable[[], float] | None = None,
                 server_rss: Callable[[], float | None] | None = None,
                 progress: Callable[[str], None] | None = None,
                 on_parked: Callable[[], Awaitable[None]] | None = None) -> None:
        self.target, self.scenario, self.transport = target, scenario, transport
        #: Awaited once every fan-out subscriber waits, before the first
        #: publish (bench/run.py measures the idle server there).
        self.on_parked = on_parked
        self.clients, self.messages, self.rate = clients, messages, rate
        self.publishes, self.subscribers, self.drain = publishes, subscribers, drain
        self.workers = workers or max(1, min(4, (os.cpu_count() or 2) - 1))
        if server_pid is not None:
            server_cpu = functools.partial(_pid_cpu, server_pid)
            server_rss = functools.partial(_pid_rss, server_pid)
        self.server_cpu, self.server_rss = server_cpu, server_rss
        self.progress = progress or (lambda line: None)
        self.interrupted = False
        self._stop: Any = None
        self.sent = 0

    def split(self, count: int) -> list[int]:
        """*count* over the workers, as evenly as can be (none empty)."""
        workers = max(1, min(self.workers, count))
        return [count // workers + (i < count % workers) for i in range(workers)]

    def run(self) -> dict[str, Any]:
        """Run it; Ctrl-C ends it at once with what was measured so far
        (``interrupted`` is then true)."""
        import asyncio
        return asyncio.run(self.arun())

    async def arun(self) -> dict[str, Any]:
        """``run`` inside a running asyncio loop."""
        import asyncio
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # (not the main thread, or no signals here)
        try:
            return await getattr(self, "_" + self.scenario)()
        finally:
            try:
                loop.remove_signal_handler(signal.SIGINT)
            except (NotImplementedError, RuntimeError, ValueError):
                pass

    def _interrupt(self) -> None:
        self.interrupted = True
        self._stop.set()

    async def _until(self, condition: Callable[[], bool], timeout: float,
                     line: Callable[[], str]) -> bool:
        """Wait for *condition* (True), *timeout* or Ctrl-C (False), with
        the progress line."""
        import asyncio
        deadline = time.monotonic() + timeout
        while not condition():
            if self._stop.is_set() or time.monotonic() > deadline:
                return False
            self.progress(line())
            try:
                await asyncio.wait_for(self._stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        self.progress(line())
        return True

    def _base(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "transport": self.transport,
                "target": f"{'https' if self.target.tls else 'http'}://{self.target.host}:"
                          f"{self.target.port}", "channel": self.target.channel}

    async def _parked(self, workers: "_Workers", count: int) -> bool:
        """Until *count* subscribers are connected and (long-poll) the
        server says they wait."""
        def line() -> str:
            return f"subscribers {workers.total('connected'):,}/{count:,} connected"
        def refused() -> bool:  # (401, 403, 429, 503...: it will not get better)
            return workers.total("failed") > 0

        if not await self._until(lambda: workers.finished() or refused() or
                                 workers.total("connected") >= count, 120, line):
            return False
        if workers.total("connected") < count or refused():
            return False
        # Connected is not yet waiting: a stream that the server has not
        # taken in yet would miss a message published now.
        health = {"waiting": 0, "next": 0.0}

        def parked() -> bool:  # (/health counts every waiting client of the server)
            if time.monotonic() >= health["next"]:
                health["next"] = time.monotonic() + 0.2
                health["waiting"] = _bench_health(self.target).get("waiting", count)
            return health["waiting"] >= count or refused()
        return not refused() and await self._until(
            parked, 60, lambda: f"subscribers {health['waiting']:,}/{count:,} waiting at the "
                                "server")

    async def _fanout(self) -> dict[str, Any]:
        import asyncio
        out = self._base()
        out.update(subscribers=self.clients, messages=self.messages, rate=self.rate)
        expected = self.clients * self.messages
        workers = _Workers(self.target, [{"mode": "subscribe", "count": n,
                                          "transport": self.transport}
                                         for n in self.split(self.clients)])
        publisher = None
        cpu0 = rss = None
        busy = 0.0
        try:
            if await self._parked(workers, self.clients):
                if self.on_parked is not None:
                    await self.on_parked()
                rss = self.server_rss() if self.server_rss else None
                cpu0 = self.server_cpu() if self.server_cpu else None
                publisher = await bench_publisher(self.target)
                marks = workers.mark()
                start = time.monotonic()
                give_up = start + self.messages / self.rate + self.drain
                for index in range(self.messages):
                    if time.monotonic() > give_up:  # (a drowning target must not take hours)
                        out["error"] = (f"stopped after {self.sent:,} messages: the target "
                                        f"fell more than {self.drain:g} s behind the schedule")
                        break
                    wait = start + index / self.rate - time.monotonic()
                    if wait > 0:
                        try:
                            await asyncio.wait_for(self._stop.wait(), wait)
                        except asyncio.TimeoutError:
                            pass
                    if self._stop.is_set():
                        break
                    status, body = await asyncio.wait_for(publisher.publish(index),
                                                          self.drain)
                    if status not in (b"200", b"201"):
                        out["error"] = (f"a publish was answered {status.decode()}: "
                                        f"{body[:200].decode(errors='replace')}")
                        break
                    self.sent += 1
                    workers.poll()
                    self.progress(self._fanout_line(workers, expected))
                target = self.sent * self.clients
                await self._until(lambda: workers.total("delivered") >= target, self.drain,
                                  lambda: self._fanout_line(workers, expected))
                busy = workers.busiest(marks)
            elif not self.interrupted and not workers.total("failed"):
                out.setdefault("error", "not every subscriber could connect and wait: "
                                        f"{workers.total('connected'):,} of {self.clients:,}")
        except (OSError, asyncio.TimeoutError) as exc:
            out["error"] = f"the target stopped answering: {exc or type(exc).__name__}"
        finally:
            cpu = self.server_cpu() - cpu0 if cpu0 is not None and self.server_cpu else None
            if publisher is not None:
                bench_close([publisher])
            results = await workers.stop()
        self._tally(out, results, self.sent * self.clients)
        out["sent"] = self.sent
        out["generator_cpu"] = busy
        completion = sorted(v for r in [_merge_completion(results)] for v in r.values())
        if completion:
            out["completion_p50_ms"] = _percentile(completion, 0.5) * 1000
            out["completion_max_ms"] = completion[-1] * 1000
        if cpu is not None and out["delivered"]:
            out["server_cpu_us_per_delivery"] = cpu / out["delivered"] * 1e6
        if rss is not None:
            out["server_rss_mb"] = rss
        return out

    def _fanout_line(self, workers: "_Workers", expected: int) -> str:
        return (f"sent {self.sent:,}/{self.messages:,} · delivered "
                f"{workers.total('delivered'):,}/{expected:,}")

    async def _throughput(self) -> dict[str, Any]:
        out = self._base()
        out.update(subscribers=self.subscribers, publishes=self.publishes)
        jobs = [{"mode": "subscribe", "count": n, "transport": self.transport}
                for n in (self.split(self.subscribers) if self.subscribers else [])]
        subscribers = _Workers(self.target, jobs) if jobs else None
        publisher = None
        results: list[dict[str, Any]] = []
        cpu = rss = None
        busy = 0.0
        try:
            if subscribers is None or await self._parked(subscribers, self.subscribers):
                rss = self.server_rss() if self.server_rss else None
                cpu0 = self.server_cpu() if self.server_cpu else None
                publisher = _Workers(self.target, [{"mode": "publish",
                                                    "count": self.publishes}])
                await self._until(publisher.finished, BENCH_CAPS["duration"],
                                  lambda: self._throughput_line(publisher, subscribers))
                busy = publisher.busiest()
                if subscribers is not None:
                    target = self.publishes * self.subscribers
                    await self._until(lambda: subscribers.total("delivered") >= target,
                                      self.drain,
                                      lambda: self._throughput_line(publisher, subscribers))
                    busy = max(busy, subscribers.busiest())
                cpu = self.server_cpu() - cpu0 if cpu0 is not None else None
            elif not self.interrupted and not subscribers.total("failed"):
                out["error"] = "not every subscriber could connect and wait"
        finally:
            published = (await publisher.stop())[0] if publisher is not None else {}
            if subscribers is not None:
                results = await subscribers.stop()
        if published.get("error"):
            out["error"] = published["error"]
        sent = published.get("published", 0)
        out["sent"] = sent
        if sent and published.get("end", 0) > published.get("start", 0):
            out["publishes_per_s"] = sent / (published["end"] - published["start"])
        self._tally(out, results, sent * self.subscribers)
        last = max((r.get("last", 0.0) for r in results), default=0.0)
        if self.subscribers and out["delivered"] and last > published.get("start", last):
            out["deliveries_per_s"] = out["delivered"] / (last - published["start"])
        if cpu is not None and sent:
            out["server_cpu_us_per_publish"] = cpu / sent * 1e6
        if rss is not None:
            out["server_rss_mb"] = rss
        out["generator_cpu"] = busy
        return out

    def _throughput_line(self, publisher: "_Workers", subscribers: "_Workers | None") -> str:
        publisher.poll()
        line = f"publishing {self.publishes:,}"
        if subscribers is not None:
            subscribers.poll()
            line += (f" · delivered {subscribers.total('delivered'):,}/"
                     f"{self.publishes * self.subscribers:,}")
        return line

    async def _connect(self) -> dict[str, Any]:
        out = self._base()
        out.update(clients=self.clients)
        workers = _Workers(self.target, [{"mode": "connect", "count": n}
                                         for n in self.split(self.clients)])
        cpu0 = self.server_cpu() if self.server_cpu else None
        start = time.monotonic()
        try:
            await self._until(workers.finished, 120,
                              lambda: f"connected and answered {workers.total('connected'):,}"
                                      f"/{self.clients:,}")
        finally:
            elapsed = time.monotonic() - start
            busy = workers.busiest()
            results = await workers.stop()
        latencies = sorted(t for r in results for t in r.get("latencies", ()))
        statuses: collections.Counter[str] = collections.Counter()
        for r in results:
            statuses.update(r.get("statuses", {}))
        out["answered"] = len(latencies)
        out["failed"] = sum(statuses.values()) - statuses.get("200", 0) + (
            self.clients - sum(statuses.values()) if not self.interrupted else 0)
        out["statuses"] = dict(statuses)
        out["seconds"] = elapsed
        if latencies:
            out["connections_per_s"] = len(latencies) / max(1e-9, max(latencies))
            out.update(_latency_fields(latencies))
        if cpu0 is not None and latencies:
            out["server_cpu_us_per_connection"] = (self.server_cpu() - cpu0) / len(
                latencies) * 1e6
        out["generator_cpu"] = busy
        return out

    def _tally(self, out: dict[str, Any], results: list[dict[str, Any]], expected: int) -> None:
        latencies = sorted(t for r in results for t in r.get("latencies", ()))
        out["expected"] = expected
        out["delivered"] = len(latencies)
        out["lost"] = max(0, expected - len(latencies))
        out["duplicates"] = sum(r.get("repeats", 0) for r in results)
        out["gaps"] = sum(r.get("gaps", 0) for r in results)
        out["failed_subscribers"] = sum(r.get("failed", 0) for r in results)
        out.update(_latency_fields(latencies))
        errors = [r["error"] for r in results if r.get("error")]
        if errors and "error" not in out:
            out["error"] = errors[0]


def _latency_fields(latencies: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max of sorted *latencies*, in milliseconds."""
    if not latencies:
        return {"latency_p50_ms": None, "latency_p90_ms": None, "latency_p99_ms": None,
                "latency_max_ms": None}
    return {"latency_p50_ms": _percentile(latencies, 0.5) * 1000,
            "latency_p90_ms": _percentile(latencies, 0.9) * 1000,
            "latency_p99_ms": _percentile(latencies, 0.99) * 1000,
            "latency_max_ms": latencies[-1] * 1000}


def _percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _merge_completion(results: list[dict[str, Any]]) -> dict[int, float]:
    """Per message, the slowest subscriber over every worker."""
    merged: dict[int, float] = {}
    for r in results:
        for index, latency in r.get("completion", {}).items():
            if latency > merged.get(index, -1.0):
                merged[index] = latency
    return merged


def _bench_refusal(status: bytes, body: bytes) -> str:
    """An answer that refused a subscriber, in a few words: its status and error."""
    try:
        error = json.loads(body.split(b"\r\n\r\n")[-1] or b"{}").get("error", "")
    except (ValueError, AttributeError):
        error = ""
    return f"{status.decode(errors='replace')} {error}".strip()


def _bench_health(target: BenchTarget) -> dict[str, Any]:
    """The target's /health (``{}`` when it does not answer)."""
    scheme = "https" if target.tls else "http"
    client = Client(f"{scheme}://{target.host}:{target.port}", timeout=5, retries=0,
                    token=target.token, cafile=target.cafile)
    try:
        return client.health()
    except LongpollError:
        return {}


def _pid_cpu(pid: int) -> float:
    """A process's CPU seconds, user and system (Linux: /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pid_rss(pid: int | str = "self") -> float | None:
    """A process's resident memory in MB (Linux: /proc), else None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def bench_table(result: dict[str, Any]) -> str:
    """A bench's result as a short table, for people."""
    rows: list[tuple[str, str]] = []

    def add(name: str, key: str, form: str = "{:,.0f}", unit: str = "") -> None:
        if result.get(key) is not None:
            rows.append((name, form.format(result[key]) + unit))

    scenario = result["scenario"]
    title = {"fanout": (f"fan-out: {result.get('subscribers', 0):,} subscribers "
                        f"({result['transport']}), {result.get('messages', 0):,} messages at "
                        f"{result.get('rate', 0):g}/s"),
             "throughput": (f"throughput: {result.get('publishes', 0):,} publishes over one "
                            f"connection, {result.get('subscribers', 0):,} subscribers "
                            f"({result['transport']})"),
             "connect": f"connect storm: {result.get('clients', 0):,} clients"}[scenario]
    if scenario in ("fanout", "throughput"):
        add("messages sent", "sent")
        add("publishes/s", "publishes_per_s")
        if scenario == "fanout" or result.get("subscribers"):
            rows.append(("delivered", f"{result.get('delivered', 0):,} of "
                                      f"{result.get('expected', 0):,}"))
            add("lost", "lost")
            add("duplicates", "duplicates")
            add("gaps", "gaps")
            if result.get("failed_subscribers"):
                add("subscribers refused or cut", "failed_subscribers")
            add("deliveries/s", "deliveries_per_s")
            for p in ("p50", "p90", "p99", "max"):
                add(f"latency {p}", f"latency_{p}_ms", "{:,.1f}", " ms")
            add("fan-out completion p50", "completion_p50_ms", "{:,.1f}", " ms")
            add("fan-out completion max", "completion_max_ms", "{:,.1f}", " ms")
        add("server CPU per delivery", "server_cpu_us_per_delivery", "{:,.1f}", " µs")
        add("server CPU per publish", "server_cpu_us_per_publish", "{:,.1f}", " µs")
    else:
        rows.append(("answered", f"{result.get('answered', 0):,} of "
                                 f"{result.get('clients', 0):,}"))
        add("failed", "failed")
        add("connections/s", "connections_per_s")
        for p in ("p50", "p90", "p99", "max"):
            add(f"connect + answer {p}", f"latency_{p}_ms", "{:,.1f}", " ms")
        add("server CPU per connection", "server_cpu_us_per_connection", "{:,.1f}", " µs")
    add("server memory (RSS)", "server_rss_mb", "{:,.0f}", " MB")
    add("load generator CPU (busiest worker)", "generator_cpu", "{:.0%}")
    width = max(len(name) for name, _ in rows) if rows else 0
    lines = [f"longpoll bench {result['target']}: {title}",
             *(f"  {name:<{width}}  {value}" for name, value in rows)]
    if result.get("generator_cpu", 0) >= 0.9:
        lines.append("  note: the load generator itself was the limit (a worker near 100 % "
                     "CPU): the server may do better; try more --generators, or another "
                     "machine")
    if result.get("gaps"):
        lines.append("  note: gap notices: subscribers fell further behind than the server "
                     "keeps (its --retention and --max-age); what they missed counts as lost")
    if result.get("interrupted"):
        lines.append("  interrupted (Ctrl-C): what was measured until then")
    if result.get("error"):
        lines.append(f"  error: {result['error']}")
    if re.search(r"\b(429|503)\b", result.get("error", "")):  # (a limit, not a bug)
        lines.append("  note: a server's limits per client (--max-connections-per-client, "
                     "--max-waiting-per-client, --publish-rate, --request-rate) count this "
                     "machine as one client; loopback is exempt")
    return "\n".join(lines)


def _bench(args: Any) -> int:
    """``longpoll bench [URL]``: measure a deployment, or (no URL) a server
    started here with the given serve options."""
    for name in ("clients", "messages", "rate", "publishes"):
        value = getattr(args, name)
        cap = BENCH_CAPS[name]
        if value <= 0:
            logger.error("--%s must be more than 0", name)
            return 2
        if value > cap and not args.no_caps:
            logger.error("--%s %s is over the cap of %s (--no-caps to go past it)", name,
                         f"{value:,}", f"{cap:,}")
            return 2
    if args.subscribers > BENCH_CAPS["clients"] and not args.no_caps:
        logger.error("--subscribers %s is over the cap of %s (--no-caps to go past it)",
                     f"{args.subscribers:,}", f"{BENCH_CAPS['clients']:,}")
        return 2
    if (args.scenario == "fanout" and args.messages / args.rate > BENCH_CAPS["duration"]
            and not args.no_caps):
        logger.error("%d messages at %g/s take longer than %.0f s (--no-caps to go past it)",
                     args.messages, args.rate, BENCH_CAPS["duration"])
        return 2
    channel = f"bench-{secrets.token_hex(4)}"
    server = None
    cpu = rss = None
    if args.url:
        try:
            target = BenchTarget.from_url(args.url, channel, args.token, args.cafile)
        except LongpollError as error:
            logger.error("%s", error.message)
            return 2
        try:
            addresses = [info[4][0] for info in socket.getaddrinfo(target.host, target.port)]
        except OSError as exc:
            logger.error("cannot resolve %s: %s", target.host, exc)
            return 2
        if not args.yes_i_own_this_server and not bench_target_allowed(target.host, addresses):
            logger.error("%s is not a loopback or private address: load only servers you own "
                         "(--yes-i-own-this-server)", target.host)
            return 2
    else:
        try:
            hub = Hub(**{option.name: getattr(args, option.name)
                         for option in OPTIONS if option.part == "hub"})
            server = make_server("127.0.0.1", 0, hub, **{
                option.name: getattr(args, option.name)
                for option in OPTIONS if option.part == "server"}).start()
        except (ValueError, LongpollError) as exc:
            logger.error("%s", exc)
            return 2
        target = BenchTarget("127.0.0.1", server.server_address[1], channel)
        # The server runs in this process; the load in other processes.
        cpu, rss = time.process_time, functools.partial(_pid_rss, "self")
    raise_open_file_limit()
    tty = sys.stderr.isatty()
    width = [0]

    def progress(line: str) -> None:
        if tty:
            sys.stderr.write("\r" + line.ljust(width[0]))
            sys.stderr.flush()
            width[0] = len(line)

    run = BenchRun(target, args.scenario, clients=args.clients, messages=args.messages,
                   rate=args.rate, publishes=args.publishes, subscribers=args.subscribers,
                   transport=args.transport, workers=args.generators, drain=args.drain,
                   server_pid=args.pid, server_cpu=cpu, server_rss=rss, progress=progress)
    try:
        result = run.run()
    finally:
        if tty and width[0]:
            sys.stderr.write("\r" + " " * width[0] + "\r")
        if server is not None:
            server.close()
    result["interrupted"] = run.interrupted
    result["server"] = "in-process" if server is not None else (
        f"pid {args.pid}" if args.pid else "remote")
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(bench_table(result), flush=True)
    return 130 if run.interrupted else 1 if result.get("error") else 0


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

EPILOG = """\
examples:
  python3 -m longpoll serve
  python3 -m longpoll publish news 'build done' --title CI --priority 4
  echo '{"ok": true}' | python3 -m longpoll publish news --json
  python3 -m longpoll subscribe news
  python3 -m longpoll subscribe news alerts --since 0 --json
  python3 -m longpoll subscribe ci --count 1    # wait for the next message, then exit
  python3 -m longpoll subscribe 'ci-*'          # every channel whose name starts ci-
  python3 -m longpoll publish reminders 'stand-up' --delay 10m --ttl 1h
  python3 -m longpoll expect backups --every 26h  # alert when no message comes for 26 h
  python3 -m longpoll bench --clients 200 --messages 10 --rate 50  # load-test a server here
"""


def _serve(args: Any) -> int:
    if args.keyfile and not args.certfile:
        logger.error("--keyfile needs --certfile (the certificate it is the key of)")
        return 2
    try:
        hub = Hub(**{option.name: getattr(args, option.name)
                     for option in OPTIONS if option.part == "hub"})
        auth = Auth.from_file(args.auth) if args.auth else None
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    try:
        server = make_server(args.host, args.port, hub, auth=auth,
                             cors_origins=args.cors_origin, trust_proxy=args.trust_proxy,
                             ntfy=args.ntfy,
                             certfile=args.certfile, keyfile=args.keyfile,
                             **{option.name: getattr(args, option.name)
                                for option in OPTIONS if option.part == "server"})
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


def _print_message(message: dict[str, Any], as_json: bool, channel: bool = False) -> None:
    """One message, one line: ``title: text`` (and ``[channel]`` first when
    several channels share the output)."""
    if as_json:
        print(json.dumps(message, ensure_ascii=False), flush=True)
        return
    body = message.get("message")
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    title = message.get("title")
    line = f"{title}: {text}" if title else text
    print(f"[{message.get('channel')}] {line}" if channel else line, flush=True)


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
    extra = {"tags": args.tags.split(",") if args.tags else None, "click": args.click,
             "markdown": True if args.markdown else None, "sequence_id": args.sequence_id,
             "ttl": args.ttl,
             "delay": args.delay, "at": args.at}
    result = client.publish(args.channel, message, title=args.title, priority=args.priority,
                            **extra)
    print(result["id"], flush=True)
    return 0


def _subscribe(args: Any) -> int:
    client = Client(args.url or [DEFAULT_URL], token=args.token, cafile=args.cafile)
    with client.subscribe(args.channels, since=args.since,
                          transport=args.transport) as subscription:
        several = len(subscription.channels) > 1 or is_pattern(subscription.channels[0])
        for count, message in enumerate(subscription, 1):
            _print_message(message, args.json, several)
            if count == args.count:
                break
    return 0


def _expect(args: Any) -> int:
    client = Client(args.url or [DEFAULT_URL], token=args.token, cafile=args.cafile)
    if args.delete:
        if not client.unexpect(args.channel):
            logger.error("no message is expected on %s", args.channel)
            return 1
        return 0
    state = (client.expect(args.channel, args.every, args.to) if args.every
             else client.expectation(args.channel))
    if state is None:
        logger.error("no message is expected on %s (set one with --every 26h)", args.channel)
        return 1
    print(json.dumps(state), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python3 -m longpoll serve | publish | subscribe | expect``."""
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

    def add_options(p: argparse.ArgumentParser) -> None:
        for option in OPTIONS:
            p.add_argument("--" + option.name.replace("_", "-"), type=type(option.default),
                           default=option.default, metavar=option.metavar,
                           help=f"{option.help} (default {option.default})")

    serve = commands.add_parser("serve", help="run a push server",
                                description="Run a longpoll server until SIGINT or SIGTERM.")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    add_options(serve)
    serve.add_argument("--auth", metavar="FILE",
                       help="JSON file of tokens and the channels they may read and write "
                            "(reloaded on SIGHUP); without it the server is open to anyone "
                            "who can reach it")
    serve.add_argument("--trust-proxy", action="store_true",
                       help="take the client address from X-Forwarded-For (only behind "
                            "your own proxy)")
    serve.add_argument("--no-ntfy", dest="ntfy", action="store_false",
                       help="do not speak ntfy's API (/<topic>, /<topic>/json, ...): only "
                            "this server's own paths")
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
    publish.add_argument("--tags", metavar="TAG,TAG", help="tags (ntfy's: emoji names too)")
    publish.add_argument("--click", metavar="URL", help="a URL a click on it opens")
    publish.add_argument("--markdown", action="store_true", help="the text is Markdown")
    publish.add_argument("--sequence-id", metavar="ID",
                         help="messages with the same one update one notification in place")
    publish.add_argument("--delay", metavar="DURATION",
                         help="publish it this much later (30s, 10m, 2h, 1d; up to the "
                              "server's --max-delay)")
    publish.add_argument("--at", metavar="TIME",
                         help="publish it at this time: a Unix time, or RFC 3339 such as "
                              "2026-12-24T18:00:00Z")
    publish.add_argument("--ttl", metavar="DURATION",
                         help="expire it after this long (90s, 10m, 2h, 1d): never delivered "
                              "later, and dropped from history")
    add_client(publish)

    subscribe = commands.add_parser(
        "subscribe", help="print messages as they arrive",
        description="Print each message of the CHANNELs as it arrives, until Ctrl-C.")
    subscribe.add_argument("channels", metavar="CHANNEL", nargs="+",
                           help="a channel, or a pattern of channels such as 'ci-*' "
                                "(quoted, so the shell leaves it alone)")
    subscribe.add_argument("--since", help="start after this cursor (0: all held)")
    subscribe.add_argument("--json", action="store_true",
                           help="one JSON object per line, with id, time, title, priority")
    subscribe.add_argument("--count", type=int, metavar="N",
                           help="exit after N messages (e.g. wait for one in a script)")
    subscribe.add_argument("--transport", choices=("poll", "ws"), default="poll",
                           help="long-poll (default), or a WebSocket, which long-polls "
                                "where the upgrade is refused")
    add_client(subscribe)

    expect = commands.add_parser(
        "expect", help="be alerted when a channel goes silent",
        description="Have the server publish an alert when CHANNEL gets no message for "
                    "--every (a dead man's switch), and again when messages resume. "
                    "Without --every: show the state.")
    expect.add_argument("channel", metavar="CHANNEL")
    expect.add_argument("--every", metavar="DURATION",
                        help="a message should come at least this often (26h, 90m, 1d)")
    expect.add_argument("--to", metavar="CHANNEL",
                        help="publish the alerts there (default: CHANNEL itself)")
    expect.add_argument("--delete", action="store_true", help="stop expecting messages")
    add_client(expect)

    bench = commands.add_parser(
        "bench", help="load-test a server (this one, or yours at URL)",
        description="Measure a longpoll server under load: with URL, that deployment; "
                    "without, a server started here (the serve options below shape it). "
                    "Only loopback and private addresses unless --yes-i-own-this-server.",
        epilog="examples: python3 -m longpoll bench; python3 -m longpoll bench "
               "--scenario throughput --store sqlite:bench.db; python3 -m longpoll bench "
               "https://push.internal --token T --clients 5000 --transport ws")
    bench.add_argument("url", metavar="URL", nargs="?",
                       help="the server to measure (default: one started here)")
    bench.add_argument("--scenario", choices=("fanout", "throughput", "connect"),
                       default="fanout",
                       help="fanout: subscribers parked, messages at a rate (default); "
                            "throughput: publishes back-to-back; connect: a connect storm")
    bench.add_argument("--transport", choices=("poll", "sse", "ws"), default="poll",
                       help="how subscribers subscribe (default poll: long-poll)")
    bench.add_argument("--clients", type=int, default=1000, metavar="N",
                       help="fanout: subscribers; connect: clients (default 1000)")
    bench.add_argument("--messages", type=int, default=50, metavar="M",
                       help="fanout: messages to publish (default 50)")
    bench.add_argument("--rate", type=float, default=10.0, metavar="R",
                       help="fanout: messages per second (default 10)")
    bench.add_argument("--publishes", type=int, default=10_000, metavar="P",
                       help="throughput: publishes (default 10000)")
    bench.add_argument("--subscribers", type=int, default=0, metavar="K",
                       help="throughput: subscribers parked meanwhile (default 0)")
    bench.add_argument("--generators", type=int, default=0, metavar="N",
                       help="load generator processes (default: the cores but one, up to 4)")
    bench.add_argument("--drain", type=float, default=30.0, metavar="SECONDS",
                       help="how long to wait for the last deliveries (default 30)")
    bench.add_argument("--pid", type=int,
                       help="the server's process id, to report its CPU and memory (Linux)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--no-caps", action="store_true",
                       help=f"allow more than {BENCH_CAPS['clients']:,} clients, "
                            f"{BENCH_CAPS['messages']:,} messages, {BENCH_CAPS['rate']:,.0f} "
                            f"messages/s, {BENCH_CAPS['publishes']:,} publishes or "
                            f"{BENCH_CAPS['duration']:.0f} s")
    bench.add_argument("--yes-i-own-this-server", action="store_true",
                       help="load a public address (only a server you run)")
    add_options(bench)
    bench.add_argument("--token", default=os.environ.get("LONGPOLL_TOKEN"),
                       help="bearer token for a server run with --auth")
    bench.add_argument("--cafile", metavar="PEM",
                       help="trust an https:// server whose certificate this CA issued")
    add_logging(bench)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command not in ("serve", "bench") and not args.url and os.environ.get(
            "LONGPOLL_URL"):
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
    run = {"serve": _serve, "publish": _publish, "subscribe": _subscribe,
           "expect": _expect, "bench": _bench}[args.command]
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
