"""The fused-step scheduler (service/scheduler.py), driven directly with a recording engine: every dispatch rule and
limit (delay, delay 0, image budget, stream cap, expected streams, one step per stream per call, concurrency),
per-item errors and the metrics. Bounded: every wait has a timeout; no network."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from service.metrics import ServiceMetrics
from service.scheduler import BatchLimits, FusedScheduler, SchedulerClosed


class RecordingEngine:
    """``step_many`` records each call's (stream key, images) and answers each item with (key, call index)."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self.gate = gate
        self.fail = fail

    def step_many(self, items, adapt=True):
        assert adapt is True
        keys = [s["key"] for s, _ in items]
        assert len(set(keys)) == len(keys), "a stream twice in one call"
        if self.gate is not None:
            assert self.gate.wait(10)
        self.calls.append([(s["key"], int(x.shape[0])) for s, x in items])
        if self.fail:
            raise RuntimeError("engine failed")
        for s, _ in items:
            s["steps"] += 1
        return [(s["key"], len(self.calls) - 1) for s, _ in items]

    def step(self, state, x, adapt=True):  # a call of one stream
        return self.step_many([(state, x)], adapt=adapt)[0]


def state(key: str) -> dict:
    return {"key": key, "steps": 0}


def x(n: int) -> torch.Tensor:
    return torch.zeros(n, 1, 2, 2)


