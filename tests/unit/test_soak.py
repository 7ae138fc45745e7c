"""`make soak` judges its own run: RSS growth after the warm-up and restarted processes fail it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tests.load.soak import RssSampler, _report, _seconds

MB = 2**20


def _sampler(series: list[dict[str, int]], interval_s: float = 60.0) -> RssSampler:
    sampler = RssSampler({}, interval_s=interval_s)
    sampler.samples = [(i * interval_s, {name: mb * MB for name, mb in rss.items()}) for i, rss in enumerate(series)]
    return sampler


def _stats(out: Path, failures: int = 0) -> Path:
    (out / "soak_stats.csv").write_text("Type,Name,Request Count,Failure Count,95%\n"
                                        f"POST,/detect,100,{failures},20\n,Aggregated,100,{failures},20\n")
    return out


def test_growth_counts_from_the_end_of_the_warm_up() -> None:
    # 100 -> 200 MB during the warm-up is loading, not a leak; 200 -> 209 after it is +4.5 %.
    sampler = _sampler([{"w:1": 100}, {"w:1": 200}, {"w:1": 205}, {"w:1": 209}])
    rows, changed = sampler.growth(warmup_s=60, window_s=0)
    assert rows == [{"process": "w:1", "rss_start_mb": 200.0, "rss_end_mb": 209.0, "growth_pct": 4.5}]
    assert changed == []
    assert sampler.per_minute() == {"w:1": [100.0, 200.0, 205.0, 209.0]}


def test_a_swing_is_not_growth_a_rising_floor_is() -> None:
    swinging = _sampler([{"f:1": mb} for mb in (80, 88, 80, 88, 80, 88)], interval_s=10)
    assert swinging.growth(warmup_s=20, window_s=10)[0][0]["growth_pct"] == 0.0
    leaking = _sampler([{"f:1": mb} for mb in (80, 88, 80, 88, 90, 98)], interval_s=10)
    assert leaking.growth(warmup_s=20, window_s=10)[0][0]["growth_pct"] == 12.5


@pytest.mark.parametrize(("series", "failures", "code"), [
    ([{"w:1": 200}, {"w:1": 210}], 0, 0),  # +5.0 %: at the bound
    ([{"w:1": 200}, {"w:1": 211}], 0, 1),  # +5.5 %
    ([{"w:1": 200}, {"w:2": 150}], 0, 1),  # the worker was replaced: its RSS fell, but not the same process
    ([{"w:1": 200}, {"w:1": 200, "w:3": 50}], 0, 1),  # a process that was not there at the end of the warm-up
    ([{"w:1": 200}, {"w:1": 200}], 1, 1),  # an error
])
def test_the_run_fails_itself(tmp_path: Path, series: list[dict[str, int]], failures: int, code: int) -> None:
    assert _report(_stats(tmp_path, failures), *_sampler(series).growth(warmup_s=0, window_s=0)) == code


def test_a_bad_run_time_is_a_usage_error_naming_it() -> None:
    assert _seconds("30s") == 30 and _seconds("10m") == 600
    for bad in ("10x", "m", "0m", "-5m"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{bad}'"):
            _seconds(bad)
