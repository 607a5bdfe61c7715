"""1-image requests through HTTP: every method on both bundled models answers 200 under the default settings."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import npy_bytes

from service.settings import ServiceSettings

METHODS = ["noadapt", "bn", "tent", "eata", "sar", "deyo", "foa"]


@pytest.mark.parametrize("model", ["resnet", "vit"])
@pytest.mark.parametrize("method", METHODS)
def test_one_image_requests_answer_200(live_server, tmp_path, digit_images, model, method):
    settings = ServiceSettings(_env_file=None, model=model, method=method, device="cpu", torch_threads=1,
                               snapshot_dir=tmp_path / "snap", log_level="warning")
    assert settings.update_images > 1 and settings.bn_stats == "ema"     # the small-batch defaults
    assert settings.bn_momentum_shallow is not None and settings.bn_momentum_shallow > settings.bn_momentum
    srv = live_server(settings)
    with srv.client() as c:
        bodies = []
        for i in range(4):
            r = c.post("/predict", content=npy_bytes(digit_images[i:i + 1]),
                       headers={"Content-Type": "application/x-npy", "X-Stream-Id": "one"})
            assert r.status_code == 200, r.text
            bodies.append(r.json())
        assert all(len(b["predictions"]) == 1 for b in bodies)
        assert all(np.isfinite(b["batch_entropy"]) for b in bodies)
        info = c.get("/streams/one").json()
        assert info["requests"] == 4 and info["bytes"] > 0


def test_confident_source_guard_settings_reach_the_engine_and_are_bounded():
    from pydantic import ValidationError

    from mgg_core.methods import build_method
    from service.runtime import engine_config

    for bad in ({"guard_confident_entropy": 0.0}, {"guard_confident_entropy": 1.01},
                {"guard_confident_entropy_gap": -0.01}, {"guard_confident_entropy_gap": 1.01}):
        with pytest.raises(ValidationError, match="guard_confident_entropy"):
            ServiceSettings(_env_file=None, **bad)
    for value in (None, 1.0):          # the limits that are allowed: off, and the loosest entropy
        s = ServiceSettings(_env_file=None, guard_confident_entropy=value, guard_confident_entropy_gap=0.0)
        cfg = engine_config(s, build_method(s.method, 10), "cpu", None).guard
        assert cfg.confident_entropy == value and cfg.confident_entropy_gap == 0.0
