"""The hub alone: channels, cursors, retention, waiting. No sockets."""
import threading

import pytest

from conftest import wait_until
from longpoll import Hub, LongpollError


def ids(batch):
    return [m.id for m in batch.messages]


def texts(batch):
    return [m.message for m in batch.messages]


def test_publish_returns_message_with_increasing_ids():
    hub = Hub()
    a = hub.publish("news", "one")
    b = hub.publish("news", {"two": 2}, title="T", priority=5)
    assert (a.channel, a.message, a.title, a.priority) == ("news", "one", None, None)
    assert b.as_dict() == {"id": b.id, "channel": "news", "time": b.time,
                           "message": {"two": 2}, "title": "T", "priority": 5}
    assert b.seq > a.seq and a.id != b.id
    assert "," not in a.id and a.id.replace("-", "").isalnum()


def test_since_zero_reads_everything_and_none_reads_from_now():
    hub = Hub()
    hub.publish("news", "old")
    assert texts(hub.read("news", "0")) == ["old"]
    head = hub.read("news")
    assert head.messages == [] and not head.gap
    hub.publish("news", "new")
    assert texts(hub.read("news", head.cursor)) == ["new"]


def test_cursor_continues_without_loss_or_repeat():
    hub = Hub()
    cursor = hub.read("ch").cursor
    seen = []
    for i in range(10):
        hub.publish("ch", i)
        if i % 3 == 0:
            batch = hub.read("ch", cursor)
            seen += texts(batch)
            cursor = batch.cursor
    seen += texts(hub.read("ch", cursor))
    assert seen == list(range(10))


def test_a_message_id_is_a_cursor():
    hub = Hub()
    first = hub.publish("ch", 1)
    hub.publish("ch", 2)
    assert texts(hub.read("ch", first.id)) == [2]


def test_limit_caps_a_batch_and_the_cursor_continues():
    hub = Hub()
    for i in range(5):
        hub.publish("ch", i)
    batch = hub.read("ch", "0", limit=2)
    assert texts(batch) == [0, 1] and batch.cursor == batch.messages[-1].id
    batch = hub.read("ch", batch.cursor, limit=2)
    assert texts(batch) == [2, 3]
    batch = hub.read("ch", batch.cursor, limit=2)
    assert texts(batch) == [4] and batch.cursor == hub.cursor


def test_channels_are_independent():
    hub = Hub()
    hub.publish("a", "for a")
    hub.publish("b", "for b")
    assert texts(hub.read("a", "0")) == ["for a"]
    assert texts(hub.read("b", "0")) == ["for b"]


def test_several_channels_merge_in_publish_order():
    hub = Hub()
    for i in range(9):
        hub.publish("abc"[i % 3], i)
    batch = hub.read(["a", "b", "c"], "0")
    assert texts(batch) == list(range(9))
    assert [m.channel for m in batch.messages] == list("abcabcabc")
    first = hub.read(["c", "a"], "0", limit=3)
    assert texts(first) == [0, 2, 3]
    assert texts(hub.read(["c", "a"], first.cursor)) == [5, 6, 8]


def test_retention_by_count_drops_oldest_and_signals_gap():
    hub = Hub(retention=3)
    cursor = hub.read("ch").cursor
    for i in range(5):
        hub.publish("ch", i)
    batch = hub.read("ch", cursor)
    assert texts(batch) == [2, 3, 4] and batch.gap
    assert not hub.read("ch", "0").gap  # "everything held" loses nothing
    assert not hub.read("ch", batch.cursor).gap


def test_retention_by_age():
    hub = Hub(max_age=60)
    old = hub.publish("ch", "old")
    cursor = hub.read("ch").cursor
    old.born -= 120  # as if published two minutes ago
    hub.publish("ch", "new")
    assert texts(hub.read("ch", "0")) == ["new"]
    hub2 = Hub(max_age=60)
    m = hub2.publish("ch", "stale")
    m.born -= 120
    batch = hub2.read("ch", hub2.read("ch").cursor)
    assert batch.messages == []
    assert cursor  # (a cursor taken before the drop still reads on)


