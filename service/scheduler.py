"""FusedScheduler: the steps of several streams in one engine call (dynamic batching across streams).

Why. A request of a few images costs nearly as much as one of many (the fixed cost of a forward, backward and
update dominates). Triton's dynamic batcher and Ray Serve's ``@serve.batch`` batch stateless requests; here every
stream carries its own adapted parameters, optimizer state, statistics and guard, so requests of *different*
streams are fused into one :meth:`~mgg_core.engine.AdaptationEngine.step_many` call, which gives each stream exactly
what ``engine.step`` alone would give it. No library batches stateful per-stream steps, hence this module.

Contract.

* ``await submit(key, state, x, before=..., after=...)`` returns ``after(state, result)`` (or the
  :class:`~mgg_core.engine.StepResult` when ``after`` is None) once the call that included the item has finished.
  ``key`` names the stream. The caller owns the stream for the whole submit (in the service: its turn in the
  stream's queue, :class:`service.store.Ticket`), so a stream has at most one item queued or running; an item whose
  key is already in the call being formed, or in a running call, waits for a later call (never two steps of one
  stream in one call, never a step overtaking its stream's previous one).
* Dispatch. Queued items go, in arrival order, into one call ``engine.step_many(items, adapt=True)`` once a call
  slot is free (at most ``max_concurrent`` calls run at once) and one of these holds:
  - a cap is reached: the queue holds ``max_images`` images or ``max_streams`` streams (a call takes items while
    both caps hold and stops at the first that does not fit; its first item always goes, so a request larger than
    the image budget runs alone);
  - the oldest item has waited ``max_delay_s`` (0: run what is queued now, never wait);
  - no other stream is expected: every stream whose request is on its way (the ``incoming`` hint: it has its
    place in the queue but is still being decoded, preprocessed or restored), and every stream that submitted
    within the last ``active_window_s`` and is *due*, is already queued or running. A lone stream therefore never
    waits, and a group of streams is run as soon as all of them are in.
  - due: each stream's think time (from its previous answer, :meth:`answered`, or else the end of its previous
    call, to its next submit) is kept as an exponential average, with its average absolute deviation (spread),
    and so is every stream's together (the prior). A stream whose next submit is predicted, pessimistically (its
    last answer + think time + spread), after the oldest item's deadline is not waited for: streams that send now
    and then, or at irregular times (an open-loop camera), cost the others little or no delay, however long
    ``max_delay_s`` is. A stream is waited for until ``late_factor`` x (think time + spread) + ``late_margin_s``
    after its last answer, not longer. A stream without a think time of its own yet (it has submitted once) is
    waited for ``unknown_wait_s`` from the call's oldest item (the old 5 ms delay), and longer only while the
    prior says it is due (so a call of fresh closed-loop streams falls into step from its second call on, and a
    one-off stream costs the others at most the prior's late bound once). A stream in a running call is due when
    that call's predicted end (its start + the average length of calls of its size, in images rounded up to a
    power of two) plus its think time and spread is before the deadline; one without a think time is not waited
    for. A stream whose last request would not fit in the call's remaining image budget is not
    waited for, nor is its request on its way. Think times are kept ``think_horizon_s`` after a stream's last
    activity, longer than the active window, so a stream that sends less often than the window keeps its own.
    Closed-loop clients (the next request follows the answer) therefore fall into step: all of them in one call,
    every call (one call of 16 streams costs far less than two of 8 on a CPU, docs/results/fused).
* Per item, in the call's worker thread: ``before(state)`` (e.g. an exact reset), the fused step, ``after(state,
  result)`` (e.g. predictions after the update). A call of a single stream is ``engine.step`` (the same answer by
  ``step_many``'s contract; a lone stream pays nothing for fusing). An exception in ``before`` or ``after`` fails
  only that item's submit; an exception of the engine call fails every item of that call (their states may be
  partly advanced: the caller restores them, as :class:`service.store.StreamStore` does under
  ``durability="step"``).
* Metrics (``metrics``: :class:`service.metrics.ServiceMetrics`): streams and images per call
  (``tta_fused_step_streams``, ``tta_fused_step_images``) and each item's queue wait, from submit to the start of
  its call (``tta_fused_queue_wait_seconds``).
* :meth:`close` refuses new items, waits for queued and running ones, then stops the dispatcher.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mgg_core.engine import AdaptationEngine, StepResult
    from mgg_core.state import StreamState

    from .metrics import ServiceMetrics

__all__ = ["BatchLimits", "FusedScheduler", "SchedulerClosed"]

log = logging.getLogger("mgg.service.scheduler")


def _size_bucket(images: int) -> int:
    """``images`` rounded up to a power of two (the key of a call length by size)."""
    return 1 << max(0, int(images) - 1).bit_length()


class SchedulerClosed(RuntimeError):
    """submit() after close()."""


@dataclass(frozen=True)
class BatchLimits:
    """When a fused call is dispatched (see the module docstring); the service reads them from its settings."""

    max_delay_s: float = 0.05
    max_images: int = 64
    max_streams: int = 64
    active_window_s: float = 1.0
    late_factor: float = 2.0
    late_margin_s: float = 0.005
    think_ema: float = 0.5
    unknown_wait_s: float = 0.005
    think_horizon_s: float = 60.0

    def __post_init__(self) -> None:
        if min(self.max_delay_s, self.active_window_s, self.late_margin_s, self.unknown_wait_s,
               self.think_horizon_s) < 0:
            raise ValueError("max_delay_s, active_window_s, late_margin_s, unknown_wait_s and think_horizon_s must "
                             "be >= 0")
        if self.late_factor < 1:
            raise ValueError("late_factor must be >= 1")
        if not 0 < self.think_ema <= 1:
            raise ValueError("think_ema must be in (0, 1]")
        if self.max_images < 1 or self.max_streams < 1:
            raise ValueError("max_images and max_streams must be >= 1")


@dataclass(eq=False)
class _Item:
    key: Hashable
    state: Any
    x: Any
    n: int
    before: Callable[[Any], None] | None
    after: Callable[[Any, Any], Any] | None
    fut: asyncio.Future
    t: float = field(default_factory=time.monotonic)


class FusedScheduler:
    def __init__(
        self,
        engine: AdaptationEngine,
        limits: BatchLimits,
        *,
        max_concurrent: int = 1,
        metrics: ServiceMetrics | None = None,
        incoming: Callable[[], Iterable[Hashable]] | None = None,
    ) -> None:
        """Args:
            engine: anything with ``step_many(items, adapt=True) -> list`` and ``step(state, x)`` (the
                adaptation engine).
            limits: the dispatch limits (:class:`BatchLimits`).
            max_concurrent: fused calls running at once (each in a worker thread).
            metrics: the service's metrics (streams and images per call, queue wait); None records nothing.
            incoming: keys of streams whose next item is on its way (the store's streams with queued requests);
                None: only recently active streams are expected.
        """
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self._incoming = incoming
        self._slots = asyncio.Semaphore(max_concurrent)
        self._queue: deque[_Item] = deque()
        self._running: dict[Hashable, tuple[float, int]] = {}  # key -> (monotonic start, images) of its running call
        self._call_s: float | None = None  # average seconds of a call (start to end)
        self._call_by_size: dict[int, float] = {}  # the same by the call's images (rounded up to a power of two)
        self._sizes: dict[Hashable, int] = {}  # key -> images of its last request (while in the window)
        self._seen: dict[Hashable, float] = {}  # key -> monotonic time of its last submit (within the window)
        self._ended: dict[Hashable, float] = {}  # key -> its last answer (or call end), until its next submit
        self._think: dict[Hashable, float] = {}  # key -> average seconds from an answer to its next submit
        self._spread: dict[Hashable, float] = {}  # key -> average absolute deviation of those seconds
        # think time and spread over every stream's gaps (averages), by request size (images rounded up to a power
        # of two: a client of big requests sends and reads for longer)
        self._prior: dict[int, tuple[float, float]] = {}
        self._last: dict[Hashable, float] = {}  # key -> its last submit or call end (think state kept for a horizon)
        self._pruned = time.monotonic()
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._calls: set[asyncio.Task] = set()
        self._closed = False

    # ------------------------------------------------------------------------------------------ public

    async def submit(
        self, key: Hashable, state: StreamState, x: torch.Tensor, *,
        before: Callable[[StreamState], None] | None = None,
        after: Callable[[StreamState, StepResult], Any] | None = None,
    ) -> Any:
        """One step of stream ``key`` on ``x`` (N x C x H x W), fused with other streams' steps; see the contract."""
        if self._closed:
            raise SchedulerClosed("the scheduler is closed")
        item = _Item(key, state, x, int(x.shape[0]), before, after, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._seen[key] = self._last[key] = item.t
        self._sizes[key] = item.n
        self._learn_think(key, item.t)
        if item.t - self._pruned >= 1.0:  # amortised: the dicts stay bounded even while calls are always full
            self._prune(item.t)
        self._wake.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="mgg-fused-scheduler")
        return await item.fut

    def answered(self, key: Hashable) -> None:
        """Stream ``key``'s answer is out (in the service: after its step's durable write): its think time runs
        from now, not from the end of its call. The caller's think time is what it does between an answer and its
        next request; counting the write and the answer in it (the same for every stream of a call, and longer
        than the call-to-call differences it should measure) made it so long and so spread that streams of a
        call that had split were not waited for, and groups stayed split. No-op once the stream has submitted
        again, or when it is in a running call."""
        if key in self._ended and key not in self._running:
            self._ended[key] = self._last[key] = time.monotonic()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def close(self) -> None:
        """Refuse new items; finish the queued and running ones; stop the dispatcher."""
        self._closed = True
        while (self._queue or self._calls) and self._dispatcher is not None and not self._dispatcher.done():
            if self._calls:
                await asyncio.wait(list(self._calls))
            else:
                self._wake.set()
                await asyncio.sleep(0.005)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for item in self._queue:  # only when the dispatcher died: never leave a caller waiting
            if not item.fut.done():
                item.fut.set_exception(SchedulerClosed("the scheduler is closed"))
        self._queue.clear()

    # ---------------------------------------------------------------------------------------- dispatch

    async def _dispatch(self) -> None:
        while True:
            await self._until(lambda: bool(self._eligible()))
            await self._slots.acquire()
            try:
                await self._fill()
                batch = self._take()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception:  # a bug here must not leave callers waiting: fail what is queued, keep serving
                self._slots.release()
                log.exception("fused-step dispatch failed; failing the queued requests")
                for item in self._queue:
                    if not item.fut.done():
                        item.fut.set_exception(RuntimeError("fused-step dispatch failed"))
                self._queue.clear()
                continue
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(batch), name="mgg-fused-call")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _until(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()``, checked after each wake-up (a submit, or the end of a call)."""
        while not ready():
            self._wake.clear()
            await self._wake.wait()

    def _eligible(self) -> list[_Item]:
        """The items the next call would take, in arrival order (caps applied); drops cancelled callers."""
        while self._queue and self._queue[0].fut.done():
            self._queue.popleft()
        lim, images = self.limits, 0
        out: list[_Item] = []
        keys: set[Hashable] = set()
        for item in self._queue:
            if item.fut.done() or item.key in keys or item.key in self._running:
                continue
            if len(out) >= lim.max_streams or (out and images + item.n > lim.max_images):
                break
            out.append(item)
            keys.add(item.key)
            images += item.n
        return out

    def _full(self, batch: list[_Item]) -> bool:
        """Whether a cap ends the call: it holds ``max_streams`` streams or ``max_images`` images, or a queued item
        that could join (its stream is neither in it nor running) was left out by the image budget."""
        if len(batch) >= self.limits.max_streams or sum(i.n for i in batch) >= self.limits.max_images:
            return True
        taken, keys = {id(i) for i in batch}, {i.key for i in batch} | self._running.keys()
        return any(id(i) not in taken and i.key not in keys and not i.fut.done() for i in self._queue)

    def _learn_think(self, key: Hashable, submitted: float) -> None:
        """Update ``key``'s think time with the gap from the end of its last call to this submit."""
        ended = self._ended.pop(key, None)
        if ended is None:
            return
        gap = max(0.0, submitted - ended)
        old = self._think.get(key)
        a = self.limits.think_ema
        size = _size_bucket(self._sizes.get(key, 1))
        prior = self._prior.get(size)
        if prior is None:
            self._prior[size] = (gap, gap / 2)
        else:
            think, spread = prior
            self._prior[size] = ((1 - a) * think + a * gap, (1 - a) * spread + a * abs(gap - think))
        if old is None:  # one gap says little about the next: start its spread at half of it
            self._think[key], self._spread[key] = gap, gap / 2
        else:
            self._think[key] = (1 - a) * old + a * gap
            self._spread[key] = (1 - a) * self._spread[key] + a * abs(gap - old)

    def _due(self, key: Hashable, since: float, busy_s: float | None, deadline: float, now: float) -> float | None:
        """Until when ``key`` is worth waiting for: its next submit is predicted at ``since + busy_s + think`` (its
        answer, or the start of its running call plus the average length of calls of that size, then its think
        time; without a think time of its own, the prior's for its request size, once it has ended a call); None
        when that is after ``deadline``, unknown, or already late (``late_factor`` x (busy + think) +
        ``late_margin_s`` after ``since``)."""
        think, spread = self._think.get(key), self._spread.get(key)
        prior = self._prior.get(_size_bucket(self._sizes.get(key, 1)))
        if think is None and key in self._ended and prior is not None:
            think, spread = prior
        if busy_s is None or think is None or spread is None:
            return None
        think += spread  # pessimistic: a stream whose think time varies more than the delay is not due
        if since + busy_s + think > deadline:
            return None
        late = since + self.limits.late_factor * (busy_s + think) + self.limits.late_margin_s
        return late if now < late else None

    def _call_length(self, images: int) -> float | None:
        """The expected seconds of a call of ``images`` images: the average of calls of that size (rounded up to a
        power of two), else of every call. A big request's call lasts longer than a call of a few small ones; one
        average for both made the streams of a running small call look due only after a big call's length."""
        return self._call_by_size.get(_size_bucket(images), self._call_s)

    def _prune(self, now: float) -> None:
        """Forget streams: out of the active window (no longer expected), and their think times ``think_horizon_s``
        after their last submit or call end (kept longer than the window, so a stream that sends less often than
        the window still has a think time, and is not taken for a new one)."""
        lim = self.limits
        for key, t in list(self._seen.items()):
            if now - t >= lim.active_window_s and key not in self._running:
                del self._seen[key]
        for key, t in list(self._last.items()):
            if now - t >= lim.think_horizon_s and key not in self._running:
                del self._last[key]
                for known in (self._ended, self._think, self._spread, self._sizes):
                    known.pop(key, None)
        self._pruned = now

    def _expected(self, oldest: float, deadline: float, room: int) -> tuple[bool, float | None]:
        """Whether another stream's item may still join before ``deadline`` (a stream with a request on its way, or
        a recently active one that is due; neither queued nor running; in both cases only if its last request
        would fit in ``room`` images), and until when, at the latest, it is worth waiting for (None: a request on
        its way is expected until the delay ends). ``oldest``: the arrival of the call's oldest item."""
        now = time.monotonic()
        self._prune(now)
        present = {i.key for i in self._queue} | self._running.keys()
        if self._incoming is not None and any(
                self._sizes.get(key, 0) <= room for key in set(self._incoming()) - present):
            return True, None
        until: list[float] = []
        for key in self._seen:
            if self._sizes.get(key, 0) > room:  # its requests would not fit in this call
                continue
            if key in self._running:  # back after its call and its think time: due if that is before the deadline
                start, images = self._running[key]
                late = self._due(key, start, self._call_length(images), deadline, now)
            elif key in present:
                continue
            elif key in self._think and key in self._ended:
                late = self._due(key, self._ended[key], 0.0, deadline, now)
            else:  # no think time of its own yet: a short wait, as for 5 ms, or while every stream's think time
                late = min(oldest + min(self.limits.unknown_wait_s, self.limits.max_delay_s),  # says it is due
                           self._seen[key] + self.limits.active_window_s)  # and while in the window
                late = late if now < late else None
                if key in self._ended:
                    prior = self._due(key, self._ended[key], 0.0, deadline, now)
                    late = prior if late is None else late if prior is None else max(late, prior)
            if late is not None:
                until.append(late)
        return (True, min(until)) if until else (False, None)

    async def _fill(self) -> None:
        """Wait (up to the oldest item's delay) while the call is not full and other streams are expected."""
        while True:
            batch = self._eligible()
            if not batch or self._full(batch):
                return
            deadline = batch[0].t + self.limits.max_delay_s
            expected, until = self._expected(batch[0].t, deadline,
                                             self.limits.max_images - sum(i.n for i in batch))
            if not expected:
                return
            left = (deadline if until is None else min(deadline, until)) - time.monotonic()
            if left <= 0:
                if deadline <= time.monotonic():
                    return
                continue  # a stream left the window or is now late: look again
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    def _take(self) -> list[_Item]:
        batch = self._eligible()
        taken = {id(i) for i in batch}
        self._queue = deque(i for i in self._queue if id(i) not in taken and not i.fut.done())
        return batch

    # -------------------------------------------------------------------------------------------- calls

    async def _run(self, batch: list[_Item]) -> None:
        keys = {i.key for i in batch}
        start = time.monotonic()
        images = sum(i.n for i in batch)
        self._running.update(dict.fromkeys(keys, (start, images)))
        self._wake.set()  # a call being formed meanwhile sees these streams running now, not missing
        m = self.metrics
        if m is not None:
            m.fused_streams.observe(len(batch))
            m.fused_images.observe(sum(i.n for i in batch))
            for item in batch:
                m.fused_queue_wait.observe(max(0.0, start - item.t))
        try:
            outs = await asyncio.to_thread(self._call, batch)
        except Exception as exc:  # noqa: BLE001 - delivered to every caller of this call
            outs = [exc] * len(batch)
        finally:
            ended = time.monotonic()
            a = self.limits.think_ema
            self._call_s = ended - start if self._call_s is None else (1 - a) * self._call_s + a * (ended - start)
            size = _size_bucket(images)
            old = self._call_by_size.get(size)
            self._call_by_size[size] = ended - start if old is None else (1 - a) * old + a * (ended - start)
            for key in keys:
                del self._running[key]
                self._ended[key] = self._last[key] = ended
            self._slots.release()
            self._wake.set()
        for item, out in zip(batch, outs, strict=True):
            if item.fut.done():
                continue
            if isinstance(out, BaseException):
                item.fut.set_exception(out)
            else:
                item.fut.set_result(out)

    def _call(self, batch: list[_Item]) -> list[Any]:
        """In a worker thread: each item's ``before``, one ``step_many`` over the rest, each item's ``after``."""
        outs: list[Any] = [None] * len(batch)
        live = []
        for k, item in enumerate(batch):
            try:
                if item.before is not None:
                    item.before(item.state)
                live.append(k)
            except Exception as exc:  # noqa: BLE001 - this item's own failure
                outs[k] = exc
        if not live:
            return outs
        try:
            if len(live) == 1:  # alone: engine.step, the same answer by step_many's contract, without fusing costs
                results = [self.engine.step(batch[live[0]].state, batch[live[0]].x)]
            else:
                results = self.engine.step_many([(batch[k].state, batch[k].x) for k in live], adapt=True)
        except Exception as exc:  # noqa: BLE001 - the call failed: every item in it fails
            for k in live:
                outs[k] = exc
            return outs
        for k, res in zip(live, results, strict=True):
            item = batch[k]
            try:
                outs[k] = item.after(item.state, res) if item.after is not None else res
            except Exception as exc:  # noqa: BLE001
                outs[k] = exc
        return outs
