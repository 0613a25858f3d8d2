"""Server-Sent Events over raw sockets: order, ids, resume, gaps, keepalive."""
import threading

import longpoll
from conftest import Stream, wait_until


def test_headers_and_events_in_order_with_ids(server):
    for i in range(3):
        server.hub.publish("news", i, title=f"t{i}")
    stream = Stream(server, "/channels/news/events?since=0")
    assert stream.head.startswith(b"HTTP/1.1 200")
    assert b"Content-Type: text/event-stream" in stream.head
    assert b"X-Accel-Buffering: no" in stream.head
    events = stream.events(3)
    assert [e[2]["message"] for e in events] == [0, 1, 2]
    assert [e[0] for e in events] == [e[2]["id"] for e in events]
    server.hub.publish("news", "live")
    assert stream.events(1)[0][2]["message"] == "live"
    stream.close()


def test_resume_with_last_event_id_gets_exactly_what_was_missed(server):
    stream = Stream(server, "/channels/r/events")
    wait_until(lambda: server.waiting == 1)
    for i in range(3):
        server.hub.publish("r", i)
    seen = stream.events(2)
    stream.close()
    wait_until(lambda: server.waiting == 0, what="the server to notice the disconnect")
    for i in range(3, 6):
        server.hub.publish("r", i)
    again = Stream(server, "/channels/r/events?since=0", f"Last-Event-ID: {seen[-1][0]}\r\n")
    assert [e[2]["message"] for e in again.events(4)] == [2, 3, 4, 5]
    server.hub.publish("r", 6)
    assert again.events(1)[0][2]["message"] == 6
    again.close()


def test_a_gap_is_an_event_before_the_messages(server):
    stale = longpoll.Hub().publish("g", "elsewhere").id
    server.hub.publish("g", "kept")
    stream = Stream(server, f"/channels/g/events?since={stale}")
    gap, message = stream.events(2)
    assert gap[1] == "gap" and message[2]["message"] == "kept"
    stream.close()


def test_keepalive_comments(make_server):
    server = make_server()
    server.keepalive = 0.2
    stream = Stream(server, "/channels/quiet/events")
    blocks = stream.blocks(3, timeout=5)
    assert blocks[0] == ": connected" and blocks[1:] == [": keepalive"] * 2
    stream.close()


def test_accept_header_and_several_channels(server):
    stream = Stream(server, "/channels/a,b", "Accept: text/event-stream\r\n")
    wait_until(lambda: server.waiting == 1)
    server.hub.publish("a", 1)
    server.hub.publish("b", 2)
    assert [(e[2]["channel"], e[2]["message"]) for e in stream.events(2)] == [("a", 1), ("b", 2)]
    stream.close()


def test_close_ends_every_stream(make_server):
    server = make_server()
    streams = [Stream(server, "/channels/s/events") for _ in range(5)]
    wait_until(lambda: server.waiting == 5)
    server.close()
    for stream in streams:
        stream.sock.settimeout(5)
        while stream.sock.recv(65536):
            pass  # until the end of the stream
        stream.close()


def test_2000_streams_cost_no_more_threads_than_20(server):
    from test_scale import MANY
    count = min(2000, MANY)
    few = [Stream(server, "/channels/many/events") for _ in range(20)]
    wait_until(lambda: server.waiting == 20)
    threads_at_20 = threading.active_count()
    many = [Stream(server, "/channels/many/events") for _ in range(count - 20)]
    wait_until(lambda: server.waiting == count, timeout=30)
    assert threading.active_count() <= threads_at_20
    server.hub.publish("many", "to all")
    for stream in few + many:
        assert stream.events(1)[0][2]["message"] == "to all"
        stream.close()
