"""scripts/summary.py and scripts/round2_tables.py with round-2 stream variants (issue 14).

A variant folder ``r2_<kind>_<policy>-<variant>_<part>`` is a setting of its own: the i.i.d. setting's rows stay
exactly what they are without it and come first; a batch-size sweep folder gives one setting per ``batch_<B>``.
Built from committed bench folders copied into a temporary root (no bench run).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
sys.path.insert(0, str(REPO / "scripts"))

summary = pytest.importorskip("summary")
round2_tables = pytest.importorskip("round2_tables")

IID = "r2_resnet_continual_g1"
VARIANT = "r2_resnet_continual-dirichlet0.1_all"


def _copy(root: Path, name: str, dest: str | None = None) -> Path:
    out = root / (dest or name)
    out.mkdir(parents=True)
    shutil.copy(RESULTS / name / "results.json", out / "results.json")
    return out


def _rows(root: Path, tmp: Path) -> dict:
    out = tmp / f"summary_{root.name}.json"
    summary.main([str(root), "--out", str(out)])
    return json.loads(out.read_text())


def test_variant_folder_is_its_own_setting_and_leaves_iid_rows_unchanged(tmp_path):
    if not (RESULTS / VARIANT / "results.json").is_file():
        pytest.skip("variant folder not committed")
    alone, both = tmp_path / "alone", tmp_path / "both"
    _copy(alone, IID)
    _copy(both, IID)
    _copy(both, VARIANT)
    a, b = _rows(alone, tmp_path), _rows(both, tmp_path)
    assert b["rows"][:len(a["rows"])] == a["rows"]           # i.i.d. rows identical and first
    assert list(b["folders"]) == ["resnet_continual", "resnet_continual-dirichlet0.1"]
    var = b["rows"][len(a["rows"]):]
    res = json.loads((RESULTS / VARIANT / "results.json").read_text())
    assert {r["method"] for r in var} == set(res["results"])
    for r in var:
        assert r["protocol"] == "resnet_continual-dirichlet0.1"
        assert r["variant"] == "dirichlet0.1" and r["label_shift"] == 0.1
        want = np.mean([d["accuracy"] for d in res["results"][r["method"]]])
        assert r["mean_online_accuracy"] == pytest.approx(round(float(want), 2))
    assert all("variant" not in r and "label_shift" not in r for r in b["rows"][:len(a["rows"])])


def test_batch_size_sweep_folder_gives_one_setting_per_size(tmp_path):
    root = tmp_path / "r"
    sweep = root / "r2_resnet_reset-batch64-4_all"
    for bs in (64, 4):
        d = _copy(root, "r2_resnet_reset_g1", f"r2_resnet_reset-batch64-4_all/batch_{bs}")
        res = json.loads((d / "results.json").read_text())
        res["protocol"]["batch_size"] = bs
        (d / "results.json").write_text(json.dumps(res))
    (sweep / "batch_size_sweep.json").write_text("{}")
    settings = summary.load_settings(root)
    assert sorted(settings) == [("resnet", "reset-batch64-4-b4"), ("resnet", "reset-batch64-4-b64")]
    rows = summary.rows_of("resnet", "reset-batch64-4-b4", settings[("resnet", "reset-batch64-4-b4")])
    assert {r["batch_size"] for r in rows} == {4} and {r["variant"] for r in rows} == {"batch64-4-b4"}
    assert round2_tables.variant_title("resnet", "reset-batch64-4-b64") == "ResNet, reset per domain, batch 64"
    assert (round2_tables.variant_title("vit", "continual-dirichlet0.1")
            == "ViT, continual, Dirichlet(0.1) label shift")
