"""Promotion gates: the checks a challenger must pass before `champion` moves to it.

Four checks, thresholds from `register.gates` in params.yaml:

- `map50_95`: COCO mAP@[.5:.95] on the test split (evaluate's metrics.json) >= `min_map50_95`;
- `dece_calibrated`: detection ECE after calibration <= `max_dece_calibrated`;
- `latency_ms`: single-image latency (`latency_ms_batch1`) <= `max_latency_ms`;
- `no_regression`: the lower end of the 95% paired-bootstrap interval of mAP(challenger) - mAP(champion)
  >= -`max_map_regression`, both models predicted by the shared runtime on the same test split: a loss
  the test images cannot rule out counts, not only the point estimate. With no champion yet the check
  passes, with a note;
- `improves/<slice>`, one per slice of `target_slices` (evaluate.slices): the lower end of the 95%
  paired-bootstrap interval of mAP(challenger) - mAP(champion) on that slice >= `min_target_improvement`
  (> 0): the challenger is better where the champion failed, with confidence, not by chance. With no
  champion yet it passes, with a note.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipelines.config.model import Gates
from pipelines.errors import DetopsError

METRIC_KEYS = {"map50_95": "map50_95", "dece_calibrated": "dece_calibrated", "latency_ms": "latency_ms_batch1"}


@dataclass(frozen=True)
class GateCheck:
    """One check: `value <comparison> threshold` gives `passed`."""

    name: str
    value: float | None
    threshold: float
    comparison: Literal[">=", "<="]
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class ChampionComparison:
    """The challenger against the current champion on the same images (delta = challenger - champion)."""

    champion_version: str
    champion_map50_95: float
    challenger_map50_95: float
    delta: float
    ci_low: float
    ci_high: float
    bootstrap_samples: int


@dataclass
class GateReport:
    """What `detops register` decided; written to gates.json (DVC metrics)."""

    model_name: str
    checks: list[GateCheck]
    version: str | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    comparison: ChampionComparison | None = None
    notes: list[str] = field(default_factory=list)
    variant: dict[str, Any] | None = None  # which model variant (fp32/int8) and why: evaluation/quantize.py
    slices: dict[str, ChampionComparison] = field(default_factory=dict)  # the same comparison per slice

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def promoted(self) -> bool:
        return self.version is not None and self.champion_after == self.version != self.champion_before

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form, with `passed` and `promoted` spelled out."""
        return {"model_name": self.model_name, "passed": self.passed, "promoted": self.promoted,
                "version": self.version, "champion_before": self.champion_before,
                "champion_after": self.champion_after,
                "checks": {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in self.checks},
                "comparison": asdict(self.comparison) if self.comparison else None, "notes": self.notes,
                "variant": self.variant,
                "slices": {name: asdict(c) for name, c in self.slices.items()}}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_metrics(path: Path) -> dict[str, float]:
    """The gate inputs of evaluate's metrics.json; a missing file or key is a DetopsError naming it."""
    if not path.is_file():
        raise DetopsError(f"{path}: metrics not found (run `detops evaluate` first)")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DetopsError(f"{path}: not valid JSON ({exc})") from None
    out = {}
    for name, key in METRIC_KEYS.items():
        value = metrics.get(key) if isinstance(metrics, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DetopsError(f"{path}: '{key}' is missing or not a number (got {value!r})")
        out[name] = float(value)
    return out


def check_gates(metrics: dict[str, float], gates: Gates, comparison: ChampionComparison | None,
                slices: dict[str, ChampionComparison] | None = None) -> list[GateCheck]:
    """Every gate on the challenger's `metrics` (as `load_metrics` returns), its champion comparison
    on the base split and, per target slice, on `slices` (None: no champion)."""
    checks = [
        GateCheck("map50_95", metrics["map50_95"], gates.min_map50_95, ">=",
                  metrics["map50_95"] >= gates.min_map50_95),
        GateCheck("dece_calibrated", metrics["dece_calibrated"], gates.max_dece_calibrated, "<=",
                  metrics["dece_calibrated"] <= gates.max_dece_calibrated),
        GateCheck("latency_ms", metrics["latency_ms"], gates.max_latency_ms, "<=",
                  metrics["latency_ms"] <= gates.max_latency_ms),
    ]
    if comparison is None:
        checks.append(GateCheck("no_regression", None, -gates.max_map_regression, ">=", True,
                                "no champion yet: nothing to regress against"))
    else:
        c = comparison
        checks.append(GateCheck(
            "no_regression", c.ci_low, -gates.max_map_regression, ">=", c.ci_low >= -gates.max_map_regression,
            f"mAP vs champion v{c.champion_version} {c.champion_map50_95:.4f} -> {c.challenger_map50_95:.4f}, "
            f"delta {c.delta:+.4f}, 95% CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}] ({c.bootstrap_samples} bootstrap "
            f"samples); the CI's lower end is checked"))
    checks += target_checks(gates, comparison is not None, slices or {})
    return checks


def target_checks(gates: Gates, has_champion: bool, slices: dict[str, ChampionComparison]) -> list[GateCheck]:
    """`improves/<slice>` per target slice: the CI's lower end of the mAP gain >= the margin."""
    checks = []
    for name in gates.target_slices:
        if not has_champion:
            checks.append(GateCheck(f"improves/{name}", None, gates.min_target_improvement, ">=", True,
                                    "no champion yet: nothing to improve on"))
            continue
        if name not in slices:
            raise DetopsError(f"register.gates.target_slices: slice {name!r} has no champion comparison "
                              f"(is it in evaluate.slices? known: {sorted(slices) or 'none'})")
        c = slices[name]
        checks.append(GateCheck(
            f"improves/{name}", c.ci_low, gates.min_target_improvement, ">=", c.ci_low >= gates.min_target_improvement,
            f"slice {name}: mAP {c.champion_map50_95:.4f} (champion v{c.champion_version}) -> "
            f"{c.challenger_map50_95:.4f}, delta {c.delta:+.4f}, 95% CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}]; "
            f"the CI's lower end is checked"))
    return checks


def gates_table(report: GateReport) -> Any:
    """A rich table of the checks, with the verdict in the caption."""
    from rich.table import Table

    verdict = ("[green]all gates passed[/green]" if report.passed
               else "[red]gates failed: champion not moved[/red]")
    table = Table(title=f"Promotion gates: {report.model_name} v{report.version or '?'}", caption=verdict)
    for column in ("gate", "value", "", "threshold", "result", "note"):
        table.add_column(column)
    for c in report.checks:
        value = "-" if c.value is None else f"{c.value:.4g}"
        result = "[green]pass[/green]" if c.passed else "[red]fail[/red]"
        table.add_row(c.name, value, c.comparison, f"{c.threshold:.4g}", result, c.note)
    return table
