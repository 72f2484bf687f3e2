"""Quantization benchmark (issue 7): fp32 eager vs kiln int8 vs the PT2E + X86InductorQuantizer + Inductor
(freezing on) anchor, same models, same calibration data, one run; accuracy and latency side by side.

Usage: ``python benchmarks/quant.py [--quick] [--json PATH]``

Models:
- ``digits``: ``examples.models.digits.DigitsCNN`` trained on scikit-learn's digits (seeded, seconds);
  accuracy on the 360 held-out images; latency at batch 64.
- ``resnet18``: the zoo's ResNet-18 definition (``examples.models.resnet``) at bench size (224x224,
  batch 1; ``--quick``: the small size) with the two ReLUs of each block as distinct modules (the
  anchor's quantizer rejects one ReLU module used twice). Random weights, so "accuracy" is agreement
  with fp32: top-1 agreement and relative L2 error of the logits on 16 random images.
- ``gpt-int4``: the zoo's GPT architecture at byte level trained briefly on the standard library's
  sources; kiln int4 weight-only (group 32, AWQ + clipping + GPTQ rounding; ``-rtn``: round-to-nearest;
  ``-int8x4``: the 4 most int4-sensitive linear layers in per-channel int8) vs fp32: next-token top-1
  agreement on held-out text, and weight bytes of the quantized layers vs float32 (``size_vs_fp32``).
Extra digits rows: kiln int8 calibrated data-free (ZeroQ), int8-dynamic, mixed precision under a
30% size budget. Calibration: 4 batches (digits: training images; resnet: N(0, 1) images) for both
kiln and the anchor. Latency: 2 threads, contenders interleaved in rounds, median of all samples and
the min-max spread; kiln runs its lowered graph (``to_fx`` of it) on the kernels ``lower_graph``
measured fastest here, listed per model in ``kernels``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from examples.models import digits as digits_mod  # noqa: E402
from examples.models import resnet  # noqa: E402
from kiln.benchmarking import Timing, benchmark_args, geomean, markdown_table, write_report  # noqa: E402
from kiln.frontend.export import from_export  # noqa: E402
from kiln.ir.clone import clone_graph  # noqa: E402
from kiln.ir.to_fx import to_fx  # noqa: E402
from kiln.passes.quantize import quantize_graph  # noqa: E402
from kiln.passes.quantize.lower import lower_graph  # noqa: E402

INT8_KEPT = 4  # gpt-int4-int8x4: the 4 most int4-sensitive linear layers (measured) kept in int8

# -- models ---------------------------------------------------------------------------------------------

class _Block(nn.Module):
    """The zoo's BasicBlock with one ReLU module per use."""

    def __init__(self, block: resnet.BasicBlock):
        super().__init__()
        self.conv1, self.conv2, self.shortcut = block.conv1, block.conv2, block.shortcut
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + self.shortcut(x))


def resnet18_model(size: str):
    model, inputs = resnet.make_resnet18(size)
    for stage in model.stages:
        for i in range(len(stage)):
            stage[i] = _Block(stage[i])
    return model.eval(), inputs


# -- the anchor -----------------------------------------------------------------------------------------

def anchor(model: nn.Module, example: tuple, calib: list[tuple], dynamic_batch: bool):
    """PT2E + X86InductorQuantizer; returns (converted QDQ module, Inductor-compiled with freezing)."""
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    exported = torch.export.export(model, example, dynamic_shapes=dyn, strict=False).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calib:
            prepared(*batch)
    converted = convert_pt2e(prepared)
    inductor_config.freezing = True
    return converted, torch.compile(converted)


# -- kiln -----------------------------------------------------------------------------------------------

