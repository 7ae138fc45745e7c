"""Draw detections on an image with OpenCV's built-in Hershey font (nothing to download)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from pipelines.types import Detection


def _colour(class_id: int) -> tuple[int, int, int]:
    """A stable, well-separated colour per class (golden-ratio hue steps), as RGB."""
    hue = int((class_id * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 220, 255]]])
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


def draw_detections(rgb: np.ndarray, detections: Sequence[Detection], class_names: Sequence[str]) -> np.ndarray:
    """A copy of `rgb` with each box outlined and labelled `<class> <confidence>`; line width and text
    size follow the image size so labels stay legible on small and large images."""
    out = np.ascontiguousarray(rgb.copy())
    h, w = out.shape[:2]
    thickness = max(1, round(min(h, w) / 300))
    scale = max(0.3, min(h, w) / 900)
    for det in detections:
        colour = _colour(det.class_id)
        x1, y1, x2, y2 = (int(round(v)) for v in (det.box.x1, det.box.y1, det.box.x2, det.box.y2))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        name = class_names[det.class_id] if 0 <= det.class_id < len(class_names) else str(det.class_id)
        label = f"{name} {det.confidence:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = y1 - th - base if y1 - th - base >= 0 else y1  # inside the box when there is no room above
        cv2.rectangle(out, (x1, top), (x1 + tw, top + th + base), colour, -1)
        cv2.putText(out, label, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """RGB array -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode the rendered image as JPEG")
    return buf.tobytes()
