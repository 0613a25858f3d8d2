"""The project's own documents: docs/protocol.md names every route the
server has, and nothing in the project points outside the repository."""
import os
import re

import longpoll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documented_routes():
    """(method, path) of each row of docs/protocol.md's route table."""
    text = open(os.path.join(ROOT, "docs", "protocol.md"), encoding="utf-8").read()
    section = text.split("## Routes", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        path = cells[1].strip("`").replace("{name}", "{names}")
        for method in re.findall(r"`([A-Z]+)`", cells[0]):
            rows.add((method, path))
    return rows


def server_routes():
    handler = longpoll.Handler
    rows = {(method, path) for path, methods in handler.routes.items() for method in methods}
    rows |= {(method, "/channels/{names}") for method in handler.channel_routes}
    rows |= {(method, "/channels/{names}/events") for method in handler.stream_routes}
    rows |= {(method, "/channels/{names}/ws") for method in handler.socket_routes}
    rows |= {(method, "/channels/{names}/expect") for method in handler.expect_routes}
    return rows


def test_every_route_is_in_the_protocol_table():
    documented = documented_routes()
    assert server_routes() <= documented, server_routes() - documented
    stray = {row for row in documented - server_routes() if row[0] != "OPTIONS"}
    assert not stray, f"documented but not served: {stray}"
    assert ("OPTIONS", "any of the above") in documented  # CORS preflights


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|\.\./\.library")
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in (
            "__pycache__", "node_modules") and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith((".py", ".md", ".cfg", ".toml", ".txt", ".html", ".js")):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    if outside.search(f.read()):
                        found.append(os.path.relpath(path, ROOT))
    ci = os.path.join(ROOT, ".ci", "run")
    if outside.search(open(ci, encoding="utf-8").read()):
        found.append(".ci/run")
    assert not found, found


def test_the_readme_links_only_to_files_that_exist():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert os.path.exists(os.path.join(ROOT, target)), target


def test_every_option_is_written_down_with_its_default():
    text = open(os.path.join(ROOT, "docs", "deploying.md"), encoding="utf-8").read()
    for option in longpoll.OPTIONS:
        flag = "--" + option.name.replace("_", "-")
        row = re.search(r"^\| `" + re.escape(flag) + r"` \| ([^|]+) \| ([^|]+) \|$", text, re.M)
        assert row, f"{flag} is not in docs/deploying.md's table"
        default = row.group(1).strip().replace(",", "")
        assert default == str(option.default) or float(default) == option.default, flag
        assert row.group(2).strip() == option.help, flag