def test_cursor_from_another_history_is_a_gap_from_the_oldest():
    old = Hub()
    stale = old.publish("ch", "before restart").id
    new = Hub()
    new.publish("ch", "after restart 1")
    new.publish("ch", "after restart 2")
    batch = new.read("ch", stale)
    assert batch.gap and texts(batch) == ["after restart 1", "after restart 2"]
    empty = Hub().read("ch", stale)
    assert empty.gap and empty.messages == []


def test_cursor_from_the_future_is_a_gap():
    hub = Hub()
    hub.publish("ch", "x")
    batch = hub.read("ch", f"{hub.history}-999")
    assert batch.gap and texts(batch) == ["x"]


@pytest.mark.parametrize("since", ["", "abc", "1", "-1", "x-y", "a-1-2", "a,b-1",
                                   "a" * 33 + "-1", "ab-" + "9" * 20, "ab -1"])
def test_malformed_cursor_is_400(since):
    with pytest.raises(LongpollError) as info:
        Hub().read("ch", since)
    assert info.value.status == 400


@pytest.mark.parametrize("name", ["", "a b", "a/b", "ä", "x" * 65, "a,b", None])
def test_bad_channel_names_are_400(name):
    with pytest.raises(LongpollError) as info:
        Hub().publish(name, "x")
    assert info.value.status == 400


@pytest.mark.parametrize("kwargs", [
    {"title": "x" * 257}, {"title": 5}, {"priority": 0}, {"priority": 6},
    {"priority": True}, {"priority": "5"}, {"priority": 2.0}])
def test_bad_title_or_priority_is_400(kwargs):
    with pytest.raises(LongpollError) as info:
        Hub().publish("ch", "x", **kwargs)
    assert info.value.status == 400


@pytest.mark.parametrize("message", [float("nan"), float("inf"), {1, 2}, object()])
def test_messages_that_are_not_plain_json_are_refused(message):
    hub = Hub()
    with pytest.raises(LongpollError):
        hub.publish("ch", message)
    assert hub.read("ch", "0").messages == []


def test_wait_returns_when_a_message_is_published():
    hub = Hub()
    results = []
    waiter = threading.Thread(target=lambda: results.append(hub.wait("ch", timeout=30)))
    waiter.start()
    wait_until(lambda: hub.waiting == 1, what="the waiter to park")
    hub.publish("other", "not for it")
    hub.publish("ch", "hello")
    waiter.join(5)
    assert texts(results[0]) == ["hello"] and hub.waiting == 0


def test_wait_times_out_with_head_cursor():
    hub = Hub()
    hub.publish("ch", "before")
    batch = hub.wait("ch", timeout=0.05)
    assert batch.messages == [] and batch.cursor == hub.cursor
    hub.publish("ch", "after")
    assert texts(hub.read("ch", batch.cursor)) == ["after"]


def test_wait_answers_at_once_when_messages_are_there():
    hub = Hub()
    hub.publish("ch", 1)
    assert texts(hub.wait("ch", "0", timeout=30)) == [1]


def test_every_waiter_gets_every_message():
    hub = Hub()
    results = []
    threads = [threading.Thread(target=lambda: results.append(texts(hub.wait("ch", timeout=30))))
               for _ in range(20)]
    for t in threads:
        t.start()
    wait_until(lambda: hub.waiting == 20)
    hub.publish("ch", "all")
    for t in threads:
        t.join(5)
    assert results == [["all"]] * 20


def test_close_wakes_every_waiter_and_refuses_publishes():
    hub = Hub()
    done = []
    threads = [threading.Thread(target=lambda: done.append(hub.wait("ch", timeout=60)))
               for _ in range(5)]
    for t in threads:
        t.start()
    wait_until(lambda: hub.waiting == 5)
    hub.close()
    for t in threads:
        t.join(5)
    assert len(done) == 5 and all(b.messages == [] for b in done)
    with pytest.raises(LongpollError) as info:
        hub.publish("ch", "late")
    assert info.value.status == 503
    assert hub.wait("ch", timeout=60).messages == []  # returns at once


