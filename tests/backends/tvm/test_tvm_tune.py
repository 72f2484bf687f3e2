"""MetaSchedule tuning: GEMM/conv lowerings, tuned kernels, the persistent tuning database and the measured
TIR-vs-PyTorch choice per GEMM kernel. Trial budgets and shapes are tiny: these test the machinery, not speed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("tvm")

from kiln.backends.driver import compile_graph  # noqa: E402
from kiln.backends.tvm import backend as tvm_backend  # noqa: E402
from kiln.backends.tvm import tune as tune_mod  # noqa: E402
from kiln.backends.tvm.cache import KernelCache, KilnCacheWarning  # noqa: E402
from kiln.backends.tvm.kernel import build_kernel, cpu_target, graph_prim_func  # noqa: E402
from kiln.backends.tvm.packed_gemm import MKL_LINEAR  # noqa: E402
from kiln.backends.tvm.te_ops import GEMM_OPS, can_lower  # noqa: E402
from kiln.backends.tvm.tune import (  # noqa: E402
    KernelTuner,
    KilnTuningWarning,
    TracedSchedule,
    measure,
    measure_against,
)
from kiln.backends.tvm.tune_db import TuningDatabase, record_key  # noqa: E402
from kiln.errors import KilnInputError  # noqa: E402
from kiln.ir.builder import Builder  # noqa: E402
from kiln.ir.graph import Graph  # noqa: E402
from kiln.ir.ops import FUSED, aten  # noqa: E402
from kiln.ir.outline import outline_region  # noqa: E402
from kiln.ir.to_fx import to_fx  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.numerics import assert_match  # noqa: E402

TRIALS = 4


def _graph(shapes, build, dtype=torch.float32, name="t"):
    g = Graph(name)
    b = Builder(g)
    xs = [g.add_input(TensorType(tuple(s), dtype), f"x{i}") for i, s in enumerate(shapes)]
    out = build(b, *xs)
    g.set_outputs(list(out) if isinstance(out, (tuple, list)) else [out])
    return g


def _conv(b, x, w, bias, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1):
    return b.call(aten.convolution, x, w, bias, list(stride), list(padding), list(dilation), False, [0, 0], groups)


GEMM_CASES = [
    ("mm", [(8, 16), (16, 12)], lambda b, x, w: b.call(aten.mm, x, w)),
    ("addmm", [(12,), (8, 16), (16, 12)], lambda b, c, x, w: b.call(aten.addmm, c, x, w)),
    ("addmm_beta_alpha", [(8, 12), (8, 16), (16, 12)],
     lambda b, c, x, w: b.call(aten.addmm, c, x, w, beta=0.5, alpha=2.0)),
    ("bmm", [(3, 8, 16), (3, 16, 12)], lambda b, x, w: b.call(aten.bmm, x, w)),
    ("conv", [(2, 3, 9, 9), (4, 3, 3, 3), (4,)], lambda b, x, w, c: _conv(b, x, w, c)),
    ("conv_stride_nobias", [(1, 4, 10, 10), (6, 4, 3, 3)],
     lambda b, x, w: _conv(b, x, w, None, stride=(2, 2), padding=(0, 0))),
    ("conv_dilated", [(1, 2, 11, 11), (3, 2, 3, 3)], lambda b, x, w: _conv(b, x, w, None, dilation=(2, 2))),
    ("conv_grouped", [(1, 4, 8, 8), (6, 2, 3, 3), (6,)], lambda b, x, w, c: _conv(b, x, w, c, groups=2)),
    ("conv_depthwise", [(2, 4, 8, 8), (4, 1, 3, 3)], lambda b, x, w: _conv(b, x, w, None, groups=4)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,shapes,build", GEMM_CASES, ids=[c[0] for c in GEMM_CASES])
def test_gemm_and_conv_lowering_matches_pytorch(name, shapes, build, dtype):
    graph = _graph(shapes, build, dtype)
    assert all(can_lower(n) for n in graph.nodes)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    ref = to_fx(graph)(*inputs)
    got = build_kernel(graph)(*inputs)  # kiln's untuned schedule: slow for GEMM, but the same semantics
    assert_match(got, ref)


def test_transposed_convolution_is_refused():
    g = _graph([(1, 4, 5, 5), (4, 2, 3, 3)],
               lambda b, x, w: b.call(aten.convolution, x, w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1))
    (node,) = g.nodes
    assert not can_lower(node)


def _mm_relu(name="mmrelu", weight="fc.w", m=8, k=32, n=16, seed=0):
    g = Graph(name)
    b = Builder(g)
    x = g.add_input(TensorType((m, k), torch.float32), "x")
    w = b.weight(weight, torch.randn(k, n, generator=torch.Generator().manual_seed(seed)))
    g.set_outputs([b.call(aten.relu, b.call(aten.mm, x, w))])
    return g


def _epilogue_model(name="m", weight="fc.w"):
    """mm + relu outlined as an epilogue group, as kiln's fusion pass leaves it."""
    g = _mm_relu(name, weight)
    mm, relu = [n for n in g.nodes if n.op.name in ("aten.mm", "aten.relu")]
    outline_region(g, [mm, relu], FUSED, {"kind": "epilogue"}, "epi")
    return g


