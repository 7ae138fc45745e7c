"""`detops validate`: check a YOLO dataset with Great Expectations before anything trains on it.

Three pandas tables are built from the dataset on disk and each gets its own expectation suite:

- ``annotations``: one row per box (pixels, image size, class);
- ``images``: one row per image (does it decode, decoded vs annotated size, content hash, boxes, is it
  a background image: no box);
- ``class_counts``: one row per (split, class) with the number of instances and the required minimum.

The outcome of every expectation goes to ``<report>/validation.json`` and ``validation.html``, and the
counts plus the overall success to ``<report>/summary.json`` (a DVC metrics file). Any failure raises
`DataValidationError`, whose message names each failed expectation with a few offending images.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config.data import ValidateConfig
from pipelines.errors import DataValidationError, DetopsError
from pipelines.types import YoloDataset

MAX_EXAMPLES = 3
SIZE_CHECK = "image size matches the annotated size"

ANNOTATION_COLUMNS = ["split", "image", "class_id", "class_name", "x1", "y1", "x2", "y2",
                      "box_width", "box_height", "image_width", "image_height"]
IMAGE_COLUMNS = ["split", "image", "path", "decodes", "decode_error", "width", "height",
                 "annotated_width", "annotated_height", "size_mismatch_px", "sha256",
                 "splits_with_same_content", "n_boxes", "label_error", "background"]
COUNT_COLUMNS = ["split", "class_id", "class_name", "instances", "required"]


@dataclass
class ExpectationOutcome:
    """The outcome of one expectation, as written to validation.json."""

    name: str
    table: str
    expectation: str
    success: bool
    observed: str
    examples: list[str] = field(default_factory=list)

    def as_line(self) -> str:
        shown = f", e.g. {'; '.join(self.examples)}" if self.examples else ""
        return f"{self.name}: {self.observed}{shown}"


@dataclass
class ValidationSummary:
    """What `validate` found: overall success, counts and every expectation's outcome."""

    success: bool
    n_images: int
    n_boxes: int
    images_per_split: dict[str, int]
    background_per_split: dict[str, int]
    outcomes: list[ExpectationOutcome]
    report_dir: Path

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]


