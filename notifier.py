"""notifier: desktop notifications for longpoll channels.

    python3 notifier.py news alerts                  # or: python3 -m notifier, longpoll-notify
    python3 notifier.py ci --min-priority 4 --url http://build-host:5000
    python3 notifier.py 'ci-*'                       # every channel whose name starts ci-

Subscribes with longpoll's client and pops a desktop notification through
``plyer`` for each message: its title is the message's ``title`` (else the
channel; with a pattern such as ``ci-*``, the channel and the title), its
body the message (shortened), its urgency from ``priority``
(1-2 low, 3-4 normal, 5 critical; on Linux urgency needs dbus-python). A
burst (more than ``--burst`` messages within half a second) becomes one
summary. The last cursor per channel is kept in a small state file, so
after sleep or a restart the notifier shows what it missed; messages that
expired meanwhile are announced as such. A message that could not be shown
(the notification daemon is gone) stays pending: the cursor does not pass
it, and it is shown once showing works again. ``plyer`` is imported
lazily: ``pip install plyer``.
"""

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import longpoll

logger = logging.getLogger("longpoll.notifier")

#: priority -> desktop urgency.
URGENCY = {1: "low", 2: "low", 3: "normal", 4: "normal", 5: "critical"}
URGENCY_LEVEL = {"low": 0, "normal": 1, "critical": 2}   # freedesktop's byte values
DEFAULT_PRIORITY = 3
MAX_BODY = 200   # characters shown of a message before the ellipsis

Notify = Callable[[str, str, str], None]   # (title, body, urgency)


class NotifierError(Exception):
    """A problem the user must fix (one clear line, no traceback)."""


# -- what a notification says -------------------------------------------------------

def shorten(text: str, limit: int = MAX_BODY) -> str:
    text = " ".join(text.split()) if len(text) > limit else text
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def describe(message: dict[str, Any], with_channel: bool = False) -> tuple[str, str, str]:
    """(title, body, urgency) for one message; *with_channel*: the title
    names the channel too (``ci-main: Build failed``), for a pattern."""
    value = message.get("message")
    body = value if isinstance(value, str) else json.dumps(
        value, ensure_ascii=False, separators=(",", ":"))
    channel = message.get("channel", "longpoll")
    title = message.get("title") or channel
    if with_channel and title != channel:
        title = f"{channel}: {title}"
    return shorten(title, 100), shorten(body), URGENCY[priority_of(message)]


def priority_of(message: dict[str, Any]) -> int:
    priority = message.get("priority")
    return priority if isinstance(priority, int) and 1 <= priority <= 5 else DEFAULT_PRIORITY


# -- the notifier -------------------------------------------------------------------

