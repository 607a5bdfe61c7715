"""Group commit (issue 10): the steps that finish together share one durable write.

Covers :func:`mgg_core.io.atomic_write_group` (all-or-nothing before the renames, old-or-new per file under
``kill -9`` mid-group), :meth:`mgg_core.state.StreamState.to_bytes` (the numpy serialiser writes the same file as
safetensors.torch), and the service: one fused step's streams are written together, ``commit_group_max_streams``
bounds a group, a group past ``max_snapshot_bytes`` refuses and reverts all of its streams, and ``kill -9`` after
the answers keeps every stream of every group. Loopback only; every wait is bounded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import gated_engine, metric, npy_bytes, serve_process, service_test_model, wait_for

from mgg_core.io import GroupWriteError, atomic_write_group
from mgg_core.state import StreamState
from mgg_replay.server import kill9_restart
from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[1]
TOKEN = "group-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NPY = {"Content-Type": "application/x-npy"}


# ------------------------------------------------------------------------------------ io: group writes


def test_group_write_replaces_every_file_with_one_folder_fsync(tmp_path, monkeypatch):
    import mgg_core.io as mio

    synced: list[Path] = []
    monkeypatch.setattr(mio, "fsync_dir", lambda p: synced.append(Path(p)))
    files = [(tmp_path / f"f{k}", f"new {k}".encode(), k != 1) for k in range(4)]
    (tmp_path / "f0").write_bytes(b"old")
    atomic_write_group(files)
    assert [(p.read_bytes()) for p, _d, _x in files] == [b"new 0", b"new 1", b"new 2", b"new 3"]
    assert synced == [tmp_path]  # one folder, one fsync
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0", "f1", "f2", "f3"]  # no temp file left


def test_a_group_write_failing_before_the_renames_changes_no_file(tmp_path):
    for k in range(3):
        (tmp_path / f"f{k}").write_bytes(b"old")
    files = [(tmp_path / "f0", b"new", True), (tmp_path / "f1", "not bytes", True), (tmp_path / "f2", b"new", True)]
    with pytest.raises(TypeError):
        atomic_write_group(files)  # type: ignore[arg-type]
    assert [(tmp_path / f"f{k}").read_bytes() for k in range(3)] == [b"old"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0", "f1", "f2"]


def test_a_failed_rename_names_the_files_already_replaced(tmp_path):
    (tmp_path / "f0").write_bytes(b"old")
    (tmp_path / "f1").mkdir()  # a folder where a file should go: its rename fails
    (tmp_path / "f1" / "inside").write_bytes(b"x")
    (tmp_path / "f2").write_bytes(b"old")
    with pytest.raises(GroupWriteError) as err:
        atomic_write_group([(tmp_path / f"f{k}", b"new", True) for k in range(3)])
    assert err.value.replaced == [tmp_path / "f0"]
    assert (tmp_path / "f0").read_bytes() == b"new" and (tmp_path / "f2").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0", "f1", "f2"]


def _state(value: float) -> StreamState:
    return StreamState(
        tensors={"theta": torch.full((50,), value), "opt.count": torch.tensor([3], dtype=torch.int64),
                 "guard.flag": torch.tensor([True, False])},
        fingerprint={"model": "m", "k": 1}, step=int(value), anchor={"theta": torch.full((50,), -value)},
        annotations={"idem": "x"})


_CRASH = textwrap.dedent("""
    import os, signal, sys
    import mgg_core.io as mio
    from mgg_core.state import StreamState
    import torch
    folder, value, after = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    real, done = os.replace, [0]
    def replace(src, dst):
        if done[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the group's renames
        real(src, dst)
        done[0] += 1
    mio.os.replace = replace
    def state(v):
        return StreamState(tensors={"theta": torch.full((50,), v), "opt.count": torch.tensor([3]),
                                    "guard.flag": torch.tensor([True, False])},
                           fingerprint={"model": "m", "k": 1}, step=int(v), anchor={"theta": torch.full((50,), -v)},
                           annotations={"idem": "x"})
    mio.atomic_write_group([(os.path.join(folder, f"s{k}.safetensors"), state(value + k).to_bytes(), True)
                            for k in range(4)])
""")


@pytest.mark.parametrize("after", [0, 2])
def test_kill_9_mid_group_leaves_every_snapshot_old_or_new_and_loadable(tmp_path, after):
    for k in range(4):
        _state(1.0 + k).save(tmp_path / f"s{k}.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path), "10", str(after)], env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    steps = [StreamState.load(tmp_path / f"s{k}.safetensors", {"model": "m", "k": 1}).step for k in range(4)]
    assert steps == [10 + k if k < after else 1 + k for k in range(4)]  # renamed ones new, the others old


# -------------------------------------------------------------------------------- state serialisation


def _parts(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed: safetensors orders its metadata map arbitrarily) and tensor bytes."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def test_to_bytes_writes_the_torch_serialisers_file(tmp_path):
    from safetensors.torch import save

    state = _state(2.0)
    state.tensors.update({"i64": torch.arange(5), "flag": torch.tensor([True, False]), "half": torch.ones(3).half(),
                          "u8": torch.arange(7, dtype=torch.uint8), "scalar": torch.tensor(1.5),
                          "strided": torch.arange(12.0).view(3, 4).t()})
    meta = {"format": "1", "scalars": json.dumps(state._scalars()),
            "fingerprint": '{"k": 1, "model": "m"}', "annotations": '{"idem": "x"}'}
    for extra in ({}, {"empty": torch.zeros(0, 3)}):  # pointer specs; with an empty tensor, safetensors.numpy
        state.tensors.update(extra)
        data = state.to_bytes()
        out = {f"state.{k}": v.contiguous() for k, v in state.tensors.items()}
        out |= {f"anchor.{k}": v for k, v in state.anchor.items()}
        want = save(out, metadata=meta)
        assert len(data) == len(want) and _parts(data) == _parts(want)  # same header, offsets and tensor bytes
    assert state.save(tmp_path / "s.safetensors") == len(data)
    back = StreamState.load(tmp_path / "s.safetensors", {"model": "m", "k": 1})
    assert back.step == 2 and back.annotations == {"idem": "x"} and torch.equal(back.theta, state.theta)
    state.tensors["theta"] = state.tensors["theta"].to(torch.bfloat16)  # no numpy dtype: the torch serialiser
    state.save(tmp_path / "s.safetensors")
    assert StreamState.load(tmp_path / "s.safetensors", None).theta.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- service


def settings_for(snapshot_dir: Path, **kw) -> ServiceSettings:
    base = dict(model=service_test_model(), device="cpu", snapshot_dir=snapshot_dir, max_images=16,
                max_body_bytes=300_000, admin_token=TOKEN, idle_seconds=600, log_level="warning", fused_steps=True,
                max_concurrent_streams=1, max_batch_delay_ms=0.0, method="tent", optimizer="sgd", lr=0.05,
                update_images=1, bn_stats="batch", guard_check_share=0.0)
    base.update(kw)
    return ServiceSettings(_env_file=None, **base)


def fused_group(srv, sids: list[str], x: np.ndarray) -> dict[str, httpx.Response]:
    """A blocker's call holds the engine; ``sids`` queue meanwhile and run as the next fused call, together."""
    results: dict[str, httpx.Response] = {}

    def send(sid: str) -> None:
        with srv.client() as c:
            results[sid] = c.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": sid})

    with gated_engine(srv) as gate, srv.client() as c:
        calls = metric(c, "tta_fused_step_streams_count")
        blocker = threading.Thread(target=send, args=("blocker",))
        blocker.start()
        wait_for(lambda: metric(c, "tta_fused_step_streams_count") == calls + 1)
        threads = [threading.Thread(target=send, args=(sid,)) for sid in sids]
        for t in threads:
            t.start()
        wait_for(lambda: metric(c, "tta_queue_depth") == len(sids) + 1)
        gate.set()
        for t in [blocker, *threads]:
            t.join(120)
        assert metric(c, "tta_fused_step_streams_count") == calls + 2  # the blocker alone, then all of sids
    return results


@pytest.mark.parametrize("group", [64, 2])
def test_a_fused_steps_streams_share_durable_writes_up_to_the_group_limit(live_server, tmp_path, digit_images,
                                                                          group):
    srv = live_server(settings_for(tmp_path / "g", commit_group_max_streams=group))
    store = srv.app.state.svc.store
    real, writes = store._write_files, []

    def write(items):
        writes.append(sorted(item[0] for item in items))
        return real(items)

    store._write_files = write
    sids = ["a", "b", "c", "d", "e"]
    results = fused_group(srv, sids, digit_images[:4])
    assert all(results[s].status_code == 200 and results[s].json()["step"] == 1 for s in sids)
    assert writes[0] == ["blocker"]
    assert [len(w) for w in writes[1:]] == ([5] if group > 2 else [2, 2, 1])
    with srv.client() as c:
        assert metric(c, "tta_commit_group_streams_count") == len(writes)
        assert metric(c, "tta_commit_group_streams_sum") == 6
    assert all((tmp_path / "g" / f"{s}.safetensors").is_file() for s in sids)


def test_a_group_past_the_snapshot_disk_cap_refuses_and_reverts_all_its_streams(live_server, tmp_path,
                                                                                 digit_images):
    srv = live_server(settings_for(tmp_path / "d"))
    store = srv.app.state.svc.store
    x = digit_images[:4]
    with srv.client() as c:
        assert c.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": "p"}).status_code == 200
        size = store.disk_bytes  # one stream's files
        # room for the probe, the blocker and one more stream (each is admitted alone), not for a group of five
        store.max_snapshot_bytes = 2 * size + max(store._file_estimate, 2 * size) + size // 2
        assert store.max_snapshot_bytes < 7 * size
    sids = ["a", "b", "c", "d", "e"]
    results = fused_group(srv, sids, x)
    with srv.client() as c:
        for sid in sids:
            assert results[sid].status_code == 507, results[sid].text
            assert results[sid].json()["error"]["code"] == "snapshot_disk_full"
            assert not (tmp_path / "d" / f"{sid}.safetensors").exists()
        # the probe's and the blocker's files, nothing of the group (their sizes may differ by a few bytes: the
        # listings' JSON numbers, e.g. entropy_ema, print with different lengths)
        assert store.disk_bytes == store._files_size("p") + store._files_size("blocker") == \
            sum(f.stat().st_size for f in (tmp_path / "d").iterdir() if not f.name.startswith("."))
        r = c.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": "a"})
        assert r.status_code == 200 and r.json()["step"] == 1  # alone it fits; it starts from its durable state


def test_a_rename_failing_mid_group_acknowledges_exactly_the_streams_on_disk(live_server, tmp_path, digit_images,
                                                                             monkeypatch):
    import mgg_core.io as mio

    snaps = tmp_path / "r"
    srv = live_server(settings_for(snaps))
    sids = ["a", "b", "c", "d"]
    with srv.client() as c:  # one durable step each first
        for sid in sids:
            assert c.post("/predict", content=npy_bytes(digit_images[:4]),
                          headers={**NPY, "X-Stream-Id": sid}).status_code == 200
    real, snapshots = os.replace, []

    def replace(src, dst):  # the group's second snapshot rename fails: the first stream's is already done
        if Path(dst).suffix == ".safetensors" and Path(dst).stem in sids:
            snapshots.append(Path(dst).stem)
            if len(snapshots) == 2:
                raise OSError(5, "I/O error (injected)")
        return real(src, dst)

    monkeypatch.setattr(mio.os, "replace", replace)
    results = fused_group(srv, sids, digit_images[4:8])
    monkeypatch.setattr(mio.os, "replace", real)
    acked = {sid: 2 if results[sid].status_code == 200 else 1 for sid in sids}
    assert [sid for sid in sids if acked[sid] == 2] == [snapshots[0]]  # durable: answered
    for sid in sids:
        if sid != snapshots[0]:  # not renamed: refused, reverted
            assert results[sid].status_code == 507, results[sid].text
            assert results[sid].json()["error"]["code"] == "snapshot_write_failed"
    srv.stop()
    again = live_server(settings_for(snaps))  # a restart: every stream is at its last acknowledged step
    with again.client() as c:
        for sid in sids:
            r = c.post("/predict", content=npy_bytes(digit_images[:4]), headers={**NPY, "X-Stream-Id": sid})
            assert r.status_code == 200 and r.json()["step"] == acked[sid] + 1, r.text


def test_commit_group_max_streams_is_validated(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        settings_for(tmp_path, commit_group_max_streams=0)


@pytest.mark.timeout(500)
def test_kill_9_after_the_answers_keeps_every_stream_of_every_group(tmp_path, digit_images):
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    streams = [f"k{i}" for i in range(6)]

    def history(c: httpx.Client) -> dict[str, int]:
        acked: dict[str, int] = {}
        url = str(c.base_url)

        def run(i: int, sid: str) -> None:
            with httpx.Client(base_url=url, timeout=60) as own:
                for k in range(4):
                    x = digit_images[(4 * (i + k)) % 24:(4 * (i + k)) % 24 + 4]
                    r = own.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": sid})
                    assert r.status_code == 200, r.text
                    acked[sid] = r.json()["step"]

        threads = [threading.Thread(target=run, args=(i, sid)) for i, sid in enumerate(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(acked) == len(streams)
        # durable writes carried more than one stream each (on average): group commit happened
        assert metric(c, "tta_commit_group_streams_sum") > metric(c, "tta_commit_group_streams_count")
        return acked

    def check(c: httpx.Client, acked: dict[str, int]) -> None:
        assert set(acked.values()) == {4}  # every request was a step
        for sid, step in acked.items():
            info = c.get(f"/streams/{sid}", headers=AUTH).json()
            assert info["step"] == step and info["requests"] == 4 and info["error"] is None, (sid, info)
            r = c.post("/predict", content=npy_bytes(digit_images[:4]), headers={**NPY, "X-Stream-Id": sid})
            assert r.status_code == 200 and r.json()["step"] == step + 1, r.text  # restored, validated, continued

    kill9_restart(lambda: serve_process(snaps, "--admin-token", TOKEN, "--max-batch-delay-ms", "50",
                                        env={"MGG_UPDATE_IMAGES": "1"}), history, check, timeout=60)


def test_gil_switch_interval_is_set_at_start_up_and_validated(tmp_path):
    from pydantic import ValidationError

    from service.runtime import load_runtime

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        load_runtime(settings_for(tmp_path, gil_switch_interval_ms=0.25))
        assert sys.getswitchinterval() == pytest.approx(0.00025)
        sys.setswitchinterval(0.005)
        load_runtime(settings_for(tmp_path, gil_switch_interval_ms=None))  # None: left as it is
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        sys.setswitchinterval(before)
    assert settings_for(tmp_path).gil_switch_interval_ms == 0.5
    for bad in (0, -1, 101):
        with pytest.raises(ValidationError):
            settings_for(tmp_path, gil_switch_interval_ms=bad)


def test_a_bug_while_preparing_a_group_refuses_its_streams_instead_of_hanging(live_server, tmp_path, digit_images):
    """Whatever fails while a group is prepared (here: its listing data) fails the group's requests (507, the step
    not kept) rather than leaving them waiting for a write that never comes; the next request is served."""
    srv = live_server(settings_for(tmp_path / "b"))
    store = srv.app.state.svc.store
    real = store._listing_meta

    def broken(entry):
        raise RuntimeError("internal detail that must not leak")

    store._listing_meta = broken
    x = digit_images[:4]
    with srv.client(timeout=30) as c:
        r = c.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": "s"})
        assert r.status_code == 507 and r.json()["error"]["code"] == "snapshot_write_failed", r.text
        assert "internal detail" not in r.text
        store._listing_meta = real
        r = c.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": "s"})
        assert r.status_code == 200 and r.json()["step"] == 1, r.text  # the refused step was not kept


def test_a_split_group_of_which_a_subclass_wrote_a_subset_answers_every_stream(live_server, tmp_path, digit_images,
                                                                               monkeypatch):
    """The Ray shard's ``_write_files`` writes only the streams it still owns; when such a subset's group splits
    at a rename, the split is matched to the streams by id: the renamed stream is answered 200, the others 507,
    none is left waiting (the sizes were zipped by position)."""
    import mgg_core.io as mio

    srv = live_server(settings_for(tmp_path / "s"))
    store = srv.app.state.svc.store
    real_write, real_replace, snapshots = store._write_files, os.replace, []

    def subset(items):  # as service/rayserve/shard.py: the first stream "moved", its write is skipped
        sizes = real_write(items[1:])
        return [items[0][3], *sizes]

    def replace(src, dst):  # the subset's second snapshot rename fails
        if Path(dst).suffix == ".safetensors" and Path(dst).stem in sids:
            snapshots.append(Path(dst).stem)
            if len(snapshots) == 2:
                raise OSError(5, "I/O error (injected)")
        return real_replace(src, dst)

    sids = ["a", "b", "c", "d"]
    store._write_files = subset
    monkeypatch.setattr(mio.os, "replace", replace)
    results = fused_group(srv, sids, digit_images[:4])
    monkeypatch.setattr(mio.os, "replace", real_replace)
    codes = {sid: results[sid].status_code for sid in sids}
    assert [sid for sid in sids if codes[sid] == 200] == [snapshots[0]], codes
    assert all(codes[sid] == 507 for sid in sids if sid != snapshots[0]), codes