def run(coro, timeout: float = 20.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def sched(engine, incoming=None, metrics=None, max_concurrent=1, **limits) -> FusedScheduler:
    base = dict(max_delay_s=0.0, max_images=1024, max_streams=64, active_window_s=0.0)
    base.update(limits)
    return FusedScheduler(engine, BatchLimits(**base), max_concurrent=max_concurrent, metrics=metrics,
                          incoming=incoming)


def test_requests_queued_together_are_one_call_in_arrival_order():
    eng = RecordingEngine()

    async def main():
        s = sched(eng)
        out = await asyncio.gather(*(s.submit(k, state(k), x(2)) for k in "abcd"))
        await s.close()
        return out

    out = run(main())
    assert eng.calls == [[("a", 2), ("b", 2), ("c", 2), ("d", 2)]]
    assert out == [("a", 0), ("b", 0), ("c", 0), ("d", 0)]  # each caller gets its own result


def test_delay_zero_runs_what_is_queued_now_even_when_others_are_expected():
    eng = RecordingEngine()

    async def main():
        s = sched(eng, incoming=lambda: {"b"}, max_delay_s=0.0, active_window_s=60.0)
        await s.submit("a", state("a"), x(1))  # b is "on its way" forever: delay 0 does not wait for it
        await s.submit("b", state("b"), x(1))
        await s.close()

    run(main())
    assert eng.calls == [[("a", 1)], [("b", 1)]]


def test_a_call_waits_for_expected_streams_and_goes_when_all_are_in():
    eng = RecordingEngine()

    async def main():
        on_the_way = {"b", "c"}
        s = sched(eng, incoming=lambda: on_the_way, max_delay_s=60.0)
        a = asyncio.create_task(s.submit("a", state("a"), x(1)))
        done, _ = await asyncio.wait({a}, timeout=0.3)
        assert not done, "a did not wait for the streams on their way"
        b = asyncio.create_task(s.submit("b", state("b"), x(2)))
        done, _ = await asyncio.wait({a}, timeout=0.3)
        assert not done, "c is still expected"
        on_the_way.discard("c")  # c's request was refused before it reached the scheduler
        c = asyncio.create_task(s.submit("c", state("c"), x(3)))
        await asyncio.gather(a, b, c)
        await s.close()

    run(main())
    assert eng.calls == [[("a", 1), ("b", 2), ("c", 3)]]


def test_the_delay_bounds_the_wait_for_expected_streams():
    eng = RecordingEngine()

    async def main():
        s = sched(eng, incoming=lambda: {"never"}, max_delay_s=0.25)
        t0 = time.monotonic()
        await s.submit("a", state("a"), x(1))
        waited = time.monotonic() - t0
        await s.close()
        return waited

    waited = run(main(), timeout=10)
    assert waited >= 0.25  # the stream it waited for never came: the call went once the delay had passed
    assert eng.calls == [[("a", 1)]]


def test_recently_active_streams_are_expected_and_a_lone_stream_never_waits():
    eng = RecordingEngine()

    async def main():
        s = sched(eng, max_delay_s=60.0, active_window_s=60.0, unknown_wait_s=60.0)
        for _ in range(3):  # alone: nothing else was active, nothing on its way: no waiting despite the delay
            await asyncio.wait_for(s.submit("a", state("a"), x(1)), 5)
        await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
        # now b is recently active: a's next call waits for it (up to the delay)
        a = asyncio.create_task(s.submit("a", state("a"), x(1)))
        done, _ = await asyncio.wait({a}, timeout=0.3)
        assert not done
        await asyncio.gather(a, s.submit("b", state("b"), x(1)))
        await s.close()

    run(main())
    assert eng.calls == [[("a", 1)]] * 3 + [[("a", 1), ("b", 1)]] * 2


def test_a_stream_past_the_active_window_is_no_longer_waited_for():
    eng = RecordingEngine()

    async def main():
        s = sched(eng, max_delay_s=60.0, active_window_s=0.2, unknown_wait_s=60.0)
        await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
        a = asyncio.create_task(s.submit("a", state("a"), x(1)))
        done, _ = await asyncio.wait({a}, timeout=0.05)
        assert not done  # b was active 0 s ago: a waits for it
        await asyncio.wait_for(a, 5)  # ... until b's activity is older than the window
        await s.close()

    run(main())
    assert eng.calls == [[("a", 1), ("b", 1)], [("a", 1)]]


def test_a_stream_that_comes_back_later_than_the_delay_is_not_waited_for():
    """b's think time (end of its call -> its next submit) is 1 s, longer than the 0.5 s delay: once learned, a's
    calls no longer wait for b (before it is learned, they wait the whole delay)."""
    eng = RecordingEngine()

    async def main():
        s = sched(eng, max_delay_s=0.5, active_window_s=60.0, unknown_wait_s=60.0)
        waits = []
        for _ in range(3):
            await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
            t0 = time.monotonic()
            a = asyncio.create_task(s.submit("a", state("a"), x(1)))
            a.add_done_callback(lambda _, t0=t0: waits.append(time.monotonic() - t0))
            await asyncio.sleep(1.0)  # b "thinks" 1 s
            await asyncio.wait_for(a, 5)
        await s.close()
        return s, waits

    s, waits = run(main())
    assert [len(c) for c in eng.calls] == [2, 1, 2, 1, 2, 1]
    assert waits[0] >= 0.49  # b's think time unknown: a waited the delay for it
    assert waits[1] < 0.3 and waits[2] < 0.3  # b not due before the deadline: a went at once
    assert s._think["b"] == pytest.approx(1.0, abs=0.3)


def test_a_stream_that_comes_back_quickly_is_waited_for_and_given_up_when_late():
    """b's think time is ~0: a's next call waits for b (b joins it); when b then does not come, a's call goes once
    b is late (late_factor x think + late_margin_s after b's call), long before the 60 s delay."""
    eng = RecordingEngine()

    async def main():
        s = sched(eng, max_delay_s=60.0, active_window_s=60.0, late_margin_s=0.5)
        for _ in range(3):  # learn b's think time: b submits again right after its answer
            await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
        a = asyncio.create_task(s.submit("a", state("a"), x(1)))
        done, _ = await asyncio.wait({a}, timeout=0.03)
        assert not done  # b is due: a waits
        await asyncio.gather(a, s.submit("b", state("b"), x(1)))
        t0 = time.monotonic()
        await asyncio.wait_for(s.submit("a", state("a"), x(1)), 5)  # b never comes: a goes when b is late
        waited = time.monotonic() - t0
        await s.close()
        return waited

    waited = run(main())
    assert 0.3 < waited < 3.0
    assert [len(c) for c in eng.calls] == [2, 2, 2, 2, 1]


def test_a_call_waits_for_a_stream_due_back_from_a_running_call():
    """Two call slots. a and b have think times ~0 and short calls: while a's call runs, b's call waits for a (due
    back within the delay) and they run together, instead of b running alone next to a."""
    gate = threading.Event()
    eng = RecordingEngine(gate=gate)

    async def main():
        s = sched(eng, max_concurrent=2, max_delay_s=60.0, active_window_s=60.0, late_margin_s=0.5)
        gate.set()
        for _ in range(3):  # learn think times (~0) and the call length
            await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
        gate.clear()
        a = asyncio.create_task(s.submit("a", state("a"), x(1)))  # a alone (b not queued yet, due though)
        await asyncio.sleep(0)
        # a's call starts only once b's wait ends: let it start with a alone by making b late first
        await asyncio.wait_for(_until_running(s, "a"), 5)
        b = asyncio.create_task(s.submit("b", state("b"), x(1)))
        await asyncio.sleep(0.05)
        assert not b.done()  # b waits for a, which is running and due back
        gate.set()
        await asyncio.wait_for(a, 5)
        await asyncio.gather(b, s.submit("a", state("a"), x(1)))
        await s.close()

    run(main())
    assert [sorted(k for k, _ in c) for c in eng.calls[3:]] == [["a"], ["a", "b"]]


async def _until_running(s: FusedScheduler, key: str) -> None:
    while key not in s._running:
        await asyncio.sleep(0.005)


async def _b_paces_then_a_alone(s: FusedScheduler, gaps: tuple[float, ...]) -> float:
    """a and b step together, then again after each pause in ``gaps`` (b's think times); then a alone: returns how
    long a's lone call took (closes ``s``)."""
    await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
    for gap in gaps:
        await asyncio.sleep(gap)
        await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
    t0 = time.monotonic()
    await asyncio.wait_for(s.submit("a", state("a"), x(1)), 5)
    waited = time.monotonic() - t0
    await s.close()
    return waited


def test_a_stream_whose_think_time_varies_more_than_the_delay_is_not_waited_for():
    """b comes back after 0.6 s, then at once, alternately: its average think time (~0.23 s) is within the 0.4 s
    delay, but its spread is not, so a's call does not wait for it (an open-loop client is not predictable)."""
    eng = RecordingEngine()

    async def main():
        s = sched(eng, max_delay_s=0.4, active_window_s=60.0)
        return s, await _b_paces_then_a_alone(s, (0.6, 0.0, 0.6, 0.0))

    s, waited = run(main())
    assert s._think["b"] < 0.4 < s._think["b"] + s._spread["b"]
    assert waited < 0.2  # waiting for b would take the whole 0.4 s delay
    assert [len(c) for c in eng.calls] == [2] * 5 + [1]


def test_a_stream_whose_requests_would_not_fit_is_not_waited_for():
    """b sends 8-image requests, the budget is 10 images: a's 4-image call cannot take b's next request, so it
    does not wait for b, however due b is."""
    eng = RecordingEngine()

    async def main():
        s = sched(eng, max_delay_s=60.0, active_window_s=60.0, max_images=10)
        await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(8)))
        await asyncio.wait_for(s.submit("a", state("a"), x(4)), 5)  # b would wait 60 s otherwise (no think yet)
        await s.close()

    run(main())
    assert eng.calls == [[("a", 1), ("b", 8)], [("a", 4)]]