class Notifier:
    """Turns the answers of a subscription into notifications.

    *notify(title, body, urgency)* shows one; inject your own to test or to
    send them elsewhere. ``handle(answers)`` takes the answers that arrived
    together (within ``window`` seconds) and is the whole policy:
    priority filter, burst summaries, gap notices, and the state file.
    """

    def __init__(self, client: longpoll.Client, channels: Iterable[str], notify: Notify, *,
                 min_priority: int = 1, burst: int = 3, window: float = 0.5,
                 state_path: str | None = None, notify_connection: bool = False) -> None:
        self.client = client
        self.channels = tuple(channels)
        #: A pattern brings several channels: each title names its channel.
        self.with_channel = any(map(longpoll.is_pattern, self.channels))
        self.notify = notify
        self.min_priority = min_priority
        self.burst = burst
        self.window = window
        self.state_path = state_path
        self.notify_connection = notify_connection
        self.state = load_state(state_path) if state_path else {}
        #: Seconds between attempts to show what could not be shown.
        self.retry_every = 5.0
        self._messages: list[dict[str, Any]] = []  # came, and not all shown yet
        self._pending: list[_Note] = []  # notifications to show, in order
        self._end: str | None = None  # the cursor past everything that came
        self._failing = False
        self._answers: queue.Queue = queue.Queue()
        self._subscription: longpoll.Subscription | None = None

    def since(self) -> str | None:
        """Where to resume: the cursor saved for these channels, if any."""
        saved = [self.state.get(channel) for channel in self.channels]
        if not all(saved):
            return None if not any(saved) else min(filter(None, saved), key=_cursor_order)
        return min(saved, key=_cursor_order)

    def handle(self, answers: list[dict[str, Any]]) -> bool:
        """Show what *answers* (arrived together) say, after anything still
        pending; save the cursor past what was shown. Returns False if a
        notification could not be shown: it and those after it stay
        pending (``retry``), and the cursor stays before their messages."""
        for answer in answers:
            first = len(self._messages)
            self._messages.extend(answer["messages"])
            if answer.get("gap"):
                lost = (self.channels if not answer["messages"]
                        else (answer["messages"][0]["channel"],))
                for channel in sorted(lost):
                    self._pending.append(_Note(
                        f"Messages lost on {channel}",
                        "Some messages expired before they could be shown.", "normal", first))
        by_channel: dict[str, list[tuple[int, dict]]] = {}
        start = len(self._messages) - sum(len(a["messages"]) for a in answers)
        for index in range(start, len(self._messages)):
            message = self._messages[index]
            if priority_of(message) >= self.min_priority:
                by_channel.setdefault(message["channel"], []).append((index, message))
        for channel, indexed in by_channel.items():
            messages = [m for _, m in indexed]
            if len(messages) > self.burst:
                top = max(priority_of(m) for m in messages)
                latest = describe(messages[-1], self.with_channel)
                self._pending.append(_Note(f"{len(messages)} new messages on {channel}",
                                           f"Latest: {latest[0]}: {latest[1]}", URGENCY[top],
                                           indexed[0][0]))
            else:
                self._pending.extend(_Note(*describe(m, self.with_channel), i)
                                     for i, m in indexed)
        if answers:
            self._end = answers[-1]["cursor"]
        return self.retry()

    def retry(self) -> bool:
        """Show what is pending, in order; save the cursor. False if one
        could not be shown (it stays pending, with those after it)."""
        shown = True
        while self._pending:
            note = self._pending[0]
            try:
                self.notify(note.title, note.body, note.urgency)
            except NotifierError as error:
                if not self._failing:
                    logger.warning("%s; will show it when that works again", error)
                self._failing, shown = True, False
                break
            if self._failing:
                logger.warning("showing notifications again")
                self._failing = False
            self._pending.pop(0)
        self._save()
        return shown

    def _save(self) -> None:
        """Save the cursor past every message shown: the end of what came,
        or, while notes are pending, just before the first message they show."""
        if self._pending:
            first = min(note.first for note in self._pending)
            cursor = self._messages[first - 1]["id"] if first else None
            self._messages = self._messages[first:]
            self._pending = [note._replace(first=note.first - first) for note in self._pending]
        else:
            cursor, self._messages = self._end, []
        if cursor and self.state_path and any(self.state.get(c) != cursor
                                              for c in self.channels):
            self.state.update({channel: cursor for channel in self.channels})
            save_state(self.state_path, self.state)

    def _connection(self, connected: bool, error: longpoll.LongpollError | None) -> None:
        if connected:
            logger.warning("connected again to %s", self.client.urls[self.client._current])
        else:
            logger.warning("lost the connection: %s", error)
        if self.notify_connection:
            self.notify("longpoll: connected again" if connected else "longpoll: connection lost",
                        ", ".join(self.channels) if connected else str(error), "normal")

    def _subscribe(self) -> None:
        try:
            for answer in self._subscription.batches():
                self._answers.put(answer)
        except BaseException as exc:  # surfaced to run()'s thread
            self._answers.put(exc)
        else:
            self._answers.put(None)

    def run(self) -> None:
        """Notify until ``close()`` (or Ctrl-C in the calling thread)."""
        self._subscription = self.client.subscribe(self.channels, since=self.since(),
                                                   on_connection=self._connection)
        threading.Thread(target=self._subscribe, name="notifier-subscription",
                         daemon=True).start()
        while True:
            first = self._get(time.monotonic() + self.retry_every if self._pending else None)
            if first is _EMPTY:
                self.retry()  # nothing new came: show what is pending, if it works now
                continue
            if first is None:
                return  # the subscription ended (closed)
            answers, ended = [first], False
            deadline = time.monotonic() + self.window  # gather what comes with it
            while True:
                more = self._get(deadline)
                if more is _EMPTY:
                    break
                if more is None:
                    ended = True
                    break
                answers.append(more)
            self.handle(answers)
            if ended:
                return

    def _get(self, deadline: float | None) -> Any:
        """The next answer, or ``_EMPTY`` once *deadline* passes (None:
        wait). Waits in short slices so that Ctrl-C is seen at once."""
        while True:
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                return _EMPTY
            try:
                item = self._answers.get(timeout=left)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()


