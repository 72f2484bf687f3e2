"""End-to-end benchmark (issue 5): every zoo model in eager PyTorch, Inductor and kiln, side by side, one run.

Usage: ``python benchmarks/e2e.py [--quick] [--json PATH] [--models mlp,gpt] [--target reference ...]
[--pipeline O1] [--no-inductor] [--reps N] [--warmup N]``

For each model of ``examples.models.REGISTRY`` (size ``bench``; with ``--quick``: size ``small``, 5 reps
and only ``QUICK_MODELS`` unless ``--models`` says otherwise) the code of
``kiln bench`` (``kiln.report.bench.run_model``) builds every contender, checks its outputs against
eager (a mismatch is a failure, never a speed-up), times them interleaved (median and min-max over the
timed reps) and adds roofline columns from kiln's graph with the machine's peaks measured in this run.
2 threads. The JSON's ``summary`` holds ``speedup_vs_eager_geomean`` and ``speedup_vs_inductor_geomean``
(kiln's first target over the correct rows) and ``all_correct``; exit status 1 when a kiln
contender's outputs do not match eager; per-contender figures are under
``summary.by_contender``. Contenders are a table (``kiln.report.bench.CONTENDERS``): adding a peer or a
variant (e.g. a tuned TVM target) is one more entry.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.models import REGISTRY  # noqa: E402
from kiln.benchmarking import benchmark_args  # noqa: E402
from kiln.logs import track  # noqa: E402
from kiln.report.bench import contenders_for, print_results, run_model, summarize, write_json  # noqa: E402
from kiln.report.roofline import measure_machine  # noqa: E402

QUICK_MODELS = ["mlp", "resnet18", "transformer"]  # --quick: a smoke test under two minutes


def main(argv: list[str] | None = None) -> int:
    ap = benchmark_args(__doc__.split("\n\n")[0])
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(REGISTRY)}")
    ap.add_argument("--target", action="append", help="kiln target (repeatable; default reference)")
    ap.add_argument("--pipeline", default="O1", help="kiln pass pipeline (default O1)")
    ap.add_argument("--no-inductor", action="store_true", help="leave out torch.compile (Inductor)")
    ap.add_argument("--reps", type=int, help="timed rounds (default 20, 5 with --quick)")
    ap.add_argument("--warmup", type=int, help="untimed rounds (default 3)")
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else list(REGISTRY))
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; available: {', '.join(REGISTRY)}")
    torch.set_num_threads(2)
    size = "small" if args.quick else "bench"
    reps = args.reps or (5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else 3
    contenders = contenders_for(args.target or ["reference"], args.pipeline, inductor=not args.no_inductor)
    peaks = measure_machine(quick=args.quick)
    print(f"e2e: {len(names)} models, size {size}, {reps} reps after {warmup} warm-up rounds, 2 threads; "
          f"contenders: {', '.join(c.name for c in contenders)}", file=sys.stderr)
    rows = []
    for name in track(names, "e2e models"):
        model, inputs = REGISTRY[name](size=size, seed=0)
        rows.append(run_model(name, model, inputs, contenders, warmup=warmup, reps=reps, peaks=peaks,
                              warm_compile=not args.quick))
        print(f"  {name}: done", file=sys.stderr)
    summary = summarize(rows, contenders)
    print_results(rows, summary, contenders)
    print(f"roofline peaks: {peaks.source}")
    if args.json:
        write_json(args.json, rows, summary, contenders, {"size": size, "quick": args.quick, "machine": vars(peaks)})
        print(f"wrote {args.json}")
    kiln_ok = all(v["all_correct"] for k, v in summary["by_contender"].items() if k.startswith("kiln"))
    return 0 if kiln_ok else 1  # an Inductor mismatch is reported in the table, kiln's own is a failure


if __name__ == "__main__":
    sys.exit(main())
