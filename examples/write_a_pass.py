"""A complete kiln pass: ``x ** 2 -> x * x`` (a strength reduction), registered as ``square-to-mul``.

Use it from the CLI: ``--plugin`` imports this file, which registers the pass, so ``-O`` can name it:

    kiln compile examples/models/mamba.py:make_model --plugin examples/write_a_pass.py \\
        -O "O1,square-to-mul" -o out/mamba
    kiln explain examples/models/mamba.py:make_model --plugin examples/write_a_pass.py \\
        -O "O1,square-to-mul" -o report.html

From Python: import this module, then ``kiln.compile(model, inputs, pipeline="O1,square-to-mul")``.
``python examples/write_a_pass.py`` compiles the zoo's Mamba with it, prints what it did and checks the
outputs against eager (exit 1 if they differ). The guide is docs/write_a_pass.md.
"""

from dataclasses import dataclass

from kiln.ir.graph import Node
from kiln.ir.ops import aten
from kiln.ir.rewrite import Rewriter, pattern
from kiln.passes.base import RewritePass, register_pass


@register_pass("square-to-mul")
@dataclass(frozen=True)
class SquareToMul(RewritePass):
    """``pow(x, 2) -> mul(x, x)``: one multiply instead of a call to pow. Exact: PyTorch computes a square
    as ``x * x``. Skipped when the types differ (e.g. an integer ``x`` with the float exponent 2.0)."""

    @pattern(aten.pow.Tensor_Scalar)
    def square(self, node: Node, rw: Rewriter) -> bool:
        base, exponent = node.args
        if exponent != 2 or node.output.type != base.type:
            return False
        rw.replace_node(node, [rw.call(aten.mul.Tensor, base, base)])
        return True


def main() -> int:
    import torch

    import kiln
    from examples.models import REGISTRY
    from kiln.numerics import compare

    model, inputs = REGISTRY["mamba"](size="small")
    compiled = kiln.compile(model, inputs, pipeline="O1,square-to-mul")
    (record,) = [r for r in compiled.pass_records if r.name == "square-to-mul"]
    print(f"square-to-mul: {record.stats['rewrites']} rewrites, nodes {record.nodes_before} -> {record.nodes_after}")
    with torch.no_grad():
        msg = compare(compiled(*inputs), model(*inputs))
    print("outputs match eager" if msg is None else f"MISMATCH: {msg}")
    return 0 if msg is None and record.changed else 1


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples` is importable from a checkout
    sys.exit(main())
