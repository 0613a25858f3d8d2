"""notifier: desktop notifications for longpoll channels.

    python3 notifier.py news alerts                  # or: python3 -m notifier, longpoll-notify
    python3 notifier.py ci --min-priority 4 --url http://build-host:5000
    python3 notifier.py 'ci-*'                       # every channel whose name starts ci-
    python3 notifier.py alerts --quiet 22:00-07:00 --sound --exec 'logger "$LONGPOLL_TITLE"'

Subscribes with longpoll's client and pops a desktop notification for
each message: its title is the message's ``title`` (else the channel;
with a pattern such as ``ci-*``, the channel and the title), its body the
message (shortened), its urgency from ``priority`` (1-2 low, 3-4 normal,
5 critical). A burst (more than ``--burst`` messages within half a
second) becomes one summary. The last cursor per channel is kept in a
small state file, so after sleep or a restart the notifier shows what it
missed; messages that expired meanwhile are announced as such. A message
that could not be shown (the notification daemon is gone) stays pending:
the cursor does not pass it, and it is shown once showing works again.

On Linux it speaks the desktop's notification service (freedesktop's
D-Bus API) itself, with the standard library: a message's ``click`` URL
opens when the notification is clicked, its ``actions`` (ntfy's ``view``
and ``http`` buttons) are buttons, messages with the same ``sequence_id``
update one notification in place, ``--sound`` asks for a sound on urgent
ones. Elsewhere it shows them through ``plyer`` (imported lazily: ``pip
install plyer``), which has no clicks or buttons. ``--exec`` runs a
command per message, ``--quiet`` holds all but urgent ones at night, and
``--tray`` shows an icon with the unread count (``pip install pystray``).
"""

import html
import itertools
import json
import logging
import os
import queue
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import webbrowser
from typing import Any, Callable, Iterable, NamedTuple

import longpoll

logger = logging.getLogger("longpoll.notifier")

#: priority -> desktop urgency.
URGENCY = {1: "low", 2: "low", 3: "normal", 4: "normal", 5: "critical"}
URGENCY_LEVEL = {"low": 0, "normal": 1, "critical": 2}   # freedesktop's byte values
DEFAULT_PRIORITY = 3
MAX_BODY = 200   # characters shown of a message before the ellipsis
SOUND_PRIORITY = 4   # --sound: the sound hint for priority 4 and 5
SOUND_NAME = "message-new-instant"   # freedesktop's sound naming spec


class Notification(NamedTuple):
    """One notification to show."""
    title: str
    body: str
    urgency: str                      # low, normal or critical
    click: str | None = None          # a URL a click on it opens
    actions: tuple[dict[str, Any], ...] = ()   # ntfy's view and http buttons
    key: str | None = None            # the one shown with the same key is updated in place
    sound: bool = False               # ask the notification server for a sound


Notify = Callable[[Notification], None]


class NotifierError(Exception):
    """A problem the user must fix (one clear line, no traceback)."""


# -- what a notification says -------------------------------------------------------

def shorten(text: str, limit: int = MAX_BODY) -> str:
    text = " ".join(text.split()) if len(text) > limit else text
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def describe(message: dict[str, Any], with_channel: bool = False) -> Notification:
    """The notification for one message; *with_channel*: the title names
    the channel too (``ci-main: Build failed``), for a pattern."""
    value = message.get("message")
    body = value if isinstance(value, str) else json.dumps(
        value, ensure_ascii=False, separators=(",", ":"))
    channel = message.get("channel", "longpoll")
    title = message.get("title") or channel
    if with_channel and title != channel:
        title = f"{channel}: {title}"
    actions = tuple(a for a in message.get("actions") or ()
                    if isinstance(a, dict) and a.get("action") in ("view", "http")
                    and isinstance(a.get("url"), str) and isinstance(a.get("label"), str))
    sequence = message.get("sequence_id")
    return Notification(shorten(title, 100), shorten(body), URGENCY[priority_of(message)],
                        click=message.get("click") if isinstance(message.get("click"), str)
                        else None, actions=actions,
                        key=f"{channel}/{sequence}" if isinstance(sequence, str) else None)


def priority_of(message: dict[str, Any]) -> int:
    priority = message.get("priority")
    return priority if isinstance(priority, int) and 1 <= priority <= 5 else DEFAULT_PRIORITY


# -- the notifier -------------------------------------------------------------------

