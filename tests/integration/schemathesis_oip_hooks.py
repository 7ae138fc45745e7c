"""Schemathesis hooks for the Open Inference Protocol test (tests/integration/test_service_oip.py,
SCHEMATHESIS_HOOKS=tests.integration.schemathesis_oip_hooks): random model names only ever reach the
404, so about half the cases name the served model and version (DETOPS_OIP_MODEL, DETOPS_OIP_VERSION)
and half the inference requests carry a real image as a BYTES tensor, so that the fuzzer reaches
decoding and inference too."""

from __future__ import annotations

import base64
import hashlib
import os

import schemathesis

from tests.fixtures import images

IMAGE = base64.b64encode(images.jpeg(80, 60, seed=7)).decode()


def _coin(seed: object, byte: int) -> bool:
    return hashlib.sha256(repr(seed).encode()).digest()[byte] % 2 == 0


@schemathesis.hook
def before_call(context, case, kwargs):  # noqa: ANN001, ANN201 (schemathesis' hook signature)
    params = case.path_parameters
    if params and _coin(params, 0):
        if "MODEL_NAME" in params:
            params["MODEL_NAME"] = os.environ["DETOPS_OIP_MODEL"]
        if "MODEL_VERSION" in params:
            params["MODEL_VERSION"] = os.environ["DETOPS_OIP_VERSION"]
    body = case.body
    if isinstance(body, dict) and _coin(body, 1):
        body["inputs"] = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [IMAGE]}]
