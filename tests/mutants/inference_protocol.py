"""Open Inference Protocol mutants (serving/inference_protocol.py, serving/gateway/scopes.py), broken
one at a time:

- `bytes_lengths_big_endian`: a BYTES tensor's element lengths read big-endian (the protocol and
  tritonclient write them little-endian);
- `pixels_channels_swapped`: an FP32 `pixels` tensor turned into its 8-bit image with R and B swapped
  (OpenCV's BGR order forgotten), so the model sees other colours than the client sent;
- `detections_columns_swapped`: the `detections` rows written as (..., class_id, confidence);
- `v2_health_behind_a_key`: `/v2/health/*` not public (Kubernetes probes and load balancers get 401);
- `v2_infer_public`: `/v2/models/.../infer` public (anyone runs the model, outside every tenant's
  quota), patched where the gateway's middleware reads it too: installed in every process of a
  service (as tests/failing_service.py installs its fault), its infer answers without a key.

Expected to fail with them: the checks of tests/unit/test_inference_protocol.py named after each
guarantee (`check_bytes_elements_round_trip`, `check_pixels_become_the_same_8_bit_image`,
`check_detections_rows_are_boxes_confidence_class`, `check_v2_scopes`); with `v2_infer_public` in
the service, tests/integration/test_access.py::test_401_403_and_both_key_headers.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np

from serving import inference_protocol as oip
from serving.gateway import middleware, scopes


@contextmanager
def bytes_lengths_big_endian() -> Iterator[None]:
    def unpack(buffer: bytes, count: int, name: str) -> list[bytes]:
        out, offset = [], 0
        while offset + 4 <= len(buffer):
            (length,) = struct.unpack_from(">I", buffer, offset)
            out.append(buffer[offset + 4:offset + 4 + length])
            offset += 4 + length
        return out

    with mock.patch.object(oip, "_unpack_bytes", unpack):
        yield


@contextmanager
def pixels_channels_swapped() -> Iterator[None]:
    def to_png(batch: np.ndarray) -> list[bytes]:
        import cv2

        pixels = np.rint(batch * 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return [cv2.imencode(".png", np.ascontiguousarray(image))[1].tobytes() for image in pixels]

    with mock.patch.object(oip, "_pixels_to_png", to_png):
        yield


@contextmanager
def detections_columns_swapped() -> Iterator[None]:
    real = oip._detection_tensors

    def tensors(per_image):  # noqa: ANN001, ANN202
        out = real(per_image)
        out[oip.DETECTIONS_OUTPUT] = out[oip.DETECTIONS_OUTPUT][..., [0, 1, 2, 3, 5, 4]]
        return out

    with mock.patch.object(oip, "_detection_tensors", tensors):
        yield


@contextmanager
def v2_health_behind_a_key() -> Iterator[None]:
    with mock.patch.object(scopes, "PUBLIC_PATHS", scopes.PUBLIC_PATHS - {"/v2/health/live", "/v2/health/ready"}):
        yield


@contextmanager
def v2_infer_public() -> Iterator[None]:
    real = scopes.is_public
    infer = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")

    def is_public(path: str) -> bool:
        return real(path) or infer.match(path) is not None

    with mock.patch.object(scopes, "is_public", is_public), mock.patch.object(middleware, "is_public", is_public):
        yield