def _count_tunings(monkeypatch) -> list:
    calls = []
    original = tune_mod.tune_prim_func

    def counting(*a, **kw):
        calls.append(a[0])
        return original(*a, **kw)

    monkeypatch.setattr(tune_mod, "tune_prim_func", counting)
    return calls


def _compile(graph, tmp_path, **options):
    tvm_backend._KERNEL_CACHE.clear()  # a fresh process: only the disk remembers
    options = {"tune_trials": TRIALS, "cache_dir": tmp_path / "kernels", "tuning_dir": tmp_path / "tuning",
               **options}
    compiled = compile_graph(graph, "tvm", options)
    (exe,) = [m.fn for m in compiled.module.modules() if hasattr(m, "fn")]
    return compiled, exe


def _check(compiled, graph):
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    assert_match(compiled(x), to_fx(graph)(x))


def test_tuned_kernel_matches_eager_and_its_record_replays(tmp_path):
    graph = _mm_relu()
    db = TuningDatabase(tmp_path, cpu_target())
    tuner = KernelTuner(TRIALS, cpu_target(), KernelCache(False), db)
    kernel, info = tuner.kernel(graph)
    x = torch.randn(8, 32)
    assert_match(kernel(x)[0], torch.relu(x @ graph.weights["fc.w"]))
    assert info["source"] == "tuned" and tuner.stats.tuned == 1 and db.stats.stored == 1
    assert info["tuned_s"] > 0 and info["untuned_s"] > 0 and info["tuned"] == (info["tuned_s"] <= info["untuned_s"])
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())["payload"]
    replayed = build_kernel(graph, schedule=TracedSchedule(record["trace"]))  # the trace alone rebuilds it
    assert_match(replayed(x)[0], torch.relu(x @ graph.weights["fc.w"]))


def test_failed_tuning_falls_back_to_default_schedule_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(tune_mod, "tune_prim_func", lambda *a, **kw: None)
    tuner = KernelTuner(TRIALS, cpu_target(), KernelCache(False), TuningDatabase(tmp_path, cpu_target()))
    with pytest.warns(KilnTuningWarning, match="no candidate schedule"):
        kernel, info = tuner.kernel(_mm_relu())
    assert not info["tuned"] and tuner.stats.fell_back == 1
    again = KernelTuner(TRIALS, cpu_target(), KernelCache(False), TuningDatabase(tmp_path, cpu_target()))
    again.kernel(_mm_relu())  # the fallback is recorded: not retried at the same budget
    assert again.stats.reused == 1 and again.stats.fell_back == 0


def test_rejected_workload_is_retried_with_producers_inlined(tmp_path, monkeypatch):
    original, forms = tune_mod.tune_prim_func, []

    def reject_first(func, *a, **kw):
        forms.append(func)
        if len(forms) == 1:
            raise RuntimeError("ScheduleError: rejected by a rule")
        return original(func, *a, **kw)

    monkeypatch.setattr(tune_mod, "tune_prim_func", reject_first)
    graph = _graph([(8, 32), (32,)], lambda b, x, s: b.call(aten.relu, b.call(
        aten.mm, b.call(aten.mul.Tensor, x, s), b.weight("w", torch.randn(32, 16)))))
    db = TuningDatabase(tmp_path, cpu_target())
    kernel, info = KernelTuner(TRIALS, cpu_target(), KernelCache(False), db).kernel(graph)
    assert len(forms) == 2 and info["source"] == "tuned"
    (path,) = tmp_path.glob("*.json")
    assert json.loads(path.read_text())["payload"]["preparation"] == "inline"
    x, s = torch.randn(8, 32), torch.randn(32)
    assert_match(kernel(x, s), to_fx(graph)(x, s))