# --------------------------------------------------------------------------- tables
def annotated_sizes(dataset: YoloDataset) -> dict[str, tuple[int, int]]:
    """Each image's size as the annotation tool recorded it (``original_width/height`` of the Label
    Studio export), keyed ``<split>/<file name>``, read from ingest_report.json; empty when absent."""
    report = dataset.root / "ingest_report.json"
    if not report.exists():
        return {}
    sizes = {}
    try:
        for entry in json.loads(report.read_text()).get("images", []):
            if entry.get("original_width") and entry.get("original_height"):
                key = f"{entry['split']}/{Path(entry['image']).name}"
                sizes[key] = (int(entry["original_width"]), int(entry["original_height"]))
    except (ValueError, AttributeError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise DetopsError(f"{report}: unreadable per-image sizes ({type(exc).__name__}: {exc})") from None
    return sizes


def _decode(path: Path) -> tuple[int | None, int | None, str | None]:
    """(width, height, None) as displayed, or (None, None, why) when the image does not decode."""
    from pipelines.images import oriented_size

    try:
        return (*oriented_size(path), None)
    except DetopsError as exc:
        return None, None, str(exc)


def build_tables(dataset: YoloDataset, cfg: ValidateConfig) -> dict[str, Any]:
    """The annotation, image and per-(split, class) count tables of a dataset, as pandas frames."""
    import pandas as pd
    from rich.progress import track

    sizes = annotated_sizes(dataset)
    names = dataset.class_names
    image_rows: list[dict[str, Any]] = []
    box_rows: list[dict[str, Any]] = []
    all_images = [(split, path) for split in dataset.splits for path in dataset.images(split)]
    for split, path in track(all_images, description="reading images", transient=True):
        key = f"{split}/{path.name}"
        width, height, decode_error = _decode(path)
        annotated = sizes.get(key)
        label_error = None
        try:
            labels = dataset.labels(path)
        except (ValueError, TypeError) as exc:  # a malformed line: not a number, too few fields
            labels, label_error = [], f"{dataset.label_path(path).name}: {exc}"
        # Boxes are placed on the image as decoded; when it does not decode, on the annotated size.
        img_w, img_h = (width, height) if decode_error is None else (annotated or (math.nan, math.nan))
        for label in labels:
            box = label.box(img_w, img_h)
            # Labels carry 6 decimals: round to 1/1000 px so that an edge box is not 1e-13 px outside.
            x1, y1, x2, y2 = (round(v, 3) for v in (box.x1, box.y1, box.x2, box.y2))
            box_rows.append({
                "split": split, "image": key, "class_id": label.class_id,
                "class_name": names[label.class_id] if 0 <= label.class_id < len(names) else "?",
                "x1": x1, "y1": y1, "x2": x2, "y2": y2, "box_width": round(x2 - x1, 3),
                "box_height": round(y2 - y1, 3), "image_width": img_w, "image_height": img_h,
            })
        mismatch = (max(abs(width - annotated[0]), abs(height - annotated[1]))
                    if annotated and decode_error is None else None)
        image_rows.append({
            "split": split, "image": key, "path": str(path), "decodes": decode_error is None,
            "decode_error": decode_error, "width": width, "height": height,
            "annotated_width": annotated[0] if annotated else None,
            "annotated_height": annotated[1] if annotated else None, "size_mismatch_px": mismatch,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "n_boxes": len(labels),
            "label_error": label_error,
            # A labelled negative (empty label file); as a number so that its mean is the share.
            "background": float(not labels and label_error is None),
        })

    images = pd.DataFrame(image_rows, columns=IMAGE_COLUMNS)
    # Leakage: the same bytes under any name in more than one split.
    images["splits_with_same_content"] = images.groupby("sha256")["split"].transform("nunique")
    images["size_mismatch_px"] = pd.to_numeric(images["size_mismatch_px"])
    annotations = pd.DataFrame(box_rows, columns=ANNOTATION_COLUMNS)

    required = cfg.min_instances_per_class.model_dump()
    counts = annotations.groupby(["split", "class_id"]).size()
    count_rows = [
        {"split": split, "class_id": cid, "class_name": name,
         "instances": int(counts.get((split, cid), 0)), "required": required[split]}
        for split in dataset.splits for cid, name in enumerate(names)
    ]
    class_counts = pd.DataFrame(count_rows, columns=COUNT_COLUMNS)
    return {"annotations": annotations, "images": images, "class_counts": class_counts}


# --------------------------------------------------------------------------- expectations
def build_suites(dataset: YoloDataset, cfg: ValidateConfig) -> dict[str, list[Any]]:
    """The expectations of each table. Each carries a readable name in ``meta["name"]``."""
    import great_expectations.expectations as gxe

    side = cfg.min_box_side_px
    tol = cfg.size_tolerance_px
    bg = cfg.background_share

    def named(expectation: type, name: str, **kwargs: Any) -> Any:
        return expectation(meta={"name": name}, **kwargs)

    n_classes = len(dataset.class_names)
    return {
        "annotations": [
            named(gxe.ExpectColumnValuesToBeBetween, "box inside image (x1 >= 0)", column="x1", min_value=0),
            named(gxe.ExpectColumnValuesToBeBetween, "box inside image (y1 >= 0)", column="y1", min_value=0),
            named(gxe.ExpectColumnPairValuesAToBeGreaterThanB, "box inside image (x2 <= image width)",
                  column_A="image_width", column_B="x2", or_equal=True),
            named(gxe.ExpectColumnPairValuesAToBeGreaterThanB, "box inside image (y2 <= image height)",
                  column_A="image_height", column_B="y2", or_equal=True),
            named(gxe.ExpectColumnValuesToBeBetween, f"box width >= {side:g} px",
                  column="box_width", min_value=side),
            named(gxe.ExpectColumnValuesToBeBetween, f"box height >= {side:g} px",
                  column="box_height", min_value=side),
            named(gxe.ExpectColumnValuesToBeInSet, f"class id in the label set (0..{n_classes - 1})",
                  column="class_id", value_set=list(range(n_classes))),
        ],
        "images": [
            # On the error column rather than `decodes`, so that each example says why it fails.
            named(gxe.ExpectColumnValuesToBeNull, "image decodes", column="decode_error"),
            named(gxe.ExpectColumnValuesToBeNull, "label file parses", column="label_error"),
            # Null where the annotated size is unknown or the image does not decode (checked above).
            named(gxe.ExpectColumnValuesToBeBetween, f"{SIZE_CHECK} (tolerance {tol} px)",
                  column="size_mismatch_px", min_value=0, max_value=tol),
            named(gxe.ExpectColumnValuesToBeBetween, "no image in two splits (same content hash)",
                  column="splits_with_same_content", max_value=1),
            named(gxe.ExpectColumnDistinctValuesToContainSet,
                  f"every split non-empty ({', '.join(dataset.splits)})",
                  column="split", value_set=list(dataset.splits)),
            named(gxe.ExpectColumnMeanToBeBetween,
                  f"background images (no box) are {bg.min:.0%}-{bg.max:.0%} of the images",
                  column="background", min_value=bg.min, max_value=bg.max),
        ],
        "class_counts": [
            named(gxe.ExpectColumnPairValuesAToBeGreaterThanB, "enough instances per class per split",
                  column_A="instances", column_B="required", or_equal=True),
        ],
    }


# Columns shown with each failing example, per table.
_EXAMPLE_KEYS = {"annotations": ["image"], "images": ["image"], "class_counts": ["split", "class_name"]}


def run_suites(tables: dict[str, Any], suites: dict[str, list[Any]]) -> list[ExpectationOutcome]:
    """Run each table's suite in an ephemeral Great Expectations context."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # GX draws a tqdm bar per suite; our own progress bar is enough.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("detops")
    outcomes = []
    for table, expectations in suites.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = context.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch,
                                                                                suite=suite))
        result = definition.run(
            batch_parameters={"dataframe": tables[table]},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": _EXAMPLE_KEYS[table],
                           "partial_unexpected_count": MAX_EXAMPLES},
        )
        for r in result.results:
            outcomes.append(_outcome(table, r, len(tables[table])))
    return outcomes


def _outcome(table: str, r: Any, n_rows: int) -> ExpectationOutcome:
    """Turn one GX result into a name, an observed value and a few failing examples."""
    config = r.expectation_config
    res = r.result or {}
    name = (config.meta or {}).get("name", config.type)
    errors = _exception_messages(r.exception_info or {})
    if errors:
        return ExpectationOutcome(name, table, config.type, False, f"could not run: {'; '.join(errors)}")
    if "unexpected_count" in res:  # a per-row expectation
        observed = f"{res['unexpected_count']} of {res.get('element_count', n_rows)} rows fail"
        examples = [_example(table, row, config) for row in (res.get("unexpected_index_list") or [])]
    elif "partial_missing_list" in res:  # distinct values must contain a set
        missing = ", ".join(map(str, res["partial_missing_list"]))
        observed = f"missing: {missing}" if not r.success else "all present"
        examples = []
    else:
        observed = str(res.get("observed_value"))
        examples = []
    return ExpectationOutcome(name, table, config.type, bool(r.success), observed, examples[:MAX_EXAMPLES])


def _exception_messages(info: dict[str, Any]) -> list[str]:
    """The distinct messages of a GX exception_info: flat, or keyed by metric id (one per failed metric)."""
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    return sorted({str(e.get("exception_message")) for e in entries if e.get("raised_exception")})


def _example(table: str, row: dict[str, Any], config: Any) -> str:
    """`train/a.jpg (x2=120.0, image_width=100)`: the row's key and the values that broke the rule."""
    keys = _EXAMPLE_KEYS[table]
    label = " ".join(str(row[k]) for k in keys if k in row)
    values = ", ".join(f"{k}={_plain(v)}" for k, v in row.items() if k not in keys)
    return f"{label} ({values})" if values else label


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, for JSON and for readable messages."""
    return value.item() if hasattr(value, "item") else value


# --------------------------------------------------------------------------- reports
def _write_reports(summary: ValidationSummary, dataset_root: Path) -> None:
    out = summary.report_dir
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "dataset": str(dataset_root),
        "success": summary.success,
        "images": summary.n_images,
        "boxes": summary.n_boxes,
        "images_per_split": summary.images_per_split,
        "background_images_per_split": summary.background_per_split,
        "expectations": [o.__dict__ for o in summary.outcomes],
    }
    (out / "validation.json").write_text(json.dumps(payload, indent=2))
    metrics = {"success": summary.success, "images": summary.n_images, "boxes": summary.n_boxes,
               "expectations": len(summary.outcomes), "failed_expectations": len(summary.failures),
               **{f"images_{s}": n for s, n in summary.images_per_split.items()},
               "background_images": sum(summary.background_per_split.values())}
    (out / "summary.json").write_text(json.dumps(metrics, indent=2))
    (out / "validation.html").write_text(_html(summary, dataset_root))


def _html(summary: ValidationSummary, dataset_root: Path) -> str:
    rows = "\n".join(
        f'<tr class="{"ok" if o.success else "fail"}"><td>{"pass" if o.success else "FAIL"}</td>'
        f"<td>{html.escape(o.table)}</td><td>{html.escape(o.name)}</td>"
        f"<td><code>{html.escape(o.expectation)}</code></td><td>{html.escape(o.observed)}</td>"
        f"<td>{'<br>'.join(html.escape(e) for e in o.examples)}</td></tr>"
        for o in summary.outcomes
    )
    verdict = "PASSED" if summary.success else f"FAILED ({len(summary.failures)} expectations)"
    splits = ", ".join(f"{s}: {n}" for s, n in summary.images_per_split.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>detops data validation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
tr.ok {{ background: #e6f4ea; }} tr.fail {{ background: #fce8e6; }}
</style></head><body>
<h1>Data validation: {verdict}</h1>
<p>Dataset <code>{html.escape(str(dataset_root))}</code>: {summary.n_images} images ({splits}),
{summary.n_boxes} boxes. Checked with Great Expectations.</p>
<table><tr><th>result</th><th>table</th><th>expectation</th><th>GX type</th><th>observed</th>
<th>examples</th></tr>
{rows}
</table></body></html>
"""


# --------------------------------------------------------------------------- entry point
def validate(cfg: ValidateConfig) -> ValidationSummary:
    """Check the dataset at ``cfg.dataset``; write the reports; raise DataValidationError on failure."""
    dataset = YoloDataset.load(cfg.dataset)
    if not dataset.splits:
        raise DataValidationError(f"{dataset.yaml_path}: declares no split (train, val, test)")
    tables = build_tables(dataset, cfg)
    outcomes = run_suites(tables, build_suites(dataset, cfg))
    images = tables["images"]
    if images["annotated_width"].isna().all():
        # Nothing to compare with: say so rather than report a vacuous pass.
        for outcome in outcomes:
            if outcome.name.startswith(SIZE_CHECK):
                outcome.observed = "not checked: ingest_report.json records no annotated image sizes"
    summary = ValidationSummary(
        success=all(o.success for o in outcomes),
        n_images=len(images),
        n_boxes=len(tables["annotations"]),
        images_per_split={s: int((images["split"] == s).sum()) for s in dataset.splits},
        background_per_split={s: int(images.loc[images["split"] == s, "background"].sum())
                              for s in dataset.splits},
        outcomes=outcomes,
        report_dir=cfg.report,
    )
    _write_reports(summary, cfg.dataset)
    if not summary.success:
        lines = "\n".join(f"  - {o.as_line()}" for o in summary.failures)
        raise DataValidationError(
            f"dataset {cfg.dataset} failed {len(summary.failures)} of {len(outcomes)} expectations "
            f"(report: {cfg.report / 'validation.html'}):\n{lines}"
        )
    return summary
