"""Observability end to end: real service processes, a real Prometheus scraping them, and every PromQL
expression of the Grafana dashboard and of the alert/recording rules evaluated against what was scraped.

Prometheus and promtool come from the Debian package `prometheus` (.ci/install_prometheus.sh). Without them the
Prometheus tests skip, except under CI (CI env var set), where they must run. The compose file is validated with
docker-compose v1 (Debian `docker-compose`, installed by the same script) under the same rule.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

import mgg_replay as rp

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tta.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
COMPOSE = REPO / "docker-compose.yml"

ADAPT_JOB, BASELINE_JOB = "mgg-tta", "mgg-tta-baseline"
# Grafana variables -> what they stand for here ($job "All" = both service jobs; windows cover the whole test)
GRAFANA_VARS = {"$__rate_interval": "2m", "$__interval": "5s", "$__range": "5m", "$job": f"{ADAPT_JOB}|{BASELINE_JOB}"}
COMPARISON = re.compile(
    r"^(?P<lhs>.+?)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<threshold>-?[0-9.]+(?:e[+-]?[0-9]+)?)\s*$", re.S
)

pytestmark = pytest.mark.timeout(300)
WARMUP_IMAGES = 4


def _need_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} not found under CI: .ci/install_prometheus.sh should have installed it")
    pytest.skip(f"{name} not installed (run .ci/install_prometheus.sh); required when CI is set")


def test_model() -> str:
    """Model for the service processes: the bundled MNIST-5k ResNet unless MGG_REPLAY_TEST_MODEL says otherwise."""
    return os.environ.get("MGG_REPLAY_TEST_MODEL", "resnet")


test_model.__test__ = False  # a helper, not a test


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return out


def _substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def _rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _alert_lhs(expr: str) -> str:
    m = COMPARISON.match(expr.strip())
    assert m, f"alert expression must end with `<op> <number>` (threshold last): {expr!r}"
    return m.group("lhs")


# ------------------------------------------------------------------------------------------ static checks


def test_alert_rules_are_complete_and_threshold_last():
    rules = _rules()
    alerts = [r for r in rules if "alert" in r]
    names = {r["alert"] for r in alerts}
    # the four families the deployment promises
    assert {"TTAEntropyDrift", "TTAEntropyHigh"} <= names
    assert {"TTARollback", "TTACollapseRepeated"} <= names
    assert "TTAHighErrorRate" in names and "TTAHighP99Latency" in names
    for r in alerts:
        assert "for" in r, r["alert"]
        assert r["labels"]["severity"] in {"info", "warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        anchor = r["annotations"]["runbook"].split("#", 1)[1]
        assert f'<a id="{anchor}"></a>' in (REPO / "docs" / "deploy.md").read_text(), f"no runbook for {r['alert']}"
        lhs = _alert_lhs(r["expr"])
        assert lhs.strip(), r["alert"]
    for r in rules:  # never a per-stream label, never the baseline job
        assert "stream" not in r["expr"]
        assert 'job="mgg-tta"' in r["expr"] or r["expr"].startswith("tta:"), r.get("alert", r.get("record"))


def test_dashboard_and_provisioning_are_consistent():
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["uid"] == "prometheus"
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
    titles = [p["title"] for p in dash["panels"]]
    for wanted in ("Batch entropy over time", "Adaptation steps and skips", "Rollbacks and resets",
                   "/predict latency quantiles", "Throughput", "Active streams", "Adapting state in memory"):
        assert any(t.startswith(wanted) for t in titles), wanted
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == ds["uid"], p["title"]
    exprs = _dashboard_exprs()
    assert len(exprs) >= 15
    metrics = " ".join(e for _, e in exprs)
    for name in ("tta_batch_entropy_ratio", "tta_adaptation_steps_total", "tta_adaptation_skipped_total",
                 "tta_rollbacks_total", "tta_resets_total", "tta_http_request_duration_seconds_bucket",
                 "tta_images_total", "tta_streams_active", "tta_state_bytes", "tta_phase_duration_seconds"):
        assert name in metrics, name


def test_promtool_checks_config_and_rules():
    promtool = _need_tool("promtool")
    r = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in r.stdout + r.stderr


def test_promtool_alert_unit_tests_fire_and_stay_quiet():
    """deploy/prometheus/alerts_test.yml: synthetic series for which each alert must fire (and healthy ones for
    which none may)."""
    promtool = _need_tool("promtool")
    r = subprocess.run([promtool, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True,
                       cwd=ALERTS_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERTS_TEST.read_text()))
    assert tested >= {r["alert"] for r in _rules() if "alert" in r}, "every alert needs a firing unit test"


def test_compose_file_validates_with_docker_compose():
    compose = _need_tool("docker-compose")
    for extra in ([], ["--profile", "baseline"]):
        r = subprocess.run([compose, "-f", str(COMPOSE), *extra, "config"], capture_output=True, text=True,
                           cwd=REPO)
        assert r.returncode == 0, r.stdout + r.stderr
        cfg = yaml.safe_load(r.stdout)
        assert {"service", "prometheus", "grafana"} <= set(cfg["services"])
    assert "service-noadapt" in cfg["services"]
    assert cfg["services"]["service-noadapt"]["environment"]["MGG_METHOD"] == "noadapt"
    assert cfg["services"]["service"]["build"]["dockerfile"].endswith("deploy/Dockerfile")
    mounts = " ".join(str(v) for s in cfg["services"].values() for v in s.get("volumes", []))
    for path in (PROM_CONFIG, ALERTS, DEPLOY / "grafana" / "provisioning", DEPLOY / "grafana" / "dashboards"):
        assert str(path) in mounts, path
        assert path.exists()


# ------------------------------------------------------------------------------------------ live Prometheus


class Prometheus:
    def __init__(self, binary: str, config: Path, storage: Path, port: int, log: Path) -> None:
        cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={storage}",
               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", "--web.enable-lifecycle"]
        self.server = rp.ServerProcess(cmd, port=port, ready_timeout=60, log_path=log, ready_path="/-/ready").start()
        self.url = self.server.url

    def query(self, expr: str) -> list[dict]:
        r = httpx.post(self.url + "/api/v1/query", data={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def close(self) -> None:
        self.server.stop()


def _finite_values(result: list[dict]) -> list[float]:
    vals = [float(s["value"][1]) for s in result if "value" in s]
    return [v for v in vals if math.isfinite(v)]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    prometheus = _need_tool("prometheus")
    tmp = tmp_path_factory.mktemp("obs")
    model = test_model()
    env = {"MGG_MODEL": model, "MGG_METHOD": "tent", "MGG_OPTIMIZER": "sgd", "MGG_DEVICE": "cpu",
           "MGG_IDLE_CHECK_SECONDS": "1",
           # one update per request (the scraped step count is compared with the replay's adapted batches)
           "MGG_UPDATE_IMAGES": "1", "MGG_BN_STATS": "batch", "MGG_GUARD_CHECK_SHARE": "0"}
    adapt = rp.LocalServer({**env, "MGG_SNAPSHOT_DIR": str(tmp / "snap-a")}, log_path=tmp / "adapt.log")
    base = rp.LocalServer({**env, "MGG_METHOD": "noadapt", "MGG_SNAPSHOT_DIR": str(tmp / "snap-b")},
                          log_path=tmp / "baseline.log")
    with adapt, base:
        # one /predict per server before the first scrape: the per-route/status series then exist with a
        # pre-replay value (Prometheus' rate() cannot see the increase of a series first scraped at its end)
        for server in (adapt, base):
            warm = np.random.default_rng(0).integers(0, 256, size=(WARMUP_IMAGES, 28, 28), dtype=np.uint8)
            body, headers = rp.encode_npy(warm)
            r = httpx.post(server.url + "/predict", content=body, headers={**headers, "X-Stream-Id": "obs-warmup"})
            assert r.status_code == 200, r.text
        # the deployment's own config, pointed at the test's processes, scraping every second
        cfg = yaml.safe_load(PROM_CONFIG.read_text())
        prom_port = rp.free_port()
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        targets = {ADAPT_JOB: adapt.url, BASELINE_JOB: base.url, "prometheus": f"http://127.0.0.1:{prom_port}"}
        for sc in cfg["scrape_configs"]:
            sc["scrape_timeout"] = "1s"
            sc["static_configs"][0]["targets"] = [targets.pop(sc["job_name"]).split("://", 1)[1]]
        assert not targets, f"deploy/prometheus/prometheus.yml lacks the jobs {sorted(targets)}"
        rules = yaml.safe_load(ALERTS.read_text())
        for g in rules["groups"]:
            g["interval"] = "1s"
        (tmp / "alerts.yml").write_text(yaml.safe_dump(rules))
        cfg["rule_files"] = [str(tmp / "alerts.yml")]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        prom = Prometheus(prometheus, tmp / "prometheus.yml", tmp / "tsdb", prom_port, tmp / "prometheus.log")
        try:
            # Prometheus applies targets a few seconds after it is ready: the counters must be scraped at
            # their pre-replay values first, or rate() over the replay sees one flat sample
            deadline = time.monotonic() + 60
            while len(_finite_values(prom.query('up{job=~"mgg-tta.*"} == 1'))) < 2:
                assert time.monotonic() < deadline, "prometheus never scraped both services"
                time.sleep(0.5)
            time.sleep(1.5)
            common = ["--streams", "2", "--images-per-domain", "64", "--batch-size", "32",
                      "--corruptions", "gaussian_noise,fog,pixelate", "--no-progress", "--stream-prefix", "obs"]
            args = rp.add_parser(_subparsers()).parse_args(
                ["--url", adapt.url, "--out", str(tmp / "out"), "--reset-each-domain", *common])
            assert rp.main(args) == 0
            args = rp.add_parser(_subparsers()).parse_args(
                ["--url", adapt.url, "--baseline", "--baseline-url", base.url, "--out", str(tmp / "out"), *common])
            assert rp.main(args) == 0
            # a client error, so that request counters carry more than one status
            httpx.post(adapt.url + "/predict", content=b"nope", headers={"Content-Type": "text/plain"})
            expected = 2 * 3 * 64 + WARMUP_IMAGES
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # scraped the final counters, and the recording rules ran since
                res = prom.query(f'sum(tta_images_total{{job="{ADAPT_JOB}"}})')
                if _finite_values(res) == [expected] and prom.query("tta:batch_entropy_ratio:mean5m"):
                    break
                time.sleep(0.5)
            else:
                pytest.fail(f"prometheus never saw {expected} images: {res}")
            time.sleep(2.5)  # a few more scrapes and rule evaluations on top
            yield prom, tmp
        finally:
            prom.close()


def _subparsers():
    import argparse

    return argparse.ArgumentParser().add_subparsers()


def test_every_dashboard_query_returns_data(live):
    prom, _ = live
    exprs = _dashboard_exprs()
    empty, nan_only = [], []
    for title, expr in exprs:
        result = prom.query(_substitute(expr))
        if not result:
            empty.append((title, expr))
        elif not _finite_values(result):
            nan_only.append((title, expr, result))
    assert not empty, f"dashboard queries without data: {empty}"
    assert not nan_only, f"dashboard queries with only NaN: {nan_only}"


def test_every_rule_expression_returns_data(live):
    prom, _ = live
    problems = []
    for rule in _rules():
        expr = rule["expr"] if "record" in rule else _alert_lhs(rule["expr"])
        result = prom.query(expr)
        if not _finite_values(result):
            problems.append((rule.get("record") or rule["alert"], expr, result))
    assert not problems, problems


def test_rules_load_and_evaluate_cleanly_and_healthy_service_fires_nothing(live):
    prom, _ = live
    body = httpx.get(prom.url + "/api/v1/rules", timeout=10).json()
    loaded = [r for g in body["data"]["groups"] for r in g["rules"]]
    assert len(loaded) == len(_rules())
    bad = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not bad, bad
    # a short healthy run: none of the alerts may be pending or firing
    active = [a for a in httpx.get(prom.url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]]
    assert not active, active


def test_scraped_numbers_match_the_replay(live):
    """The counters Prometheus scraped agree with what the replay client sent and saw."""
    prom, tmp = live
    adapt = json.loads((tmp / "out" / "replay.json").read_text())
    base = json.loads((tmp / "out" / "baseline.json").read_text())
    s = adapt["summary"]
    images = _finite_values(prom.query(f'sum(tta_images_total{{job="{ADAPT_JOB}"}})'))
    assert images == [s["images_answered"] + WARMUP_IMAGES]
    steps = _finite_values(prom.query(f'sum(tta_adaptation_steps_total{{job="{ADAPT_JOB}"}})'))
    assert steps == [s["adapted_batches"] + 1]
    ok_predicts = prom.query(f'sum(tta_http_requests_total{{job="{ADAPT_JOB}",route="/predict",status="200"}})')
    assert _finite_values(ok_predicts) == [s["requests_ok"] + 1]
    assert _finite_values(prom.query(f'sum(tta_http_requests_total{{job="{ADAPT_JOB}",status="415"}})')) == [1]
    # --reset-each-domain: each stream was reset at each of its 2 domain changes
    resets = _finite_values(prom.query(f'sum(tta_resets_total{{job="{ADAPT_JOB}"}})'))
    assert resets == [2 * 2] == [sum(1 for r in adapt["resets"] if r["reason"].startswith("domain:"))]
    # the baseline server never adapted: every batch was skipped
    b = base["summary"]
    skipped = _finite_values(prom.query(f'sum(tta_adaptation_skipped_total{{job="{BASELINE_JOB}"}})'))
    assert skipped == [b["requests_ok"] + 1] and b["adapted_batches"] == 0
