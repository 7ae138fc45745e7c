"""Synthetic Label Studio project: the offline default data source.

`synthesize(cfg)` writes into `cfg.out` what a Label Studio project with local-files storage would give:

- `images/<name>.jpg`: coloured shapes (one class per shape and colour) on textured backgrounds,
- `labeling_config.xml`: the project's labeling config (classes in `cfg.classes` order),
- `export.json`: the project's JSON export (tasks, annotations, regions in percent),
- `ground_truth.json`: the generator's exact boxes per image (also objects outside the label set),
- `messiness.json`: which tasks carry which deliberate Label Studio quirk.

Everything is a pure function of the config: the same seed gives byte-identical files. Each image draws
from its own random streams (seeded by `(seed, index)`), so the drift shifts `dark`,
`night`, `blur`, `gray` and `background` keep the objects of the unshifted image and change only what they are
meant to change.
See docs/synthetic.md.
"""

from __future__ import annotations

import itertools
import json
import math
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from xml.sax.saxutils import quoteattr

import cv2
import numpy as np

from pipelines.config.data import SynthesizeConfig
from pipelines.errors import DetopsError
from pipelines.types import Box

# --------------------------------------------------------------------------- catalogue
# Base colour of each shape as an OpenCV hue (0-180); every object jitters it. The default four classes
# have well separated hues; the extra shapes exist for custom class lists and the `unseen_class` shift.
SHAPE_HUES: dict[str, int] = {
    "square": 0,  # red
    "circle": 110,  # blue
    "triangle": 60,  # green
    "star": 24,  # orange-yellow
    "hexagon": 145,  # purple
    "cross": 88,  # cyan
}
# The shape the `unseen_class` shift adds: the first of these not in the label set.
UNSEEN_ORDER = ("hexagon", "cross", "star", "triangle", "circle", "square")

MESSINESS_CASES = ("second_annotator", "cancelled_annotation", "non_rectangle_region", "no_annotation",
                   "rotated_rectangle")

UPLOAD_PROJECT = 1  # the `<P>` of `/data/upload/<P>/<name>`: Label Studio's project id
UPLOAD_SHARE = 0.1  # share of tasks that reference an uploaded file instead of local-files storage
MIN_VISIBLE = 0.4  # objects less visible than this (occluded or outside the image) are not drawn
SIZE_RANGE = (0.06, 0.45)  # object extent as a share of the image's shorter side, in distribution
JPEG_QUALITY = 92  # of the written images
EXPORT_EPOCH = datetime(2024, 5, 6, 9, 0, 0, tzinfo=timezone.utc)  # fixed: timestamps are deterministic


@dataclass(frozen=True)
class TruthObject:
    """One drawn object: its class (shape) name, its tight axis-aligned box in pixels, whether the
    project's labels include it, and, for the rotated-rectangle case, the Label Studio rotation."""

    label: str
    box: Box
    in_label_set: bool
    rotation: float = 0.0


@dataclass(frozen=True)
class ImageTruth:
    """Ground truth of one image: its size and its objects in drawing order."""

    width: int
    height: int
    objects: list[TruthObject]


@dataclass
class SyntheticImage:
    """One rendered image (BGR uint8) with its ground truth and the geometry the export needs."""

    name: str
    image: np.ndarray
    truth: ImageTruth
    shapes: list[_Shape] = field(default_factory=list, repr=False)  # drawn geometry, as `truth.objects`


@dataclass(frozen=True)
class _Shape:
    label: str
    polygon: np.ndarray  # (N, 2) float pixel vertices
    bgr: tuple[int, int, int]
    in_label_set: bool
    rotation: float = 0.0  # degrees clockwise about the top-left corner (rotated rectangles only)
    half: tuple[float, float] = (0.0, 0.0)  # half sizes before rotation (rotated rectangles only)


