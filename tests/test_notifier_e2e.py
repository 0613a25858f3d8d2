"""notifier.py as a user runs it, against a real notification server:
Xvfb + a private D-Bus session bus + dunst, read back with dunstctl."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import E2E, parked_on, wait_until
from notify_stack import NotifyStack, missing_tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    missing = missing_tools()
    if missing:
        message = f"not installed: {', '.join(missing)} (see .ci/run for the apt packages)"
        if E2E:
            pytest.fail(message)
        pytest.skip(message)
    stack = NotifyStack(tmp_path_factory.mktemp("notify")).start()
    yield stack
    stack.stop()


@pytest.fixture
def notifier_proc(stack, server):
    procs = []

    def start(channel, *args):
        before = server.waiting
        proc = subprocess.Popen([sys.executable, "notifier.py", channel, "--url", server.url,
                                 *args], cwd=ROOT, env=stack.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_until(lambda: server.waiting > before or proc.poll() is not None,
                   what="the notifier to subscribe")
        assert proc.poll() is None, proc.stderr.read()
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
        assert "Traceback" not in proc.stderr.read()


def shown(stack, channel):
    return [n for n in stack.history() if channel in n["summary"] or channel in n["body"]]


def test_title_body_and_critical_urgency_within_2_s(stack, server, notifier_proc):
    channel = f"ci{uuid.uuid4().hex[:6]}"
    notifier_proc(channel, "--no-state")
    title = f"Build {channel} done"
    stack.history()  # closes any popup left on screen
    published = time.monotonic()
    server.hub.publish(channel, "All 42 tests passed", title=title, priority=5)
    wait_until(lambda: int(stack.run("dunstctl", "count", "displayed")) >= 1, timeout=2.0,
               interval=0.02, what="the popup")
    assert time.monotonic() - published < 2.0
    shot = os.environ.get("NOTIFY_SHOT", str(stack.tmp / "notify-shot.png"))
    assert stack.screenshot(shot) > 1, "the screen is plain black: no popup drawn"
    n = stack.wait_for(title)  # (reading history closes the popup)
    assert n["body"] == "All 42 tests passed" and n["appname"] == "longpoll"
    assert n["message"] == f"CRITICAL|{title}|All 42 tests passed"


def test_min_priority_4_shows_4_and_not_2(stack, server, notifier_proc):
    channel = f"prio{uuid.uuid4().hex[:6]}"
    notifier_proc(channel, "--no-state", "--min-priority", "4")
    server.hub.publish(channel, "routine", title=f"{channel} p2", priority=2)
    server.hub.publish(channel, "important", title=f"{channel} p4", priority=4)
    n = stack.wait_for(f"{channel} p4")
    assert n["message"] == f"NORMAL|{channel} p4|important"
    assert not [x for x in stack.history() if x["summary"] == f"{channel} p2"]


def test_twenty_at_once_make_at_most_two_notifications(stack, server, notifier_proc):
    channel = f"burst{uuid.uuid4().hex[:6]}"
    notifier_proc(channel, "--no-state")
    for i in range(20):
        server.hub.publish(channel, f"message {i}")
    wait_until(lambda: any("new messages on" in n["summary"] for n in shown(stack, channel)),
               timeout=5)
    # A message after the burst: once it is shown, the notifier has shown
    # everything the burst made (it shows in order).
    server.hub.publish(channel, "after the burst", title=f"{channel} after")
    stack.wait_for(f"{channel} after")
    notes = [n for n in shown(stack, channel) if n["summary"] != f"{channel} after"]
    assert len(notes) <= 2, notes
    assert any(n["summary"] in (f"20 new messages on {channel}", f"19 new messages on {channel}")
               for n in notes)


def test_stopped_notifier_shows_the_three_it_missed_once(stack, server, notifier_proc, tmp_path):
    channel = f"resume{uuid.uuid4().hex[:6]}"
    state = str(tmp_path / "state.json")
    first = notifier_proc(channel, "--state", state)
    server.hub.publish(channel, "seen live", title=f"{channel} live")
    stack.wait_for(f"{channel} live")
    first.send_signal(signal.SIGINT)
    assert first.wait(10) == 0
    # (until the server sees its poll go, it still counts as waiting: the next
    # notifier's start is told by that count going up)
    wait_until(lambda: parked_on(server, channel) == 0, what="the server to see it go")
    for i in range(3):
        server.hub.publish(channel, f"missed {i}", title=f"{channel} missed {i}")
    notifier_proc(channel, "--state", state)
    for i in range(3):
        stack.wait_for(f"{channel} missed {i}")
    wait_until(lambda: server.waiting >= 1)
    summaries = [n["summary"] for n in shown(stack, channel)]
    assert sorted(summaries) == sorted([f"{channel} live"] + [f"{channel} missed {i}"
                                                             for i in range(3)])


def test_what_could_not_be_shown_waits_for_the_daemon(stack, server, notifier_proc, tmp_path):
    """The notification daemon goes away: a message published meanwhile is
    not passed by the saved cursor, and is shown once the daemon is back."""
    import json
    import select
    channel = f"down{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state.json"
    proc = notifier_proc(channel, "--state", str(state))
    server.hub.publish(channel, "before", title=f"{channel} before")
    stack.wait_for(f"{channel} before")
    saved = json.loads(state.read_text())["cursors"][channel]
    stack.stop_daemon()
    try:
        server.hub.publish(channel, "while down", title=f"{channel} down")
        ready = select.select([proc.stderr], [], [], 15)[0]
        assert ready, "the notifier never said it could not show the message"
        assert "could not show a notification" in proc.stderr.readline()
        assert json.loads(state.read_text())["cursors"][channel] == saved
    finally:
        stack.start_daemon()
    stack.wait_for(f"{channel} down", timeout=15)  # it retries every 5 s
    wait_until(lambda: json.loads(state.read_text())["cursors"][channel] != saved,
               what="the cursor to pass the message once shown")