class Notifier:
    """Turns the answers of a subscription into notifications.

    *notify(notification)* shows one (a ``Notification``); inject your own
    to test or to send them elsewhere. ``handle(answers)`` takes the
    answers that arrived together (within ``window`` seconds) and is the
    whole policy: priority filter, quiet hours, burst summaries, gap
    notices, the command per message, and the state file.

    *quiet*: ``(start, end)`` minutes after local midnight (``--quiet
    22:00-07:00`` is ``(1320, 420)``); in between, messages below
    *quiet_min_priority* are held, and one summary shows when quiet hours
    end. *clock* gives the time (a Unix time; inject one to test).
    *command*: a shell command run for each message shown (``--exec``).
    *sound*: ask for a sound on messages of priority 4 and 5.
    *on_message(message)*: called for each message that passes the
    priority filter (the tray icon counts them).
    """

    def __init__(self, client: longpoll.Client, channels: Iterable[str], notify: Notify, *,
                 min_priority: int = 1, burst: int = 3, window: float = 0.5,
                 state_path: str | None = None, notify_connection: bool = False,
                 command: str | None = None, quiet: tuple[int, int] | None = None,
                 quiet_min_priority: int = 5, sound: bool = False,
                 clock: Callable[[], float] = time.time,
                 on_message: Callable[[dict[str, Any]], None] | None = None,
                 on_connection: Callable[[bool], None] | None = None) -> None:
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
        self.quiet = quiet
        self.quiet_min_priority = quiet_min_priority
        self.sound = sound
        self.clock = clock
        self.on_message = on_message
        self.on_connection = on_connection
        #: False while paused (the tray's switch): messages are counted, not shown.
        self.showing = True
        self.state = load_state(state_path) if state_path else {}
        #: Seconds between attempts to show what could not be shown.
        self.retry_every = 5.0
        self._messages: list[dict[str, Any]] = []  # came, and not all shown yet
        self._pending: list[_Note] = []  # notifications to show, in order
        self._held: list[dict[str, Any]] = []  # held in quiet hours
        self._end: str | None = None  # the cursor past everything that came
        self._failing = False
        self._answers: queue.Queue = queue.Queue()
        self._subscription: longpoll.Subscription | None = None
        self._commands = Commands(command) if command else None

    def since(self) -> str | None:
        """Where to resume: the cursor saved for these channels, if any."""
        saved = [self.state.get(channel) for channel in self.channels]
        if not all(saved):
            return None if not any(saved) else min(filter(None, saved), key=_cursor_order)
        return min(saved, key=_cursor_order)

    def quiet_now(self) -> bool:
        """Whether it is quiet hours now (by *clock*, in local time)."""
        if self.quiet is None:
            return False
        now = time.localtime(self.clock())
        minute, (start, end) = now.tm_hour * 60 + now.tm_min, self.quiet
        return start <= minute < end if start <= end else minute >= start or minute < end

    def handle(self, answers: list[dict[str, Any]]) -> bool:
        """Show what *answers* (arrived together) say, after anything still
        pending; save the cursor past what was shown. Returns False if a
        notification could not be shown: it and those after it stay
        pending (``retry``), and the cursor stays before their messages."""
        quiet = self.quiet_now()
        for answer in answers:
            first = len(self._messages)
            self._messages.extend(answer["messages"])
            if answer.get("gap"):
                lost = (self.channels if not answer["messages"]
                        else (answer["messages"][0]["channel"],))
                for channel in sorted(lost):
                    self._pending.append(_Note(Notification(
                        f"Messages lost on {channel}",
                        "Some messages expired before they could be shown.", "normal"), first))
        by_channel: dict[str, list[tuple[int, dict]]] = {}
        start = len(self._messages) - sum(len(a["messages"]) for a in answers)
        for index in range(start, len(self._messages)):
            message = self._messages[index]
            priority = priority_of(message)
            if priority < self.min_priority:
                continue
            if self.on_message is not None:
                self.on_message(message)
            if not self.showing:
                continue  # paused: counted (on_message), not shown
            if quiet and priority < self.quiet_min_priority:
                self._held.append(message)
                continue
            by_channel.setdefault(message["channel"], []).append((index, message))
        if not quiet and self._held:  # (held before these came: shown before them)
            self._release_held(start)
        for channel, indexed in by_channel.items():
            messages = [m for _, m in indexed]
            if len(messages) > self.burst:
                self._pending.append(_Note(self.summary(
                    f"{len(messages)} new messages on {channel}", messages),
                    indexed[0][0], messages))
            else:
                self._pending.extend(_Note(self.notification(m), i, [m]) for i, m in indexed)
        if answers:
            self._end = answers[-1]["cursor"]
        return self.retry()

    def tick(self) -> bool:
        """What the loop does when nothing came: show what quiet hours held
        once they are over, and what is pending, if showing works now."""
        if self._held and not self.quiet_now():
            self._release_held(len(self._messages))
        return self.retry()

    def _release_held(self, first: int) -> None:
        """One summary of what quiet hours held (their messages are behind
        the cursor already: *first* is where the ones to come begin)."""
        held, self._held = self._held, []
        title = (f"{len(held)} message{'s' if len(held) > 1 else ''} during quiet hours")
        self._pending.append(_Note(self.summary(title, held), first, held))

    def notification(self, message: dict[str, Any]) -> Notification:
        note = describe(message, self.with_channel)
        return note._replace(sound=self.sound and priority_of(message) >= SOUND_PRIORITY)

    def summary(self, title: str, messages: list[dict[str, Any]]) -> Notification:
        """One notification for several messages: the count, the latest,
        the highest urgency (and its sound)."""
        top = max(priority_of(m) for m in messages)
        latest = describe(messages[-1], self.with_channel)
        return Notification(title, f"Latest: {latest.title}: {latest.body}", URGENCY[top],
                            sound=self.sound and top >= SOUND_PRIORITY)

    def retry(self) -> bool:
        """Show what is pending, in order; save the cursor. False if one
        could not be shown (it stays pending, with those after it)."""
        shown = True
        while self._pending:
            note = self._pending[0]
            try:
                self.notify(note.notification)
            except NotifierError as error:
                if not self._failing:
                    logger.warning("%s; will show it when that works again", error)
                self._failing, shown = True, False
                break
            if self._failing:
                logger.warning("showing notifications again")
                self._failing = False
            self._pending.pop(0)
            if self._commands is not None and note.messages:
                self._commands.run(note.notification, note.messages)
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
        if self.on_connection is not None:
            self.on_connection(connected)
        if self.notify_connection:
            self.notify(Notification(
                "longpoll: connected again" if connected else "longpoll: connection lost",
                ", ".join(self.channels) if connected else str(error), "normal"))

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
        if self.on_connection is not None:
            self.on_connection(True)
        try:
            self._run()
        finally:
            if self._commands is not None:
                self._commands.close()

    def _run(self) -> None:
        while True:
            wake = (self.retry_every if self._pending else
                    QUIET_CHECK if self._held else None)
            first = self._get(None if wake is None else time.monotonic() + wake)
            if first is _EMPTY:
                self.tick()  # nothing new came: what quiet hours held, what is pending
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
QUIET_CHECK = 30.0  # seconds between checks whether quiet hours are over


