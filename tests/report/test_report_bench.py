"""``kiln.report.bench`` (shared by ``kiln bench`` and ``benchmarks/e2e.py``): contenders as a table,
correctness before speed, interleaved timing statistics, summary geomeans, the JSON layout."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from kiln.errors import KilnInputError, UnsupportedError
from kiln.report.bench import (
    CONTENDERS,
    Contender,
    add_speedups,
    contenders_for,
    headline_kiln,
    kernel_path_counts,
    named_contender,
    run_model,
    summarize,
    tuning_totals,
)
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
    assert list(CONTENDERS) == ["eager", "inductor", "inductor-freezing", "openvino", "kiln"]
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
        rc = e2e.main(["--quick", "--models", "mlp", "--contenders", "kiln", "--pipeline", "O1", "--reps", "2",
                       "--warmup", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"rows", "summary", "env", "contenders", "machine"}
    assert {"speedup_vs_eager_geomean", "speedup_vs_inductor_geomean", "speedup_vs_best_peer_geomean",
            "all_correct", "warm_compile_s_max", "by_contender"} <= set(doc["summary"])
    assert doc["summary"]["all_correct"] is True and doc["summary"]["speedup_vs_inductor_geomean"] is None
    assert doc["summary"]["kiln_contender"] == "kiln" and doc["summary"]["speedup_vs_best_peer_geomean"] is None
    assert [c["name"] for c in doc["contenders"]] == ["eager", "kiln"]
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
    assert "kiln vs inductor" in capsys.readouterr().out


def test_named_contenders():
    names = ["eager", "inductor", "inductor-freezing", "openvino", "kiln", "kiln-tvm", "kiln-tvm-tuned"]
    cs = [named_contender(n, pipeline="O2", tune_trials=7) for n in names]
    assert [c.name for c in cs] == names
    assert [c.kind for c in cs] == ["eager", "inductor", "inductor", "openvino", "kiln", "kiln", "kiln"]
    assert cs[2].options == {"freezing": True} and cs[2].compile_context is not None
    assert cs[3].options["config"]["INFERENCE_PRECISION_HINT"] == "f32" and cs[3].options["device"] == "CPU"
    assert cs[4].options == {"target": "reference", "pipeline": "O2"}
    assert cs[6].options == {"target": "tvm", "pipeline": "O2", "tune_trials": 7}
    assert all(c.reset is not None for c in cs[1:])
    with pytest.raises(KilnInputError, match="unknown contender 'tvm'"):
        named_contender("tvm")
    with pytest.raises(KilnInputError, match="unknown target 'gpu'"):
        named_contender("kiln-gpu-tuned")


def test_freezing_is_scoped_to_the_compile():
    import torch._inductor.config as inductor_config

    c = named_contender("inductor-freezing")
    assert inductor_config.freezing is False
    with c.compile_context():
        assert inductor_config.freezing is True
    assert inductor_config.freezing is False


def _row(**ms_correct):
    row = {"model": "m"}
    for name, (ms, ok) in ms_correct.items():
        name = name.replace("_", "-")
        if ms is not None:
            row[f"{name}_ms"] = ms
        row[f"{name}_correct"] = ok
    return row


def _issue6():
    return [named_contender(n, tune_trials=4) for n in
            ("eager", "inductor", "inductor-freezing", "openvino", "kiln-tvm", "kiln-tvm-tuned")]


def test_best_peer_is_the_fastest_correct_peer():
    cs = _issue6()
    row = _row(eager=(10.0, True), inductor=(8.0, True), inductor_freezing=(4.0, True), openvino=(2.0, False),
               kiln_tvm=(5.0, True), kiln_tvm_tuned=(2.0, True))
    add_speedups(row, cs)
    assert row["best_peer"] == "inductor-freezing" and row["best_peer_ms"] == 4.0  # openvino is wrong
    assert row["kiln-tvm-tuned_speedup_vs_best_peer"] == pytest.approx(2.0)
    assert row["kiln-tvm-tuned_speedup_vs_inductor"] == pytest.approx(4.0)
    assert row["kiln-tvm_speedup_vs_best_peer"] == pytest.approx(0.8)
    assert row["openvino_speedup_vs_eager"] is None and "openvino_speedup_vs_best_peer" not in row
    none = _row(eager=(10.0, True), inductor=(8.0, False), openvino=(None, False), kiln_tvm=(5.0, True))
    add_speedups(none, cs)
    assert none["best_peer"] is None and none["kiln-tvm_speedup_vs_best_peer"] is None
    assert none["kiln-tvm_speedup_vs_inductor"] is None and none["kiln-tvm_speedup_vs_eager"] == 2.0


def test_summary_headline_is_the_tuned_kiln_unless_unavailable():
    cs = _issue6()
    rows = []
    for peer_ms, tuned_ms, warm in ((4.0, 2.0, 0.5), (9.0, 1.0, 0.8)):
        r = _row(eager=(10.0, True), inductor=(peer_ms, True), inductor_freezing=(None, False),
                 openvino=(None, False), kiln_tvm=(5.0, True), kiln_tvm_tuned=(tuned_ms, True))
        r["openvino_unavailable"], r["openvino_error"] = True, "ModuleNotFoundError: No module named 'openvino'"
        r["inductor-freezing_error"] = "RuntimeError: boom"
        r["kiln-tvm-tuned_compile_warm_s"] = warm
        add_speedups(r, cs)
        rows.append(r)
    s = summarize(rows, cs)
    assert headline_kiln(rows, cs) == s["kiln_contender"] == "kiln-tvm-tuned"
    assert s["speedup_vs_eager_geomean"] == pytest.approx(math.sqrt(5 * 10))
    assert s["speedup_vs_best_peer_geomean"] == pytest.approx(math.sqrt(2 * 9))
    assert s["warm_compile_s_max"] == 0.8 and s["all_correct"] is True
    assert s["peers_all_correct"] is False  # inductor-freezing failed; unavailable openvino does not count
    assert s["unavailable"] == {"openvino": "ModuleNotFoundError: No module named 'openvino'"}
    assert s["by_contender"]["kiln-tvm"]["speedup_vs_best_peer_geomean"] == pytest.approx(math.sqrt(0.8 * 1.8))
    for r in rows:  # tuning not built: the untuned contender is the headline, all_correct ignores the n/a cells
        for k in [k for k in r if k.startswith("kiln-tvm-tuned_")]:
            del r[k]
        r["kiln-tvm-tuned_correct"], r["kiln-tvm-tuned_unavailable"] = False, True
        r["kiln-tvm-tuned_error"] = "UnsupportedError: tuning is not implemented"
    s = summarize(rows, cs)
    assert s["kiln_contender"] == "kiln-tvm" and s["speedup_vs_eager_geomean"] == pytest.approx(2.0)
    assert s["all_correct"] is True and s["warm_compile_s_max"] is None
    assert s["unavailable"]["kiln-tvm-tuned"].startswith("UnsupportedError")
    rows[0]["kiln-tvm_correct"] = False  # a wrong available kiln cell
    assert summarize(rows, cs)["all_correct"] is False


def test_unavailable_contenders_and_warm_compiles(monkeypatch):
    model, inputs = _model()
    calls = {"reset": 0, "context": 0}

    def reset():
        calls["reset"] += 1

    class Context:
        def __enter__(self):
            calls["context"] += 1

        def __exit__(self, *exc):
            return False

    def not_built(model, inputs):
        raise UnsupportedError("option 'tune_trials' is not implemented yet")

    counted = Contender("counted", lambda m, i: m, "inductor", {}, reset, Context)
    contenders = [*contenders_for(["reference"], inductor=False), counted,
                  Contender("kiln-later", not_built, "kiln"), named_contender("openvino")]
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed: import raises ImportError
    monkeypatch.setitem(sys.modules, "openvino.torch", None)
    row = run_model("lin", model, inputs, contenders, warmup=1, reps=2, warm_compile=True)
    assert calls == {"reset": 2, "context": 3}  # reset: cold and warm builds; context: those + the settling call
    assert row["counted_compile_warm_s"] > 0 and row["kiln_compile_warm_s"] > 0
    assert row["counted_warm_cache"] == {}  # no Inductor compile happened
    assert row["kiln-later_unavailable"] and row["kiln-later_error"].startswith("UnsupportedError")
    assert row["openvino_unavailable"] and row["openvino_error"].startswith("ModuleNotFoundError")
    assert row["best_peer"] == "counted"
    s = summarize([row], contenders)
    assert s["all_correct"] is True and s["kiln_contender"] == "kiln"
    assert set(s["unavailable"]) == {"kiln-later", "openvino"}


def test_kernel_path_counts():
    class Fn:
        def __call__(self, *a):
            return a

    fn = Fn()
    fn.kernel_paths = [{"kernel": "a", "path": "tvm", "ops": ["aten.add"]},
                       {"kernel": "b", "path": "torch", "ops": ["aten.mm"]},
                       {"kernel": "c", "path": "tvm", "ops": ["aten.convolution.default", "aten.relu"]}]
    executables = [fn]

    class Compiled:  # a kiln.compile result: the backend executables, one per partition
        compiled = type("CG", (), {"executables": executables})()

    assert kernel_path_counts(Compiled()) == {"torch": 1, "tvm": 2}
    assert kernel_path_counts(Compiled(), gemm_only=True) == {"torch": 1, "tvm": 1}
    assert tuning_totals(Compiled()) is None  # untuned
    fn.tuning = {"tuned": 2, "reused": 1, "fell_back": 0, "gemm_choices_measured": 1, "tuning_s": 3.5,
                 "kernels": [{}]}
    executables.append(Fn())
    executables[1].tuning = {"tuned": 0, "reused": 4, "tuning_s": 0.0}
    assert tuning_totals(Compiled()) == {"tuned": 2, "reused": 5, "fell_back": 0, "gemm_choices_measured": 1,
                                         "gemm_choices_reused": 0, "tuning_s": 3.5}
    assert kernel_path_counts(object()) is None


def test_openvino_retries_with_aot_autograd_and_notes_it(monkeypatch):
    import types

    seen = []

    def fake_compile(model, backend=None, options=None, **kw):
        seen.append(dict(options))

        def fn(*x):
            if not options.get("aot_autograd"):
                raise AssertionError("sources must not be empty for symbol s7")
            return model(*x)
        return fn

    fake = types.ModuleType("openvino")
    fake.torch = types.ModuleType("openvino.torch")
    monkeypatch.setitem(sys.modules, "openvino", fake)
    monkeypatch.setitem(sys.modules, "openvino.torch", fake.torch)
    monkeypatch.setattr(torch, "compile", fake_compile)
    model, inputs = _model()
    row = run_model("lin", model, inputs, [named_contender("eager"), named_contender("openvino")], warmup=0, reps=1)
    note = row["openvino_note"]
    assert row["openvino_correct"] and "aot_autograd=True" in note and "symbol s7" in note
    assert [o.get("aot_autograd") for o in seen] == [None, True]
    threads = str(torch.get_num_threads())
    assert seen[0]["config"] == {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}


def test_select_and_tune_trials_check_benchmark_arguments():
    from kiln.benchmarking import benchmark_args, select, tune_trials

    ap = benchmark_args("t")
    assert select(ap, None, ["a"], ["a", "b"], "model") == ["a"]
    assert select(ap, "b; a", [], ["a", "b"], "shape", ";") == ["b", "a"]
    with pytest.raises(SystemExit):
        select(ap, "c", [], ["a", "b"], "model")
    assert tune_trials(ap, None, 32) == 32 and tune_trials(ap, 4, 32) == 4
    with pytest.raises(SystemExit):
        tune_trials(ap, 0, 32)


def test_builds_do_not_walk_what_earlier_contenders_left_alive():
    import gc

    from kiln.report.bench import Contender, _build_and_call

    seen = []

    def build(model, inputs):
        seen.append(gc.get_freeze_count())
        return model

    _build_and_call(Contender("frozen", build, "other"), torch.nn.Identity(), (torch.ones(2),))
    assert seen[0] > 0 and gc.get_freeze_count() == 0  # frozen during the build only
