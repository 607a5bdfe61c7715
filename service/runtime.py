"""Loading what every stream shares: the classifier, its preprocessor and the adaptation engine.

:func:`load_runtime` is blocking (it reads checkpoints and may compute FOA's source statistics); the server runs it
in a thread, then :func:`warm_up` takes one throwaway step so the first request does not pay for allocation.
:class:`ServiceState` owns the lifecycle: loading in the background, the :class:`~service.store.StreamStore`, and
the readiness answer (:meth:`ServiceState.require_ready`) that every route but the probes depends on.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .decode import DecodeLimits, PixelBudget
from .errors import ApiError
from .metrics import ServiceMetrics
from .scheduler import BatchLimits, FusedScheduler
from .settings import ServiceSettings
from .store import StreamStore

if TYPE_CHECKING:  # torch and the engine load lazily: `mgg --help` and /healthz must not wait for them
    import torch

    from mgg_core.classifier import LoadedClassifier as Classifier
    from mgg_core.engine import AdaptationEngine, EngineConfig
    from mgg_core.methods import Method
    from mgg_core.preprocess import Preprocessor

log = logging.getLogger("mgg.service")


@dataclass
class Runtime:
    """The loaded model and engine, shared by all streams."""

    classifier: Classifier
    engine: AdaptationEngine
    preprocessor: Preprocessor
    class_names: list[str]
    device: str
    input_size: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resolve_checkpoint(model: str) -> Path:
    """A bundled classifier's name ('vit', 'resnet') or a path to a classifier checkpoint."""
    from mgg_core.classifier import DEFAULT_CHECKPOINTS, default_checkpoint

    return Path(default_checkpoint(model)) if model in DEFAULT_CHECKPOINTS else Path(model)


def _optimizer_for(settings: ServiceSettings, method: Method) -> str | None:
    if not method.needs_grad:
        return None
    return (settings.optimizer or method.default_optimizer or "sgd").lower()


def _mgg_checkpoint_for(settings: ServiceSettings, clf: Classifier, checkpoint: Path) -> str:
    """The MGG checkpoint pretrained for this classifier (by weights' sha256), else the bundled one of its name."""
    if settings.mgg_checkpoint is not None:
        return settings.mgg_checkpoint
    from mgg_core.assets import DEFAULT_MGG_CHECKPOINTS, mgg_checkpoint_for

    found = mgg_checkpoint_for(clf) or DEFAULT_MGG_CHECKPOINTS.get(settings.model)
    if found is None or not Path(found).is_file():
        raise FileNotFoundError(
            f"no MGG checkpoint for classifier {checkpoint}: set mgg_checkpoint (train one with `mgg pretrain`)"
        )
    return str(found)


def _source_stats(settings: ServiceSettings, clf: Classifier, checkpoint: Path, device: str) -> tuple[Any, str]:
    """FOA's clean source statistics and where they came from (a file, or computed from clean training data)."""
    if settings.source_stats:
        from mgg_core.features import load_stats

        return load_stats(settings.source_stats), str(settings.source_stats)
    from mgg_core.assets import source_stats_for, stats_path_for

    stats = source_stats_for(clf, data=settings.source_data, device=device)
    beside = stats_path_for(checkpoint)
    return stats, str(beside) if beside.is_file() else f"computed from clean {settings.source_data or 'mnist5k'} train"


def engine_config(settings: ServiceSettings, method: Method, device: str, mgg_checkpoint: str | None) -> EngineConfig:
    """The engine configuration the service runs ``method`` with (also for models built outside the service).

    Args:
        settings: the service settings; reads method, optimizer, lr, bn_stats, bn_momentum, bn_momentum_shallow,
            bn_prior_images, bn_warmup_shift, bn_warmup_release, bn_balanced, bn_balanced_form, bn_balanced_confidence,
            bn_balanced_agree, bn_balanced_share, update_images,
            collapse_guard, guard_check_share, guard_confident_entropy, guard_confident_entropy_gap, guard_judge_images,
            guard_confident_hold_entropy, guard_collapse_hold_images and guard_keep_source_history.
        method: the built method (its defaults decide the optimizer and whether BatchNorm statistics adapt).
        device: where the engine runs (``settings.resolved_device()`` for the service).
        mgg_checkpoint: the MGG meta-network's checkpoint when the optimizer is MGG.
    """
    from mgg_core.engine import EngineConfig, GuardConfig

    return EngineConfig(
        method=settings.method, optimizer=_optimizer_for(settings, method), lr=settings.lr,
        mgg_checkpoint=mgg_checkpoint, bn_stats=settings.bn_stats if method.bn_stats != "source" else None,
        bn_momentum=settings.bn_momentum, bn_momentum_shallow=settings.bn_momentum_shallow,
        bn_prior_images=settings.bn_prior_images, bn_warmup_shift=settings.bn_warmup_shift,
        bn_warmup_release=settings.bn_warmup_release and settings.bn_prior_images is not None,
        bn_balanced=settings.bn_balanced, bn_balanced_form=settings.bn_balanced_form,
        bn_balanced_confidence=settings.bn_balanced_confidence, bn_balanced_agree=settings.bn_balanced_agree,
        bn_balanced_share=settings.bn_balanced_share,
        update_images=settings.update_images,
        guard=GuardConfig(enabled=settings.collapse_guard, check_share=settings.guard_check_share,
                          confident_entropy=settings.guard_confident_entropy,
                          confident_entropy_gap=settings.guard_confident_entropy_gap,
                          judge_images=settings.guard_judge_images,
                          confident_hold_entropy=settings.guard_confident_hold_entropy,
                          collapse_hold_images=settings.guard_collapse_hold_images,
                          keep_source_history=settings.guard_keep_source_history), device=device,
    )