def kiln_int8(model, example, calib, dynamic_batch: bool, scheme="int8", **options):
    dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    graph = from_export(model, example, dynamic_shapes=dyn)
    t0 = time.perf_counter()
    result = quantize_graph(graph, scheme, calib, **options)
    quant_s = time.perf_counter() - t0
    reference = to_fx(clone_graph(graph))
    t0 = time.perf_counter()
    report = lower_graph(graph, example)
    lower_s = time.perf_counter() - t0
    return result, reference, to_fx(graph), report, {"quantize_s": quant_s, "lower_s": lower_s}


# -- measurement ----------------------------------------------------------------------------------------

def interleaved(fns: dict, args: tuple, rounds: int, reps: int, warmup: int = 3) -> dict[str, Timing]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn(*args)
        for _ in range(rounds):
            for k, fn in fns.items():
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn(*args)
                    samples[k].append(time.perf_counter() - t0)
    return {k: Timing(statistics.median(v), min(v), max(v), v) for k, v in samples.items()}


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def batched(fn, x: torch.Tensor, size: int = 120) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([first(fn(x[i:i + size])) for i in range(0, len(x), size)])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def kernel_summary(report) -> str:
    return ", ".join(f"{k}x{v}" for k, v in sorted(report.paths().items()))


# -- rows -----------------------------------------------------------------------------------------------

def digits_rows(quick: bool, rounds: int, reps: int) -> tuple[list[dict], dict]:
    t0 = time.perf_counter()
    model, data = digits_mod.train_digits_cnn()
    train_s = time.perf_counter() - t0
    x_test, y_test = data.x_test, data.y_test
    calib = [(data.x_train[i * 64:(i + 1) * 64],) for i in range(4)]
    example = (x_test[:64].clone(),)
    acc = {}
    with torch.no_grad():
        acc["fp32"] = digits_mod.accuracy(model(x_test), y_test)
    res, ref_gm, kiln_gm, report, times = kiln_int8(model, example, calib, dynamic_batch=True)
    acc["kiln_int8_reference"] = digits_mod.accuracy(batched(ref_gm, x_test), y_test)
    acc["kiln_int8"] = digits_mod.accuracy(batched(kiln_gm, x_test), y_test)
    converted, compiled = anchor(model, example, calib, dynamic_batch=True)
    acc["anchor"] = digits_mod.accuracy(batched(converted, x_test), y_test)
    t = interleaved({"fp32": model, "kiln": kiln_gm, "anchor": compiled}, example, rounds, reps)
    rows = [{"model": "digits", "batch": 64, "fp32_ms": t["fp32"].median * 1e3, "kiln_int8_ms": t["kiln"].median * 1e3,
             "anchor_ms": t["anchor"].median * 1e3,
             "kiln_spread_ms": f"{t['kiln'].min * 1e3:.3g}-{t['kiln'].max * 1e3:.3g}",
             "anchor_spread_ms": f"{t['anchor'].min * 1e3:.3g}-{t['anchor'].max * 1e3:.3g}",
             "fp32_acc": acc["fp32"], "kiln_acc": acc["kiln_int8"], "kiln_ref_acc": acc["kiln_int8_reference"],
             "anchor_acc": acc["anchor"], "kernels": kernel_summary(report), "train_s": train_s, **times}]
    # data-free calibration, dynamic int8 and mixed precision, on the same trained model
    extra = {}
    graph = from_export(model, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    for name, scheme, calib_in, opts in [
        ("zeroq", "int8", "zeroq", {"zeroq_steps": 60 if quick else 200}),
        ("dynamic", "int8-dynamic", None, {}),
        ("mixed", "mixed", calib, {"budget": 0.3, "precisions": ("int8", "int4", "bf16")}),
    ]:
        g = clone_graph(graph)
        r = quantize_graph(g, scheme, calib_in, **opts)
        extra[f"{name}_acc"] = digits_mod.accuracy(batched(to_fx(g), x_test), y_test)
        if name == "mixed":
            extra["mixed_assignment"] = r.stats["assignment"]
            extra["mixed_cost_bytes"] = r.stats["cost"]
            extra["mixed_budget_bytes"] = r.stats["budget"]
            extra["mixed_float32_bytes"] = r.stats["float32_cost"]
            extra["mixed_frontier_points"] = len(r.stats["frontier"])
    extra.update({"fp32_acc": acc["fp32"], "kiln_int8_acc": acc["kiln_int8"], "anchor_acc": acc["anchor"]})
    return rows, extra


def resnet_rows(quick: bool, rounds: int, reps: int) -> list[dict]:
    size = "small" if quick else "bench"
    model, (x,) = resnet18_model(size)
    calib = [(torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i)),) for i in range(4)]
    test = [torch.randn(x.shape, generator=torch.Generator().manual_seed(200 + i)) for i in range(8 if quick else 16)]
    res, ref_gm, kiln_gm, report, times = kiln_int8(model, (x,), calib, dynamic_batch=False)
    converted, compiled = anchor(model, (x,), calib, dynamic_batch=False)
    with torch.no_grad():
        fp = torch.cat([model(t) for t in test])
        kq = torch.cat([first(kiln_gm(t)) for t in test])
        aq = torch.cat([first(converted(t)) for t in test])
    t = interleaved({"fp32": model, "kiln": kiln_gm, "anchor": compiled}, (x,), rounds, reps)
    agree = lambda q: float((q.argmax(-1) == fp.argmax(-1)).float().mean())  # noqa: E731
    return [{"model": f"resnet18-{size}", "batch": x.shape[0], "fp32_ms": t["fp32"].median * 1e3,
             "kiln_int8_ms": t["kiln"].median * 1e3, "anchor_ms": t["anchor"].median * 1e3,
             "kiln_spread_ms": f"{t['kiln'].min * 1e3:.3g}-{t['kiln'].max * 1e3:.3g}",
             "anchor_spread_ms": f"{t['anchor'].min * 1e3:.3g}-{t['anchor'].max * 1e3:.3g}",
             "kiln_top1_agree": agree(kq), "anchor_top1_agree": agree(aq), "kiln_rel_err": rel_err(kq, fp),
             "anchor_rel_err": rel_err(aq, fp), "kernels": kernel_summary(report), **times}]


