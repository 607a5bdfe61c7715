"""Service configuration (pydantic-settings).

Precedence, highest first: explicit overrides (the ``mgg serve`` flags), environment variables
(prefix ``MGG_``, e.g. ``MGG_STATE_BUDGET_BYTES``), a ``.env`` file, a YAML/JSON config file
(``--config`` or ``MGG_CONFIG``), then the defaults below.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "MGG_"


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads a flat YAML or JSON mapping of setting names to values (lowest priority above defaults)."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | os.PathLike[str] | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path:
            self._data = read_config_file(path)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of setting names to values")
    unknown = sorted(set(data) - set(ServiceSettings.model_fields))
    if unknown:
        raise ValueError(f"config file {p}: unknown settings {', '.join(unknown)}")
    return data


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- model / adaptation -------------------------------------------------------------------
    model: str = Field("resnet", description="bundled classifier ('resnet': BatchNorm, the default; 'vit': LayerNorm, "
                       "the paper's setting) or a path to a classifier checkpoint")
    method: str = Field("eata", description="adaptation method (noadapt, bn, tent, eata, sar, deyo, foa, come, roid); "
                        "'foa' = FOA's loss with the MGG optimizer (docs/results.md: MGG wins reset-per-domain "
                        "streams on the ViT, EATA long continual ones)")
    optimizer: str | None = Field(
        None, description="optimizer (sgd, adam, mgg); None = the method's default (foa: mgg)")
    lr: float | None = Field(None, gt=0, description="step size; None = the method/optimizer default")
    mgg_checkpoint: str | None = Field(
        None, description="MGG meta-network checkpoint; None = the bundled one pretrained for this classifier"
    )
    source_stats: str | None = Field(
        None,
        description="FOA source feature statistics (.safetensors); None = <checkpoint stem>_foa_stats.safetensors "
        "beside the checkpoint if present, else computed from clean source data at start-up",
    )
    source_data: str | None = Field(
        None, description="clean data for the source statistics ('mnist5k' or an image folder); None = from the card"
    )
    collapse_guard: bool = Field(True, description="roll a stream back when its predictions collapse")
    bn_stats: Literal["source", "batch", "ema"] | None = Field(
        "ema", description="BatchNorm statistics of adapting methods: 'ema' = per-stream statistics kept as a "
        "moving average over images (works for any request size), 'batch' = each request's own, 'source' = the "
        "source's; None = the method's default ('batch'). Methods that never adapt keep the source's")
    bn_momentum: float = Field(0.001, gt=0, le=1, description="per-image momentum of bn_stats='ema'; of the deepest "
                               "BatchNorm layer when bn_momentum_shallow is set (0.001 with bn_momentum_shallow 0.2: "
                               "chosen on held-out streams, docs/results/smallbatch/heldout; fast deep statistics "
                               "lose the class signal under label shift)")
    bn_momentum_shallow: float | None = Field(
        0.2, gt=0, le=1, description="per-image momentum of the first BatchNorm layer of bn_stats='ema'; the "
        "deeper layers interpolate geometrically (over the layers' order) to bn_momentum at the last one: shallow "
        "statistics reflect the corruption and may follow the stream fast, deep ones the class mix (TTN, Lim et "
        "al. 2023; 0.2: chosen on held-out streams, the first layer follows about 5 images). None = every layer "
        "bn_momentum")
    bn_prior_images: float | None = Field(
        16.0, gt=0, le=1_000_000, description="statistics warm-up of bn_stats='ema': the t-th image since a stream's "
        "statistics were the source's (a new stream, a reset, a guard fallback) merges with momentum max(m, 1/(N0 + t "
        "+ 1)), N0 = this prior strength in images (a cumulative mean of the source and the stream's images until "
        "the layer's own momentum takes over; Schneider et al. 2020). 16, with bn_warmup_release: chosen on held-out "
        "streams in session 6 (docs/results/smallbatch/README.md); at every restart from source it cost label-shifted "
        "streams (session 5), so the default starts it only at a hold's domain-shift release. None = no warm-up")
    bn_warmup_shift: float | None = Field(
        None, gt=0, le=1000, description="with bn_prior_images: the warm-up starts when the stream's data moves to "
        "another domain (its pixel descriptor this many standard deviations from a slow per-stream reference), "
        "instead of at a new stream or a guard fallback to source (a warm-up at every restart from source costs "
        "label-shifted streams). bn_warmup_release (on by default) adds its restarts at a hold's domain-shift "
        "release; set it false for this detector alone. None = off")
    bn_warmup_release: bool = Field(
        True, description="with bn_prior_images: the warm-up also starts when a guard hold at source ends because the "
        "stream's data moved to another domain (the statistics are the source's then; the deep layers' slow momenta "
        "would take the rest of a short domain to follow it); a new stream or a guard fallback starts with the "
        "warm-up over. True: chosen on held-out streams (docs/results/smallbatch/README.md, session 6); without "
        "bn_prior_images it does nothing. False = off")
    bn_balanced: float | None = Field(
        None, gt=0, le=1, description="class-balanced statistics of bn_stats='ema' (TRIBE's Balanced BatchNorm, Su et "
        "al. 2024): each BatchNorm layer also keeps per-stream per-class statistics, updated with the pseudo-labels "
        "of a no-grad pre-pass (one extra forward per request), and normalises with their class-uniform mixture "
        "merged with the per-stream statistics at this weight (1 = the balanced statistics alone), so a label-shifted "
        "stream's class mix does not move the normalisation. None = off (docs/results/smallbatch/README.md, "
        "session 8)")
    bn_balanced_form: Literal["mixture", "correction"] = Field(
        "mixture", description="with bn_balanced: how the class statistics enter. 'mixture' = their class-uniform "
        "mixture (TRIBE); 'correction' = the per-stream statistics with their recent class mix (tracked per layer at "
        "the layer's momentum) replaced by the uniform one, which leaves an i.i.d. stream's statistics as they are")
    bn_balanced_confidence: float | None = Field(
        None, gt=0, lt=1, description="with bn_balanced: only images whose pre-pass max softmax probability is at "
        "least this move the class statistics (wrong pseudo-labels on low-accuracy domains corrupt them); with "
        "'correction' the recent class mix counts the same images and the correction's weight is scaled by their "
        "recent share. Needs bn_balanced. None = every image (docs/results/smallbatch/README.md, session 8)")
    bn_balanced_agree: bool = Field(
        False, description="with bn_balanced: only images whose pre-pass label agrees with the frozen source model's "
        "label (and, with bn_balanced_confidence, are that confident) move the class statistics and the recent class "
        "mix (one source forward per request that moves them; the guard's source checks reuse it). Needs "
        "bn_balanced. False = off (docs/results/smallbatch/README.md, session 9)")
    bn_balanced_share: float | None = Field(
        None, gt=0, le=0.5, description="with bn_balanced_form='correction' and a gate (bn_balanced_confidence or "
        "bn_balanced_agree): the correction's weight is bn_balanced x clamp(rho / this - 1, 0, 1), rho the layer's "
        "recent share of gated labels: none while at most this share of the recent images pass the gate, full from "
        "twice it. None = bn_balanced x rho (docs/results/smallbatch/README.md, session 9)")
    update_images: int = Field(64, ge=1, description="gradients are accumulated over requests until this many "
                               "images were seen, then one update is applied (request size does not change "
                               "the adaptation)")
    guard_check_share: float = Field(0.25, ge=0, le=1, description="share of images the guard also classifies "
                                     "with the source model to judge the adapted one against it")
    guard_confident_entropy: float | None = Field(
        None, gt=0, le=1, description="the guard holds a stream at source, from its first checked images on, while "
        "the source is confident on them (its normalised entropy EMA at or below this) and the adapted model is "
        "guard_confident_entropy_gap less certain; it also keeps a hold from ending because such a source predicts few "
        "classes (label shift). None = off, the default: on held-out streams 0.05-0.15 fixed the domains where the "
        "source is confident and cost another domain more (docs/results/smallbatch/heldout)")
    guard_judge_images: int | None = Field(
        16, ge=1, le=1_000_000, description="outside holds the guard judges a stream once this many images arrived "
        "since its last judgement, so small requests are not judged more often than large ones (judged after every "
        "request, a 4-image stream tests the same moving averages 16 times as often as a 64-image one and falls back "
        "on transient crossings). 16: chosen on held-out streams (docs/results/smallbatch/README.md, session 6; "
        "requests of 16 or more images are judged after each one, as before). None = after every request")
    guard_confident_hold_entropy: float | None = Field(
        None, gt=0, le=1, description="a guard hold at source does not end because the source predicts few classes "
        "('source_failing') while the source's normalised entropy on the checked images (a per-stream moving average) "
        "is at most this: under label shift a right, confident source predicts few classes too; the hold still ends "
        "by running out or on a domain shift. Starts no hold itself. When set, it is the limit in place of "
        "guard_confident_entropy's, even a lower one. None = off")
    guard_collapse_hold_images: int | None = Field(
        None, ge=1, le=1_000_000, description="a guard fallback for a collapse (class_collapse, entropy_divergence, "
        "partial_collapse) that goes to source (the stream has no healthy anchor) also holds the stream there, "
        "gradient-free, for this many images, doubled for every fallback in a row up to 8x (the count of the other "
        "holds; cleared by a healthy anchor or a domain-shift release); the hold ends early as the others do. Meant "
        "for domains where adapting from the source collapses at once and each restart repeats it "
        "(docs/results/smallbatch/README.md, session 10). None = off: adapt again at once")
    guard_keep_source_history: bool = Field(
        False, description="the guard's checks of whether the source is a usable reference (its prediction "
        "diversity, min_source_diversity) read a per-stream source prediction histogram that a guard fallback keeps "
        "(it describes the data, not the adapted model; a stream reset clears it); the comparisons of the adapted "
        "model with the source still use the histograms a fallback resets. Meant for streams where, after a "
        "fallback, the few requests of a new histogram make the source look like no reference and the guard judges "
        "nothing against it (docs/results/smallbatch/README.md, session 11). False = off")
    guard_confident_entropy_gap: float = Field(
        0.05, ge=0, le=1, description="normalised-entropy excess of the adapted model over a confident source "
        "that makes the guard hold the stream at source (guard_confident_entropy)")
    device: str = Field("auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    torch_threads: int | None = Field(
        None, ge=1, description="torch CPU threads for the model (None = torch's default, one per core); on a CPU "
        "shared with other work, fewer threads avoid oversubscription")
    gil_switch_interval_ms: float | None = Field(
        0.5, gt=0, le=100, description="the interpreter's thread switch interval (sys.setswitchinterval), set at "
        "start-up; None keeps Python's 5 ms. While the engine thread runs Python code, every other thread waits up "
        "to this long each time it takes the GIL back after a system call: a group commit's ~4 calls per file then "
        "cost 5 ms each at the default (a 3.5 ms write of 8 snapshots took 142 ms next to a busy thread, 21 ms at "
        "0.5 ms)")
    gc_freeze: bool = Field(
        True, description="after the model is loaded and warmed up, move every object alive then (model, "
        "libraries) to the garbage collector's permanent generation (gc.freeze): full collections stop scanning "
        "them. Measured under 16 streams of 4-image requests: a full collection paused the server for 160 ms, "
        "1.3 ms frozen. False = leave the collector as it is")
    return_post_update: bool = Field(
        False, description="return predictions made after the update instead of before it (costs one more forward)"
    )
    topk: int = Field(5, ge=1, le=100)
    model_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="model name of the Open Inference Protocol (V2) endpoints (/v2/models/<name>); None = the "
        "classifier card's model name")

    # --- server ---------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    admin_token: SecretStr | None = Field(None, description="when set, /reset and /streams need 'Bearer <token>'")

    # --- limits ---------------------------------------------------------------------------------
    max_images: int = Field(64, ge=1, description="images per /predict request")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="request body size limit")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="pixels per decoded image")
    max_request_pixels: int = Field(
        32 * 1024 * 1024, ge=1, description="decoded pixels per request, all images together; checked from the "
        "image headers before anything is decoded (413 too_many_pixels)")
    max_pixels_in_flight: int = Field(
        64 * 1024 * 1024, ge=1, description="decoded pixels held by all requests at once (503 pixels_in_flight + "
        "Retry-After past it); a request's pixels are released as soon as its images are preprocessed")
    inline_max_pixels: int = Field(
        16384, ge=0, le=1024 * 1024, description="a request whose body has at most 4 bytes per such pixel and whose "
        "images have at most this many pixels (all together) is decoded on the event loop, and preprocessed there "
        "when its model inputs also have at most this many (a small image is resized up to the model's input "
        "size): about 50 ns per pixel, instead of in worker threads, whose two hops cost more than the work for a "
        "few small images and wait behind the busy threads under load (docs/results/fused, session 10). "
        "0 = always in worker threads")
    max_concurrent_streams: int = Field(
        2, ge=1, description="engine calls running at the same time: streams adapting at once, or fused steps "
        "(each counts once) when fused_steps is on")
    fused_steps: bool = Field(
        True, description="run the steps of concurrent requests of different streams as one fused engine call "
        "(service/scheduler.py: each stream still gets exactly its own update); False = one engine call per "
        "request")
    max_batch_delay_ms: float = Field(
        50.0, ge=0, le=10_000, description="fused_steps: the longest a request waits for other streams' requests "
        "to join its fused step (Triton's max_queue_delay); 0 = run what is queued now. A request waits only "
        "while another stream is missing that has a request on its way, or was active within "
        "batch_active_window_ms and is due: its usual time from an answer to its next request (think time, "
        "learned per stream) ends before the delay does. So a lone stream never waits, streams that send now and "
        "then make no one wait, and closed-loop clients fall into step (service/scheduler.py)")
    max_batch_images: int = Field(
        64, ge=1, description="fused_steps: images per fused step, all its requests together; a fused step "
        "takes queued requests in arrival order while they fit (a single larger request runs alone)")
    max_batch_streams: int = Field(
        64, ge=1, description="fused_steps: streams (= requests) per fused step")
    batch_active_window_ms: float = Field(
        1000.0, ge=0, le=600_000, description="fused_steps: a stream that sent a request within this window may "
        "be expected again, and a fused step waits for it (at most max_batch_delay_ms, and only while it is due)")
    max_queue_per_stream: int = Field(16, ge=1, description="requests waiting or running per stream before 429")
    max_queue_total: int = Field(256, ge=1, description="requests waiting or running in total before 429")
    retry_after_seconds: int = Field(1, ge=1)
    idempotency_keys: int = Field(
        16, ge=1, description="per stream, the answers of the last this many Idempotency-Key requests are kept "
        "(with the stream's snapshot) and replayed to a retry instead of stepping again")
    idempotency_max_bytes: int = Field(
        256 * 1024, ge=1024, le=1024 * 1024, description="per stream, bytes the kept answers take at most (oldest "
        "dropped first; an answer larger than this alone is not kept, and its retry gets 409 "
        "idempotent_answer_not_kept). At most 1 MiB: the records travel in the stream's snapshot")
    idempotency_v2_request_id: bool = Field(
        False, description="the V2 infer request's JSON 'id' serves as its Idempotency-Key when no header is "
        "sent (off by default: the protocol does not require ids to be unique)")
    body_timeout_seconds: float = Field(
        120.0, gt=0, description="a request body must have arrived this long after it started (408 body_timeout "
        "and the connection is closed past it)")
    limit_concurrency: int | None = Field(
        512, ge=1, description="open connections (or running requests) at once; past it a new request gets 503 "
        "with Connection: close from the HTTP server (uvicorn's limit_concurrency; None = unlimited)")
    timeout_keep_alive_seconds: int = Field(
        5, ge=1, description="an idle keep-alive connection is closed after this long (uvicorn's timeout_keep_alive)")
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="a request line and headers must be complete this long after their first byte (or "
        "the connection's start); past it 408 header_timeout and the connection is closed (slowloris); also how long "
        "a request body may keep arriving after its request was answered (nobody reads it: closed)")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="bytes of a request's header names and values (431 headers_too_large "
        "past it, connection closed); also the bytes the server buffers of a request head still incomplete (400 "
        "and the connection closed past it)")
    http_parser: Literal["httptools", "h11"] = Field(
        "httptools", description="HTTP/1.1 parser: httptools (llhttp, C; less event-loop time per request) or h11 "
        "(pure Python); the same limits and answers either way (service/server.py)")
    max_headers: int = Field(100, ge=1, description="header fields per request (431 headers_too_large past it)")
    body_idle_timeout_seconds: float = Field(
        15.0, gt=0, description="the longest wait for the next chunk of a request body (408 body_timeout past it)")

    # --- state ----------------------------------------------------------------------------------
    state_budget_bytes: int = Field(2 * 1024**3, ge=0, description="bytes of stream state kept in memory (LRU)")
    idle_seconds: float = Field(900.0, gt=0, description="streams idle this long are snapshotted and unloaded")
    idle_check_seconds: float = Field(30.0, gt=0)
    snapshot_dir: Path = Field(Path("mgg-snapshots"), description="folder of <stream_id>.safetensors snapshots")
    durability: Literal["step", "interval"] = Field(
        "step", description="'step': a stream's state is written and fsynced before each /predict answer, so "
        "no acknowledged step is lost to a crash (kill -9, power loss); 'interval': snapshots are written in the "
        "background every snapshot_interval_steps steps or snapshot_interval_seconds, whichever comes first, "
        "so a crash loses at most that many acknowledged steps per stream (tta_steps_unpersisted shows how many "
        "are at risk now)")
    commit_group_max_streams: int = Field(
        64, ge=1, description="durability='step': streams whose snapshots share one durable write (group commit: "
        "the steps that finish together, e.g. one fused step's streams, are written, fsynced and renamed together; "
        "a failed write refuses and reverts all of them); 1 = each stream written on its own")
    snapshot_interval_steps: int = Field(
        32, ge=1, description="durability='interval': a stream is snapshotted after this many unpersisted steps")
    snapshot_interval_seconds: float = Field(
        5.0, gt=0, description="durability='interval': unpersisted steps are snapshotted at most this long after "
        "they were acknowledged")
    max_streams: int = Field(
        10_000, ge=1, description="streams known at once (in memory, on disk or queued); a request for a new "
        "stream past it is refused with 507 too_many_streams")
    max_snapshot_bytes: int = Field(
        10 * 1024**3, ge=0, description="bytes of snapshots on disk; a new stream that would need more is refused "
        "with 507 snapshot_disk_full")
    snapshot_retention_seconds: float | None = Field(
        30 * 24 * 3600.0, gt=0, description="snapshots of streams idle this long are deleted and the streams "
        "forgotten (None = keep forever)")
    max_page_size: int = Field(1000, ge=1, description="GET /streams: most streams per page (?limit=)")

    @model_validator(mode="after")
    def _warmup_shift_needs_prior(self) -> ServiceSettings:
        if self.bn_warmup_shift is not None and self.bn_prior_images is None:
            raise ValueError("bn_warmup_shift needs bn_prior_images (the warm-up it starts)")
        # on by default: bn_prior_images=None alone turns the warm-up off, release included; asked for explicitly
        # without a warm-up it is a misconfiguration
        if self.bn_warmup_release and self.bn_prior_images is None and "bn_warmup_release" in self.model_fields_set:
            raise ValueError("bn_warmup_release needs bn_prior_images (the warm-up it starts)")
        if self.bn_balanced_confidence is not None and self.bn_balanced is None:
            raise ValueError("bn_balanced_confidence needs bn_balanced (the class statistics it gates)")
        if self.bn_balanced_agree and self.bn_balanced is None:
            raise ValueError("bn_balanced_agree needs bn_balanced (the class statistics it gates)")
        if self.bn_balanced_share is not None and not (
                self.bn_balanced is not None and self.bn_balanced_form == "correction"
                and (self.bn_balanced_agree or self.bn_balanced_confidence is not None)):
            raise ValueError("bn_balanced_share needs bn_balanced with bn_balanced_form 'correction' and a gate "
                             "(bn_balanced_confidence or bn_balanced_agree)")
        return self

    @field_validator("admin_token")
    @classmethod
    def _empty_token_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            return None
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_path = os.environ.get(ENV_PREFIX + "CONFIG")
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            file_secret_settings,
            _ConfigFileSource(settings_cls, config_path),
        )

    def binds_loopback_only(self) -> bool:
        """True when ``host`` is a loopback address or 'localhost' (nothing beyond this machine can connect)."""
        if self.host.strip().lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False  # a host name: assume it is reachable from elsewhere

    def with_safe_admin_token(self) -> tuple[ServiceSettings, str | None]:
        """The settings to serve with, and the admin token generated for them if one was needed.

        Binding beyond loopback without ``admin_token`` would let anyone reset or delete every stream: a random
        token is generated for this run (the caller prints it once) so that admin routes are never open.
        """
        if self.admin_token is not None or self.binds_loopback_only():
            return self, None
        token = secrets.token_urlsafe(24)
        return self.model_copy(update={"admin_token": SecretStr(token)}), token

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> ServiceSettings:
    """Build settings; ``overrides`` (e.g. CLI flags) win over env vars, .env and the config file.

    ``None`` overrides are dropped so that an unset flag does not mask the other sources.
    A ``.env`` config file is read as a dotenv file; ``.yaml``/``.yml``/``.json`` as a mapping.
    """
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if config_file is None:
        return ServiceSettings(**kwargs)
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix.lower() in {".yaml", ".yml", ".json"}:
        data = read_config_file(path)
        # lowest priority: apply only what env/.env/overrides do not set
        base = ServiceSettings(**kwargs)
        explicit = base.model_fields_set
        merged = {**data, **{k: getattr(base, k) for k in explicit}}
        return ServiceSettings(**merged)
    return ServiceSettings(_env_file=path, **kwargs)
