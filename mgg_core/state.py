"""StreamState: everything that changes online for one stream, and nothing else.

Tensors (flat adapted scalars ``theta``, optimizer moments and MGG memory ``opt.*``, method EMAs ``method.*``,
collapse-guard EMAs ``guard.*``) plus a few scalars. The frozen backbone is shared and never copied per stream.
Snapshots are single safetensors files (tensors + JSON metadata), written atomically.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["FORMAT_VERSION", "RESERVED_META", "StreamState", "owned"]

FORMAT_VERSION = "1"
#: header metadata keys of the state itself; :meth:`StreamState.to_bytes`'s ``extra_meta`` may not use them
RESERVED_META = ("format", "scalars", "fingerprint", "annotations")
# dtypes whose tensors safetensors.numpy writes exactly as safetensors.torch does (same dtype tag, same bytes), with
# the numpy dtype name safetensors reads for each
_NUMPY_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
                torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8",
                torch.uint8: "uint8", torch.bool: "bool"}
_NUMPY_DTYPES = frozenset(_NUMPY_NAMES)
try:  # safetensors >= 0.8: tensors described by pointer, serialised without a per-tensor copy or numpy lookups
    from safetensors import TensorSpec as _TensorSpec
    from safetensors import serialize as _serialize

    _POINTER_SPECS = True
except ImportError:  # pragma: no cover - older safetensors: the safetensors.numpy path below
    _POINTER_SPECS = False


def owned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when its storage is larger than the tensor itself (a view such as a row of a stack)."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


@dataclass
class StreamState:
    tensors: dict[str, torch.Tensor]
    fingerprint: dict                       # engine identity; a snapshot only loads into a matching engine
    step: int = 0                           # updates taken since the last reset
    batches: int = 0                        # batches seen since the last reset
    images: int = 0
    skipped: int = 0
    resets: int = 0
    rollbacks: int = 0
    seed: int = 0                           # per-stream randomness (DeYO's shuffles)
    last_seen: float = field(default_factory=time.time)
    anchor: dict[str, torch.Tensor] | None = None   # last healthy copy of ``tensors`` (collapse-guard rollback)
    anchor_step: int = 0
    healthy_streak: int = 0
    # opaque text kept with the state by the layers above the engine (the service's idempotency records): saved and
    # restored with the snapshot, counted in nbytes(), cleared by an exact reset (kept by the engine's own returns to
    # source: guard fallbacks, SAR recovery); the engine never reads it
    annotations: dict[str, str] = field(default_factory=dict)

    # ---- views ----
    @property
    def theta(self) -> torch.Tensor:
        return self.tensors["theta"]

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def set_group(self, prefix: str, values: dict[str, torch.Tensor]) -> None:
        """Store ``values`` as ``<prefix>.<key>``. A value that is a view into a larger storage (a row of the fused
        step's stacked tensors) is stored as a copy, so the state never keeps other streams' rows alive and
        :meth:`nbytes` counts what it holds."""
        for k, v in values.items():
            self.tensors[f"{prefix}.{k}"] = owned(v)

    @property
    def entropy_ema(self) -> float | None:
        t = self.tensors.get("guard.entropy_ema")
        return None if t is None or torch.isnan(t) else float(t)

    @property
    def top_class_share(self) -> float | None:
        t = self.tensors.get("guard.class_share")
        return None if t is None or float(t.sum()) == 0 else float(t.max() / t.sum())

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.tensors.values())
        if self.anchor is not None:
            n += sum(t.numel() * t.element_size() for t in self.anchor.values())
        return n + sum(len(k) + len(v) for k, v in self.annotations.items())

    def _scalars(self) -> dict:
        return {"step": self.step, "batches": self.batches, "images": self.images, "skipped": self.skipped,
                "resets": self.resets, "rollbacks": self.rollbacks, "seed": self.seed, "last_seen": self.last_seen,
                "anchor_step": self.anchor_step, "healthy_streak": self.healthy_streak}

    def summary(self) -> dict:
        return {**self._scalars(), "bytes": self.nbytes(), "entropy_ema": self.entropy_ema,
                "top_class_share": self.top_class_share}

    def clone(self) -> StreamState:
        return StreamState(
            tensors={k: v.clone() for k, v in self.tensors.items()}, fingerprint=dict(self.fingerprint),
            anchor=None if self.anchor is None else {k: v.clone() for k, v in self.anchor.items()},
            annotations=dict(self.annotations), **self._scalars(),
        )

    # ---- persistence ----
    def to_bytes(self, extra_meta: dict[str, str] | None = None) -> bytes:
        """The snapshot file's bytes (safetensors: tensors ``state.*``/``anchor.*`` + JSON metadata).

        ``extra_meta``: more header metadata (text values) kept with the snapshot for the layers above the engine,
        e.g. the service's listing data, readable from the header alone; :meth:`load` ignores it. Its keys may not
        be the state's own (``format``, ``scalars``, ``fingerprint``, ``annotations``): ValueError.

        Serialised as ``safetensors.numpy`` does (the same file as ``safetensors.torch`` writes: same header, dtype
        tags, offsets and tensor bytes) whenever every tensor's dtype has a numpy equivalent: with safetensors >=
        0.8 by handing ``safetensors.serialize`` each tensor's pointer (``TensorSpec``; about 4x cheaper than
        ``safetensors.numpy.save`` for these ~50 small tensors, which matters because a group commit serialises
        every stream of a fused step on the request path), else through ``safetensors.numpy``; through
        ``safetensors.torch`` otherwise (bfloat16).
        """
        out = {f"state.{k}": v for k, v in self.tensors.items()}
        if self.anchor is not None:
            out.update({f"anchor.{k}": v for k, v in self.anchor.items()})
        meta = {"format": FORMAT_VERSION, "scalars": json.dumps(self._scalars()),
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True)}
        if self.annotations:
            meta["annotations"] = json.dumps(self.annotations)
        if extra_meta:
            clash = sorted(set(extra_meta) & set(RESERVED_META))
            if clash:
                raise ValueError(f"extra_meta may not set the state's own header keys {clash}")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra_meta.items()):
                raise ValueError("extra_meta must map text to text")
            meta.update(extra_meta)
        cpu = {k: v.detach().cpu().contiguous() for k, v in out.items()}
        if all(t.dtype in _NUMPY_DTYPES for t in cpu.values()):
            if _POINTER_SPECS and all(t.numel() for t in cpu.values()):  # ``cpu`` keeps every tensor alive
                # while serialize reads the pointers (an empty tensor may have a null pointer: the numpy path)
                specs = {k: _TensorSpec(dtype=_NUMPY_NAMES[t.dtype], shape=t.shape, data_ptr=t.data_ptr(),
                                        data_len=t.numel() * t.element_size()) for k, t in cpu.items()}
                return bytes(_serialize(specs, metadata=meta))
            from safetensors.numpy import save as save_numpy

            return save_numpy({k: t.numpy() for k, t in cpu.items()}, metadata=meta)
        from safetensors.torch import save as save_torch

        return save_torch(cpu, metadata=meta)

    def save(self, path: str | Path) -> int:
        """Atomic, durable safetensors snapshot (:func:`mgg_core.io.atomic_write_bytes`); returns its size."""
        from .io import atomic_write_bytes

        data = self.to_bytes()
        atomic_write_bytes(path, data)
        return len(data)

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: dict | None = None, device=None) -> StreamState:
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a stream-state snapshot of format {FORMAT_VERSION}")
        fingerprint = json.loads(meta["fingerprint"])
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(expected_fingerprint)
                          if fingerprint.get(k) != expected_fingerprint.get(k))
            raise ValueError(f"{path}: snapshot was made by a different engine configuration (differs in {diff})")
        mv = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        tensors = {k[len("state."):]: mv(v) for k, v in raw.items() if k.startswith("state.")}
        anchor = {k[len("anchor."):]: mv(v) for k, v in raw.items() if k.startswith("anchor.")} or None
        annotations = json.loads(meta.get("annotations", "{}"))
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise ValueError(f"{path}: its annotations are not a mapping of strings")
        return cls(tensors=tensors, fingerprint=fingerprint, anchor=anchor, annotations=annotations,
                   **json.loads(meta["scalars"]))