def test_a_stream_sending_less_often_than_the_window_keeps_its_think_time():
    """b comes back every 0.3 s, longer than the 0.25 s active window: its think time is still learned (kept for
    think_horizon_s), so a's call does not take b for a new stream and goes at once."""
    eng = RecordingEngine()

    async def main():
        s = sched(eng, max_delay_s=0.2, active_window_s=0.25, unknown_wait_s=60.0)
        return s, await _b_paces_then_a_alone(s, (0.3, 0.3))

    s, waited = run(main())
    assert s._think["b"] == pytest.approx(0.3, abs=0.15)
    assert waited < 0.15  # unknown, b would be waited for the whole 0.2 s delay


def test_streams_taken_by_a_capped_call_count_as_running_at_once():
    """Two slots, 2 streams per call: two of a, b, c fill the first call (held in the engine), the third's call is
    formed while the first starts. Its streams are running (not missing streams to wait for), so the third goes at
    once instead of after the 0.5 s delay."""
    gate = threading.Event()
    eng = RecordingEngine(gate=gate)

    async def main():
        s = sched(eng, max_concurrent=2, max_streams=2, max_delay_s=0.5, active_window_s=60.0, unknown_wait_s=60.0)
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, gate.set)
        t0 = time.monotonic()
        await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)),
                             s.submit("c", state("c"), x(1)))
        waited = time.monotonic() - t0
        await s.close()
        return waited

    assert run(main()) < 0.35
    assert sorted(len(c) for c in eng.calls) == [1, 2]


def test_a_request_on_its_way_that_would_not_fit_is_not_waited_for():
    """``incoming`` names a stream whose last request (8 images) would not fit in the 10-image budget next to a's 4:
    a's call does not wait for it."""
    eng = RecordingEngine()

    async def main():
        s = sched(eng, incoming=lambda: {"big"}, max_delay_s=60.0, active_window_s=60.0, max_images=10)
        await asyncio.gather(s.submit("big", state("big"), x(8)))
        await asyncio.wait_for(s.submit("a", state("a"), x(4)), 5)  # would wait the 60 s delay for "big"
        await s.close()

    run(main())
    assert eng.calls == [[("big", 8)], [("a", 4)]]


