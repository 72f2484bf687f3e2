"""GEMM/conv micro-benchmark (issue 6): kiln's TVM GEMM/conv kernels as a fraction of the machine's peak.

Usage: ``python benchmarks/gemm.py [--quick] [--json PATH] [--tune-trials N] [--shapes a;b] [--reps N]
[--contenders a,b]``

Peak: measured at the start and again at the end of the same run (the larger counts), 2 threads
(``kiln.report.gemm.measure_peak``): a TIR FMA loop (TVMScript compiled by TVM for this CPU: per thread 12
independent 16-lane fp32 accumulators kept in AVX-512 registers, one fused multiply-add each per iteration, no
memory traffic: the FP32 FMA throughput, the ceiling no GEMM can pass) and a 2048^3 ``torch.mm`` (MKL). The
peak is the larger of the two (normally the FMA loop); both are printed and stored.

Workloads (``kiln.report.gemm.WORKLOADS``, fp32; ``--quick``: ``QUICK_WORKLOADS``): GEMMs MxKxN
64x512x1024, 256x1024x1024, 512x512x512, 1x4096x4096 (a GEMV: memory-bound), bmm 8x128x64x128 (BxMxKxN),
and convs: ResNet 3x3 64->64 at 56x56, 1x1 64->256 at 56x56, MobileNet depthwise 3x3 144 at 56x56.

Contenders (``--contenders``; default all):
- ``torch``: the PyTorch module itself (MKL/oneDNN);
- ``kiln-tvm-tir``: ``kiln.compile(target="tvm", pipeline=O2, backend_options={"gemm": "tvm"})``: the
  GEMM/conv as a TIR kernel with kiln's default schedule, untuned (a matmul: kiln's register-tiled GEMM
  template, ``kiln/backends/tvm/gemm_schedule.py``; a convolution, depthwise included: its direct-convolution
  template, ``conv_schedule.py``);
- ``kiln-tvm-tir-tuned``: the same with ``tune_trials=N`` (``--tune-trials``, default 64; 4 with
  ``--quick``);
- ``kiln-tvm-auto-tuned``: ``gemm="auto"`` with ``tune_trials=N``: the backend picks, by measurement,
  tuned TIR or PyTorch's kernel (the path it took is shown).
A ``gemm="tvm"`` contender whose GEMM/conv kernel still ran on PyTorch's path (the backend's
``kernel_paths``) is reported failed and unavailable ("not honoured"): it would be timing MKL under kiln's
name. Contenders
whose options the backend does not implement yet are reported unavailable with the reason.

Threads: 2 for torch and TVM; idle workers of both pools sleep instead of spinning
(``OMP_WAIT_POLICY=PASSIVE``, ``TVM_THREAD_POOL_SPIN_COUNT=0`` unless set in the environment), as in e2e.py.

Caches: kiln's default kernel cache and tuning database (``$KILN_CACHE_DIR``, default ``~/.cache/kiln``), so
a second run reuses the first one's tuning (the compile column is then not a cold figure; e2e.py measures
cold and warm compiles).

Per shape the contenders are built (compile time), checked against the PyTorch output
(``kiln.numerics``, atol scaled by the largest output element: long fp32 accumulations), and timed
interleaved (``--reps``, default 50, 10 with ``--quick``, after 3 warm-up rounds; medians). Columns:
median ms, GFLOP/s (FLOPs / median; a multiply-add is 2 FLOPs) and % of peak per contender.

Summary (``--json``): ``peak_fraction_best`` = max over shapes and kiln contenders whose output matched
of achieved FLOP/s / peak (kiln's best kernel, as a fraction of the FMA peak); where it was reached
(``peak_fraction_best_shape``/``_contender``); ``peak_fraction_best_tir``: the same over the cells whose
GEMM/conv ran as TIR (not PyTorch's kernel through the hybrid path); ``peak_fraction_by_shape``;
``torch_peak_fraction_best`` for scale; ``all_correct``; ``unavailable``; ``by_contender`` (max and geomean
fraction, GFLOP/s per shape).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Thread pools: 2 threads each, and idle workers sleep instead of spinning (unless the environment says
# otherwise). Contenders run interleaved on 2 cores: a runtime whose workers spin after a parallel region
# (libgomp for PyTorch/Inductor/MKL, TVM's pool) steals the cores from the next contender's first call.
for _var, _value in (("TVM_NUM_THREADS", "2"), ("TVM_THREAD_POOL_SPIN_COUNT", "0"), ("OMP_WAIT_POLICY", "PASSIVE")):
    os.environ.setdefault(_var, _value)
THREAD_ENV = {k: os.environ[k] for k in ("TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT", "OMP_WAIT_POLICY")}
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kiln.benchmarking import benchmark_args, markdown_table, select, tune_trials, write_report  # noqa: E402
from kiln.logs import track  # noqa: E402
from kiln.report.bench import Contender, kiln_contender, run_model  # noqa: E402
from kiln.report.gemm import (  # noqa: E402
    QUICK_WORKLOADS,
    WORKLOADS,
    add_rates,
    check_gemm_paths,
    combine_peaks,
    measure_peak,
    summarize,
)

THREADS = 2
CONTENDER_NAMES = ["torch", "kiln-tvm-tir", "kiln-tvm-tir-tuned", "kiln-tvm-auto-tuned"]


def make_contender(name: str, trials: int, pipeline: str) -> Contender:
    if name == "torch":
        return Contender("torch", lambda model, inputs: model, "eager")
    gemm = {"kiln-tvm-tir": "tvm", "kiln-tvm-tir-tuned": "tvm", "kiln-tvm-auto-tuned": "auto"}.get(name)
    if gemm is None:
        raise SystemExit(f"unknown contender {name!r}; valid: {', '.join(CONTENDER_NAMES)}")
    options = {"backend_options": {"gemm": gemm}}
    if name.endswith("-tuned"):
        options["tune_trials"] = trials
    return kiln_contender(name, "tvm", pipeline, **options)


def main(argv: list[str] | None = None) -> int:
    ap = benchmark_args(__doc__.split("\n\n")[0])
    ap.add_argument("--tune-trials", type=int, help="MetaSchedule trials for *-tuned contenders (default 64, 4 "
                                                    "with --quick)")
    ap.add_argument("--shapes", help=f"';'-separated subset of: {'; '.join(w.name for w in WORKLOADS)}")
    ap.add_argument("--contenders", help=f"comma-separated subset of {','.join(CONTENDER_NAMES)} (torch is "
                                         "always included)")
    ap.add_argument("--pipeline", default="O2", help="kiln pass pipeline (default O2)")
    ap.add_argument("--reps", type=int, help="timed rounds (default 50, 10 with --quick)")
    args = ap.parse_args(argv)
    by_name = {w.name: w for w in WORKLOADS}
    names = select(ap, args.shapes, QUICK_WORKLOADS if args.quick else list(by_name), by_name, "shape", ";")
    trials = tune_trials(ap, args.tune_trials, 4 if args.quick else 64)
    wanted = ["torch"] + [n for n in (args.contenders.split(",") if args.contenders else CONTENDER_NAMES)
                          if n and n != "torch"]
    contenders = [make_contender(n, trials, args.pipeline) for n in dict.fromkeys(wanted)]
    reps = args.reps or (10 if args.quick else 50)
    torch.set_num_threads(THREADS)
    peak = measure_peak(THREADS, quick=args.quick)
    print(f"gemm: {len(names)} shapes, {reps} reps, {THREADS} threads; peak {peak.flops_per_s / 1e9:.0f} GFLOP/s "
          f"({peak.source}); contenders: {', '.join(c.name for c in contenders)}; {THREAD_ENV}", file=sys.stderr)
    rows = []
    for name in track(names, "gemm shapes"):
        workload = by_name[name]
        model, inputs = workload.build(seed=0)
        row = run_model(name, model, inputs, contenders, warmup=3, reps=reps, output_scaled_atol=True)
        check_gemm_paths(row, contenders)
        rows.append(row)
    peak = combine_peaks(peak, measure_peak(THREADS, quick=args.quick))
    for row in rows:
        add_rates(row, by_name[row["model"]], contenders, peak)
    summary = summarize(rows, contenders, peak)
    print_table(rows, contenders, summary, peak)
    if args.json:
        write_report(args.json, rows, summary, {
            "contenders": [{"name": c.name, "kind": c.kind, **c.options} for c in contenders],
            "peak": vars(peak), "threads": THREADS, "tune_trials": trials, "quick": args.quick,
            "pipeline": args.pipeline, "thread_env": THREAD_ENV, "workloads": [{"name": w, "kind": by_name[w].kind,
                                                      "shape": by_name[w].shape, "flops": by_name[w].flops}
                                                     for w in names]})
        print(f"wrote {args.json}")
    return 0 if summary["all_correct"] else 1


def print_table(rows: list[dict], contenders: list[Contender], summary: dict, peak) -> None:
    cols = ["shape", "GFLOP"]
    table = []
    for r in rows:
        t = {"shape": r["model"], "GFLOP": r["flops"] / 1e9}
        for c in contenders:
            n = c.name
            if f"{n}_ms" not in r:
                t[f"{n} ms"] = "n/a" if r.get(f"{n}_unavailable") else "FAILED"
            else:
                t[f"{n} ms"] = f"{r[f'{n}_ms']:.3g}" + ("" if r.get(f"{n}_correct") else " (failed)")
            t[f"{n} GFLOP/s"] = r.get(f"{n}_gflops")
            frac = r.get(f"{n}_peak_fraction")
            t[f"{n} % peak"] = None if frac is None else 100 * frac
            if c.kind == "kiln":
                t[f"{n} path"] = r.get(f"{n}_gemm_path")
                t[f"{n} compile s"] = r.get(f"{n}_compile_s")
        table.append(t)
    for c in contenders:
        cols += [f"{c.name} ms", f"{c.name} GFLOP/s", f"{c.name} % peak"]
        if c.kind == "kiln":
            cols += [f"{c.name} path", f"{c.name} compile s"]
    print(f"torch threads: {torch.get_num_threads()}; median ms over the timed reps; GFLOP/s = FLOPs / median; "
          f"% peak = of {peak.flops_per_s / 1e9:.0f} GFLOP/s ({peak.source})")
    print(markdown_table(table, cols))
    for r in rows:
        for c in contenders:
            if r.get(f"{c.name}_error"):
                print(f"{r['model']}: {c.name}: {r[f'{c.name}_error']}")
    hidden = ("by_contender", "unavailable", "peak_fraction_by_shape", "above_peak")
    shown = {k: v for k, v in summary.items() if k not in hidden}
    print("summary: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    for name, reason in summary["unavailable"].items():
        print(f"unavailable: {name}: {reason}")
    if summary["above_peak"]:
        print(f"WARNING: faster than the measured peak (a disturbed peak measurement; fractions not to be trusted): "
              f"{', '.join(summary['above_peak'])}")


if __name__ == "__main__":
    sys.exit(main())
