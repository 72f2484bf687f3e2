"""End-to-end benchmark (issues 5 and 6): every zoo model in eager PyTorch, its compilers and kiln, one run.

Usage: ``python benchmarks/e2e.py [--quick] [--json PATH] [--models mlp,gpt] [--contenders a,b,...]
[--tune-trials N] [--pipeline O2] [--cache-dir DIR] [--warm] [--reps N] [--warmup N]``

Contenders (``--contenders``, default all of ``DEFAULT_CONTENDERS``; with ``--quick`` all but the tuned
one, which does not fit the smoke test's two minutes; names as in ``kiln.report.bench.named_contender``):
- ``eager``: the model itself;
- ``inductor``: ``torch.compile(model)``, default mode; ``inductor-freezing``: the same with
  ``torch._inductor.config.freezing = True`` during its compiles only (weights become constants);
- ``openvino``: ``torch.compile(model, backend="openvino")``, device CPU, ``INFERENCE_PRECISION_HINT`` f32,
  2 inference threads; an optional peer (``pip install openvino``, in the ``bench`` extra): when the
  package is missing or a compile fails the cell says so and the run goes on;
- ``kiln-tvm``: ``kiln.compile(target="tvm", pipeline=O2)``, kiln's default schedules (no tuning);
- ``kiln-tvm-tuned``: the same with ``tune_trials=N`` (``--tune-trials``, default 32; 2 with ``--quick``):
  MetaSchedule tuning with the persistent tuning database, GEMM/conv on PyTorch's MKL/oneDNN kernels
  (``--tuned-gemm torch``, the default: the ``auto`` choice tunes and times every GEMM/conv in TIR too, and
  buys little here: with kiln's GEMM/conv templates, resnet18 at 8 trials took 2 of its GEMM/conv kernels to
  TIR and ran 24.8 ms against 24.9 untuned, after a 565 s cold compile; session 9). Where kiln refuses the option
  (``UnsupportedError``) the cell is reported unavailable with that reason.
Any ``kiln``, ``kiln-<target>`` or ``kiln-<target>-tuned`` name works too (e.g. ``kiln`` = reference target).

Per model (size ``bench``; with ``--quick``: size ``small``, ``QUICK_MODELS``, 5 reps, no warm compile
unless ``--warm``,
no tuned contender unless ``--contenders`` names it)
``kiln.report.bench.run_model`` builds every contender (cold compile), builds it again after dropping the
process's compile caches (warm compile: Inductor's on-disk FX graph cache, kiln's on-disk kernel cache
and tuning database), checks each output against eager (a mismatch is a failure, never a speed-up), times
all contenders interleaved (median and min-max), and adds roofline columns from kiln's graph with the
machine's peaks measured in this run. 2 threads (torch, OpenVINO and TVM's ``num-cores``); idle pool workers
sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE``, ``TVM_THREAD_POOL_SPIN_COUNT=0``, unless set in the
environment): on 2 cores, interleaved, one runtime's spinning workers steal the next contender's cores
(measured here under load: resnet18 small eager 29 ms median spinning vs 3.8 ms passive, max 258 vs 16 ms).

Caches: by default every run starts from an empty temporary cache directory (``KILN_CACHE_DIR`` and
``TORCHINDUCTOR_CACHE_DIR`` point into it), so "cold" means cold; kernels and tuning records are still
shared between models of the same run (identical workloads). ``--cache-dir DIR`` keeps them in ``DIR``
instead (reused by the next run: its cold compiles are then warm-ish; the JSON records which). ``--quick``
uses the user's default cache directories (a smoke test: its compile times are not the cold figures).

Summary (``--json``): the top-level keys describe one kiln contender, ``summary.kiln_contender``:
``kiln-tvm-tuned`` when it is in the run and available, else the first available kiln contender
(``kiln.report.bench.headline_kiln``). ``speedup_vs_eager_geomean``, ``speedup_vs_inductor_geomean``
(default Inductor), ``speedup_vs_best_peer_geomean`` (per model, the fastest correct of Inductor,
Inductor+freezing and OpenVINO) are geomeans over the models where both sides match eager;
``warm_compile_s_max`` is that contender's slowest warm compile; ``all_correct`` says every available kiln
cell matched eager; ``unavailable`` lists contenders that are not built/installed, with the reason;
``by_contender`` has the same figures for every contender. Exit status 1 when ``all_correct`` is false.
After each model the tables so far go to stderr and the JSON is rewritten (``meta.complete`` false until the
last model), so a stopped run keeps what it measured.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Thread pools: 2 threads each, and idle workers sleep instead of spinning (unless the environment says
# otherwise). Contenders run interleaved on 2 cores: a runtime whose workers spin after a parallel region
# (libgomp for PyTorch/Inductor/MKL, TVM's pool) steals the cores from the next contender's first call.
for _var, _value in (("TVM_NUM_THREADS", "2"), ("TVM_THREAD_POOL_SPIN_COUNT", "0"), ("OMP_WAIT_POLICY", "PASSIVE")):
    os.environ.setdefault(_var, _value)
THREAD_ENV = {k: os.environ[k] for k in ("TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT", "OMP_WAIT_POLICY")}
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.models import REGISTRY  # noqa: E402
from kiln.benchmarking import benchmark_args, select, tune_trials  # noqa: E402
from kiln.logs import track  # noqa: E402
from kiln.report.bench import named_contender, print_results, run_model, summarize, write_json  # noqa: E402
from kiln.report.roofline import measure_machine  # noqa: E402

QUICK_MODELS = ["mlp", "resnet18", "transformer"]  # --quick: a smoke test under two minutes
DEFAULT_CONTENDERS = ["eager", "inductor", "inductor-freezing", "openvino", "kiln-tvm", "kiln-tvm-tuned"]
QUICK_CONTENDERS = [c for c in DEFAULT_CONTENDERS if not c.endswith("-tuned")]  # tuning does not fit 2 minutes
THREADS = 2


def _caches_note(cache_root: Path | None, fresh: bool) -> str:
    if cache_root is None:
        return "the user's default kiln and Inductor cache directories (as previous runs left them)"
    return f"{cache_root} ({'fresh, deleted after the run' if fresh else 'kept'})"


def main(argv: list[str] | None = None) -> int:
    ap = benchmark_args(__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(REGISTRY)}")
    ap.add_argument("--contenders", help=f"comma-separated (default {','.join(DEFAULT_CONTENDERS)}); eager is "
                                         "always included")
    ap.add_argument("--tune-trials", type=int, help="MetaSchedule trials for *-tuned contenders (default 32, "
                                                    "2 with --quick)")
    ap.add_argument("--tuned-gemm", choices=("torch", "auto", "tvm"), default="torch",
                    help="the tuned contenders' GEMM/conv path (backend option gemm; default torch: MKL/oneDNN, "
                         "TVM tunes the other kernels; auto also tunes every GEMM/conv in TIR and times it "
                         "against PyTorch's, ~13 min for resnet18 alone at 4 trials)")
    ap.add_argument("--pipeline", default="O2", help="kiln pass pipeline (default O2)")
    ap.add_argument("--cache-dir", help="keep kiln's and Inductor's caches here (default: a fresh temporary "
                                        "directory per run)")
    ap.add_argument("--warm", action="store_true", help="measure warm compiles with --quick too")
    ap.add_argument("--reps", type=int, help="timed rounds (default 20, 5 with --quick)")
    ap.add_argument("--warmup", type=int, help="untimed rounds (default 3)")
    args = ap.parse_args(argv)
    names = select(ap, args.models, QUICK_MODELS if args.quick else list(REGISTRY), REGISTRY, "model")
    trials = tune_trials(ap, args.tune_trials, 2 if args.quick else 32)
    default = QUICK_CONTENDERS if args.quick else DEFAULT_CONTENDERS
    wanted = ["eager"] + [n for n in (args.contenders.split(",") if args.contenders else default) if n and n != "eager"]
    contenders = [named_contender(n, pipeline=args.pipeline, tune_trials=trials,
                                  backend_options={"gemm": args.tuned_gemm} if n.endswith("-tuned") else None)
                  for n in dict.fromkeys(wanted)]
    size = "small" if args.quick else "bench"
    reps = args.reps or (5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else 3
    saved_env = {k: os.environ.get(k) for k in ("KILN_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    fresh = not args.cache_dir and not args.quick
    tmp = tempfile.TemporaryDirectory(prefix="kiln-e2e-") if fresh else None
    where = args.cache_dir or (tmp.name if tmp else None)
    cache_root = Path(where).expanduser().resolve() if where else None
    try:
        if cache_root is not None:
            os.environ["KILN_CACHE_DIR"] = str(cache_root / "kiln")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / "inductor")
        torch.set_num_threads(THREADS)
        peaks = measure_machine(quick=args.quick)

        def meta(complete: bool) -> dict:
            return {"complete": complete, "size": size, "quick": args.quick, "threads": THREADS,
                    "tune_trials": trials, "tuned_gemm": args.tuned_gemm, "pipeline": args.pipeline,
                    "caches": _caches_note(cache_root, fresh), "caches_fresh": fresh, "thread_env": THREAD_ENV,
                    "machine": vars(peaks)}

        print(f"e2e: {len(names)} models, size {size}, {reps} reps after {warmup} warm-up rounds, {THREADS} "
              f"threads; contenders: {', '.join(c.name for c in contenders)}; caches: "
              f"{_caches_note(cache_root, fresh)}; {THREAD_ENV}", file=sys.stderr)
        rows = []
        for name in track(names, "e2e models"):
            model, inputs = REGISTRY[name](size=size, seed=0)
            rows.append(run_model(name, model, inputs, contenders, warmup=warmup, reps=reps, peaks=peaks,
                                  warm_compile=args.warm or not args.quick))
            # a long run (tuning) that is stopped keeps what it measured: the tables so far go to stderr and
            # the JSON is rewritten after every model, marked incomplete until the last one
            print(f"  {name}: done; results so far:", file=sys.stderr)
            print_results(rows, summarize(rows, contenders), contenders,
                          out=lambda line: print(line, file=sys.stderr))
            if args.json:
                write_json(args.json, rows, summarize(rows, contenders), contenders,
                           meta(complete=len(rows) == len(names)))
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if tmp is not None:
            tmp.cleanup()
    summary = summarize(rows, contenders)
    print_results(rows, summary, contenders)
    print(f"roofline peaks: {peaks.source}")
    if args.json:
        print(f"wrote {args.json}")
    return 0 if summary["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
