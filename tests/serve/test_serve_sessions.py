"""The tracker model's session table without a server: idle time counts only while the instance
is not executing (a fake clock, no sleeps), a freed idle stream's Triton sequence is ended too,
a stream is bound to its opener, --max-sessions holds across instances (processes sharing one
folder)."""

from __future__ import annotations

import pytest

from fastsam2.serve.protocol import ServerError, SessionLimitError, decode_error, error_message
from fastsam2.serve.sessions import SessionTable, Slots


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeSession:
    closed = 0

    def close(self):
        FakeSession.closed += 1

    def memory_bytes(self):
        return 100


def table(folder, instance="i0", limit=2, idle=3.0, clock=None, on_free=None):
    return SessionTable(lambda options: FakeSession(), Slots(folder, instance, limit), idle, clock=clock or Clock(),
                        on_free=on_free)


def test_a_stream_waiting_behind_other_streams_is_not_idle(tmp_path):
    """A slow client's 12 s frame: the other stream's next frame waits behind it and must not be
    freed; a stream that really stopped sending is freed, and its Triton sequence ended (Triton's
    own timeout counts queueing as idle, so it is only a backstop far above ours)."""
    from fastsam2.serve.repository import triton_idle_us

    clock, freed = Clock(), []
    t = table(tmp_path, clock=clock, on_free=freed.append)
    _, k1 = t.open(1, {})
    t.open(2, {})
    with t.busy():  # stream 2's frame takes 12 s; stream 1's next frame waits in Triton's queue
        clock.t += 12
    assert t.reap() == 0 and len(t) == 2 and freed == []
    clock.t += 2.9  # nothing executing: both idle 2.9 s < 3 s
    assert t.reap() == 0
    t.get(1, k1)  # stream 1's frame arrives
    clock.t += 0.2  # stream 2 has been idle 3.1 s (not counting the 12 s busy)
    assert t.reap() == 1 and sorted(t.sessions) == [1] and freed == [2]
    with pytest.raises(ServerError, match="idle longer than the server's idle timeout"):
        t.get(2, "x")
    # Triton's timeout would have dropped stream 1 during the 12 s wait had it been ours (3 s)
    assert triton_idle_us(3.0) >= 10 * 3.0 * 1e6 and triton_idle_us(60.0) >= 10 * 60.0 * 1e6


def test_an_abandoned_stream_is_freed_on_an_instance_that_never_stops(tmp_path):
    """The idle clock stands still while the instance executes: where other streams keep it
    busy without a pause, a stream that went away is still freed after the backstop (10x the
    timeout here, 300 s more at least), which is also Triton's own sequence timeout."""
    clock, freed = Clock(), []
    t = table(tmp_path, clock=clock, idle=60.0, on_free=freed.append)
    t.open(1, {})
    _, k2 = t.open(2, {})
    for _ in range(59):  # stream 2's 10 s frames, back to back, for 590 s
        with t.busy():
            t.get(2, k2)
            clock.t += 10
    assert t.reap() == 0
    with t.busy():
        t.get(2, k2)
        clock.t += 11  # 601 s since stream 1's last request
    assert t.reap() == 1 and freed == [1] and sorted(t.sessions) == [2]


def test_a_stream_is_bound_to_its_opener(tmp_path):
    from fastsam2.runtime.errors import InputError

    t = table(tmp_path)
    s1, k1 = t.open(7, {})
    with pytest.raises(InputError, match="stream 7 is live on this server") as e:
        t.open(7, {})  # a second START on a live id used to replace the session silently
    assert e.value.live and t.get(7, k1) is s1 and t.slots.count() == 1
    for wrong in (None, "", "0" * 32, 5):
        with pytest.raises(InputError, match="not its opener's"):
            t.get(7, wrong)
        assert wrong is None or not t.close(7, wrong)  # (None: the server's own close, e.g. idle)
        assert t.get(7, k1) is s1
    assert t.close(7, k1) and len(t) == 0 and t.slots.count() == 0


def test_max_sessions_holds_across_instances_and_frees_on_close(tmp_path):
    a, b = table(tmp_path, "i0"), table(tmp_path, "i1")
    a.open(1, {})
    b.open(2, {})
    with pytest.raises(SessionLimitError, match="--max-sessions"):
        b.open(3, {})
    assert len(b) == 1 and a.slots.count() == 2
    assert a.close(1) and not a.close(1)
    b.open(3, {})
    assert b.memory_bytes() == 200
    # a restarted instance starts without its predecessor's sessions (a crashed stub)
    table(tmp_path, "i1")
    assert a.slots.count() == 0


def test_errors_cross_the_wire_as_their_own_class():
    from fastsam2.runtime.errors import InputError

    e = decode_error(error_message(InputError("point 400,10 is outside the 320x240 frame")))
    assert type(e) is InputError and str(e) == "point 400,10 is outside the 320x240 frame"
    assert type(decode_error(error_message(SessionLimitError("full")))) is SessionLimitError
    other = decode_error("Stub process 'x' is not healthy.")
    assert type(other) is ServerError and "not healthy" in str(other)