_EMPTY = object()  # "nothing more came within the window"


class _Note(NamedTuple):
    """A notification to show, and the first message it shows (an index
    into the messages not all shown yet): the cursor may not pass it."""
    title: str
    body: str
    urgency: str
    first: int


def _cursor_order(cursor: str) -> tuple[str, int]:
    """longpoll's cursors are "<history>-<seq>": order by position."""
    history, _, seq = cursor.rpartition("-")
    return (history, int(seq)) if seq.isdigit() else (cursor, 0)


# -- the state file -----------------------------------------------------------------

def default_state_path() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".local", "state")
    return os.path.join(base, "longpoll", "notifier.json")


def load_state(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return {k: v for k, v in data.get("cursors", {}).items() if isinstance(v, str)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        logger.warning("ignoring the unreadable state file %s: %s", path, exc)
        return {}


def save_state(path: str, cursors: dict[str, str]) -> None:
    """Write atomically: a crash mid-write never leaves a broken file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"cursors": cursors}, f)
    os.replace(temporary, path)


# -- how notifications are shown ----------------------------------------------------

def desktop_notify(app_name: str = "longpoll") -> Notify:
    """A notify function that shows desktop notifications, checked first:
    raises ``NotifierError`` (one line saying what is missing) when nothing
    could be shown here. Through plyer (imported here, lazily); on Linux
    plyer needs dbus-python to speak to the notification daemon, and
    without it this runs ``notify-send`` itself, as plyer would, but so
    that urgency and failures are not lost."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from plyer import notification
    except ImportError:
        raise NotifierError("plyer is not installed: pip install plyer "
                            "(or use --print)") from None
    if not sys.platform.startswith("linux"):
        return _plyer_notify(notification, None, app_name)
    _check_session()
    try:  # urgency needs the D-Bus byte type (plyer's notify-send path ignores it)
        import dbus
    except ImportError:
        return _notify_send(app_name)
    try:
        bus = dbus.SessionBus()
        present = (bus.name_has_owner(NOTIFICATIONS)
                   or NOTIFICATIONS in bus.list_activatable_names())
    except dbus.exceptions.DBusException as exc:
        raise NotifierError(f"cannot reach the desktop session's D-Bus ({_first_line(exc)}); "
                            "run it inside your desktop session, or use --print") from None
    if not present:
        raise NotifierError("no notification daemon on the session bus (start one, "
                            "e.g. dunst, or your desktop's; or use --print)")
    return _plyer_notify(notification, dbus.Byte, app_name)


NOTIFICATIONS = "org.freedesktop.Notifications"  # the freedesktop service


def _first_line(error: Any) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_session() -> None:
    """A desktop session on Linux: a D-Bus session bus to reach (named by
    $DBUS_SESSION_BUS_ADDRESS, or the user bus in $XDG_RUNTIME_DIR, or
    one dbus may start for an X display)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if (os.environ.get("DBUS_SESSION_BUS_ADDRESS") or os.environ.get("DISPLAY")
            or runtime and os.path.exists(os.path.join(runtime, "bus"))):
        return
    raise NotifierError("no desktop session here (no D-Bus session bus and no display): "
                        "run it inside your desktop session, or use --print")


def _plyer_notify(notification: Any, byte: Any, app_name: str) -> Notify:
    def notify(title: str, body: str, urgency: str) -> None:
        hints = {"urgency": byte(URGENCY_LEVEL[urgency])} if byte else {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                notification.notify(title=title, message=body, app_name=app_name,
                                    timeout=10, hints=hints)
        except NotImplementedError:
            raise NotifierError("no desktop notification backend works here "
                                "(on Linux: a notification daemon and D-Bus; or use --print)"
                                ) from None
        except Exception as exc:  # dbus.exceptions.DBusException and friends
            raise NotifierError(f"could not show a notification ({_first_line(exc)})") from None

    return notify


def _notify_send(app_name: str) -> Notify:
    program = shutil.which("notify-send")
    if program is None:
        raise NotifierError("neither dbus-python nor notify-send is installed: "
                            "apt-get install libnotify-bin (or use --print)")

    def notify(title: str, body: str, urgency: str) -> None:
        try:
            done = subprocess.run([program, "--app-name", app_name, "--urgency", urgency,
                                   "--expire-time", "10000", "--", title, body],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NotifierError(f"could not show a notification ({exc})") from None
        if done.returncode:
            raise NotifierError("could not show a notification "
                                f"({_first_line(done.stderr or done.returncode)})")

    return notify


def print_notify(title: str, body: str, urgency: str) -> None:
    mark = {"low": " ", "normal": "*", "critical": "!"}[urgency]
    print(f"{mark} {title}: {body}", flush=True)


# -- command line -------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="longpoll-notify", description="Desktop notifications for longpoll channels.",
        epilog="example: python3 notifier.py news alerts --min-priority 3")
    parser.add_argument("channels", metavar="CHANNEL", nargs="+")
    parser.add_argument("--url", action="append", metavar="URL",
                        help=f"server base URL; repeat for failover (default "
                             f"{longpoll.DEFAULT_URL}, or $LONGPOLL_URL)")
    parser.add_argument("--token", default=os.environ.get("LONGPOLL_TOKEN"),
                        help="bearer token (default $LONGPOLL_TOKEN)")
    parser.add_argument("--cafile", metavar="PEM",
                        help="trust https:// servers whose certificate this CA issued")
    parser.add_argument("--min-priority", type=int, default=1, choices=range(1, 6),
                        metavar="N", help="show only messages of priority N or more (1-5)")
    parser.add_argument("--burst", type=int, default=3, metavar="N",
                        help="more than N messages at once become one summary (default 3)")
    parser.add_argument("--state", metavar="FILE", default=None,
                        help=f"where to keep the last cursors (default {default_state_path()})")
    parser.add_argument("--no-state", action="store_true", help="keep no state file")
    parser.add_argument("--notify-connection", action="store_true",
                        help="also notify when the connection is lost and when it is back")
    parser.add_argument("--print", action="store_true",
                        help="print to the terminal instead of desktop notifications")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="longpoll-notify: %(message)s")
    try:
        for channel in args.channels:
            longpoll.check_pattern(channel)
        notify = print_notify if args.print else desktop_notify()
        urls = args.url or [os.environ.get("LONGPOLL_URL") or longpoll.DEFAULT_URL]
        notifier = Notifier(longpoll.Client(urls, token=args.token,
                                                    cafile=args.cafile), args.channels, notify,
                            min_priority=args.min_priority, burst=args.burst,
                            state_path=None if args.no_state else (args.state or
                                                                   default_state_path()),
                            notify_connection=args.notify_connection)
        notifier.run()
    except (NotifierError, longpoll.LongpollError) as error:
        print(f"longpoll-notify: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
