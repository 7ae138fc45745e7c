"""Confusion matrix of the evaluate stage on a hand-built image."""

from __future__ import annotations

from evaluation.evaluate import confusion_matrix
from pipelines.types import Box, Detection

GT = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [0, 0, 10, 10], "area": 100,
                       "iscrowd": 0},
                      {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100,
                       "iscrowd": 0},
                      {"id": 3, "image_id": 1, "category_id": 1, "bbox": [80, 0, 10, 10], "area": 100,
                       "iscrowd": 0}],
      "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}


def test_confusion_counts_hits_confusions_false_positives_and_misses():
    dets = [Detection(Box(0, 0, 10, 10), 0, 0.9, 0.9),      # a as a
            Detection(Box(50, 50, 60, 61), 0, 0.8, 0.8),    # b as a (class-agnostic match)
            Detection(Box(20, 20, 30, 30), 1, 0.7, 0.7),    # background as b
            Detection(Box(80, 0, 90, 10), 1, 0.1, 0.1)]     # below the threshold: b missed
    m = confusion_matrix({1: dets}, GT, n_classes=2, conf=0.25)
    assert m.tolist() == [[1, 0, 0],
                          [1, 0, 1],
                          [0, 1, 0]]
