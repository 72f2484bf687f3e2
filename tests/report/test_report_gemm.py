"""``kiln.report.gemm`` (``benchmarks/gemm.py``): FLOP counts, the measured peak, rates as fractions of it,
the gemm-path check and the summary's ``peak_fraction_best``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kiln.errors import KilnError
from kiln.report.bench import Contender, kiln_contender
from kiln.report.gemm import (
    WORKLOADS,
    Peak,
    Workload,
    add_rates,
    check_gemm_paths,
    combine_peaks,
    fma_peak,
    measure_peak,
    summarize,
)

REPO = Path(__file__).resolve().parents[2]
PEAK = Peak(100e9, 100e9, 50e9, "test")


def test_flops_match_the_operators():
    assert Workload("a", "mm", (2, 3, 4)).flops == 2 * 2 * 3 * 4
    assert Workload("b", "bmm", (5, 2, 3, 4)).flops == 5 * 2 * 2 * 3 * 4
    conv = Workload("c", "conv", (1, 8, 10, 10, 16, 3, 2, 1, 1))
    assert conv.conv_out() == (5, 5) and conv.flops == 2 * 16 * 5 * 5 * 8 * 9
    dw = Workload("d", "conv", (2, 6, 4, 4, 6, 3, 1, 1, 6))
    assert dw.flops == 2 * 2 * 6 * 4 * 4 * 1 * 9
    with pytest.raises(KilnError, match="kind 'mm' with shape"):
        Workload("bad", "mm", (1, 2))


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: w.name)
def test_workloads_build_deterministic_fp32_cases(w):
    model, inputs = w.build(seed=0)
    _, again = w.build(seed=0)
    assert all(x.dtype == torch.float32 for x in inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs, again))
    with torch.no_grad():
        out = model(*inputs)
    if w.kind == "conv":
        n, _, _, _, cout, *_ = w.shape
        assert out.shape == (n, cout, *w.conv_out())
    else:
        assert out.shape[-1] == w.shape[-1] and out.shape[-2] == w.shape[-3]


def test_fma_peak_is_measured():
    flops = fma_peak(threads=1, seconds=0.005, reps=2)
    assert flops > 1e9  # a vectorised FMA loop on any x86 CPU of this decade, even loaded
    peak = measure_peak(threads=1, quick=True)
    assert peak.flops_per_s == max(peak.fma_flops_per_s, peak.mkl_flops_per_s)
    assert "FMA loop" in peak.source and "MKL" in peak.source


def _contenders():
    return [Contender("torch", lambda m, i: m, "eager"),
            kiln_contender("tir", backend_options={"gemm": "tvm"}),
            kiln_contender("auto", backend_options={"gemm": "auto"})]


def test_gemm_path_check_and_rates():
    cs = _contenders()
    w = Workload("mm", "mm", (100, 100, 50))  # 1 MFLOP
    row = {"model": "mm", "torch_ms": 0.1, "torch_correct": True, "tir_ms": 0.05, "tir_correct": True,
           "tir_gemm_kernels": {"torch": 1}, "auto_ms": 0.02, "auto_correct": True,
           "auto_gemm_kernels": {"tvm": 1}}
    check_gemm_paths(row, cs)
    assert row["tir_correct"] is False and row["tir_unavailable"] and "not honoured" in row["tir_error"]
    assert row["auto_correct"] is True and row["auto_gemm_path"] == "tvm" and row["tir_gemm_path"] == "torch"
    add_rates(row, w, cs, PEAK)
    assert row["torch_gflops"] == pytest.approx(10.0) and row["torch_peak_fraction"] == pytest.approx(0.1)
    assert row["auto_peak_fraction"] == pytest.approx(0.5)
    assert row["tir_gflops"] is None and row["tir_peak_fraction"] is None  # a failed cell has no rate


def test_summary_peak_fraction_best():
    cs = _contenders()
    rows = [{"model": "s1", "torch_peak_fraction": 0.6, "tir_peak_fraction": 0.3, "tir_correct": True,
             "tir_gemm_path": "tvm", "auto_peak_fraction": 0.55, "auto_correct": True, "auto_gemm_path": "torch"},
            {"model": "s2", "torch_peak_fraction": 0.2, "tir_peak_fraction": 0.4, "tir_correct": True,
             "tir_gemm_path": "tvm", "auto_peak_fraction": 0.4, "auto_correct": True, "auto_gemm_path": "tvm"},
            {"model": "s3", "torch_peak_fraction": 0.5, "tir_correct": False, "tir_unavailable": True,
             "tir_error": "not built", "auto_correct": False, "auto_error": "wrong"}]
    s = summarize(rows, cs, PEAK)
    assert s["peak_fraction_best"] == 0.55 and s["peak_fraction_best_contender"] == "auto"
    assert s["peak_fraction_best_shape"] == "s1" and s["peak_fraction_best_tir"] == 0.4
    assert s["peak_fraction_by_shape"] == {"s1": 0.55, "s2": 0.4, "s3": None}
    assert s["torch_peak_fraction_best"] == 0.6
    assert s["all_correct"] is False  # auto is wrong on s3 (tir's s3 cell is unavailable, not counted)
    assert s["unavailable"] == {"tir": "not built"}
    assert s["by_contender"]["tir"]["peak_fraction_geomean"] == pytest.approx((0.3 * 0.4) ** 0.5)
    assert s["by_contender"]["tir"]["shapes_correct"] == 2
    assert s["above_peak"] == []
    empty = summarize([{"model": "s", "torch_peak_fraction": 1.2}], cs, PEAK)
    assert empty["peak_fraction_best"] is None and empty["all_correct"] is False
    assert empty["above_peak"] == ["s: torch"]  # a disturbed peak measurement is flagged, not hidden


def test_combined_peak_is_the_larger_measurement():
    busy, quiet = Peak(80e9, 80e9, 60e9, "busy"), Peak(300e9, 300e9, 55e9, "quiet")
    both = combine_peaks(busy, quiet)
    assert (both.flops_per_s, both.fma_flops_per_s, both.mkl_flops_per_s) == (300e9, 300e9, 60e9)
    assert "[busy]" in both.source and "[quiet]" in both.source
    no_fma = combine_peaks(Peak(60e9, None, 60e9, "a"), Peak(50e9, None, 50e9, "b"))
    assert no_fma.fma_flops_per_s is None and no_fma.flops_per_s == 60e9


def test_gemm_script_quick_json(tmp_path):
    spec = importlib.util.spec_from_file_location("kiln_bench_gemm", REPO / "benchmarks" / "gemm.py")
    gemm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gemm)
    out = tmp_path / "gemm.json"
    threads = torch.get_num_threads()
    try:
        gemm.main(["--quick", "--shapes", "bmm 8x128x64x128", "--contenders", "kiln-tvm-tir", "--reps", "2",
                   "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(out.read_text())
    assert {"peak_fraction_best", "all_correct", "by_contender"} <= set(doc["summary"])
    (row,) = doc["rows"]
    assert row["model"] == "bmm 8x128x64x128" and row["torch_correct"] is True
    assert row["torch_peak_fraction"] > 0 and doc["peak"]["flops_per_s"] > 0
    assert [c["name"] for c in doc["contenders"]] == ["torch", "kiln-tvm-tir"]