def load_runtime(settings: ServiceSettings) -> Runtime:
    """Load the classifier and build the engine (blocking; run it in a thread).

    Args:
        settings: the service settings; reads model, method, optimizer, lr, mgg_checkpoint, source_stats,
            source_data, collapse_guard, bn_stats, bn_momentum, bn_momentum_shallow, bn_prior_images, bn_warmup_shift,
            bn_warmup_release, bn_balanced, bn_balanced_form, bn_balanced_confidence, bn_balanced_agree,
            bn_balanced_share, update_images, guard_check_share, guard_confident_entropy,
            guard_confident_entropy_gap, guard_judge_images, guard_confident_hold_entropy, guard_collapse_hold_images,
            guard_keep_source_history, device, torch_threads and
            gil_switch_interval_ms (process-wide: sys.setswitchinterval).

    Bundled companions are found the way the rest of the project finds them (``mgg_core.assets``): the MGG
    checkpoint pretrained for this classifier (matched by the weights' sha256, else the bundled one of the same
    default), and FOA's clean source statistics (the file beside the checkpoint, else computed from the card's
    clean training data).
    """
    import torch

    from mgg_core.classifier import load_classifier
    from mgg_core.engine import AdaptationEngine
    from mgg_core.methods import build_method

    device = settings.resolved_device()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.gil_switch_interval_ms is not None:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    checkpoint = resolve_checkpoint(settings.model)
    clf = load_classifier(checkpoint, device=device)
    method = build_method(settings.method, clf.num_classes)
    optimizer = _optimizer_for(settings, method)
    mgg_checkpoint = _mgg_checkpoint_for(settings, clf, checkpoint) if optimizer == "mgg" else settings.mgg_checkpoint
    stats, stats_from = _source_stats(settings, clf, checkpoint, device) if method.needs_features else (None, None)
    config = engine_config(settings, method, device, mgg_checkpoint)
    engine = AdaptationEngine(clf, config, source_stats=stats)
    class_names = list(clf.class_names)
    input_size = tuple(int(v) for v in clf.data_config["input_size"])
    info = {
        "model": clf.card.model_name,
        "checkpoint": str(checkpoint),
        "num_classes": len(class_names),
        "input_size": list(input_size),
        "method": settings.method,
        "optimizer": optimizer,
        "lr": settings.lr,
        "mgg_checkpoint": mgg_checkpoint,
        "source_stats": stats_from,
        "collapse_guard": settings.collapse_guard,
        "device": device,
        "torch": torch.__version__,
        "engine": engine.describe(),
    }
    return Runtime(clf, engine, clf.preprocessor, class_names, device, input_size, info)


def warm_up(rt: Runtime) -> float:
    """One adaptation step and one prediction on a throwaway state: compiles/allocates everything once."""
    import torch

    t0 = time.perf_counter()
    x: torch.Tensor = torch.zeros((2, *rt.input_size), dtype=torch.float32, device=rt.device)
    state = rt.engine.new_state()
    rt.engine.step(state, x)
    rt.engine.predict(state, x)
    return time.perf_counter() - t0


