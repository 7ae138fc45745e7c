"""The Open Inference Protocol's encodings (serving/inference_protocol.py) and scopes, in process; each
guarantee is a check that its mutant (tests/mutants/inference_protocol.py) must make fail. The served
routes and real clients: tests/integration/test_service_oip.py."""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import pytest
from PIL import Image

from pipelines.types import Box, Detection
from serving import inference_protocol as oip
from serving.gateway import scopes
from serving.imaging import RequestRejected
from tests.fixtures import images
from tests.mutants import inference_protocol as mutants

SIZE = 32


def _binary(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def check_bytes_elements_round_trip() -> None:
    items = [images.jpeg(20, 10, seed=1), b"", images.png(7, 9, seed=2)]
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                          "parameters": {"binary_data_size": len(_binary(items))}}]}
    assert oip._images(header["inputs"], _binary(items), SIZE, 8) == items
    as_json = [{"name": "image", "datatype": "BYTES", "shape": [3, 1],
                "data": [[base64.b64encode(i).decode()] for i in items]}]
    assert oip._images(as_json, b"", SIZE, 8) == items


def check_pixels_become_the_same_8_bit_image() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    tensor = (pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255).astype("<f4")
    header = [{"name": "pixels", "datatype": "FP32", "shape": list(tensor.shape),
               "parameters": {"binary_data_size": tensor.nbytes}}]
    pngs = oip._images(header, tensor.tobytes(), SIZE, 8)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs])
    assert np.array_equal(decoded, pixels)


def check_detections_rows_are_boxes_confidence_class() -> None:
    dets = [[Detection(Box(1.5, 2.0, 30.25, 40.0), 2, 0.75, 0.5), Detection(Box(0, 0, 5, 5), 0, 0.5, 0.25)], []]
    out = oip._detection_tensors(dets)
    assert out["num_detections"].tolist() == [2, 0] and out["detections"].dtype == np.float32
    assert out["detections"].shape == (2, 2, 6)
    assert out["detections"][0].tolist() == [[1.5, 2.0, 30.25, 40.0, 0.75, 2.0], [0, 0, 5, 5, 0.5, 0]]
    assert not out["detections"][1].any()  # padding


def check_v2_scopes() -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert scopes.is_public(path), path
    for method, path in (("GET", "/v2"), ("GET", "/v2/models/m"), ("GET", "/v2/models/m/versions/3/ready"),
                         ("POST", "/v2/models/m/infer"), ("POST", "/v2/models/m/versions/3/infer")):
        assert not scopes.is_public(path) and scopes.required_scope(method, path) == "detect", path


CHECKS: dict[str, tuple[Callable[[], None], Callable[[], AbstractContextManager[None]]]] = {
    "bytes": (check_bytes_elements_round_trip, mutants.bytes_lengths_big_endian),
    "pixels": (check_pixels_become_the_same_8_bit_image, mutants.pixels_channels_swapped),
    "detections": (check_detections_rows_are_boxes_confidence_class, mutants.detections_columns_swapped),
    "scopes": (check_v2_scopes, mutants.v2_health_behind_a_key),
    "infer_scope": (check_v2_scopes, mutants.v2_infer_public),
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_guarantee_holds(name: str) -> None:
    CHECKS[name][0]()


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_guarantee_fails_with_its_mutant(name: str) -> None:
    check, mutant = CHECKS[name]
    with mutant(), pytest.raises(AssertionError):
        check()


@pytest.mark.parametrize("inputs, binary, needle", [
    ([{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 9}}],
     _binary([b"abcde"]), "1 elements in the binary data, the shape says 2"),
    ([{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}],
     struct.pack("<I", 100) + b"abcd", "runs past the binary data"),
    ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}], b"", "not valid base64"),
    ([{"name": "pixels", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE], "data": [2.0] * (3 * SIZE * SIZE)}],
     b"", "within [0, 1]"),
    ([{"name": "pixels", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE], "data": [0.5] * 5}], b"", "5 values"),
    ([{"name": "image", "datatype": "BYTES", "shape": [1]}], b"", "no data"),
    ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}], b"xx", "no binary_data_size"),
])
def test_bad_tensors_name_the_problem(inputs: list, binary: bytes, needle: str) -> None:
    with pytest.raises(RequestRejected) as err:
        oip._images(inputs, binary, SIZE, 8)
    assert err.value.status == 400 and needle in err.value.detail, err.value.detail


def test_request_parameters_and_outputs() -> None:
    assert oip._parameters({"conf": 0.5, "max_det": 3, "binary_data_output": True}) == {
        "conf": 0.5, "max_det": 3, "binary_data_output": True}
    for bad in ({"conf": "high"}, {"max_det": 2.5}, {"iou": True}, {"confidence": 0.1}, {"conf": float("nan")}):
        with pytest.raises(RequestRejected):
            oip._parameters(bad)
    assert oip._outputs(None, True) == [("detections", True), ("num_detections", True)]
    assert oip._outputs([{"name": "num_detections", "parameters": {"binary_data": False}}], True) == [
        ("num_detections", False)]
    header, binary = oip._split(b'{"inputs": []}XYZ', "14")
    assert header == {"inputs": []} and binary == b"XYZ"
    with pytest.raises(RequestRejected):
        oip._split(json.dumps({"inputs": []}).encode(), "999")