@pytest.fixture(scope="module")
def tuned_once(tmp_path_factory):
    """One tuned compile of the epilogue model (gemm=auto): its cache and tuning dirs, and what it reported."""
    root = tmp_path_factory.mktemp("tuned")
    graph = _epilogue_model()
    tvm_backend._KERNEL_CACHE.clear()
    compiled = compile_graph(graph, "tvm", {"tune_trials": TRIALS, "cache_dir": root / "kernels",
                                            "tuning_dir": root / "tuning"})
    (exe,) = [m.fn for m in compiled.module.modules() if hasattr(m, "fn")]
    return root, graph, compiled, exe


def _copy(tuned_once, tmp_path):
    root = tuned_once[0]
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)


def test_tuned_compile_matches_and_records_the_measured_choice(tuned_once):
    _, graph, compiled, exe = tuned_once
    _check(compiled, graph)
    gemm_entries = [p for p in exe.kernel_paths if set(p["ops"]) & GEMM_OPS]
    (entry,) = gemm_entries
    assert entry["path"] == entry["choice"] and entry["path"] in ("tvm", "torch")
    assert entry["tvm_s"] > 0 and entry["torch_s"] > 0
    assert entry["path"] == ("tvm" if entry["tvm_s"] <= entry["torch_s"] else "torch")
    tvm_entries = [p for p in exe.kernel_paths if p["path"] == "tvm"]
    assert tvm_entries and all(isinstance(p["tuned"], bool) and p["untuned_s"] > 0 for p in tvm_entries)
    summary = exe.tuning
    assert summary["tuned"] + summary["fell_back"] == 2  # the fused TIR GEMM and the epilogue-only kernel
    assert summary["gemm_choices_measured"] == 1 and summary["reused"] == 0


def test_second_compile_performs_no_tuning(tuned_once, tmp_path, monkeypatch):
    _copy(tuned_once, tmp_path)
    calls = _count_tunings(monkeypatch)
    graph = _epilogue_model("another_model", "layer.weight")  # same workload, other names
    compiled, exe = _compile(graph, tmp_path)
    assert calls == []
    assert exe.tuning["tuned"] == 0 and exe.tuning["gemm_choices_measured"] == 0
    assert exe.tuning["gemm_choices_reused"] == 1 and exe.tuning["reused"] >= 1
    first = [p for p in tuned_once[3].kernel_paths if set(p["ops"]) & GEMM_OPS][0]
    again = [p for p in exe.kernel_paths if set(p["ops"]) & GEMM_OPS][0]
    assert (again["path"], again["tvm_s"], again["torch_s"]) == (first["path"], first["tvm_s"], first["torch_s"])
    _check(compiled, graph)


def _damage_corrupt(path):
    path.write_text(path.read_text()[:40])


def _damage_foreign_version(path):
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "tvm": "0.1.0"}))


def _damage_edited_payload(path):
    record = json.loads(path.read_text())
    record["payload"]["trials"] = record["payload"]["trials"] + 100
    path.write_text(json.dumps(record))


def _damage_format(path):
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 999}))


@pytest.mark.parametrize("damage,reason", [
    (_damage_corrupt, "unreadable or not JSON"),
    (_damage_foreign_version, "tuned with TVM 0.1.0"),
    (_damage_edited_payload, "sha256 mismatch"),
    (_damage_format, "record format 999"),
], ids=["corrupt", "foreign-version", "edited", "foreign-format"])
def test_bad_tuning_record_is_ignored_with_a_warning_and_retuned(tuned_once, tmp_path, monkeypatch, damage, reason):
    _copy(tuned_once, tmp_path)
    kernel_records = [p for p in (tmp_path / "tuning").glob("*.json")
                      if "trace" in json.loads(p.read_text())["payload"]]
    for record in kernel_records:  # the compile reads one of them (the other is the unchosen variant's)
        damage(record)
    calls = _count_tunings(monkeypatch)
    with pytest.warns(KilnCacheWarning, match=reason) as caught:
        compiled, exe = _compile(_epilogue_model(), tmp_path)
    (victim,) = [p for p in kernel_records if any(str(p) in str(w.message) for w in caught)]
    assert len(calls) == 1  # only the damaged record's kernel is tuned again
    assert json.loads(victim.read_text())["tvm"] != "0.1.0"  # and its record rewritten
    _check(compiled, _epilogue_model())