class _Note(NamedTuple):
    """A notification to show, and the first message it shows (an index
    into the messages not all shown yet): the cursor may not pass it;
    *messages*: what it shows, for the command (none for a notice)."""
    notification: Notification
    first: int
    messages: tuple[dict[str, Any], ...] | list[dict[str, Any]] = ()


def parse_quiet(text: str) -> tuple[int, int]:
    """``22:00-07:00`` as (start, end) minutes after midnight."""
    try:
        start, end = (_minutes(part) for part in text.split("-"))
    except ValueError:
        raise NotifierError(f"--quiet takes HH:MM-HH:MM such as 22:00-07:00, not {text!r}"
                            ) from None
    if start == end:
        raise NotifierError("--quiet: the start and the end are the same time")
    return start, end


def _minutes(text: str) -> int:
    hours, minutes = text.strip().split(":")
    if not (hours.isdigit() and minutes.isdigit() and len(minutes) == 2
            and int(hours) < 24 and int(minutes) < 60):
        raise ValueError(text)
    return int(hours) * 60 + int(minutes)


# -- a command per message ------------------------------------------------------------

class Commands:
    """Runs ``--exec``'s command for each message shown, one at a time and
    in order, off the notifier's thread: the message in ``LONGPOLL_*``
    environment variables and as JSON on standard input. A command that
    fails is reported and the next one runs."""

    def __init__(self, command: str) -> None:
        self.command = command
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="notifier-exec", daemon=True)
        self._thread.start()

    def run(self, note: Notification, messages: list[dict[str, Any]]) -> None:
        self._queue.put((note, messages))

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued (up to *timeout* seconds), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            self._run(*item)

    def _run(self, note: Notification, messages: list[dict[str, Any]]) -> None:
        latest = messages[-1]
        value = latest.get("message")
        env = dict(os.environ,
                   LONGPOLL_CHANNEL=str(latest.get("channel", "")),
                   LONGPOLL_TITLE=note.title,
                   LONGPOLL_MESSAGE=value if isinstance(value, str) else json.dumps(value),
                   LONGPOLL_PRIORITY=str(priority_of(latest)),
                   LONGPOLL_ID=str(latest.get("id", "")),
                   LONGPOLL_CLICK=note.click or "",
                   LONGPOLL_COUNT=str(len(messages)))
        data = latest if len(messages) == 1 else {**latest, "title": note.title,
                                                  "count": len(messages),
                                                  "messages": messages}
        try:
            done = subprocess.run(self.command, shell=True, env=env, capture_output=True,
                                  input=json.dumps(data, ensure_ascii=False).encode())
        except OSError as exc:
            logger.warning("--exec: could not run the command: %s", exc)
            return
        if done.returncode:
            said = done.stderr.decode(errors="replace").strip().splitlines()
            logger.warning("--exec: the command failed (exit status %d)%s", done.returncode,
                           f": {said[-1]}" if said else "")


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
    could be shown here. On Linux, through the desktop's notification
    service on the session D-Bus (``DesktopNotifications``: clicks,
    buttons, updates in place, sound); elsewhere through plyer (imported
    here, lazily), which shows title, body and urgency only."""
    if sys.platform.startswith("linux"):
        _check_session()
        return DesktopNotifications(app_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from plyer import notification
    except ImportError:
        raise NotifierError("plyer is not installed: pip install plyer "
                            "(or use --print)") from None
    return _plyer_notify(notification, app_name)


NOTIFICATIONS = "org.freedesktop.Notifications"  # the freedesktop service
_NOTIFICATIONS_PATH = "/org/freedesktop/Notifications"


def _first_line(error: Any) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_session() -> None:
    """A desktop session on Linux: a D-Bus session bus to reach (named by
    $DBUS_SESSION_BUS_ADDRESS, or the user bus in $XDG_RUNTIME_DIR)."""
    if session_bus_addresses():
        return
    raise NotifierError("no desktop session here (no D-Bus session bus): "
                        "run it inside your desktop session, or use --print")


def _plyer_notify(notification: Any, app_name: str) -> Notify:
    def notify(note: Notification) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                notification.notify(title=note.title, message=note.body, app_name=app_name,
                                    timeout=10)
        except NotImplementedError:
            raise NotifierError("no desktop notification backend works here "
                                "(or use --print)") from None
        except Exception as exc:
            raise NotifierError(f"could not show a notification ({_first_line(exc)})") from None

    return notify


class DesktopNotifications:
    """freedesktop's notification API (what GNOME, KDE, dunst, mako, xfce4
    and every Linux desktop serve on the session bus), spoken with the
    standard library (``DBus``), so that all of it works with nothing
    installed: urgency; the ``click`` URL as the default action (a click
    on the notification opens it, in the default browser: ``webbrowser``,
    which follows $BROWSER); ntfy's ``view`` (open a URL) and ``http``
    (make a request, then show its outcome in place) actions as buttons;
    a ``key`` updates the notification shown with the same key in place
    (``replaces_id``); ``sound``: the ``sound-name`` hint. A server that
    lacks the ``actions`` capability shows none of them (said once)."""

    def __init__(self, app_name: str = "longpoll",
                 open_url: Callable[[str], Any] = webbrowser.open) -> None:
        self.app_name = app_name
        self.open_url = open_url
        self._lock = threading.Lock()
        self._shown: dict[int, Notification] = {}   # id -> what it shows
        self._ids: dict[str, int] = {}               # key -> id
        self._bus: DBus | None = None
        self._capabilities: list[str] = []
        self._connect()

    def _connect(self) -> "DBus":
        try:
            bus = DBus.session()
            bus.on_signal = self._signal
            bus.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                     "AddMatch", "s", (f"type='signal',interface='{NOTIFICATIONS}'",))
            present = (bus.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                "org.freedesktop.DBus", "NameHasOwner", "s",
                                (NOTIFICATIONS,))[0]
                       or NOTIFICATIONS in bus.call(
                           "org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus", "ListActivatableNames")[0])
        except (OSError, DBusError) as exc:
            raise NotifierError(f"cannot reach the desktop session's D-Bus ({exc}); run it "
                                "inside your desktop session, or use --print") from None
        if not present:
            bus.close()
            raise NotifierError("no notification daemon on the session bus (start one, "
                                "e.g. dunst, or your desktop's; or use --print)")
        self._bus = bus
        return bus

    @property
    def capabilities(self) -> list[str]:
        """What the notification server says it can do (``actions``,
        ``body-markup``, ``sound``...), asked once it is there."""
        if not self._capabilities:
            try:
                self._capabilities = self._call("GetCapabilities", "", ())[0]
            except NotifierError:
                return []
            if "actions" not in self._capabilities:
                logger.warning("this notification server shows no buttons: clicks and "
                               "actions will do nothing")
        return self._capabilities

    def _call(self, member: str, signature: str, args: tuple) -> tuple:
        try:
            bus = self._bus if self._bus is not None and not self._bus.closed else (
                self._connect())
            return bus.call(NOTIFICATIONS, _NOTIFICATIONS_PATH, NOTIFICATIONS, member,
                            signature, args)
        except (OSError, DBusError) as exc:
            raise NotifierError(f"could not show a notification ({exc})") from None

    def __call__(self, note: Notification) -> None:
        capabilities = self.capabilities
        actions: list[str] = []
        if "actions" in capabilities:
            if note.click:
                actions += ["default", "Open"]
            for index, action in enumerate(note.actions):
                actions += [f"action-{index}", action["label"]]
        body = note.body
        if "body-markup" in capabilities:  # (else "<" and "&" would be read as markup)
            body = html.escape(body, quote=False)
        hints: dict[str, tuple[str, Any]] = {"urgency": ("y", URGENCY_LEVEL[note.urgency])}
        if note.sound:
            hints["sound-name"] = ("s", SOUND_NAME)
        with self._lock:
            replaces = self._ids.get(note.key, 0) if note.key else 0
        ident = self._notify(replaces, note.title, body, actions, hints)
        with self._lock:
            self._shown[ident] = note
            if note.key:
                self._ids[note.key] = ident

    def _notify(self, replaces: int, title: str, body: str, actions: list[str],
                hints: dict[str, tuple[str, Any]]) -> int:
        """The Notify call (in place of notification *replaces*, if not 0);
        the id of the notification shown. The server's default timeout."""
        return self._call("Notify", "susssasa{sv}i", (
            self.app_name, replaces, "", title, body, actions, hints, -1))[0]

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()

    # -- what the user does with a notification (on the bus's reader thread) --

    def _signal(self, interface: str, member: str, args: tuple) -> None:
        if interface != NOTIFICATIONS:
            return
        if member == "NotificationClosed":
            with self._lock:
                note = self._shown.pop(args[0], None)
                if note is not None and note.key and self._ids.get(note.key) == args[0]:
                    del self._ids[note.key]
        elif member == "ActionInvoked":
            ident, key = args[0], args[1]
            with self._lock:
                note = self._shown.get(ident)
            if note is None:
                return  # (another program's notification)
            if key == "default" and note.click:
                self._open(note.click)
            elif key.startswith("action-") and key[7:].isdigit() and int(key[7:]) < len(
                    note.actions):
                action = note.actions[int(key[7:])]
                if action["action"] == "view":
                    self._open(action["url"])
                else:
                    threading.Thread(target=self._http, args=(ident, note, action),
                                     name="notifier-action", daemon=True).start()

    def _open(self, url: str) -> None:
        threading.Thread(target=self.open_url, args=(url,), name="notifier-open",
                         daemon=True).start()

    def _http(self, ident: int, note: Notification, action: dict[str, Any]) -> None:
        """An ``http`` action: its request (POST unless it says), then
        its outcome, shown in place of the notification."""
        body = action.get("body")
        request = urllib.request.Request(
            action["url"], data=body.encode() if body is not None else b"",
            headers=action.get("headers") or {}, method=(action.get("method") or "POST").upper())
        try:
            with urllib.request.urlopen(request, timeout=15) as answer:
                outcome, urgency = f"{answer.status} {answer.reason}", "normal"
        except urllib.error.HTTPError as exc:
            outcome, urgency = f"failed: {exc.code} {exc.reason}", "critical"
        except (OSError, ValueError) as exc:
            outcome, urgency = f"failed: {_first_line(exc)}", "critical"
        logger.info("action %s: %s", action["label"], outcome)
        try:
            self._notify(ident, f"{action['label']}: {outcome}", note.title, [],
                         {"urgency": ("y", URGENCY_LEVEL[urgency])})
        except NotifierError as error:
            logger.warning("%s", error)


