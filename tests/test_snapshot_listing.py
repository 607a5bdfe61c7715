"""A stream's listing data lives in its snapshot's own header: one file per stream and per durable write.

The service lists streams that are not resident (``GET /streams``) from the ``listing`` metadata of their
snapshot's safetensors header; snapshot folders of versions that kept it in a ``<id>.json`` sidecar still load,
are listed from the sidecar, and lose it at the stream's next write.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import npy_bytes, service_test_model
from safetensors import safe_open
from safetensors.torch import save_file

from mgg_core.state import RESERVED_META, StreamState
from service.settings import ServiceSettings

TOKEN = "listing-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NPY = {"Content-Type": "application/x-npy"}


def settings_for(snapshot_dir: Path, **kw) -> ServiceSettings:
    base = dict(model=service_test_model(), device="cpu", snapshot_dir=snapshot_dir, max_images=16,
                max_body_bytes=300_000, admin_token=TOKEN, idle_seconds=600, log_level="warning",
                method="tent", optimizer="sgd", lr=0.05, update_images=1, bn_stats="batch", guard_check_share=0.0)
    base.update(kw)
    return ServiceSettings(_env_file=None, **base)


def header(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def step(c, sid: str, x) -> dict:
    r = c.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": sid})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------- the state


def _state() -> StreamState:
    g = torch.Generator().manual_seed(0)
    return StreamState(tensors={"theta": torch.randn(5, generator=g), "opt.m": torch.randn(2, 3, generator=g)},
                       fingerprint={"model": "m"}, step=3, annotations={"k": "v"})


def test_extra_header_metadata_is_kept_and_ignored_by_load(tmp_path):
    state = _state()
    path = tmp_path / "s.safetensors"
    path.write_bytes(state.to_bytes({"listing": '{"step": 3}'}))
    meta, _ = header(path)
    assert meta["listing"] == '{"step": 3}'
    back = StreamState.load(path, expected_fingerprint={"model": "m"})
    assert back.step == 3 and back.annotations == {"k": "v"}
    assert all(torch.equal(back.tensors[k], v) for k, v in state.tensors.items())
    # without extra metadata the header is what it always was (safetensors orders metadata keys freely)
    plain = []
    for i, extra in enumerate((None, {})):
        (tmp_path / f"{i}.safetensors").write_bytes(state.to_bytes(extra))
        plain.append(header(tmp_path / f"{i}.safetensors")[0])
    assert plain[0] == plain[1] and set(plain[0]) == set(RESERVED_META)


@pytest.mark.parametrize("key", RESERVED_META)
def test_extra_header_metadata_cannot_replace_the_states_own(key):
    with pytest.raises(ValueError, match=key):
        _state().to_bytes({key: "x"})


def test_extra_header_metadata_is_text():
    with pytest.raises(ValueError, match="text"):
        _state().to_bytes({"listing": 3})  # type: ignore[dict-item]


# -------------------------------------------------------------------------------------------- the service


def test_a_durable_step_writes_one_file_whose_header_lists_the_stream(live_server, tmp_path, digit_images):
    snaps, x = tmp_path / "s", digit_images[:4]
    srv = live_server(settings_for(snaps))
    with srv.client() as c:
        for _ in range(3):
            last = step(c, "cam", x)
        resident = c.get("/streams/cam", headers=AUTH).json()
    srv.stop()
    assert files(snaps) == ["cam.safetensors"]  # no sidecar
    meta, _ = header(snaps / "cam.safetensors")
    listing = json.loads(meta["listing"])
    assert listing["step"] == last["step"] == 3 and listing["requests"] == 3
    assert listing["entropy_ema"] == resident["entropy_ema"] and listing["bytes"] == resident["bytes"]
    again = live_server(settings_for(snaps))
    with again.client() as c:  # listed from the header alone: the state is not loaded
        info = c.get("/streams/cam", headers=AUTH).json()
        assert info["resident"] is False and info["snapshot"] is True
        assert (info["step"], info["requests"], info["entropy_ema"], info["last_seen"]) == \
            (3, 3, resident["entropy_ema"], resident["last_seen"])
        assert again.app.state.svc.store.disk_bytes == (snaps / "cam.safetensors").stat().st_size


def _as_older_version(snaps: Path, sid: str, **sidecar) -> None:
    """Rewrite ``sid``'s snapshot as an older version left it: no listing in the header, a ``<id>.json`` sidecar."""
    path = snaps / f"{sid}.safetensors"
    meta, tensors = header(path)
    listing = json.loads(meta.pop("listing"))
    save_file(tensors, str(path), metadata=meta)
    (snaps / f"{sid}.json").write_text(json.dumps({**listing, **sidecar}, indent=1))