def freeze_startup_objects() -> int:
    """Collect, then move every object alive now to the collector's permanent generation (``gc.freeze``; setting
    ``gc_freeze``): the loaded model, its modules and the libraries are never garbage, and a full collection that
    scans them costs the server a pause (160 ms with the bundled model, 1.3 ms frozen). Returns the number of
    objects frozen so far."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


_ABS_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/]+/)+")


def without_folders(text: str) -> str:
    """``text`` with absolute paths cut to their file names (answers never show the server's folders)."""
    return _ABS_PATH.sub("", text)


class ServiceState:
    """The server's shared state: settings, metrics, and (once loaded) the runtime and the stream store."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime: Runtime | None = None
        self.store: StreamStore | None = None
        self.scheduler: FusedScheduler | None = None  # fused_steps: DataPlane.step goes through it
        self.ready = False
        self.load_error: str | None = None
        self.warmup_seconds: float | None = None
        self.limits = DecodeLimits(max_images=settings.max_images, max_image_pixels=settings.max_image_pixels,
                                   max_request_pixels=settings.max_request_pixels)
        self.pixels = PixelBudget(settings.max_pixels_in_flight, settings.retry_after_seconds)
        metrics.pixels_in_flight.set_function(lambda: self.pixels.used)
        admin = settings.admin_token
        self.admin_token: str | None = admin.get_secret_value() if admin is not None else None

    def _open_store(self, rt: Runtime) -> StreamStore:
        s = self.settings
        return StreamStore(
            rt.engine,
            s.snapshot_dir,
            metrics=self.metrics,
            budget_bytes=s.state_budget_bytes,
            max_concurrent=s.max_concurrent_streams,
            max_queue_per_stream=s.max_queue_per_stream,
            max_queue_total=s.max_queue_total,
            idle_seconds=s.idle_seconds,
            idle_check_seconds=s.idle_check_seconds,
            durability=s.durability,
            snapshot_interval_steps=s.snapshot_interval_steps,
            snapshot_interval_seconds=s.snapshot_interval_seconds,
            max_streams=s.max_streams,
            max_snapshot_bytes=s.max_snapshot_bytes,
            retention_seconds=s.snapshot_retention_seconds,
            commit_group_max_streams=s.commit_group_max_streams,
        )

    def open_scheduler(self, rt: Runtime, store: StreamStore) -> FusedScheduler | None:
        """The fused-step scheduler over ``rt.engine`` and ``store`` (None when ``fused_steps`` is off)."""
        s = self.settings
        if not s.fused_steps:
            return None
        limits = BatchLimits(max_delay_s=s.max_batch_delay_ms / 1000, max_images=s.max_batch_images,
                             max_streams=s.max_batch_streams, active_window_s=s.batch_active_window_ms / 1000)
        return FusedScheduler(rt.engine, limits, max_concurrent=s.max_concurrent_streams, metrics=self.metrics,
                              incoming=store.queued_streams)

    async def startup(self) -> None:
        """Load, warm up and open the store; a failure is kept in ``load_error`` (and /readyz says it)."""
        try:
            rt = await asyncio.to_thread(load_runtime, self.settings)
            self.warmup_seconds = await asyncio.to_thread(warm_up, rt)
            if self.settings.gc_freeze:
                freeze_startup_objects()
            store = self._open_store(rt)
            await store.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {without_folders(str(exc))}"
            log.exception("model loading failed")
            return
        self.runtime, self.store = rt, store
        self.scheduler = self.open_scheduler(rt, store)
        self.metrics.set_build_info(
            version=__version__, model=rt.info["model"], method=self.settings.method,
            optimizer=rt.info["optimizer"] or "none", device=rt.device, torch=rt.info["torch"],
        )
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready: %s on %s (warm-up %.2fs)", rt.info["model"], rt.device, self.warmup_seconds)

    async def shutdown(self) -> None:
        """Stop answering as ready and snapshot every stream."""
        self.ready = False
        self.metrics.ready.set(0)
        if self.store is not None:
            await self.store.close()  # waits for queued requests, fused ones included
            log.info("all streams snapshotted to %s", self.settings.snapshot_dir)
        if self.scheduler is not None:
            await self.scheduler.close()

    def require_ready(self) -> tuple[Runtime, StreamStore]:
        """The runtime and store, or a 503 ApiError: shutting down, load failed, or still loading."""
        if self.store is not None and self.store.closed:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        if not self.ready or self.runtime is None or self.store is None:
            if self.load_error:
                raise ApiError(503, "model_load_failed", f"the model could not be loaded: {self.load_error}")
            raise ApiError(
                503, "not_ready", "the model is still loading; retry shortly",
                {"Retry-After": str(self.settings.retry_after_seconds)},
            )
        return self.runtime, self.store


__all__ = [
    "Runtime", "ServiceState", "engine_config", "freeze_startup_objects", "load_runtime", "resolve_checkpoint",
    "warm_up", "without_folders",
]