# -- D-Bus, the little of it notifications need -----------------------------------------

class DBusError(Exception):
    """An error reply, or a bus that cannot be reached."""


def session_bus_addresses() -> list[tuple[str, str]]:
    """Where the session bus listens, as (kind, where) with kind ``path``
    or ``abstract`` (Unix sockets): from $DBUS_SESSION_BUS_ADDRESS, else the
    user bus in $XDG_RUNTIME_DIR."""
    found = []
    for address in os.environ.get("DBUS_SESSION_BUS_ADDRESS", "").split(";"):
        transport, _, params = address.partition(":")
        if transport != "unix":
            continue
        values = dict(part.partition("=")[::2] for part in params.split(","))
        for kind in ("path", "abstract"):
            if kind in values:
                found.append((kind, urllib.parse.unquote(values[kind])))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not found and runtime and os.path.exists(os.path.join(runtime, "bus")):
        found.append(("path", os.path.join(runtime, "bus")))
    return found


_ALIGN = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4,
          "s": 4, "o": 4, "g": 1, "v": 1, "a": 4, "(": 8, "{": 8}
_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q",
          "d": "d", "h": "I"}


def _types(signature: str) -> list[str]:
    """A D-Bus signature split into its complete types."""
    types, index = [], 0
    while index < len(signature):
        end = _type_end(signature, index)
        types.append(signature[index:end])
        index = end
    return types