def test_an_older_versions_sidecar_is_read_then_removed_by_the_next_write(live_server, tmp_path, digit_images):
    snaps, x = tmp_path / "s", digit_images[:4]
    srv = live_server(settings_for(snaps))
    with srv.client() as c:
        for _ in range(2):
            step(c, "old", x)
        twin = [step(c, "twin", x) for _ in range(3)]  # the same stream, never restarted
        step(c, "bad", x)
    srv.stop()
    _as_older_version(snaps, "old", requests=41)  # a count only the sidecar has
    _as_older_version(snaps, "bad", step="abc")
    both = (snaps / "old.safetensors").stat().st_size + (snaps / "old.json").stat().st_size
    again = live_server(settings_for(snaps))
    store = again.app.state.svc.store
    with again.client() as c:
        info = c.get("/streams/old", headers=AUTH).json()
        assert info["resident"] is False and (info["step"], info["requests"]) == (2, 41)
        assert store._files_size("old") == both
        bad = c.get("/streams/bad", headers=AUTH).json()
        assert "sidecar" in bad["error"] and "step" in bad["error"], bad
        got = step(c, "old", x)  # the older snapshot loads and continues exactly
        assert got["step"] == 3 and got["predictions"] == twin[2]["predictions"]
        # old's sidecar is gone
        assert files(snaps) == ["bad.json", "bad.safetensors", "old.safetensors", "twin.safetensors"]
        assert json.loads(header(snaps / "old.safetensors")[0]["listing"])["requests"] == 42
        assert store.disk_bytes == sum((snaps / n).stat().st_size for n in files(snaps))


def test_a_sidecar_left_next_to_a_listed_snapshot_is_ignored(live_server, tmp_path, digit_images):
    """A crash between a write and the removal of the older version's sidecar: the header's listing wins."""
    snaps, x = tmp_path / "s", digit_images[:4]
    srv = live_server(settings_for(snaps))
    with srv.client() as c:
        step(c, "cam", x)
    srv.stop()
    (snaps / "cam.json").write_text(json.dumps({"step": 99, "requests": 99}))
    again = live_server(settings_for(snaps))
    with again.client() as c:
        info = c.get("/streams/cam", headers=AUTH).json()
        assert (info["step"], info["requests"], info["error"]) == (1, 1, None)
        step(c, "cam", x)  # the next write removes the stale sidecar too, and the disk bytes count what is left
        store = again.app.state.svc.store
        assert files(snaps) == ["cam.safetensors"]
        assert store.disk_bytes == (snaps / "cam.safetensors").stat().st_size


def test_a_group_split_removes_the_sidecars_of_the_streams_it_wrote(live_server, tmp_path, monkeypatch):
    """A rename failing mid-group: the streams already renamed are durable and counted at their snapshot's bytes,
    so their older version's sidecars go at once, as after a whole group; the others' stay (their old snapshot)."""
    import os

    import mgg_core.io as mio
    from service.store import _GroupSplit

    snaps = tmp_path / "s"
    srv = live_server(settings_for(snaps))
    store = srv.app.state.svc.store
    for sid in ("a", "b"):
        (snaps / f"{sid}.json").write_text(json.dumps({"step": 0}))
        assert store._files_size(sid) > 0  # counted: removed by the stream's next write
    real, renamed = os.replace, []

    def replace(src, dst):  # the group's second snapshot rename fails
        if Path(dst).suffix == ".safetensors":
            renamed.append(Path(dst).stem)
            if len(renamed) == 2:
                raise OSError(5, "I/O error (injected)")
        return real(src, dst)

    monkeypatch.setattr(mio.os, "replace", replace)
    state = store.engine.new_state()
    with pytest.raises(_GroupSplit) as split:
        store._write_files([("a", state, {}, 0), ("b", state, {}, 0)])
    assert split.value.committed == {"a"}
    assert files(snaps) == ["a.safetensors", "b.json"]
