"""Fusion benchmark (fusion issue): kernels and intermediate traffic before/after kiln's ``fuse``, beside Inductor.

Usage: ``python benchmarks/fusion.py [--quick] [--json PATH] [--pipeline SPEC] [--size small|bench]
[--models a,b]``

Models: every zoo model (``examples.models.REGISTRY``). Size: ``bench`` in the full run (realistic shapes:
what fraction of traffic fusion removes depends on them, and Inductor picks split reductions and loop
orders by size), ``small`` with ``--quick`` (a smoke test; kernel counts are the same at both sizes for
these models, traffic fractions differ). For each model, in one process:
1. kiln: export, then the pipeline (``O2`` if it runs ``fuse``, else ``canonicalize,constant-fold,cse,dce,
   fuse``; ``--pipeline`` overrides). ``graph_cost`` (kernels; intermediate bytes: a tensor one kernel
   writes and others read, once written + the part each reader reads) before the first of the fusion
   issue's passes (``fold-bn``, ``fuse-attention``, ``layout``, ``fuse``: "before"), just before ``fuse``
   ("pre_fuse", so ``traffic_reduction_fuse_only`` is this module's share) and at the end ("after").
   The fused graph runs through the reference (``to_fx``) and must match eager (``kiln.numerics``).
2. Inductor: ``torch.compile(model)`` (CPU, C++ codegen), ``torch._inductor.metrics`` reset before the
   first call. What it counts: ``generated_kernel_count`` is incremented per C++ *loop nest* it generates
   (a softmax launch holds 3-4 of them), not per launch, and excludes extern calls. So the comparison uses
   the launches in Inductor's generated wrapper (``run_and_get_code``): calls of ``cpp_fused_*`` kernels
   (generated) and of ``extern_kernels.*`` / ``torch.ops.*`` (extern: mm/addmm/bmm/conv libraries and
   fallbacks); the metric is reported beside them.
Like with like: Inductor on CPU never fuses into extern mm/conv, so kiln's kernels are split the same way:
``kiln_extern`` = every anchor (mm/addmm/bmm/conv, fused or not) and every attention group (Inductor
calls SDPA as one extern op), ``kiln_generated`` = every other launch, an epilogue group counting as one
generated kernel (its epilogue) beside its extern anchor. ``kiln_kernels`` (all launches, an epilogue
fused into its anchor) is compared with Inductor's generated + extern launches too.

Summary: ``traffic_reduction_geomean`` = 1 - geomean over models of (intermediate bytes after / before);
``kernels_le_inductor_fraction`` = share of models with kiln_generated <= Inductor's generated launches;
``launches_le_inductor_fraction`` the same for all launches; ``all_correct``; per-model traffic
reductions and the issue's goal (>= 40% on the transformer and CNN models).
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kiln.passes.fusion  # noqa: E402,F401  (registers "fuse" even before kiln.passes.builtin loads)
from examples.models import REGISTRY  # noqa: E402
from kiln.benchmarking import benchmark_args, geomean, markdown_table, write_report  # noqa: E402
from kiln.errors import first_line  # noqa: E402
from kiln.frontend.export import from_export  # noqa: E402
from kiln.ir.graph import Graph  # noqa: E402
from kiln.ir.to_fx import to_fx  # noqa: E402
from kiln.ir.verifier import verify  # noqa: E402
from kiln.numerics import compare  # noqa: E402
from kiln.passes.analysis import graph_cost, is_kernel  # noqa: E402
from kiln.passes.fusion.classify import OpKind, classify  # noqa: E402
from kiln.passes.manager import PassManager, parse_pipeline  # noqa: E402

OWN_PIPELINE = "canonicalize,constant-fold,cse,dce,fuse"
FUSION_PASSES = ("fold-bn", "fuse-attention", "layout", "fuse")  # the fusion issue's passes
GOAL_MODELS = ("transformer", "gpt", "resnet18", "mobilenetv2", "unet")  # transformer and CNN models
QUICK_MODELS = ("mlp", "resnet18", "transformer")


def default_pipeline() -> str:
    return "O2" if "fuse" in parse_pipeline("O2") else OWN_PIPELINE


def kiln_counts(graph: Graph) -> dict:
    kinds: Counter[str] = Counter()
    bare_anchors = fused_anchors = attention = 0
    for node in graph.nodes:
        if not is_kernel(node):
            continue
        if node.subgraph is not None:
            kind = str(node.attrs.get("kind", node.op.name))
            kinds[kind] += 1
            if kind == "attention":
                attention += 1
            else:
                fused_anchors += sum(1 for n in node.subgraph.nodes if classify(n).kind is OpKind.ANCHOR)
        elif classify(node).kind is OpKind.ANCHOR:
            bare_anchors += 1
    cost = graph_cost(graph)
    return {"kernels": cost.kernels, "generated": cost.kernels - bare_anchors - attention,
            "extern": bare_anchors + fused_anchors + attention, "groups": dict(kinds)}


def run_kiln(model, inputs, expected, pipeline: str) -> dict:
    names = parse_pipeline(pipeline)
    if "fuse" not in names:
        raise SystemExit(f"pipeline {pipeline!r} does not run the fuse pass: {names}")
    first = min(i for i, n in enumerate(names) if n in FUSION_PASSES)
    at_fuse = names.index("fuse")
    t0 = time.perf_counter()
    graph = from_export(model, inputs)
    PassManager(names[:first]).run(graph)
    before = graph_cost(graph)
    PassManager(names[first:at_fuse]).run(graph)
    pre_fuse = graph_cost(graph)
    t1 = time.perf_counter()
    records = PassManager(names[at_fuse:]).run(graph)
    fuse_s = time.perf_counter() - t1
    verify(graph)
    counts = kiln_counts(graph)
    after = graph_cost(graph)
    with torch.no_grad():
        got = to_fx(graph)(*inputs)
    got = got[0] if len(got) == 1 else tuple(got)
    mismatch = compare(got, expected, "kiln fused graph")
    return {
        "nodes": len(graph.nodes), "kernels_before": before.kernels, "kernels_pre_fuse": pre_fuse.kernels,
        "kiln_kernels": after.kernels, "kiln_generated": counts["generated"], "kiln_extern": counts["extern"],
        "inter_bytes_before": before.intermediate_bytes, "inter_bytes_pre_fuse": pre_fuse.intermediate_bytes,
        "inter_bytes_after": after.intermediate_bytes,
        "traffic_reduction": _reduction(before.intermediate_bytes, after.intermediate_bytes),
        "traffic_reduction_fuse_only": _reduction(pre_fuse.intermediate_bytes, after.intermediate_bytes),
        "groups": counts["groups"], "fuse_stats": records[0].stats, "fuse_s": fuse_s,
        "kiln_s": time.perf_counter() - t0, "correct": mismatch is None, "mismatch": mismatch,
    }


def _reduction(before: int, after: int) -> float:
    return 1 - after / before if before else 0.0


_GENERATED_CALL = re.compile(r"^\s+(cpp_fused_\w+)\(", re.M)
_EXTERN_CALL = re.compile(r"^\s+(?:[\w, ]+ = )?(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(", re.M)


def run_inductor(model, inputs, expected) -> dict:
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    metrics.reset()
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(model, backend="inductor")
        with torch.no_grad():
            out, codes = run_and_get_code(compiled, *inputs)
    except Exception as e:  # report, don't hide: a failed Inductor row has no counts
        return {"inductor_error": f"{type(e).__name__}: {first_line(e)}"}
    code = "\n".join(codes)
    extern = Counter(_EXTERN_CALL.findall(code))
    return {
        "inductor_generated": len(_GENERATED_CALL.findall(code)),
        "inductor_extern": sum(extern.values()),
        "inductor_extern_ops": dict(extern),
        "inductor_metric_kernels": metrics.generated_kernel_count,
        "inductor_compile_s": time.perf_counter() - t0,
        "inductor_correct": compare(out, expected, "inductor") is None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_args(__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None, help=f"kiln pipeline (default: O2 if it fuses, else "
                                                         f"{OWN_PIPELINE})")
    parser.add_argument("--size", choices=("small", "bench"), default=None,
                        help="zoo size (default: bench; small with --quick)")
    parser.add_argument("--models", default=None, help="comma-separated subset of the zoo")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    size = args.size or ("small" if args.quick else "bench")
    pipeline = args.pipeline or default_pipeline()
    models = args.models.split(",") if args.models else (list(QUICK_MODELS) if args.quick else sorted(REGISTRY))
    print(f"# fusion: {len(models)} zoo models at size {size!r}, kiln pipeline {pipeline!r}, "
          f"Inductor CPU (C++), torch threads {torch.get_num_threads()}")
    rows = []
    for name in models:
        model, inputs = REGISTRY[name](size=size)
        with torch.no_grad():
            expected = model(*inputs)
        row = {"model": name, "size": size, **run_kiln(model, inputs, expected, pipeline)}
        row.update(run_inductor(model, inputs, expected))
        ind_gen, ind_ext = row.get("inductor_generated"), row.get("inductor_extern")
        if ind_gen is not None:
            row["kernels_le_inductor"] = row["kiln_generated"] <= ind_gen
            row["launches_le_inductor"] = row["kiln_kernels"] <= ind_gen + ind_ext
        rows.append(row)
        print(f"  {name}: kernels {row['kernels_before']} -> {row['kiln_kernels']}, traffic "
              f"-{row['traffic_reduction']:.0%}, generated kiln {row['kiln_generated']} vs Inductor {ind_gen}, "
              f"correct {row['correct']}", flush=True)
    compared = [r for r in rows if "kernels_le_inductor" in r]
    reductions = {r["model"]: r["traffic_reduction"] for r in rows}
    goal = {m: reductions[m] for m in GOAL_MODELS if m in reductions}
    summary = {
        "models": len(rows),
        "size": size,
        "pipeline": pipeline,
        "traffic_reduction_geomean": 1 - geomean(max(r["inter_bytes_after"], 1) / max(r["inter_bytes_before"], 1)
                                                 for r in rows),
        "traffic_reduction_fuse_only_geomean": 1 - geomean(max(r["inter_bytes_after"], 1)
                                                           / max(r["inter_bytes_pre_fuse"], 1) for r in rows),
        "kernels_le_inductor_fraction": (sum(r["kernels_le_inductor"] for r in compared) / len(compared)
                                         if compared else float("nan")),
        "launches_le_inductor_fraction": (sum(r["launches_le_inductor"] for r in compared) / len(compared)
                                          if compared else float("nan")),
        "all_correct": all(r["correct"] for r in rows),
        "inductor_all_correct": all(r.get("inductor_correct", False) for r in rows),
        "traffic_reduction_by_model": reductions,
        "goal_traffic_40pct_transformer_cnn": all(v >= 0.4 for v in goal.values()) if goal else None,
    }
    print(markdown_table(rows, ["model", "nodes", "kernels_before", "kiln_kernels", "kiln_generated", "kiln_extern",
                                "inductor_generated", "inductor_extern", "inductor_metric_kernels",
                                "inter_bytes_before", "inter_bytes_after", "traffic_reduction",
                                "traffic_reduction_fuse_only", "correct", "inductor_correct", "fuse_s",
                                "inductor_compile_s"]))
    print()
    print(markdown_table([{k: v for k, v in summary.items() if not isinstance(v, dict)}],
                         [k for k, v in summary.items() if not isinstance(v, dict)]))
    if args.json:
        write_report(args.json, rows, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