def _type_end(signature: str, index: int) -> int:
    kind = signature[index]
    if kind == "a":
        return _type_end(signature, index + 1)
    if kind in "({":
        index += 1
        while signature[index] not in ")}":
            index = _type_end(signature, index)
    return index + 1


class _Writer:
    """D-Bus's wire format (little-endian), written."""

    def __init__(self) -> None:
        self.data = bytearray()

    def align(self, size: int) -> None:
        self.data += bytes(-len(self.data) % size)

    def put(self, signature: str, value: Any) -> None:
        kind = signature[0]
        self.align(_ALIGN[kind])
        if kind in _FIXED:
            self.data += struct.pack("<" + _FIXED[kind], value)
        elif kind in "so":
            raw = value.encode()
            self.data += struct.pack("<I", len(raw)) + raw + b"\0"
        elif kind == "g":
            raw = value.encode()
            self.data += bytes((len(raw),)) + raw + b"\0"
        elif kind == "v":  # (signature, value)
            self.put("g", value[0])
            self.put(value[0], value[1])
        elif kind == "a":
            at = len(self.data)
            self.data += bytes(4)
            item = signature[1:]
            self.align(_ALIGN[item[0]])
            begin = len(self.data)
            for element in (value.items() if item[0] == "{" else value):
                self.put(item, element)
            struct.pack_into("<I", self.data, at, len(self.data) - begin)
        else:  # a struct or a dict entry
            for inner, element in zip(_types(signature[1:-1]), value):
                self.put(inner, element)