def test_more_trials_than_recorded_retunes(tuned_once, tmp_path, monkeypatch):
    _copy(tuned_once, tmp_path)
    monkeypatch.setattr(tune_mod, "tune_prim_func", lambda *a, **kw: None)  # count without tuning
    with pytest.warns(KilnTuningWarning):
        _, exe = _compile(_epilogue_model(), tmp_path, tune_trials=TRIALS + 1)
    assert exe.tuning["reused"] == 0 and exe.tuning["fell_back"] >= 1


@pytest.mark.parametrize("gemm,path", [("tvm", "tvm"), ("torch", "torch")])
def test_gemm_option_forces_the_path(tuned_once, tmp_path, gemm, path):
    _copy(tuned_once, tmp_path)
    compiled, exe = _compile(_epilogue_model(), tmp_path, gemm=gemm)
    (entry,) = [p for p in exe.kernel_paths if set(p["ops"]) & (GEMM_OPS | {MKL_LINEAR})]
    assert entry["path"] == path and "choice" not in entry
    assert exe.tuning["tuned"] == 0  # both variants' kernels were tuned (and recorded) by the auto compile
    _check(compiled, _epilogue_model())


def test_untuned_compile_keeps_gemm_in_pytorch(tmp_path):
    compiled, exe = _compile(_epilogue_model(), tmp_path, tune_trials=0)
    (entry,) = [p for p in exe.kernel_paths if set(p["ops"]) & (GEMM_OPS | {MKL_LINEAR})]
    assert entry["path"] == "torch" and exe.tuning is None
    assert not (tmp_path / "tuning").exists()


@pytest.mark.parametrize("options", [{"tune_trials": -1}, {"tune_trials": "8"}, {"tune_trials": 4, "gemm": "x"},
                                     {"tune_trials": 4, "tune_kernel_s": 0}, {"tune_trials": 4, "tune_kernel_s": "9"}])
def test_bad_options_raise(tmp_path, options):
    with pytest.raises(KilnInputError):
        compile_graph(_epilogue_model(), "tvm", {"cache_dir": tmp_path, **options})


def test_search_that_runs_out_of_candidates_stops_before_its_trial_budget():
    # a one-element kernel has a handful of schedules: MetaSchedule alone would re-sample its population
    # forever waiting for 64 distinct candidates; kiln's callback ends the task after a round with none
    graph = _graph([(1,)], lambda b, x: b.call(aten.relu, x))
    trace, seconds, stopped = tune_mod.tune_prim_func(graph_prim_func(graph), cpu_target(), 64)
    assert seconds > 0 and stopped.startswith("search exhausted after ")
    assert int(stopped.split()[3]) < 64


def test_search_stops_after_the_round_that_spends_its_time_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(tune_mod, "trials_per_round", lambda trials: 4)
    graph = _graph([(64, 64)], lambda b, x: b.call(aten.relu, b.call(aten.mm, x, b.weight("w", torch.randn(64, 64)))))
    tuner = KernelTuner(64, cpu_target(), KernelCache(False), TuningDatabase(tmp_path, cpu_target()), time_s=1e-6)
    kernel, info = tuner.kernel(graph)  # the first round's candidates, then the budget ends the search
    assert info["stopped"] == "time budget of 1e-06 s spent after 4 candidates"
    x = torch.randn(64, 64)
    assert_match(kernel(x)[0], torch.relu(x @ graph.weights["w"]))


