"""``kiln.report.bench`` (shared by ``kiln bench`` and ``benchmarks/e2e.py``): contenders as a table,
correctness before speed, interleaved timing statistics, summary geomeans, the JSON layout."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from kiln.errors import KilnInputError
from kiln.report.bench import CONTENDERS, Contender, contenders_for, run_model, summarize
from kiln.report.roofline import REFERENCE_PEAKS

REPO = Path(__file__).resolve().parents[2]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval(), (torch.randn(4, 8),)


def _wrong() -> Contender:
    return Contender("wrong", lambda model, inputs: (lambda *x: model(*x) + 1.0), "kiln")


def _broken() -> Contender:
    def build(model, inputs):
        raise RuntimeError("cannot compile")
    return Contender("broken", build, "other")


def test_contender_table_and_validation():
    assert list(CONTENDERS) == ["eager", "inductor", "kiln"]
    names = [c.name for c in contenders_for(["reference", "tvm", "reference"], inductor=False)]
    assert names == ["eager", "kiln", "kiln-tvm"]
    with pytest.raises(KilnInputError, match="unknown target 'gpu'"):
        contenders_for(["gpu"])
    with pytest.raises(KilnInputError, match="unknown pass or pipeline"):
        contenders_for(["reference"], pipeline="O1,nope")


def test_wrong_answers_are_failures_never_speedups():
    model, inputs = _model()
    contenders = [*contenders_for(["reference"], inductor=False), _wrong(), _broken()]
    row = run_model("lin", model, inputs, contenders, warmup=1, reps=3, peaks=REFERENCE_PEAKS)
    assert row["kiln_correct"] and row["eager_correct"]
    assert row["kiln_speedup_vs_eager"] == pytest.approx(row["eager_ms"] / row["kiln_ms"])
    assert row["kiln_speedup_vs_inductor"] is None  # no Inductor in this run
    assert row["wrong_correct"] is False and row["wrong_speedup_vs_eager"] is None
    assert "not close" in row["wrong_error"] and "wrong_ms" in row  # still timed, shown, not credited
    assert row["broken_correct"] is False and row["broken_error"] == "RuntimeError: cannot compile"
    assert "broken_ms" not in row
    for c in ("eager", "kiln", "wrong"):
        assert row[f"{c}_min_ms"] <= row[f"{c}_ms"] <= row[f"{c}_max_ms"]
    assert row["kiln_compile_s"] > 0 and "eager_compile_s" not in row
    assert row["flops"] > 0 and row["bytes"] > 0 and row["roofline_ms"] > 0 and row["kiln_pct_of_roofline"] > 0
    summary = summarize([row], contenders)
    assert summary["all_correct"] is False and summary["kiln_contender"] == "kiln"
    assert summary["speedup_vs_eager_geomean"] == pytest.approx(row["kiln_speedup_vs_eager"])
    assert summary["by_contender"]["wrong"]["speedup_vs_eager_geomean"] is None


def test_summary_geomeans_over_correct_rows():
    contenders = contenders_for(["reference"], inductor=True)
    rows = [{"eager_correct": True, "inductor_correct": True, "kiln_correct": True,
             "kiln_speedup_vs_eager": 2.0, "kiln_speedup_vs_inductor": 0.5, "inductor_speedup_vs_eager": 4.0},
            {"eager_correct": True, "inductor_correct": True, "kiln_correct": True,
             "kiln_speedup_vs_eager": 8.0, "kiln_speedup_vs_inductor": 2.0, "inductor_speedup_vs_eager": 4.0},
            {"eager_correct": True, "inductor_correct": True, "kiln_correct": False,
             "kiln_speedup_vs_eager": None, "kiln_speedup_vs_inductor": None, "inductor_speedup_vs_eager": 1.0}]
    s = summarize(rows, contenders)
    assert s["speedup_vs_eager_geomean"] == pytest.approx(4.0)
    assert s["speedup_vs_inductor_geomean"] == pytest.approx(1.0)
    assert s["by_contender"]["inductor"]["speedup_vs_eager_geomean"] == pytest.approx(16 ** (1 / 3))
    assert s["all_correct"] is False and s["models"] == 3


def test_e2e_script_quick_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("kiln_bench_e2e", REPO / "benchmarks" / "e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    out = tmp_path / "e2e.json"
    threads = torch.get_num_threads()
    try:
        rc = e2e.main(["--quick", "--models", "mlp", "--no-inductor", "--reps", "2", "--warmup", "1",
                       "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"rows", "summary", "env", "contenders", "machine"}
    assert {"speedup_vs_eager_geomean", "speedup_vs_inductor_geomean", "all_correct"} <= set(doc["summary"])
    assert doc["summary"]["all_correct"] is True and doc["summary"]["speedup_vs_inductor_geomean"] is None
    assert math.isfinite(doc["summary"]["speedup_vs_eager_geomean"])
    (row,) = doc["rows"]
    assert row["model"] == "mlp" and row["reps"] == 2 and doc["env"]["torch_threads"] == 2
    assert "| mlp |" in capsys.readouterr().out


@pytest.mark.slow
def test_kiln_bench_cli_with_inductor(tmp_path, capsys, monkeypatch):
    from kiln.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        rc = main(["bench", "examples/models/mlp.py:make_model", "--size", "small", "--reps", "5",
                   "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["inductor_correct"] and row["kiln_correct"]
    assert doc["summary"]["speedup_vs_inductor_geomean"] == pytest.approx(row["kiln_speedup_vs_inductor"])
    assert "kiln_speedup_vs_inductor" in capsys.readouterr().out
