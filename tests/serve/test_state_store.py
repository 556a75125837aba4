"""The state store a served stream's memory moves through: a real redis-server and a folder."""

from __future__ import annotations

import os
import time

import pytest

from fastsam2.runtime.errors import InputError
from fastsam2.serve import state_store
from fastsam2.serve.state_store import FileStore, open_store
from services import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as (url, _):
        yield url


@pytest.fixture(params=["redis", "file"])
def store(request, tmp_path):
    url = request.getfixturevalue("redis_url") if request.param == "redis" else f"file://{tmp_path}"
    s = open_store(url, ttl=60)
    yield s
    s.close()


def test_base_then_increments_in_order(store):
    assert store.load("a") is None
    store.put_base("a", b"base0")
    assert [store.append("a", bytes([i])) for i in range(3)] == [1, 2, 3]
    assert store.load("a") == (b"base0", [b"\x00", b"\x01", b"\x02"])
    store.put_base("b", b"other")  # streams are apart
    assert store.load("b") == (b"other", [])
    store.put_base("a", b"base1")  # a new base drops the chain before it
    store.append("a", b"x")
    assert store.load("a") == (b"base1", [b"x"])
    store.drop("a")
    assert store.load("a") is None and store.load("b") == (b"other", [])


def test_stream_names_never_reach_paths_or_key_patterns(store, tmp_path):
    for hostile in ("../../etc", "*", "a:b:base", "x" * 10000, 2**64 - 1):
        store.put_base(hostile, b"z")
        assert store.load(hostile) == (b"z", [])
    if isinstance(store, FileStore):
        assert all(len(p.name) == 32 for p in tmp_path.iterdir())


def test_file_store_keeps_the_newest_whole_generation(tmp_path):
    s = FileStore(f"file://{tmp_path}", ttl=60)
    s.put_base(1, b"g0")
    s.append(1, b"i0")
    d = next(tmp_path.iterdir())
    # a reader that lists between a new base's write and the old chain's removal: an older
    # generation's files next to the newer base are ignored
    (d / "base.000000000005").write_bytes(b"g5")
    assert s.load(1) == (b"g5", [])
    s.append(1, b"i5")
    assert s.load(1) == (b"g5", [b"i5"])
    s.put_base(1, b"g6")
    assert sorted(p.name for p in d.iterdir()) == ["base.000000000006"]


def test_file_store_expires_idle_streams(tmp_path):
    s = FileStore(f"file://{tmp_path}", ttl=30)
    s.put_base("old", b"1")
    d = next(tmp_path.iterdir())
    past = time.time() - 31
    os.utime(d, (past, past))
    assert s.load("old") is None  # idle past the TTL reads as gone
    s.put_base("new", b"2")  # and the next write removes it
    assert not d.exists() and s.load("new") == (b"2", [])


def test_redis_entries_expire_with_the_ttl(redis_url):
    import redis

    s = open_store(redis_url, ttl=7)
    s.put_base("t", b"1")
    s.append("t", b"2")
    r = redis.Redis.from_url(redis_url)
    base, chain = (f"fastsam2:{state_store.stream_key('t')}:{k}" for k in ("base", "chain"))
    assert 0 < r.ttl(base) <= 7 and 0 < r.ttl(chain) <= 7
    r.close()
    s.close()


def test_increment_without_base_and_oversized_entries_are_refused(tmp_path, monkeypatch):
    s = FileStore(f"file://{tmp_path}", ttl=60)
    with pytest.raises(InputError, match="needs a base snapshot first"):
        s.append("none", b"x")
    monkeypatch.setattr(state_store, "MAX_ENTRY_BYTES", 4)
    with pytest.raises(InputError, match="over the store's 4 bytes"):
        s.put_base("big", b"12345")


@pytest.mark.parametrize("url, words", [
    ("http://x", "must be redis://HOST:PORT/DB or file:///DIR"),
    ("", "must be redis://"),
    ("file:///no/such/folder/here", "is not a folder"),
    ("redis://127.0.0.1:1/0", "does not answer"),
])
def test_bad_store_urls_are_one_line(url, words):
    with pytest.raises(InputError) as e:
        open_store(url, ttl=60)
    assert words in str(e.value) and "\n" not in str(e.value)