def test_take_hands_each_message_to_one_taker():
    hub = Hub()
    taken = []
    lock = threading.Lock()

    def taker():
        while True:
            msg = hub.take("default", timeout=0.5)
            if msg is None:
                return
            with lock:
                taken.append(msg.message)

    threads = [threading.Thread(target=taker) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(200):
        hub.publish("default", i)
    for t in threads:
        t.join(10)
    assert sorted(taken) == list(range(200))
    assert len(hub.read("default", "0", limit=1000).messages) == 200  # broadcast unaffected


def test_take_waits_and_times_out():
    hub = Hub()
    assert hub.take(timeout=0.01) is None
    got = []
    t = threading.Thread(target=lambda: got.append(hub.take(timeout=30)))
    t.start()
    wait_until(lambda: hub.waiting == 1)
    hub.publish("default", "job")
    t.join(5)
    assert got[0].message == "job"


def test_watch_fires_once_on_publish_or_close():
    hub = Hub()
    calls = []
    hub.watch(["a", "b"], lambda: calls.append("x"))
    hub.publish("b", 1)
    hub.publish("b", 2)
    hub.publish("a", 3)
    assert calls == ["x"]
    cancel = hub.watch("a", lambda: calls.append("cancelled"))
    cancel()
    hub.publish("a", 4)
    hub.watch("a", lambda: calls.append("closed"))
    hub.close()
    assert calls == ["x", "closed"]
    hub.watch("a", lambda: calls.append("after"))
    assert calls[-1] == "after"


def test_prune_forgets_idle_empty_channels_but_keeps_history():
    hub = Hub(retention=1)
    hub.read("ghost")
    hub.wait("ghost", timeout=0)
    hub.publish("kept", 1)
    hub.publish("kept", 2)
    hub.prune()
    assert hub.channel_count == 1


def test_concurrent_publishers_get_unique_increasing_ids():
    hub = Hub(retention=10_000)
    def publish():
        for i in range(500):
            hub.publish("ch", i)
    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batch = hub.read("ch", "0", limit=1000)
    seqs = [m.seq for m in batch.messages]
    assert seqs == sorted(set(seqs)) and len(seqs) == 1000
    rest = hub.read("ch", batch.cursor, limit=1000).messages
    rest2 = hub.read("ch", rest[-1].id, limit=1000).messages
    assert len(batch.messages) + len(rest) + len(rest2) == 2000


def test_bad_limits_are_refused():
    hub = Hub()
    for limit in (0, 1001, 2.5, True):
        with pytest.raises(LongpollError):
            hub.read("ch", "0", limit=limit)
    with pytest.raises(ValueError):
        Hub(retention=0)


def test_batch_json_matches_as_dict():
    import json
    hub = Hub(retention=1)
    cursor = hub.read("ch").cursor
    hub.publish("ch", {"ü": [1, None]}, title="t")
    hub.publish("ch", "x")
    batch = hub.read("ch", cursor)
    assert json.loads(batch.to_json()) == batch.as_dict()
    assert batch.as_dict()["gap"] is True


@pytest.mark.parametrize("fields, words", [
    ({"tags": "warning"}, "tags must be"),
    ({"tags": ["x" * 65]}, "tags must be"),
    ({"tags": ["t"] * 17}, "tags must be"),
    ({"click": "javascript:alert(1)"}, "click must be"),
    ({"icon": "ftp://x/y.png"}, "icon must be an http"),
    ({"actions": [{"action": "view", "label": "x"}]}, "url must be"),
    ({"actions": [{"action": "launch", "label": "x"}]}, "view, broadcast or http"),
    ({"actions": [{"action": "broadcast", "label": "x"}] * 4}, "at most 3"),
    ({"markdown": "yes"}, "markdown must be true"),
    ({"sequence_id": "has space"}, "sequence_id must be"),
    ({"sequence_id": "x" * 65}, "sequence_id must be"),
    ({"sequence_id": 7}, "sequence_id must be"),
])
def test_a_messages_other_fields_are_checked(fields, words):
    hub = Hub()
    with pytest.raises(LongpollError, match=words) as caught:
        hub.publish("x", "m", **fields)
    assert caught.value.status == 400
    assert hub.read("x", "0").messages == []


def test_an_unknown_field_is_a_programming_error():
    with pytest.raises(TypeError, match="unknown message fields: colour"):
        Hub().publish("x", "m", colour="red")


def test_a_lone_surrogate_in_a_field_is_refused_before_anything_is_kept():
    hub = Hub()
    with pytest.raises(LongpollError, match="valid Unicode"):
        hub.publish("x", "m", tags=["\ud800"])
    hub.publish("x", "after")
    assert texts(hub.read("x", "0")) == ["after"]
