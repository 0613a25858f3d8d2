"""notifier.py --tray: a real tray host (trayer on Xvfb) shows the icon;
the menu's actions, through pystray's own menu objects."""
import gc
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

import longpoll
import notifier
from conftest import E2E, wait_until
from notify_stack import TRAY_TOOLS, TrayStack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def need(tools=TRAY_TOOLS, modules=("pystray", "PIL", "Xlib")):
    """Skip (fail with LONGPOLL_E2E=1) without the tray's parts."""
    missing = [t for t in tools if shutil.which(t) is None]
    missing += [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        message = (f"not installed: {', '.join(missing)} (apt-get install trayer x11-utils; "
                   "pip install pystray pillow)")
        if E2E:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def tray_stack(tmp_path_factory):
    need()
    stack = TrayStack(tmp_path_factory.mktemp("tray")).start()
    yield stack
    stack.stop()


def run_notifier(env, server, channel, *args):
    before = server.waiting
    proc = subprocess.Popen([sys.executable, "notifier.py", channel, "--url", server.url,
                             "--no-state", "--print", "--tray", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: server.waiting > before or proc.poll() is not None,
               what="the notifier to subscribe")
    assert proc.poll() is None, proc.stderr.read()
    return proc


def stop(proc):
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr
    return stderr


def test_the_icon_docks_in_the_tray_and_counts_unread(tray_stack, server):
    channel = f"tray{uuid.uuid4().hex[:6]}"
    proc = run_notifier(tray_stack.env, server, channel)
    try:
        wait_until(lambda: '"longpoll: 0 unread (connected)"' in tray_stack.tree(),
                   what="the icon in the tray")
        server.hub.publish(channel, "Build 7 failed", title="CI", priority=4)
        server.hub.publish(channel, "Build 8 passed", title="CI")
        wait_until(lambda: '"longpoll: 2 unread (connected)"' in tray_stack.tree(),
                   what="the unread count")
        tree = tray_stack.tree()
        icon = next(line for line in tree.splitlines() if "longpollSystemTrayIcon" in line)
        panel = tree.index('"panel"')
        assert tree.index(icon) > panel  # a child of trayer's panel: docked
        shot = os.environ.get("TRAY_SHOT", str(tray_stack.tmp / "tray-shot.png"))
        assert tray_stack.screenshot(shot) > 1
    finally:
        stop(proc)


def test_without_a_tray_host_it_says_so_and_runs_without_the_icon(server, tmp_path):
    need(tools=("Xvfb",))
    bare = TrayStack(tmp_path).start(host=False)
    try:
        channel = f"notray{uuid.uuid4().hex[:6]}"
        proc = run_notifier(bare.env, server, channel)
        server.hub.publish(channel, "still here", title="T")
        wait_until(lambda: "still here" in proc.stdout.readline(), what="the message printed")
        stderr = stop(proc)
        assert stderr.strip().splitlines() == [
            "longpoll-notify: no system tray here (no tray host on this display): running "
            "without the icon"]
    finally:
        bare.stop()


def test_the_menus_actions(tray_stack, monkeypatch):
    monkeypatch.setenv("DISPLAY", tray_stack.env["DISPLAY"])
    import pystray
    from PIL import Image
    opened = []
    n = notifier.Notifier(longpoll.Client("http://127.0.0.1:9"), ("news",), lambda note: None)
    tray = notifier.Tray(n, "http://127.0.0.1:9/", pystray, Image, open_url=opened.append)
    try:
        use_the_menu(tray, n, opened)
    finally:
        # The icon holds a connection to this X server: let it go while the
        # server is up (pystray closes it when the icon is collected).
        n.on_message = n.on_connection = None
        del tray, n
        gc.collect()


def use_the_menu(tray, n, opened):
    assert [str(i) for i in tray.icon.menu.items][0] == "No messages yet"
    for i in range(12):
        n.handle([{"messages": [{"id": f"h-{i}", "channel": "news", "message": f"m{i}",
                                 "title": "T", **({"click": "https://x.example/11"}
                                                  if i == 11 else {})}],
                   "cursor": f"h-{i}"}])
    assert tray.unread == 12 and tray.icon.title.startswith("longpoll: 12 unread")
    items = list(tray.icon.menu.items)
    labels = [str(i) for i in items]
    assert labels[:10] == [f"news: T: m{i}" for i in range(11, 1, -1)]  # the last 10
    items[0](tray.icon)  # a message with a link: opens it
    items[1](tray.icon)  # one without: the live page
    assert opened == ["https://x.example/11", "http://127.0.0.1:9/"]
    by_label = {str(i): i for i in items}
    by_label["Mark all read"](tray.icon)
    assert tray.unread == 0 and "0 unread" in tray.icon.title
    pause = by_label["Pause notifications"]
    pause(tray.icon)
    assert pause.checked and not n.showing and "paused" in tray.icon.title
    n.handle([{"messages": [{"id": "h-99", "channel": "news", "message": "while paused"}],
               "cursor": "h-99"}])
    assert tray.unread == 1  # counted, not shown
    pause(tray.icon)
    assert not pause.checked and n.showing
    by_label["Open the live page"](tray.icon)
    assert opened[-1] == "http://127.0.0.1:9/"
    assert by_label["Open the live page"].default  # a click on a bare X11 tray icon
    closed = []
    n.close = lambda: closed.append(True)
    by_label["Quit"](tray.icon)
    assert closed == [True]