def test_think_limits_are_validated():
    for bad in (dict(late_factor=0.5), dict(late_margin_s=-1.0), dict(think_ema=0.0), dict(think_ema=1.5),
                dict(unknown_wait_s=-1.0), dict(think_horizon_s=-1.0)):
        with pytest.raises(ValueError):
            BatchLimits(**bad)


def test_the_image_budget_splits_a_call():
    eng = RecordingEngine()

    async def main():
        s = sched(eng, max_images=8)
        await asyncio.gather(*(s.submit(k, state(k), x(n)) for k, n in [("a", 4), ("b", 4), ("c", 4), ("d", 12),
                                                                          ("e", 1)]))
        await s.close()

    run(main())
    # calls take items in arrival order while they fit; a request over the budget runs alone
    assert eng.calls == [[("a", 4), ("b", 4)], [("c", 4)], [("d", 12)], [("e", 1)]]


def test_a_full_image_budget_does_not_wait_for_the_delay():
    eng = RecordingEngine()

    async def main():
        s = sched(eng, incoming=lambda: {"x", "y"}, max_delay_s=60.0, max_images=4)
        await asyncio.gather(s.submit("a", state("a"), x(2)), s.submit("b", state("b"), x(2)))
        await s.close()

    run(main(), timeout=10)
    assert eng.calls == [[("a", 2), ("b", 2)]]


def test_the_stream_cap_splits_a_call_and_ends_the_wait():
    eng = RecordingEngine()

    async def main():
        s = sched(eng, incoming=lambda: {"z"}, max_delay_s=60.0, max_streams=2)
        await asyncio.gather(*(s.submit(k, state(k), x(1)) for k in "abcd"))
        await s.close()

    run(main(), timeout=10)
    assert eng.calls == [[("a", 1), ("b", 1)], [("c", 1), ("d", 1)]]


def test_a_stream_is_at_most_once_per_call_and_stays_in_order():
    eng = RecordingEngine()

    async def main():
        s = sched(eng)
        st = state("a")
        out = await asyncio.gather(s.submit("a", st, x(1)), s.submit("b", state("b"), x(1)),
                                   s.submit("a", st, x(2)))
        await s.close()
        return out, st

    out, st = run(main())
    assert eng.calls == [[("a", 1), ("b", 1)], [("a", 2)]]
    assert out[0] == ("a", 0) and out[2] == ("a", 1) and st["steps"] == 2


def test_one_call_at_a_time_and_the_next_takes_everything_that_queued_meanwhile():
    gate = threading.Event()
    eng = RecordingEngine(gate)

    async def main():
        s = sched(eng, max_concurrent=1)
        first = asyncio.create_task(s.submit("a", state("a"), x(1)))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(s.submit(k, state(k), x(1))) for k in "bcd"]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *rest)
        await s.close()

    run(main())
    assert eng.calls == [[("a", 1)], [("b", 1), ("c", 1), ("d", 1)]]


def test_errors_fail_only_their_own_request():
    eng = RecordingEngine()

    def bad_before(_s):
        raise ValueError("before failed")

    def bad_after(_s, _r):
        raise OSError("after failed")

    async def main():
        s = sched(eng)
        out = await asyncio.gather(
            s.submit("a", state("a"), x(1), before=bad_before),
            s.submit("b", state("b"), x(1), after=lambda st, r: ("after", r)),
            s.submit("c", state("c"), x(1), after=bad_after),
            return_exceptions=True)
        failing = sched(RecordingEngine(fail=True))
        whole = await asyncio.gather(failing.submit("d", state("d"), x(1)), failing.submit("e", state("e"), x(1)),
                                     return_exceptions=True)
        await s.close()
        await failing.close()
        with pytest.raises(SchedulerClosed):
            await s.submit("a", state("a"), x(1))
        return out, whole

    out, whole = run(main())
    assert isinstance(out[0], ValueError) and isinstance(out[2], OSError)
    assert out[1] == ("after", ("b", 0))
    assert eng.calls == [[("b", 1), ("c", 1)]]  # a's failed reset kept it out of the step
    assert all(isinstance(e, RuntimeError) and "engine failed" in str(e) for e in whole)


def test_metrics_count_streams_images_and_queue_wait():
    eng = RecordingEngine()
    m = ServiceMetrics()

    async def main():
        s = sched(eng, metrics=m, max_streams=3)
        await asyncio.gather(*(s.submit(k, state(k), x(4)) for k in "abcde"))
        await s.close()

    run(main())
    r = m.registry
    assert r.get_sample_value("tta_fused_step_streams_count") == 2
    assert r.get_sample_value("tta_fused_step_streams_sum") == 5
    assert r.get_sample_value("tta_fused_step_streams_bucket", {"le": "1.0"}) == 0
    assert r.get_sample_value("tta_fused_step_images_sum") == 20
    assert r.get_sample_value("tta_fused_queue_wait_seconds_count") == 5