def test_kernel_over_the_op_limit_keeps_the_default_schedule_untuned(tmp_path, monkeypatch):
    calls = _count_tunings(monkeypatch)
    monkeypatch.setattr(tune_mod, "MAX_TUNED_OPS", 1)
    tuner = KernelTuner(TRIALS, cpu_target(), KernelCache(False), TuningDatabase(tmp_path, cpu_target()))
    graph = _mm_relu()
    kernel, info = tuner.kernel(graph)
    assert not calls and not info["tuned"] and info["untuned_s"] > 0 and tuner.summary()["skipped"] == 1
    assert info["stopped"] == "not tuned: 2 ops, over MAX_TUNED_OPS=1"
    x = torch.randn(8, 32)
    assert_match(kernel(x)[0], torch.relu(x @ graph.weights["fc.w"]))


def test_record_keys_separate_kinds_and_targets():
    assert record_key("kernel", "w", "llvm") != record_key("gemm-choice", "w", "llvm")
    assert record_key("kernel", "w", "llvm") != record_key("kernel", "w", "llvm -mcpu=x")


def test_measure_times_callables():
    x = torch.ones(256, 256)
    calls = []

    def counted(a):
        calls.append(1)
        return a + 1

    assert measure(counted, [x], repeats=3) > 0
    assert len(calls) >= 3  # at least one call per repeat (no wall-clock claims: the machine may be busy)
    times = measure_against({"one": lambda a: a @ a, "eight": lambda a: [a @ a for _ in range(8)]}, [x])
    assert set(times) == {"one", "eight"} and all(t > 0 for t in times.values())


@pytest.mark.slow
def test_lone_gemm_outside_groups_is_chosen_by_measurement(tmp_path):
    graph = _mm_relu()
    compiled, exe = _compile(graph, tmp_path)
    (entry,) = [p for p in exe.kernel_paths if set(p["ops"]) & GEMM_OPS]
    assert entry["path"] == entry["choice"] and entry["tvm_s"] > 0 and entry["torch_s"] > 0
    _check(compiled, graph)


@pytest.mark.slow
def test_tuned_conv_kernel_matches_eager(tmp_path):
    graph = _graph([(1, 8, 14, 14)], lambda b, x: b.call(aten.relu, _conv(
        b, x, b.weight("conv.w", torch.randn(16, 8, 3, 3)), b.weight("conv.b", torch.randn(16)))))
    tuner = KernelTuner(8, cpu_target(), KernelCache(False), TuningDatabase(tmp_path, cpu_target()))
    kernel, info = tuner.kernel(graph)
    assert info["source"] == "tuned" and tuner.stats.tuned == 1  # conv + bias + relu: MetaSchedule takes it
    x = torch.randn(1, 8, 14, 14)
    assert_match(kernel(x), to_fx(graph)(x), scale=10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp"])
def test_tuned_zoo_model_matches_reference(tmp_path, name):
    from examples.models import REGISTRY
    from kiln.frontend.export import from_export
    from kiln.passes.base import PassContext
    from kiln.passes.manager import PassManager, parse_pipeline

    model, inputs = REGISTRY[name]()
    graph = from_export(model, inputs)
    PassManager(parse_pipeline("O1")).run(graph, PassContext())
    compiled, exe = _compile(graph, tmp_path)
    assert exe.tuning["tuned"] + exe.tuning["fell_back"] >= 1
    assert_match(compiled(*inputs), to_fx(graph)(*inputs))


def test_trace_that_no_longer_applies_is_ignored_and_retuned(tuned_once, tmp_path, monkeypatch):
    from kiln.backends.tvm.tune_db import _payload_sha

    _copy(tuned_once, tmp_path)
    (victim,) = [p for p in (tmp_path / "tuning").glob("*.json") if "T_matmul_NN" in p.read_text()]
    record = json.loads(victim.read_text())
    payload = {**record["payload"], "choice": "tuned",
               "trace": record["payload"]["trace"].replace("T_matmul_NN", "no_such_block")}
    victim.write_text(json.dumps({**record, "payload": payload, "sha256": _payload_sha(payload)}))
    calls = _count_tunings(monkeypatch)
    with pytest.warns(KilnCacheWarning, match="trace does not apply"):
        compiled, exe = _compile(_epilogue_model(), tmp_path, gemm="tvm")
    assert len(calls) == 1 and "no_such_block" not in victim.read_text()
    _check(compiled, _epilogue_model())
