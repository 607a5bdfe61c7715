"""ServiceMetrics.child: the cached labelled children of the per-request metrics count exactly what labels() would."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.metrics import ServiceMetrics


def samples(m: ServiceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = m.render()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_child_is_labels_cached_and_counts_exactly():
    m = ServiceMetrics()
    a = m.child(m.http_requests, "POST", "/predict", "200")
    assert a is m.child(m.http_requests, "POST", "/predict", "200")  # looked up once
    assert a is m.http_requests.labels(method="POST", route="/predict", status="200")  # prometheus_client's child
    assert m.child(m.http_requests, "POST", "/predict", "429") is not a
    for _ in range(3):
        m.child(m.http_requests, "POST", "/predict", "200").inc()
    m.child(m.http_requests, "POST", "/predict", "429").inc()
    m.http_requests.labels(method="POST", route="/predict", status="200").inc()  # the uncached path: same series
    got = samples(m)
    key = (("method", "POST"), ("route", "/predict"))
    assert got[("tta_http_requests_total", (*key, ("status", "200")))] == 4
    assert got[("tta_http_requests_total", (*key, ("status", "429")))] == 1
    # the same label values on another metric are another child
    assert m.child(m.http_duration, "POST", "/predict", "200") is not a
    m.observe_phase("decode", 0.25)
    m.observe_phase("decode", -1.0)  # clamped at 0
    got = samples(m)
    assert got[("tta_phase_duration_seconds_count", (("phase", "decode"),))] == 2
    assert got[("tta_phase_duration_seconds_sum", (("phase", "decode"),))] == 0.25
