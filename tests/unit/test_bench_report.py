"""`make bench` reports the median of its quiet runs, field by field."""

from __future__ import annotations

from tests.bench.serving_bench import median_record


def test_the_median_of_each_figure_and_the_rest_as_it_is() -> None:
    runs = [{"imgsz": 160, "precision": "int8", "served_images_per_s": 200.0, "served_over_naive": None, "raw": {"a": 1}},
            {"imgsz": 160, "precision": "int8", "served_images_per_s": 150.0, "served_over_naive": 3.0, "raw": {}},
            {"imgsz": 160, "precision": "int8", "served_images_per_s": 240.0, "served_over_naive": 2.0, "raw": {}}]
    assert median_record(runs) == {"imgsz": 160, "precision": "int8", "served_images_per_s": 200.0,
                                   "served_over_naive": 2.5}
