"""Drive a detops service with Open Inference Protocol clients nobody here wrote: `tritonclient.http`
(binary tensor data and JSON modes) and kserve's `InferenceRESTClient`; print what they got as JSON.

Runs with the python of the clients' own venv (`.venv-oip-clients`, requirements-oip-clients.lock:
their pins conflict with the project's lock), so it imports nothing from detops. Used by
tests/integration/test_service_oip.py and tests/integration/test_deploy.py:

    .venv-oip-clients/bin/python tests/oip_clients.py URL MODEL VERSION IMAGE... [--header K:V] [--only triton]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys

import numpy as np


def _detections(detections: np.ndarray, counts: np.ndarray) -> list[list[list[float]]]:
    """Per image, its rows (x1, y1, x2, y2, confidence, class_id) as float lists, padding dropped."""
    return [detections[i, :int(n)].astype(float).tolist() for i, n in enumerate(counts)]


def triton(url: str, model: str, version: str, images: list[bytes], headers: dict[str, str],
           params: dict[str, object]) -> dict[str, object]:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url.removeprefix("http://"), connection_timeout=120,
                                              network_timeout=120)
    out: dict[str, object] = {
        "live": client.is_server_live(headers=headers), "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(model, headers=headers),
        "version_ready": client.is_model_ready(model, version, headers=headers),
        "metadata": client.get_model_metadata(model, headers=headers),
        "server": client.get_server_metadata(headers=headers)}
    # Binary tensor data (tritonclient's default): raw image bytes in, binary outputs back.
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    # A fresh dict per call: tritonclient writes Inference-Header-Content-Length into the one it is given.
    result = client.infer(model, [tensor], model_version=version, headers=dict(headers), parameters=params)
    out["binary"] = _detections(result.as_numpy("detections"), result.as_numpy("num_detections"))
    # JSON tensors: BYTES elements as base64 text, outputs asked for as JSON.
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=np.object_), binary_data=False)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in ("detections", "num_detections")]
    result = client.infer(model, [tensor], outputs=outputs, headers=dict(headers), parameters=params)
    out["json"] = _detections(result.as_numpy("detections"), result.as_numpy("num_detections"))
    out["json_response"] = result.get_response()
    out["unknown_version_ready"] = client.is_model_ready(model, "no-such-version", headers=headers)
    try:
        client.get_model_metadata("no-such-model", headers=headers)
        out["unknown_model"] = "no error"
    except InferenceServerException as exc:
        out["unknown_model"] = {"status": exc.status(), "message": exc.message()}
    client.close()
    return out


async def kserve(url: str, model: str, version: str, images: list[bytes], headers: dict[str, str],
                 params: dict[str, object]) -> dict[str, object]:
    sys.argv = sys.argv[:1]  # importing kserve parses the command line as its model server's (abbreviations too)
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=120))
    try:
        out: dict[str, object] = {
            "live": await client.is_server_live(url, headers=headers),
            "ready": await client.is_server_ready(url, headers=headers),
            "model_ready": await client.is_model_ready(url, model, headers=headers)}
        tensor = InferInput("image", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
        response = await client.infer(url, InferRequest(model, [tensor], parameters=params),
                                      model_name=model, headers=dict(headers))
        outputs = {o.name: o.as_numpy() for o in response.outputs}
        out["binary"] = _detections(outputs["detections"], outputs["num_detections"])
    finally:
        await client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("version")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--header", action="append", default=[], help="K:V, sent with every request")
    parser.add_argument("--conf", type=float, default=None)
    parser.add_argument("--only", choices=("triton", "kserve"), default=None)
    args = parser.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    images = [open(path, "rb").read() for path in args.images]
    params = {} if args.conf is None else {"conf": args.conf}
    report: dict[str, object] = {}
    if args.only in (None, "triton"):
        report["triton"] = triton(args.url, args.model, args.version, images, headers, params)
    if args.only in (None, "kserve"):
        report["kserve"] = asyncio.run(kserve(args.url, args.model, args.version, images, headers, params))
    json.dump(report, sys.stdout, default=str)


if __name__ == "__main__":
    main()
