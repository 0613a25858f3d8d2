"""A real, private desktop-notification stack for tests: Xvfb + a session
D-Bus of our own + dunst, started and stopped by the tests (no service
is ever D-Bus-activated behind their back)."""
import json
import os
import select
import shutil
import subprocess
import time

TOOLS = ("Xvfb", "dbus-daemon", "dbus-send", "dbus-monitor", "dunst", "dunstctl", "busctl",
         "import", "identify")

# Like the stock session.conf, but with no service directories: nothing is
# ever D-Bus-activated behind our back (the stock one would start a dunst).
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

# Never merge duplicates, keep a long history, and render the urgency into
# each notification's text (dunstctl history has no urgency field).
DUNSTRC = """[global]
    font = DejaVu Sans 11
    width = 420
    origin = top-right
    offset = 10x10
    notification_limit = 0
    stack_duplicates = false
    history_length = 1000
    sticky_history = yes
    idle_threshold = 0
    show_indicators = no
[urgency_low]
    timeout = 0
    format = "LOW|%s|%b"
[urgency_normal]
    timeout = 0
    format = "NORMAL|%s|%b"
[urgency_critical]
    timeout = 0
    format = "CRITICAL|%s|%b"
"""


def missing_tools():
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _read_line(fd, timeout, what):
    buf, deadline = b"", time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"timed out waiting for {what}")
        chunk = os.read(fd, 256)
        if not chunk:
            raise RuntimeError(f"{what} exited before it was ready")
        buf += chunk
    return buf.decode().strip()


def _start_xvfb(tmp, procs, screen):
    """Start Xvfb on a display it picks (added to *procs*); return ":N"."""
    r, w = os.pipe()
    with open(tmp / "xvfb.log", "w") as log:
        procs.append(subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", screen,
                                       "-nolisten", "tcp"], pass_fds=(w,),
                                      stdout=subprocess.DEVNULL, stderr=log))
    os.close(w)
    try:
        return ":" + _read_line(r, 15, "Xvfb")
    finally:
        os.close(r)


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


class NotifyStack:
    def __init__(self, tmp, dunstrc=DUNSTRC):
        self.tmp, self.procs, self.env, self.dunstrc = tmp, [], None, dunstrc

    def start(self):
        (self.tmp / "bus.conf").write_text(BUS_CONF)
        (self.tmp / "dunstrc").write_text(self.dunstrc)
        display = _start_xvfb(self.tmp, self.procs, "1280x720x24")
        with open(self.tmp / "dbus.log", "w") as log:
            bus = subprocess.Popen(["dbus-daemon", f"--config-file={self.tmp / 'bus.conf'}",
                                    "--nofork", "--nopidfile", "--print-address=1"],
                                   stdout=subprocess.PIPE, stderr=log)
        self.procs.append(bus)
        address = _read_line(bus.stdout.fileno(), 10, "dbus-daemon")
        self.env = dict(os.environ, DISPLAY=display, DBUS_SESSION_BUS_ADDRESS=address)
        self.env.pop("WAYLAND_DISPLAY", None)
        self.start_daemon()
        return self

    def _daemon_present(self):
        return "true" in self.run("dbus-send", "--session", "--print-reply=literal",
                                  "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                                  "org.freedesktop.DBus.NameHasOwner",
                                  "string:org.freedesktop.Notifications")

    def start_daemon(self):
        """Start dunst; return once it owns the notification service."""
        with open(self.tmp / "dunst.log", "a") as log:
            self.dunst = subprocess.Popen(["dunst", "-config", str(self.tmp / "dunstrc")],
                                          env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self._daemon_present():
            if self.dunst.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dunst did not come up: " + (self.tmp / "dunst.log").read_text())
            time.sleep(0.05)

    def stop_daemon(self):
        """Stop dunst (its history goes with it); return once the service is gone."""
        _stop(self.dunst)
        deadline = time.monotonic() + 10
        while self._daemon_present():
            assert time.monotonic() < deadline, "dunst's service outlived it"
            time.sleep(0.05)

    def stop(self):
        _stop(self.dunst)
        for proc in reversed(self.procs):  # the bus, then Xvfb
            _stop(proc)

    def run(self, *args):
        return subprocess.run(args, env=self.env, check=True, capture_output=True, text=True,
                              timeout=10).stdout

    def history(self):
        """Every notification dunst received, newest first (close-all first:
        dunstctl history lists only closed ones)."""
        self.run("dunstctl", "close-all")
        raw = json.loads(self.run("dunstctl", "history"))
        return [{k: v["data"] for k, v in n.items()} for n in raw["data"][0]]

    def wait_for(self, summary, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            for n in self.history():
                if n["summary"] == summary:
                    return n
            if time.monotonic() > deadline:
                raise AssertionError(f"dunst never got {summary!r}: {self.history()[:5]}")
            time.sleep(0.05)

    def screenshot(self, path):
        """Screenshot the whole screen once a popup is displayed and drawn;
        return its number of colours (1: plain black, nothing drawn)."""
        deadline = time.monotonic() + 5
        while int(self.run("dunstctl", "count", "displayed")) < 1:
            assert time.monotonic() < deadline, "no popup displayed"
            time.sleep(0.05)
        while True:  # dunst paints a moment after it counts the popup displayed
            subprocess.run(["import", "-window", "root", str(path)], env=self.env, check=True,
                           timeout=20)
            colours = int(subprocess.run(["identify", "-format", "%k", str(path)], check=True,
                                         capture_output=True, text=True).stdout)
            if colours > 1 or time.monotonic() > deadline:
                return colours


TRAY_TOOLS = ("Xvfb", "trayer", "xwininfo", "import", "identify")


class TrayStack:
    """Xvfb and a real tray host (trayer, a freedesktop system tray) on it:
    an icon that docks shows as a child window of trayer's panel."""

    def __init__(self, tmp):
        self.tmp, self.procs, self.env = tmp, [], None

    def start(self, host=True):
        display = _start_xvfb(self.tmp, self.procs, "640x200x24")
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")}
        self.env["DISPLAY"] = display
        if host:
            with open(self.tmp / "trayer.log", "w") as log:
                self.procs.append(subprocess.Popen(
                    ["trayer", "--edge", "top", "--align", "right", "--widthtype", "pixel",
                     "--width", "200", "--heighttype", "pixel", "--height", "40",
                     "--transparent", "false", "--tint", "0x888888"],
                    env=self.env, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + 10
            while '"panel"' not in self.tree():
                if time.monotonic() > deadline:
                    raise RuntimeError("trayer did not come up: "
                                       + (self.tmp / "trayer.log").read_text())
                time.sleep(0.05)
        return self

    def tree(self):
        return subprocess.run(["xwininfo", "-root", "-tree"], env=self.env, capture_output=True,
                              text=True, timeout=10).stdout

    def screenshot(self, path):
        subprocess.run(["import", "-window", "root", str(path)], env=self.env, check=True,
                       timeout=20)
        return int(subprocess.run(["identify", "-format", "%k", str(path)], env=self.env,
                                  capture_output=True, text=True, check=True).stdout)

    def stop(self):
        for proc in reversed(self.procs):
            _stop(proc)
