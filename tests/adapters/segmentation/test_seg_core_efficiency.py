"""Per-case time and memory, the report table and FLARE's rank-then-aggregate."""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

from medmeta.adapters.segmentation.efficiency import (
    MB,
    EfficiencyMonitor,
    MemorySampler,
    efficiency_table,
    flare_ranking,
    markdown_table,
    write_efficiency_report,
)


def test_sampler_area_under_a_known_curve():
    start = time.perf_counter()
    sampler = MemorySampler(lambda: int((time.perf_counter() - start) * 100 * MB), interval=0.02).start()
    time.sleep(0.25)
    sampler.stop()
    duration = sampler.times[-1] - sampler.times[0]
    t0 = sampler.times[0] - start
    # memory grows linearly at 100 MiB/s: the area is exactly the trapezoid of a line
    expected = 100 * (t0 * duration + duration**2 / 2)
    assert len(sampler.values) >= 5
    assert sampler.auc_mb_s == pytest.approx(expected, rel=0.1)  # loose: the probe runs just after the clock
    assert sampler.max_mb == pytest.approx(100 * (sampler.times[-1] - start), rel=0.1)
    with pytest.raises(ValueError, match="interval"):
        MemorySampler(lambda: 0, interval=0)


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="per-case peak RSS needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_is_per_case():
    monitor = EfficiencyMonitor("cpu")
    with monitor.measure("big"):
        x = torch.ones(160 * MB // 4)  # 160 MiB of tensor memory, invisible to tracemalloc
        x.add_(1)
        del x
    with monitor.measure("small"):
        y = torch.ones(1000)
        del y
    big, small = monitor.cases
    assert big.peak_rss_mb - big.memory_start_mb > 150  # the allocation is seen
    assert small.peak_rss_mb - small.memory_start_mb < 50  # the mark was reset for the next case
    assert big.seconds > 0 and math.isnan(big.cuda_peak_allocated_mb)


@pytest.mark.gpu
def test_cuda_peak_memory_is_per_case():
    monitor = EfficiencyMonitor("cuda")
    with monitor.measure("big"):
        x = torch.ones(256 * MB // 4, device="cuda")
        del x
    with monitor.measure("small"):
        y = torch.ones(1000, device="cuda")
        del y
    big, small = monitor.cases
    assert big.cuda_peak_allocated_mb >= 256 and small.cuda_peak_allocated_mb < 16
    assert big.cuda_peak_reserved_mb >= 256 and big.memory_max_mb > 0 and big.memory_auc_mb_s >= 0


def test_table_overall_row_and_report(tmp_path):
    rows = [
        {"case": "a", "seconds": 1.0, "memory_max_mb": 100.0, "memory_auc_mb_s": 50.0, "slices": 10, "dice_mean": 0.5},
        {"case": "b", "seconds": 3.0, "memory_max_mb": 300.0, "memory_auc_mb_s": 70.0, "slices": 20, "dice_mean": 0.7},
    ]
    table = efficiency_table(rows)
    overall = table.iloc[-1]
    assert overall["case"] == "overall" and overall["seconds"] == 4.0 and overall["mean_seconds"] == 2.0
    assert overall["memory_max_mb"] == 300.0 and overall["memory_auc_mb_s"] == 120.0 and overall["slices"] == 30
    assert overall["dice_mean"] == pytest.approx(0.6)
    paths = write_efficiency_report(table, tmp_path)
    assert pd.read_csv(paths["csv"])["case"].tolist() == ["a", "b", "overall"]
    text = paths["markdown"].read_text()
    assert "| overall | 4.000 | 2.000 | 300.000 |" in text and "n/a" in text  # mean_seconds absent per case
    assert markdown_table(pd.DataFrame({"x": [1.23456, np.nan]}), digits=2).splitlines()[2:] == ["| 1.23 |", "| n/a |"]


def test_flare_ranking_by_hand():
    # two cases, three methods; per case ranks on (dice, nsd, seconds, memory):
    rows = []
    data = {
        "A": [(0.9, 0.8, 10.0, 1000.0), (0.8, 0.7, 12.0, 1000.0)],
        "B": [(0.8, 0.9, 5.0, 2000.0), (0.8, 0.6, 6.0, 2000.0)],
        "C": [(0.7, 0.7, 20.0, 500.0), (0.6, 0.5, 25.0, 500.0)],
    }
    for method, cases in data.items():
        for i, (d, n, s, m) in enumerate(cases):
            rows.append({"method": method, "case": f"c{i}", "dice_mean": d, "nsd_mean": n, "seconds": s,
                         "memory_max_mb": m})
    rows.append({"method": "A", "case": "overall", "dice_mean": 0, "nsd_mean": 0, "seconds": 0, "memory_max_mb": 0})
    ranking = flare_ranking(pd.DataFrame(rows))
    # case c0: A ranks (1, 2, 2, 2), B (2, 1, 1, 3), C (3, 3, 3, 1)
    # case c1: A ranks (1.5, 1, 2, 2), B (1.5, 2, 1, 3), C (3, 3, 3, 1)
    expected = {"A": (1 + 2 + 2 + 2 + 1.5 + 1 + 2 + 2) / 8, "B": (2 + 1 + 1 + 3 + 1.5 + 2 + 1 + 3) / 8,
                "C": (3 + 3 + 3 + 1 + 3 + 3 + 3 + 1) / 8}
    assert ranking["method"].tolist() == sorted(expected, key=expected.get)
    for _, row in ranking.iterrows():
        assert row["mean_rank"] == pytest.approx(expected[row["method"]])
    assert ranking.set_index("method").loc["A", "rank_dice_mean"] == pytest.approx(1.25)
    with pytest.raises(ValueError, match="column 'hd95'"):
        flare_ranking(pd.DataFrame(rows), criteria={"hd95": False})
    with pytest.raises(ValueError, match="have no result on task"):
        flare_ranking(pd.DataFrame(rows[:-2]))