class _Reader:
    """D-Bus's wire format, read (either byte order)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self.order = "<" if data[:1] == b"l" else ">"

    def get(self, signature: str) -> Any:
        kind = signature[0]
        self.pos += -self.pos % _ALIGN[kind]
        if kind in _FIXED:
            layout = self.order + _FIXED[kind]
            value = struct.unpack_from(layout, self.data, self.pos)[0]
            self.pos += struct.calcsize(layout)
            return value
        if kind in "sog":
            size = self.get("y" if kind == "g" else "u")
            value = self.data[self.pos:self.pos + size].decode(errors="replace")
            self.pos += size + 1
            return value
        if kind == "v":
            return self.get(self.get("g"))
        if kind == "a":
            size, item = self.get("u"), signature[1:]
            self.pos += -self.pos % _ALIGN[item[0]]
            end, items = self.pos + size, []
            while self.pos < end:
                items.append(self.get(item))
            return dict(items) if item[0] == "{" else items
        return tuple(self.get(inner) for inner in _types(signature[1:-1]))


class DBus:
    """A connection to a D-Bus message bus: method calls (``call``) and
    signals (``on_signal(interface, member, args)``, on the connection's
    reader thread), with the standard library. The subset of the
    specification notifications need: Unix sockets, EXTERNAL auth."""

    CALL, RETURN, ERROR, SIGNAL = 1, 2, 3, 4

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.on_signal: Callable[[str, str, tuple], None] = lambda *args: None
        self.closed = False
        self._serials = itertools.count(1)
        self._send_lock = threading.Lock()
        self._replies: dict[int, tuple[int, tuple, str]] = {}
        self._arrived = threading.Condition()
        self._authenticate()
        threading.Thread(target=self._read, name="notifier-dbus", daemon=True).start()
        self.name = self.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                              "org.freedesktop.DBus", "Hello")[0]

    @classmethod
    def session(cls) -> "DBus":
        """The desktop session's bus."""
        addresses = session_bus_addresses()
        if not addresses:
            raise DBusError("no session bus address ($DBUS_SESSION_BUS_ADDRESS is not set)")
        error: Exception | None = None
        for kind, where in addresses:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            try:
                sock.connect(where if kind == "path" else "\0" + where)
                return cls(sock)
            except (OSError, DBusError) as exc:
                sock.close()
                error = exc
        raise DBusError(f"cannot connect to the session bus: {error}")

    def _authenticate(self) -> None:
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode()
                          + b"\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = self.sock.recv(512)
            if not chunk:
                raise DBusError("the bus closed the connection while authenticating")
            line += chunk
        if not line.startswith(b"OK "):
            raise DBusError(f"the bus refused us: {line.decode(errors='replace').strip()}")
        self.sock.sendall(b"BEGIN\r\n")
        self.sock.settimeout(None)

    def call(self, destination: str, path: str, interface: str, member: str,
             signature: str = "", args: tuple = (), timeout: float = 10.0) -> tuple:
        """Call a method; return its reply's values, or raise ``DBusError``."""
        serial = next(self._serials)
        fields = [(1, ("o", path)), (2, ("s", interface)), (3, ("s", member)),
                  (6, ("s", destination))]
        body = _Writer()
        for kind, value in zip(_types(signature), args):
            body.put(kind, value)
        if signature:
            fields.append((8, ("g", signature)))
        head = _Writer()
        for kind, value in (("y", ord("l")), ("y", self.CALL), ("y", 0), ("y", 1),
                            ("u", len(body.data)), ("u", serial), ("a(yv)", fields)):
            head.put(kind, value)
        head.align(8)
        with self._send_lock:
            if self.closed:
                raise DBusError("the bus connection is closed")
            self.sock.sendall(bytes(head.data + body.data))
        deadline = time.monotonic() + timeout
        with self._arrived:
            while serial not in self._replies:
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise DBusError("the bus connection closed" if self.closed else
                                    f"no answer to {member} in {timeout:.0f} s")
                self._arrived.wait(left)
            kind, values, error = self._replies.pop(serial)
        if kind == self.ERROR:
            raise DBusError(f"{error}: {values[0]}" if values and isinstance(values[0], str)
                            else error)
        return values

    def _receive(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read(self) -> None:
        try:
            while True:
                fixed = self._receive(16)
                order = "<" if fixed[:1] == b"l" else ">"
                body_size, _, fields_size = struct.unpack(order + "III", fixed[4:16])
                head_size = 16 + fields_size + (-(16 + fields_size) % 8)
                data = fixed + self._receive(head_size - 16 + body_size)
                reader = _Reader(data)
                kind = data[1]
                reader.pos = 12
                fields = dict(reader.get("a(yv)"))
                reader.pos = head_size
                values = tuple(reader.get(t) for t in _types(fields.get(8, "")))
                if kind in (self.RETURN, self.ERROR):
                    with self._arrived:
                        self._replies[fields.get(5, 0)] = (kind, values, fields.get(4, ""))
                        self._arrived.notify_all()
                elif kind == self.SIGNAL:
                    try:
                        self.on_signal(fields.get(2, ""), fields.get(3, ""), values)
                    except Exception:
                        logger.exception("error handling a D-Bus signal")
        except (OSError, EOFError, struct.error, IndexError, ValueError):
            pass
        finally:
            self.closed = True
            with self._arrived:
                self._arrived.notify_all()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def print_notify(note: Notification) -> None:
    mark = {"low": " ", "normal": "*", "critical": "!"}[note.urgency]
    print(f"{mark} {note.title}: {note.body}", flush=True)


# -- the tray icon --------------------------------------------------------------------

class Tray:
    """``--tray``: an icon in the system tray (through pystray, imported
    lazily: ``pip install pystray``) that shows whether the notifier is
    connected and how many messages came since its menu was last looked
    at; its menu lists the last 10 (choosing one opens its link), pauses
    and resumes notifications, opens the server's live page, and quits.
    (On plain X11 trays pystray has no menus: a click on the icon opens
    the live page, the default item.)"""

    RECENT = 10

    def __init__(self, notifier: Notifier, page_url: str, pystray: Any, image: Any,
                 open_url: Callable[[str], Any] = webbrowser.open) -> None:
        self.notifier = notifier
        self.page_url = page_url
        self.open_url = open_url
        self.recent: list[dict[str, Any]] = []   # newest first
        self.unread = 0
        self.connected = False
        self._pystray, self._image = pystray, image
        self._changed: threading.Event | None = None  # (set once the icon runs)
        self._stopping = False
        notifier.on_message = self.message
        notifier.on_connection = self.connection
        self.icon = pystray.Icon("longpoll", self.draw(), self.title(),
                                 menu=pystray.Menu(self.items))

    @classmethod
    def start(cls, notifier: Notifier, page_url: str) -> "Tray | None":
        """The tray icon, or None (said in one line) where there cannot be one."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pystray
                from PIL import Image
        except ImportError:
            logger.warning("--tray needs pystray: pip install pystray (running without the "
                           "icon)")
            return None
        except Exception as exc:  # pystray opens the display when it is imported
            logger.warning("no tray here (%s): running without the icon", _first_line(exc))
            return None
        if not _has_tray_host(pystray):
            logger.warning("no system tray here (no tray host on this display): running "
                           "without the icon")
            return None
        return cls(notifier, page_url, pystray, Image)

    # -- what it shows ---------------------------------------------------------

    def title(self) -> str:
        state = "connected" if self.connected else "disconnected"
        paused = ", paused" if not self.notifier.showing else ""
        return f"longpoll: {self.unread} unread ({state}{paused})"

    def draw(self) -> Any:
        """The icon: a bell-coloured disc (green connected, grey not, amber
        paused) with the unread count."""
        from PIL import ImageDraw, ImageFont
        colour = ((120, 120, 120) if not self.connected else
                  (230, 160, 0) if not self.notifier.showing else (40, 170, 80))
        image = self._image.new("RGBA", (64, 64), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        draw.ellipse((2, 2, 62, 62), fill=colour)
        if self.unread:
            text = str(self.unread) if self.unread < 100 else "99+"
            try:  # (a scalable font needs Pillow 10.1 and FreeType)
                font = ImageFont.load_default(size=44 if len(text) == 1 else 30)
            except (TypeError, OSError):
                font = ImageFont.load_default()
            draw.text((32, 32), text, fill=(255, 255, 255), anchor="mm", font=font)
        return image

    def items(self) -> list[Any]:
        """The menu, built afresh each time it opens."""
        item, separator = self._pystray.MenuItem, self._pystray.Menu.SEPARATOR
        entries = [item(self.label(m), self.opener(m)) for m in self.recent]
        if not entries:
            entries = [item("No messages yet", None, enabled=False)]
        return [*entries, separator,
                item("Mark all read", self.mark_read),
                item("Pause notifications", self.toggle_pause,
                     checked=lambda _: not self.notifier.showing),
                item("Open the live page", self.open_page, default=True),
                item("Quit", self.quit)]

    @staticmethod
    def label(message: dict[str, Any]) -> str:
        note = describe(message, with_channel=True)
        return shorten(f"{note.title}: {note.body}", 60)

    def opener(self, message: dict[str, Any]) -> Callable[[], None]:
        """Choosing a message opens its link (its click URL, else the live page)."""
        url = describe(message).click or self.page_url
        return lambda: self.open_url(url)

    # -- what changes it -------------------------------------------------------

    def message(self, message: dict[str, Any]) -> None:
        self.recent = [message, *self.recent][:self.RECENT]
        self.unread += 1
        self.refresh()

    def connection(self, connected: bool) -> None:
        self.connected = connected
        self.refresh()

    def mark_read(self) -> None:
        self.unread = 0
        self.refresh()

    def toggle_pause(self) -> None:
        self.notifier.showing = not self.notifier.showing
        self.refresh()

    def open_page(self) -> None:
        self.open_url(self.page_url)

    def quit(self) -> None:
        self.notifier.close()
        self.icon.stop()

    def refresh(self) -> None:
        """Show the current state: at once before the icon runs; once it
        runs, on the updater thread (``_update``), latest state wins."""
        if self._changed is None:
            self._apply()
        else:
            self._changed.set()

    def _apply(self) -> None:
        self.icon.title = self.title()
        self.icon.icon = self.draw()
        self.icon.update_menu()

    def _update(self) -> None:
        """The updater thread: apply each change, one at a time."""
        while self._changed is not None:
            self._changed.wait()
            self._changed.clear()
            if self._stopping:
                return
            self._through_loop(self._apply)

    def _through_loop(self, change: Callable[[], None],
                      done: threading.Event | None = None) -> None:
        """Make *change*, a round trip to the icon's loop, and wait for it
        (or for *done*). python-xlib (pystray's X11 backend) can miss
        waking that loop when the round trip crosses one the loop makes
        itself (a flush that returns early without releasing the request
        waiting on it, or events read by another thread while the loop
        goes to sleep): the loop then sleeps, and the change with it. So
        a change that has not gone through within a second is followed by
        another round trip (the image set again), which wakes the loop."""
        made = threading.Event()
        done = done or made

        def make() -> None:
            try:
                change()
            except Exception as exc:  # (the icon went away meanwhile)
                logger.debug("tray: %s", exc)
            made.set()

        def wake() -> None:
            try:
                self.icon.icon = self.icon.icon  # (a title set again goes nowhere)
            except Exception as exc:
                logger.debug("tray: %s", exc)

        threading.Thread(target=make, name="tray-change", daemon=True).start()
        while not done.wait(1.0):
            threading.Thread(target=wake, name="tray-wake", daemon=True).start()

    def run(self) -> int:
        """Run the notifier on a thread and the icon on this one, until
        Quit, Ctrl-C, or the notifier ends."""
        outcome: list[BaseException] = []
        ended = threading.Event()  # (the icon's loop has returned)

        def notify() -> None:
            try:
                self.notifier.run()
            except BaseException as exc:
                outcome.append(exc)
            finally:
                self._stopping = True
                self._through_loop(self.icon.stop, ended)

        def setup(icon: Any) -> None:
            icon.visible = True
            self._changed = threading.Event()
            threading.Thread(target=self._update, name="tray-update", daemon=True).start()
            threading.Thread(target=notify, name="notifier", daemon=True).start()

        # Ctrl-C (and a service manager's SIGTERM) end the notifier, which
        # stops the icon: never an interrupt inside pystray's loop.
        previous = {sig: signal.signal(sig, lambda *_: self.notifier.close())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.icon.run(setup=setup)
        finally:
            ended.set()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stopping = True
            if self._changed is not None:
                self._changed.set()
        if outcome and isinstance(outcome[0], (NotifierError, longpoll.LongpollError)):
            raise outcome[0]
        return 0


def _has_tray_host(pystray: Any) -> bool:
    """Whether a tray can show the icon: on X11 (pystray's xorg backend),
    whether a tray host owns the system tray selection; elsewhere, yes."""
    if not pystray.Icon.__module__.endswith("_xorg"):
        return True
    import Xlib.display
    display = Xlib.display.Display()
    try:
        selection = display.intern_atom(f"_NET_SYSTEM_TRAY_S{display.get_default_screen()}")
        return display.get_selection_owner(selection) != 0
    finally:
        display.close()


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
    parser.add_argument("--quiet", metavar="HH:MM-HH:MM", type=_quiet_arg,
                        help="quiet hours (local time), e.g. 22:00-07:00: hold messages "
                             "below --quiet-min-priority, show one summary when they end")
    parser.add_argument("--quiet-min-priority", type=int, default=5, choices=range(1, 6),
                        metavar="N", help="in quiet hours, still show priority N or more "
                                          "(default 5, urgent)")
    parser.add_argument("--sound", action="store_true",
                        help="ask for a sound on messages of priority 4 and 5 (Linux)")
    parser.add_argument("--exec", metavar="CMD", dest="command",
                        help="run CMD (a shell command) for each message shown, with "
                             "LONGPOLL_CHANNEL, _TITLE, _MESSAGE, _PRIORITY, _ID, _CLICK set "
                             "and the message as JSON on standard input")
    parser.add_argument("--no-notify", action="store_true",
                        help="show no notifications (with --exec: only run the command)")
    parser.add_argument("--tray", action="store_true",
                        help="a tray icon: connected or not, unread count, the last "
                             "messages, pause (pip install pystray)")
    parser.add_argument("--state", metavar="FILE", default=None,
                        help=f"where to keep the last cursors (default {default_state_path()})")
    parser.add_argument("--no-state", action="store_true", help="keep no state file")
    parser.add_argument("--notify-connection", action="store_true",
                        help="also notify when the connection is lost and when it is back")
    parser.add_argument("--print", action="store_true",
                        help="print to the terminal instead of desktop notifications")
    parser.add_argument("--install-service", action="store_true",
                        help="write a systemd user unit that starts the notifier, with "
                             "these arguments, at login (Linux), and say how to enable it")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="longpoll-notify: %(message)s")
    try:
        for channel in args.channels:
            longpoll.check_pattern(channel)
        if args.install_service:
            return install_service([a for a in (sys.argv[1:] if argv is None else argv)
                                    if a != "--install-service"])
        notify: Notify = (_no_notify if args.no_notify else
                          print_notify if args.print else desktop_notify())
        urls = args.url or [os.environ.get("LONGPOLL_URL") or longpoll.DEFAULT_URL]
        notifier = Notifier(longpoll.Client(urls, token=args.token, cafile=args.cafile),
                            args.channels, notify, min_priority=args.min_priority,
                            burst=args.burst,
                            state_path=None if args.no_state else (args.state or
                                                                   default_state_path()),
                            notify_connection=args.notify_connection, command=args.command,
                            quiet=args.quiet, quiet_min_priority=args.quiet_min_priority,
                            sound=args.sound)
        if args.tray:
            tray = Tray.start(notifier, urls[0])
            if tray is not None:
                return tray.run()
        notifier.run()
    except (NotifierError, longpoll.LongpollError) as error:
        print(f"longpoll-notify: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _quiet_arg(text: str) -> tuple[int, int]:
    import argparse
    try:
        return parse_quiet(text)
    except NotifierError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _no_notify(note: Notification) -> None:
    """--no-notify: show nothing (the command still runs)."""


# -- a user service -------------------------------------------------------------------

SERVICE_NAME = "longpoll-notify.service"


def install_service(arguments: list[str]) -> int:
    """Write a systemd user unit running this notifier with *arguments*
    at login; print how to enable it (nothing is enabled behind the
    user's back)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".config")
    path = os.path.join(base, "systemd", "user", SERVICE_NAME)
    command = " ".join(shlex.quote(part) for part in (
        sys.executable, os.path.abspath(__file__), *arguments))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""[Unit]
Description=longpoll desktop notifications ({' '.join(arguments)})
After=graphical-session.target
PartOf=graphical-session.target

[Service]
ExecStart={command.replace('%', '%%')}
Restart=on-failure
RestartSec=5

[Install]
WantedBy=graphical-session.target default.target
""")
    print(f"wrote {path}\nstart it now and at every login with:\n"
          f"    systemctl --user daemon-reload && systemctl --user enable --now "
          f"{SERVICE_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