def test_limits_are_validated():
    with pytest.raises(ValueError):
        BatchLimits(max_images=0)
    with pytest.raises(ValueError):
        BatchLimits(max_streams=0)
    with pytest.raises(ValueError):
        BatchLimits(max_delay_s=-1)


def test_a_call_of_one_stream_is_engine_step_and_of_several_one_step_many():
    class Split:
        def __init__(self) -> None:
            self.log: list[tuple[str, list[str]]] = []

        def step(self, st, xx, adapt=True):
            self.log.append(("step", [st["key"]]))
            return st["key"]

        def step_many(self, items, adapt=True):
            self.log.append(("step_many", [st["key"] for st, _ in items]))
            return [st["key"] for st, _ in items]

    eng = Split()

    async def main():
        s = sched(eng)
        await s.submit("a", state("a"), x(1))
        await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
        await s.close()

    run(main())
    assert eng.log == [("step", ["a"]), ("step_many", ["a", "b"])]


class SlowEngine(RecordingEngine):
    """A :class:`RecordingEngine` whose call takes ``per_image`` seconds per image (in the call's worker thread)."""

    def __init__(self, per_image: float) -> None:
        super().__init__()
        self.per_image = per_image

    def step_many(self, items, adapt=True):
        time.sleep(self.per_image * sum(int(x.shape[0]) for _, x in items))
        return super().step_many(items, adapt)


def test_think_time_runs_from_the_answer_not_from_the_end_of_the_call():
    """The data plane calls answered(key) once the step is durable; the time between the call's end and the answer
    (the durable write, the same for every stream of a call) is not the client's think time."""
    eng = RecordingEngine()

    async def main():
        s = sched(eng, max_delay_s=0.0, active_window_s=60.0)
        for key, answer_after in (("a", 0.3), ("b", None)):
            await s.submit(key, state(key), x(1))
            await asyncio.sleep(0.3)  # the "durable write"
            if answer_after is not None:
                s.answered(key)
            await s.submit(key, state(key), x(1))  # the client sends its next request at once
        s.answered("a")  # after its next submit: no-op (its think time was learned from the answer)
        await s.close()
        return s

    s = run(main())
    assert s._think["a"] < 0.1  # from the answer
    assert s._think["b"] == pytest.approx(0.3, abs=0.1)  # no answer reported: from the end of its call


def test_a_stream_without_a_think_time_of_its_own_is_waited_for_by_every_streams_average():
    """c has ended one call (no think time of its own yet): beyond unknown_wait_s, a call waits for it as long as
    the other streams' average think time says it is due (they come back at once: until the late bound)."""
    eng = RecordingEngine()

    async def main():
        s = sched(eng, max_delay_s=60.0, active_window_s=60.0, unknown_wait_s=0.01, late_margin_s=0.5)
        for _ in range(3):  # a and b come back at once: every stream's average think time is ~0
            await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
        await asyncio.gather(*(s.submit(k, state(k), x(1)) for k in "abc"))  # c's first call
        ab = asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
        await asyncio.sleep(0.15)  # well past unknown_wait_s: a and b still wait for c
        assert not ab.done()
        await asyncio.gather(ab, s.submit("c", state("c"), x(1)))
        t0 = time.monotonic()  # c does not come again: the call goes once c is late (late_margin_s), not 60 s
        await asyncio.gather(s.submit("a", state("a"), x(1)), s.submit("b", state("b"), x(1)))
        waited = time.monotonic() - t0
        await s.close()
        return waited

    waited = run(main())
    assert [sorted(k for k, _ in c) for c in eng.calls[3:]] == [["a", "b", "c"], ["a", "b", "c"], ["a", "b"]]
    assert waited < 5


def test_a_running_call_is_expected_to_last_as_long_as_calls_of_its_size():
    """Call lengths are averaged by size (images rounded up to a power of two): after 64-image calls of ~0.26 s, a
    1-image call is still expected to take its own ~0.01 s."""
    eng = SlowEngine(per_image=0.004)

    async def main():
        s = sched(eng, max_delay_s=0.0, active_window_s=60.0)
        for _ in range(2):
            await s.submit("big", state("big"), x(64))
            await s.submit("small", state("small"), x(1))
        await s.submit("big", state("big"), x(64))
        await s.close()
        return s

    s = run(main())
    assert s._call_length(1) < 0.08 < 0.2 < s._call_length(64)
    assert s._call_length(48) == s._call_length(64)  # the same bucket
    assert s._call_s > 0.08  # every call's average: a big one last
