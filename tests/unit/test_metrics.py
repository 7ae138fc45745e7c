"""Request metrics are labelled by route, never by raw path (a series per job id grew every worker)."""

from __future__ import annotations

import pytest

from serving import inference_protocol
from serving.jobs import api as jobs_api
from serving.metrics import UNMATCHED, RouteLabels

LABELS = RouteLabels({"/detect", "/metrics"}, (jobs_api.app, inference_protocol.app), prefixes=("/static_content/",))


@pytest.mark.parametrize(("path", "label"), [
    ("/detect", "/detect"),
    ("/metrics", "/metrics"),
    ("/jobs", "/jobs"),
    ("/jobs/5f0c9a", "/jobs/{job_id}"),
    ("/jobs/5f0c9a/results", "/jobs/{job_id}/results"),
    ("/v2/health/ready", "/v2/health/ready"),
    ("/v2/models/detector/infer", "/v2/models/{name}/infer"),
    ("/v2/models/detector/versions/7/infer", "/v2/models/{name}/versions/{version}/infer"),
    ("/static_content/swagger-ui.css", "/static_content/{path}"),
    ("/wp-login.php", UNMATCHED),
    ("/detect/../etc/passwd", UNMATCHED),
])
def test_a_path_is_labelled_by_its_route(path: str, label: str) -> None:
    assert LABELS(path) == label


def test_labels_are_bounded_whatever_the_paths() -> None:
    paths = [f"/jobs/{i:032x}" for i in range(500)] + [f"/jobs/{i}/results" for i in range(500)] + \
            [f"/scan/{i}" for i in range(500)]
    assert {LABELS(p) for p in paths} == {"/jobs/{job_id}", "/jobs/{job_id}/results", UNMATCHED}