# --------------------------------------------------------------------------- public API
def labeling_config_xml(classes: list[str]) -> str:
    """The Label Studio labeling config of the project: one RectangleLabels control, classes in order."""
    labels = "\n".join(
        f"    <Label value={quoteattr(name)} background={quoteattr(_hex(_base_bgr(name)))}/>" for name in classes
    )
    return (
        "<View>\n"
        '  <Image name="image" value="$image"/>\n'
        '  <RectangleLabels name="label" toName="image">\n'
        f"{labels}\n"
        "  </RectangleLabels>\n"
        "</View>\n"
    )


def synthesize(cfg: SynthesizeConfig) -> Path:
    """Write the synthetic project (images, labeling config, export, ground truth) into `cfg.out`."""
    from rich.console import Console
    from rich.progress import Progress

    _check(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DetopsError(f"synthesize.out: {out} exists and is not a folder")
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    plan = _messiness_plan(cfg)
    tasks, truths, written = [], {}, set()
    annotation_ids = itertools.count(1)
    with Progress(console=Console(stderr=True), transient=True) as progress:  # stdout stays clean
        job = progress.add_task(f"synthesizing {cfg.n_images} images", total=cfg.n_images)
        for index in range(cfg.n_images):
            sample = _render(cfg, index, plan)
            (images_dir / sample.name).write_bytes(jpeg_bytes(sample))
            written.add(sample.name)
            truths[sample.name] = sample.truth
            tasks.append(_task(cfg, index, sample, plan.get(index), annotation_ids))
            progress.advance(job)
    # A previous, larger run must not leave images that the export does not mention.
    for stale in images_dir.glob("*.jpg"):
        if stale.name not in written:
            stale.unlink()
    (out / "labeling_config.xml").write_text(labeling_config_xml(list(cfg.classes)))
    (out / "export.json").write_text(json.dumps(tasks, indent=2))
    (out / "ground_truth.json").write_text(json.dumps(_truth_json(cfg, truths), indent=1))
    messiness = {case: [] for case in MESSINESS_CASES}
    for index, case in sorted(plan.items()):
        messiness[case].append({"task": index + 1, "image": _name(cfg, index)})
    (out / "messiness.json").write_text(json.dumps(messiness, indent=2))
    return out


def render(cfg: SynthesizeConfig, index: int) -> SyntheticImage:
    """Render image `index` of the project `cfg` describes, without writing anything (for drift
    simulation and tests). Identical to the image `synthesize(cfg)` writes, before JPEG encoding."""
    _check(cfg)
    if not 0 <= index < cfg.n_images:
        raise DetopsError(f"image index {index} out of range 0..{cfg.n_images - 1}")
    return _render(cfg, index, _messiness_plan(cfg))


def jpeg_bytes(sample: SyntheticImage) -> bytes:
    """A rendered image as the JPEG file `synthesize` writes (clients re-rendering traffic send these)."""
    ok, encoded = cv2.imencode(".jpg", sample.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise DetopsError(f"could not encode image {sample.name} as JPEG")
    return encoded.tobytes()


def load_ground_truth(root: Path | str) -> dict[str, ImageTruth]:
    """The generator's ground truth of a synthesized project, by image file name (e.g. `img_00003.jpg`)."""
    path = Path(root) / "ground_truth.json"
    if not path.exists():
        raise DetopsError(f"{path}: no ground truth (not a synthesized project?)")
    try:
        spec = json.loads(path.read_text())
        return {
            name: ImageTruth(
                width=entry["width"],
                height=entry["height"],
                objects=[TruthObject(label=o["label"], box=Box(*o["box"]), in_label_set=o["in_label_set"],
                                     rotation=o.get("rotation", 0.0)) for o in entry["objects"]],
            )
            for name, entry in spec["images"].items()
        }
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DetopsError(f"{path}: malformed ground truth ({exc.__class__.__name__}: {exc})") from None


# --------------------------------------------------------------------------- plan and names
def _check(cfg: SynthesizeConfig) -> None:
    unknown = [c for c in cfg.classes if c not in SHAPE_HUES]
    if unknown:
        raise DetopsError(f"synthesize.classes: unknown shape(s) {unknown}; known: {sorted(SHAPE_HUES)}")
    if cfg.shift == "unseen_class" and _unseen_shape(cfg) is None:
        raise DetopsError("synthesize.shift: unseen_class needs a shape outside synthesize.classes")


def _unseen_shape(cfg: SynthesizeConfig) -> str | None:
    return next((s for s in UNSEEN_ORDER if s not in cfg.classes), None)


def _messiness_plan(cfg: SynthesizeConfig) -> dict[int, str]:
    """Image index -> messiness case: a few distinct tasks per case (one per 250 images, at least one)."""
    if not cfg.messy:
        return {}
    # A rotated rectangle needs the rectangle class.
    cases = [c for c in MESSINESS_CASES if c != "rotated_rectangle" or "square" in cfg.classes]
    per_case = max(1, cfg.n_images // 250)
    rng = np.random.default_rng([cfg.seed, 7919])
    count = min(cfg.n_images, per_case * len(cases))
    chosen = rng.choice(cfg.n_images, size=count, replace=False)
    return {int(i): cases[k // per_case] for k, i in enumerate(chosen)}


def _streams(cfg: SynthesizeConfig, index: int) -> dict[str, np.random.Generator]:
    # Independent streams per concern: a shift that re-draws one concern leaves the others unchanged.
    names = ("canvas", "size", "layout", "background", "clutter", "light", "noise", "shift", "export", "annotation")
    seqs = np.random.SeedSequence([cfg.seed, index]).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, seqs)}


@lru_cache(maxsize=8)
def _uploaded(seed: int, n_images: int) -> frozenset[int]:
    """The images referenced as uploaded files: UPLOAD_SHARE of them, at least one."""
    rng = np.random.default_rng([seed, 15485863])
    count = max(1, round(n_images * UPLOAD_SHARE))
    return frozenset(int(i) for i in rng.choice(n_images, size=count, replace=False))


def _name(cfg: SynthesizeConfig, index: int) -> str:
    if index in _uploaded(cfg.seed, cfg.n_images):
        # Label Studio prefixes uploaded files with 8 hex characters.
        return f"{_streams(cfg, index)['export'].integers(0, 16**8):08x}-img_{index:05d}.jpg"
    return f"img_{index:05d}.jpg"


# --------------------------------------------------------------------------- colours and geometry
def _hsv_to_bgr(h: float, s: float, v: float) -> tuple[int, int, int]:
    pixel = np.array([[[h % 180, s, v]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(pixel, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _base_bgr(shape: str) -> tuple[int, int, int]:
    return _hsv_to_bgr(SHAPE_HUES[shape], 220, 230)


def _hex(bgr: tuple[int, int, int]) -> str:
    b, g, r = bgr
    return f"#{r:02X}{g:02X}{b:02X}"


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices of the shape in [-1, 1]², centred at the origin, clockwise in image coordinates."""
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if shape == "cross":
        a = 0.34
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
                         [-1, a], [-1, -a], [-a, -a]], dtype=np.float64)
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    else:
        corners = {"circle": 72, "triangle": 3, "hexagon": 6}[shape]
        angles = -np.pi / 2 + np.arange(corners) * 2 * np.pi / corners
        radii = np.ones(corners)
    return np.stack([radii * _cos(angles), radii * _sin(angles)], axis=1)


def _cos(values: np.ndarray) -> np.ndarray:
    """Cosine by the C library, one value at a time: numpy's vectorised transcendental functions
    differ in the last bits between instruction sets (AVX2 vs AVX-512), the scalar libm does not."""
    return np.array([math.cos(float(v)) for v in np.ravel(values)], dtype=np.float64).reshape(np.shape(values))


def _sin(values: np.ndarray) -> np.ndarray:
    """Sine by the C library (see `_cos`)."""
    return np.array([math.sin(float(v)) for v in np.ravel(values)], dtype=np.float64).reshape(np.shape(values))


def _rotation(degrees: float) -> np.ndarray:
    # Image coordinates (y down): a positive angle turns clockwise on screen, as in Label Studio.
    t = math.radians(float(degrees))
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def _box(polygon: np.ndarray, width: int, height: int) -> Box:
    x1, y1 = polygon.min(axis=0)
    x2, y2 = polygon.max(axis=0)
    return Box(float(np.clip(x1, 0, width)), float(np.clip(y1, 0, height)),
               float(np.clip(x2, 0, width)), float(np.clip(y2, 0, height)))


def _fixed(polygon: np.ndarray) -> np.ndarray:
    # fillPoly with shift=4 takes 1/16-pixel fixed point: sub-pixel accurate edges. Pixel centres sit at
    # integer coordinates in OpenCV, so continuous coordinates move by half a pixel.
    return np.round((polygon - 0.5) * 16).astype(np.int32).reshape(-1, 1, 2)


# --------------------------------------------------------------------------- layout
def _layout(cfg: SynthesizeConfig, width: int, height: int, streams: dict[str, np.random.Generator],
            case: str | None) -> list[_Shape]:
    """The objects of one image, in drawing order (later ones occlude earlier ones)."""
    rng, size_rng = streams["layout"], streams["size"]
    short = min(width, height)
    shapes: list[tuple[str, bool]] = [(str(c), True) for c in rng.choice(cfg.classes, size=rng.integers(1, 7))]
    if cfg.shift == "unseen_class":
        unseen = _unseen_shape(cfg)
        for _ in range(int(streams["shift"].integers(1, 3))):
            # Never last: the last-drawn object is the one that is always fully visible and labeled.
            shapes.insert(int(streams["shift"].integers(0, len(shapes))), (unseen, False))
    objects = []
    for shape, labeled in shapes:
        if cfg.shift == "scale":
            lo, hi = (0.025, 0.05) if streams["shift"].random() < 0.5 else (0.55, 0.8)
            extent = streams["shift"].uniform(lo, hi) * short
        else:
            extent = size_rng.uniform(*SIZE_RANGE) * short
        squeeze = rng.uniform(-0.35, 0.35) if shape in ("square", "circle") else rng.uniform(-0.15, 0.15)
        hx, hy = extent / 2 * math.exp(squeeze / 2), extent / 2 * math.exp(-squeeze / 2)
        angle = 0.0 if shape == "square" else rng.uniform(0, 360)
        local = _unit_polygon(shape) * [hx, hy] @ _rotation(angle).T
        # The centre may sit near a border: at most about a fifth of the object leaves the image.
        half_w, half_h = np.abs(local).max(axis=0)
        cx = rng.uniform(0.6 * half_w, max(width - 0.6 * half_w, 0.6 * half_w + 1))
        cy = rng.uniform(0.6 * half_h, max(height - 0.6 * half_h, 0.6 * half_h + 1))
        objects.append(_Shape(shape, local + [cx, cy], _jitter_colour(shape, rng), labeled))
    if case == "rotated_rectangle" and "square" in cfg.classes:
        objects.append(_rotated_square(width, height, rng))
    return _drop_occluded(objects, width, height)


def _jitter_colour(shape: str, rng: np.random.Generator) -> tuple[int, int, int]:
    return _hsv_to_bgr(SHAPE_HUES[shape] + rng.uniform(-6, 6), rng.uniform(150, 255), rng.uniform(150, 255))


def _rotated_square(width: int, height: int, rng: np.random.Generator) -> _Shape:
    """A rectangle turned 15-40 degrees clockwise about its top-left corner, fully inside the image."""
    extent = rng.uniform(0.25, 0.4) * min(width, height)
    hx, hy = extent / 2 * rng.uniform(0.8, 1.1), extent / 2 * rng.uniform(0.6, 0.9)
    angle = float(rng.uniform(15, 40))
    local = _unit_polygon("square") * [hx, hy] @ _rotation(angle).T
    half_w, half_h = np.abs(local).max(axis=0)
    cx, cy = rng.uniform(half_w + 1, width - half_w - 1), rng.uniform(half_h + 1, height - half_h - 1)
    return _Shape("square", local + [cx, cy], _jitter_colour("square", rng), True, angle, (hx, hy))


def _drop_occluded(objects: list[_Shape], width: int, height: int) -> list[_Shape]:
    """Remove, one at a time, the least visible object while any is less than MIN_VISIBLE visible
    (hidden by later objects or outside the image): every drawn object of the image is labelable."""
    objects = list(objects)
    while objects:
        owner = np.zeros((height, width), dtype=np.uint8)
        for k, obj in enumerate(objects, start=1):
            cv2.fillPoly(owner, [_fixed(obj.polygon)], k, lineType=cv2.LINE_8, shift=4)
        counts = np.bincount(owner.ravel(), minlength=len(objects) + 1)[1:]
        areas = np.array([cv2.contourArea(o.polygon.astype(np.float32)) for o in objects])
        visible = counts / np.maximum(areas, 1.0)
        worst = int(np.argmin(visible))
        if visible[worst] >= MIN_VISIBLE:
            break
        objects.pop(worst)
    return objects


# --------------------------------------------------------------------------- pixels
def _background(width: int, height: int, rng: np.random.Generator, family: str) -> np.ndarray:
    """A float32 BGR background of one texture family (muted colours: objects must stand out)."""

    def muted() -> np.ndarray:
        return np.array(_hsv_to_bgr(rng.uniform(0, 180), rng.uniform(0, 60), rng.uniform(80, 220)), np.float32)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if family == "checkerboard":  # only for the `background` shift
        tile = rng.uniform(6, 18)
        t = math.radians(rng.uniform(0, 90))
        u, v = xx * math.cos(t) + yy * math.sin(t), -xx * math.sin(t) + yy * math.cos(t)
        mask = ((np.floor(u / tile) + np.floor(v / tile)) % 2)[..., None]
        return muted() * mask + muted() * (1 - mask)
    if family == "gradient":
        t = math.radians(rng.uniform(0, 360))
        ramp = xx * math.cos(t) + yy * math.sin(t)
        ramp = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0))[..., None]
        return muted() * ramp + muted() * (1 - ramp)
    if family == "stripes":
        t = math.radians(rng.uniform(0, 180))
        # Periods, then a sine table: only exact IEEE arithmetic (no vectorised sin) touches the pixels.
        periods = (xx * math.cos(t) + yy * math.sin(t)) / np.float32(rng.uniform(8, 40))
        phase = ((periods - np.floor(periods)) * _SINE_STEPS).astype(np.int64) % _SINE_STEPS
        wave = 0.5 + 0.5 * _sine_table()[phase]
        return muted() * wave[..., None] + muted() * (1 - wave[..., None])
    if family == "blotches":
        canvas = np.empty((height, width, 3), np.uint8)  # muted colours are whole numbers
        canvas[:] = muted()
        for _ in range(int(rng.integers(8, 25))):
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (int(rng.integers(5, width // 3)), int(rng.integers(5, height // 3)))
            cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, muted().tolist(), -1)
        # OpenCV's 8-bit Gaussian blur is fixed-point (bit-exact on every CPU); its float one is not.
        return cv2.GaussianBlur(canvas, (0, 0), rng.uniform(3, 8)).astype(np.float32)
    # "noise": smooth value noise, mostly in brightness with a little colour (strong chroma would mimic
    # the objects' colours)
    coarse = rng.normal(0, 1, (max(height // 16, 2), max(width // 16, 2), 3)).astype(np.float32)
    coarse = coarse[..., :1] + 0.3 * coarse
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return muted() + smooth * rng.uniform(10, 30)


BACKGROUND_FAMILIES = ("noise", "gradient", "stripes", "blotches")


def _clutter(canvas: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Distractors that are no class: desaturated lines, arcs and irregular blobs."""
    height, width = canvas.shape[:2]
    for _ in range(count):
        colour = _hsv_to_bgr(rng.uniform(0, 180), rng.uniform(0, 70), rng.uniform(30, 230))
        kind = rng.integers(0, 3)
        if kind == 0:
            p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(canvas, p1, p2, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
        elif kind == 1:
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (int(rng.integers(4, width // 4)), int(rng.integers(4, height // 4)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(canvas, centre, axes, 0, start, start + rng.uniform(60, 200), colour,
                        int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            n = int(rng.integers(7, 13))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radius = rng.uniform(0.02, 0.08) * min(width, height) * rng.uniform(0.4, 1.0, n)
            centre = rng.uniform([0, 0], [width, height])
            blob = centre + np.stack([radius * _cos(angles), radius * _sin(angles)], axis=1)
            cv2.fillPoly(canvas, [_fixed(blob)], colour, cv2.LINE_AA, shift=4)


_SINE_STEPS = 4096  # entries per period of the stripes' sine table


@lru_cache(maxsize=1)
def _sine_table() -> np.ndarray:
    return np.array([math.sin(2 * math.pi * k / _SINE_STEPS) for k in range(_SINE_STEPS)], dtype=np.float32)


def _tone_curve(canvas: np.ndarray, contrast: float, brightness: float, gamma: float) -> np.ndarray:
    """Contrast about the image mean, brightness and gamma as a 256-entry float32 lookup table.

    The image's pixels are uint8, so a table computed with scalar double arithmetic (an exact integer
    mean, the C library's pow) gives the same bytes on every CPU; numpy's vectorised float mean and
    power differ in the last bits between AVX2 and AVX-512 and so did the JPEGs."""
    mean = int(canvas.sum(dtype=np.int64)) / canvas.size
    table = []
    for value in range(256):
        level = min(max((value - mean) * contrast + mean + brightness, 0.0), 255.0)
        table.append(255 * math.pow(level / 255, gamma))
    return np.array(table, dtype=np.float32)


def _render(cfg: SynthesizeConfig, index: int, plan: dict[int, str]) -> SyntheticImage:
    streams = _streams(cfg, index)
    canvas_rng = streams["canvas"]
    width = int(canvas_rng.integers(cfg.min_side, cfg.max_side + 1))
    height = int(canvas_rng.integers(cfg.min_side, cfg.max_side + 1))
    objects = _layout(cfg, width, height, streams, plan.get(index))

    bg_rng = streams["background"]
    family = str(bg_rng.choice(BACKGROUND_FAMILIES))
    if cfg.shift == "background":
        family = "checkerboard"
    canvas = np.clip(_background(width, height, bg_rng, family), 0, 255).astype(np.uint8)
    clutter = streams["clutter"]
    _clutter(canvas, clutter, int(clutter.integers(2, 8)))
    for obj in objects:
        cv2.fillPoly(canvas, [_fixed(obj.polygon)], obj.bgr, cv2.LINE_AA, shift=4)
    _clutter(canvas, clutter, int(clutter.integers(0, 3)))  # a few thin distractors over the objects

    # Lighting: contrast, brightness, gamma and a soft shading ramp across the image.
    light = streams["light"]
    img = _tone_curve(canvas, light.uniform(0.75, 1.2), light.uniform(-25, 25), light.uniform(0.8, 1.25))[canvas]
    t = math.radians(light.uniform(0, 360))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx - width / 2) * math.cos(t) / width + (yy - height / 2) * math.sin(t) / height
    img *= (1 + light.uniform(0, 0.4) * ramp)[..., None]
    noise = streams["noise"]
    img += noise.normal(0, noise.uniform(2, 7), img.shape).astype(np.float32)

    shift = streams["shift"]
    if cfg.shift == "dark":
        img = img * shift.uniform(0.2, 0.35)
    elif cfg.shift == "night":  # far less light than `dark`, and the sensor's gain amplifies its noise
        img = img * shift.uniform(0.06, 0.12) + shift.normal(0, 2.0, img.shape).astype(np.float32)
    elif cfg.shift == "blur":
        # On 8-bit pixels: OpenCV's 8-bit Gaussian blur is bit-exact across CPUs, the float one is not.
        img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (0, 0),
                               shift.uniform(2.0, 3.5) * min(width, height) / 256)
    image = np.clip(img, 0, 255).astype(np.uint8)
    if cfg.shift == "gray":  # a camera in monochrome (night/IR) mode: same scene, no colour
        image = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)

    truth = ImageTruth(width, height, [
        TruthObject(o.label, _box(o.polygon, width, height), o.in_label_set, o.rotation) for o in objects
    ])
    return SyntheticImage(_name(cfg, index), image, truth, objects)


# --------------------------------------------------------------------------- export
def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _region_id(rng: np.random.Generator) -> str:
    alphabet = np.array(list(string.ascii_letters + string.digits + "_-"))
    return "".join(rng.choice(alphabet, 10))


def _rectangle(obj: _Shape, box: Box, width: int, height: int, rng: np.random.Generator,
               wobble: float = 0.0) -> dict:
    """A `rectanglelabels` region in percent. `wobble` (pixels) moves each edge, for a sloppy annotator."""
    if obj.rotation:
        hx, hy = obj.half
        corner = obj.polygon[0]  # the top-left corner before rotation, where Label Studio anchors x, y
        x, y, w, h = corner[0], corner[1], 2 * hx, 2 * hy
    else:
        dx1, dy1, dx2, dy2 = rng.uniform(-wobble, wobble, 4) if wobble else (0.0, 0.0, 0.0, 0.0)
        x1, y1 = float(np.clip(box.x1 + dx1, 0, width)), float(np.clip(box.y1 + dy1, 0, height))
        x2, y2 = float(np.clip(box.x2 + dx2, x1, width)), float(np.clip(box.y2 + dy2, y1, height))
        x, y, w, h = x1, y1, x2 - x1, y2 - y1
    px, py = 100 * float(x) / width, 100 * float(y) / height
    return {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": px,
            "y": py,
            # min(): percent rounding must never put the far edge past 100%.
            "width": min(100 * float(w) / width, 100 - px),
            "height": min(100 * float(h) / height, 100 - py),
            "rotation": obj.rotation,
            "rectanglelabels": [obj.label],
        },
        "id": _region_id(rng),
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def _non_rectangle_regions(obj: _Shape, width: int, height: int, rng: np.random.Generator) -> list[dict]:
    """A polygon and a keypoint left over from an earlier labeling config (controls no longer in it)."""
    step = max(1, len(obj.polygon) // 12)
    points = [[float(np.clip(100 * x / width, 0, 100)), float(np.clip(100 * y / height, 0, 100))]
              for x, y in obj.polygon[::step]]
    cx, cy = np.clip(obj.polygon.mean(axis=0), 0, [width - 1, height - 1])
    common = {"original_width": width, "original_height": height, "image_rotation": 0, "to_name": "image",
              "origin": "manual"}
    return [
        {**common, "value": {"points": points, "closed": True, "polygonlabels": [obj.label]},
         "id": _region_id(rng), "from_name": "polygon", "type": "polygonlabels"},
        {**common, "value": {"x": 100 * float(cx) / width, "y": 100 * float(cy) / height, "width": 0.5,
                             "keypointlabels": [obj.label]},
         "id": _region_id(rng), "from_name": "keypoint", "type": "keypointlabels"},
    ]


def _annotation(annotation_id: int, task_id: int, user: int, result: list[dict], created: datetime,
                lead_time: float, cancelled: bool = False, updated: datetime | None = None) -> dict:
    return {
        "id": annotation_id,
        "completed_by": user,
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": _timestamp(created),
        "updated_at": _timestamp(updated or created),
        "draft_created_at": None,
        "lead_time": round(lead_time, 3),
        "prediction": {},
        "result_count": len(result),
        "unique_id": f"{task_id:08x}-{annotation_id:04x}-4000-8000-{annotation_id * 7919:012x}",
        "import_id": None,
        "last_action": None,
        "bulk_created": False,
        "task": task_id,
        "project": UPLOAD_PROJECT,
        "updated_by": user,
        "parent_prediction": None,
        "parent_annotation": None,
        "last_created_by": None,
    }


def _task(cfg: SynthesizeConfig, index: int, sample: SyntheticImage, case: str | None,
          annotation_ids: Iterator[int]) -> dict:
    """One task of the Label Studio JSON export, with its annotations (and its messiness case)."""
    rng = _streams(cfg, index)["annotation"]
    width, height = sample.truth.width, sample.truth.height
    labeled = [(o, t) for o, t in zip(sample.shapes, sample.truth.objects) if o.in_label_set]
    task_id = index + 1
    created = EXPORT_EPOCH + timedelta(seconds=37 * index)
    annotated = created + timedelta(seconds=float(rng.uniform(600, 86_400)))
    exact = [_rectangle(o, t.box, width, height, rng) for o, t in labeled]

    annotations = []
    if case == "second_annotator":
        # A sloppy first pass, then a reviewer's exact boxes: the later annotation is the right one.
        sloppy = [_rectangle(o, t.box, width, height, rng, wobble=0.04 * min(width, height)) for o, t in labeled]
        annotations.append(_annotation(next(annotation_ids), task_id, 1, sloppy, annotated, rng.uniform(5, 60)))
        later = annotated + timedelta(hours=float(rng.uniform(2, 48)))
        annotations.append(_annotation(next(annotation_ids), task_id, 2, exact, later, rng.uniform(5, 60)))
    elif case == "cancelled_annotation":
        annotations.append(_annotation(next(annotation_ids), task_id, 1, exact, annotated, rng.uniform(5, 60)))
        # A second annotator skipped the task later, leaving a wrong partial result: it must be ignored.
        wrong = []
        if exact:
            right = exact[0]["value"]["rectanglelabels"][0]
            other = next((c for c in cfg.classes if c != right), right)
            wrong = [{**exact[0], "id": _region_id(rng), "value": {**exact[0]["value"], "rectanglelabels": [other]}}]
        skipped = annotated + timedelta(hours=float(rng.uniform(1, 24)))
        annotations.append(_annotation(next(annotation_ids), task_id, 2, wrong, skipped, rng.uniform(1, 10),
                                       cancelled=True))
    elif case != "no_annotation":
        result = list(exact)
        if case == "non_rectangle_region" and labeled:
            result += _non_rectangle_regions(labeled[0][0], width, height, rng)
        annotations.append(_annotation(next(annotation_ids), task_id, 1, result, annotated, rng.uniform(5, 90),
                                       updated=annotated + timedelta(seconds=float(rng.uniform(0, 30)))))

    upload = index in _uploaded(cfg.seed, cfg.n_images)
    image_ref = (f"/data/upload/{UPLOAD_PROJECT}/{sample.name}" if upload
                 else f"/data/local-files/?d=images/{sample.name}")
    meta = {"messiness": case} if case else {}
    unseen = sum(not o.in_label_set for o in sample.truth.objects)
    if unseen:
        meta["unlabeled_unseen_objects"] = unseen
    valid = [a for a in annotations if not a["was_cancelled"]]
    return {
        "id": task_id,
        "annotations": annotations,
        "file_upload": sample.name if upload else None,
        "drafts": [],
        "predictions": [],
        "data": {"image": image_ref},
        "meta": meta,
        "created_at": _timestamp(created),
        # Fixed-width ISO timestamps order like the moments they stand for.
        "updated_at": max([_timestamp(created)] + [a["updated_at"] for a in annotations]),
        "inner_id": task_id,
        "total_annotations": len(valid),
        "cancelled_annotations": len(annotations) - len(valid),
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": UPLOAD_PROJECT,
        "updated_by": annotations[-1]["completed_by"] if annotations else None,
        "comment_authors": [],
    }


def _truth_json(cfg: SynthesizeConfig, truths: dict[str, ImageTruth]) -> dict:
    return {
        "seed": cfg.seed,
        "shift": cfg.shift,
        "classes": list(cfg.classes),
        "unseen_class": _unseen_shape(cfg) if cfg.shift == "unseen_class" else None,
        "images": {
            name: {"width": t.width, "height": t.height,
                   "objects": [{"label": o.label, "box": [o.box.x1, o.box.y1, o.box.x2, o.box.y2],
                                "in_label_set": o.in_label_set, "rotation": o.rotation} for o in t.objects]}
            for name, t in truths.items()
        },
    }