def gpt_rows(quick: bool, rounds: int, reps: int) -> list[dict]:
    steps = 120 if quick else 400
    t0 = time.perf_counter()
    model, corpus = digits_mod.train_tiny_gpt(steps=steps)
    train_s = time.perf_counter() - t0
    train, held = digits_mod.split_corpus(corpus)
    cfg = digits_mod.GPT_CONFIG
    gen = torch.Generator().manual_seed(7)
    calib = [(digits_mod.text_windows(train, cfg.seq, 8, gen)[0],) for _ in range(4)]
    tests = [digits_mod.text_windows(held, cfg.seq, 8, gen)[0] for _ in range(4 if quick else 16)]
    example = (tests[0],)
    graph = from_export(model, example)
    rows = []
    with torch.no_grad():
        fp = [model(t) for t in tests]
    for name, options in (("int4-awq", {}), ("int4-rtn", {"awq": False, "gptq": False}),
                          (f"int4-int8x{INT8_KEPT}", {"keep_int8": INT8_KEPT})):
        g = clone_graph(graph)
        res = quantize_graph(g, "int4-weight", calib, group_size=32, **options)
        ref = to_fx(clone_graph(g))
        report = lower_graph(g, example)
        gm = to_fx(g)
        with torch.no_grad():
            q_ref = [ref(t)[0] for t in tests]
            q = [gm(t)[0] for t in tests]
        agree = statistics.fmean(float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(q, fp))
        agree_ref = statistics.fmean(float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(q_ref, fp))
        t = interleaved({"fp32": model, "kiln": gm}, example, rounds, reps)
        rows.append({"model": f"gpt-{name}", "batch": example[0].shape[0], "fp32_ms": t["fp32"].median * 1e3,
                     "kiln_ms": t["kiln"].median * 1e3, "top1_agreement": agree, "top1_agreement_reference": agree_ref,
                     "positions": sum(t.numel() for t in tests), "awq_alpha": res.stats.get("awq_alpha"),
                     "int8_layers": res.stats["int8_layers"],
                     "size_vs_fp32": res.stats["weight_bytes"] / res.stats["float32_weight_bytes"],
                     "kernels": kernel_summary(report), "train_steps": steps, "train_s": train_s})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = benchmark_args(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rounds, reps = (3, 5) if args.quick else (5, 10)
    print(f"# quantization benchmark ({'quick' if args.quick else 'full'}), torch threads: "
          f"{torch.get_num_threads()}\n")
    rows, digits_extra = digits_rows(args.quick, rounds, reps)
    rows += resnet_rows(args.quick, rounds, reps)
    int8_rows = list(rows)
    gpt = gpt_rows(args.quick, rounds, reps)
    rows += gpt
    cols = ["model", "batch", "fp32_ms", "kiln_int8_ms", "anchor_ms", "kiln_spread_ms", "anchor_spread_ms",
            "fp32_acc", "kiln_acc", "anchor_acc", "kiln_top1_agree", "anchor_top1_agree", "kiln_rel_err",
            "anchor_rel_err", "kernels"]
    print(markdown_table(int8_rows, cols))
    print()
    print(markdown_table(gpt, ["model", "batch", "fp32_ms", "kiln_ms", "top1_agreement",
                               "top1_agreement_reference", "size_vs_fp32", "positions", "kernels"]))
    print()
    awq = next(r for r in gpt if r["model"] == "gpt-int4-awq")
    mixed4 = next(r for r in gpt if r["model"] == f"gpt-int4-int8x{INT8_KEPT}")
    summary = {
        "int8_speedup_vs_fp32_eager_geomean": geomean(r["fp32_ms"] / r["kiln_int8_ms"] for r in int8_rows),
        "int8_latency_vs_anchor_geomean": geomean(r["kiln_int8_ms"] / r["anchor_ms"] for r in int8_rows),
        "int8_accuracy_drop_pts": 100 * (digits_extra["fp32_acc"] - digits_extra["kiln_int8_acc"]),
        "int4_top1_agreement": awq["top1_agreement"],
        "anchor_int8_accuracy_drop_pts": 100 * (digits_extra["fp32_acc"] - digits_extra["anchor_acc"]),
        "zeroq_int8_accuracy_drop_pts": 100 * (digits_extra["fp32_acc"] - digits_extra["zeroq_acc"]),
        "dynamic_int8_accuracy_drop_pts": 100 * (digits_extra["fp32_acc"] - digits_extra["dynamic_acc"]),
        "mixed_accuracy_drop_pts": 100 * (digits_extra["fp32_acc"] - digits_extra["mixed_acc"]),
        "mixed_within_budget": digits_extra["mixed_cost_bytes"] <= digits_extra["mixed_budget_bytes"],
        "int4_rtn_top1_agreement": next(r for r in gpt if r["model"] == "gpt-int4-rtn")["top1_agreement"],
        "int4_size_vs_fp32": awq["size_vs_fp32"],
        "int4_int8head_top1_agreement": mixed4["top1_agreement"],
        "int4_int8head_size_vs_fp32": mixed4["size_vs_fp32"],
        "all_correct": all(r.get("kiln_rel_err", 0) < 0.1 for r in int8_rows)
        and abs(digits_extra["fp32_acc"] - digits_extra["kiln_int8_acc"]) < 0.05,
    }
    summary = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in summary.items()}
    print(markdown_table([summary], list(summary)))
    print("\ndigits extras:", {k: v for k, v in digits_extra.items() if k.startswith("mixed") or k.endswith("acc")})
    if args.json:
        write_report(args.json, rows, summary, extra={"digits": digits_extra})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
