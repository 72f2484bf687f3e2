"""Attention recognition: hand-written attention (scale on the scores or on q/k, additive or filled padding
masks, causal masks, decomposed softmax, multi-head reshapes) and F.scaled_dot_product_attention become
one kiln.fused attention node whose attrs describe it; near misses (softmax over the wrong dim, scores
read elsewhere, other contractions, live dropout, training graphs) stay as they are."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kiln.passes.attention  # noqa: F401  (registers the pass)
from examples.models import REGISTRY
from kiln.frontend.export import from_export
from kiln.frontend.fx_import import import_fx
from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph, Node
from kiln.ir.ops import FUSED, WEIGHT, aten
from kiln.ir.parser import parse_graph
from kiln.ir.printer import print_graph
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify
from kiln.numerics import assert_match
from kiln.passes.base import PassContext, get_pass
from kiln.passes.manager import PassManager

F32 = torch.float32
GEN = torch.Generator().manual_seed(0)
Q, K, V = torch.randn(2, 4, 8, 16, generator=GEN), torch.randn(2, 4, 10, 16, generator=GEN), \
    torch.randn(2, 4, 10, 12, generator=GEN)
PAD = torch.zeros(2, 1, 1, 10, dtype=torch.bool)
PAD[0, ..., -3:] = True
ADDITIVE = torch.zeros(2, 1, 1, 10).masked_fill(PAD, float("-inf"))


def fuse(g: Graph, inputs: tuple) -> dict[str, int]:
    """Run fuse-attention; check verifier, text round trip and outputs against the unfused graph."""
    before = clone_graph(g)
    result = get_pass("fuse-attention").run(g, PassContext())
    verify(g)
    text = print_graph(g)
    assert print_graph(parse_graph(text, weights=g.weights)) == text
    with torch.no_grad():
        assert_match(list(to_fx(g)(*inputs)), list(to_fx(before)(*inputs)), "after fuse-attention")
    assert result.changed == (result.stats["attention"] > 0)
    return result.stats


def groups(g: Graph) -> list[Node]:
    return [n for n in g.nodes if n.op is FUSED and n.attrs.get("kind") == "attention"]


def operand(node: Node, role: str) -> str | None:
    ref = node.attrs[role]
    return None if ref is None else node.inputs[ref].name


class Attention(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, *args):
        return self.core(*args)


def single(core, *inputs, decompose: bool = True) -> tuple[Graph, Node]:
    g = from_export(Attention(core), inputs, decompose=decompose)
    assert fuse(g, inputs)["attention"] == 1
    (node,) = groups(g)
    return g, node


# -- what is recognised -----------------------------------------------------------------------------------

def test_hand_written_attention_with_additive_padding_mask():
    def core(q, k, v, mask):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return torch.softmax(s + mask, dim=-1) @ v

    g, node = single(core, Q, K, V, ADDITIVE)
    a = node.attrs
    assert (a["form"], a["mask_kind"], a["causal"], a["dropout_p"]) == ("decomposed", "additive", False, 0.0)
    assert a["scale"] == pytest.approx(0.25) and a["fully_masked_rows"] == "nan"
    assert [operand(node, r) for r in ("q", "k", "v", "mask")] == ["args_0", "args_1", "args_2", "args_3"]
    assert node.results[0].type.shape == (2, 4, 8, 12)
    assert [n.op for n in g.nodes] == [FUSED]  # everything, views included, is inside


def test_masked_fill_padding_mask_and_keep_style_where():
    def fill(q, k, v, pad):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        return s.masked_fill(pad, float("-inf")).softmax(-1) @ v

    _, node = single(fill, Q, K, V, PAD)
    assert (node.attrs["mask_kind"], node.attrs["mask_fill"], operand(node, "mask")) == ("fill", -math.inf, "args_3")

    def keep(q, k, v, pad):
        s = q @ k.transpose(-1, -2)
        return torch.where(~pad, s, -1e9).softmax(-1) @ v

    _, node = single(keep, Q, K, V, PAD)
    assert (node.attrs["mask_kind"], node.attrs["mask_fill"], node.attrs["scale"]) == ("keep", -1e9, 1.0)


def test_decomposed_softmax_with_and_without_the_max():
    def stable(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.3
        e = (s - s.amax(-1, keepdim=True)).exp()
        return (e / e.sum(-1, keepdim=True)) @ v

    def naive(q, k, v):
        e = ((q * 0.5) @ (k * 0.5).transpose(-2, -1)).exp()
        return (e / e.sum(-1, keepdim=True)) @ v

    _, node = single(stable, Q, K, V)
    assert node.attrs["scale"] == pytest.approx(0.3)
    _, node = single(naive, Q, K, V)
    assert node.attrs["scale"] == pytest.approx(0.25)  # 0.5 on q times 0.5 on k


def test_sdpa_as_export_decomposes_it():
    _, node = single(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), Q, K, V, ADDITIVE)
    a = node.attrs
    assert a["scale"] == pytest.approx(1 / math.sqrt(16))  # sqrt(scale) on q and on k
    assert (a["mask_kind"], a["fully_masked_rows"], operand(node, "mask")) == ("additive", "zero", "args_3")


def test_causal_sdpa_and_causal_buffer_are_recognised_and_the_mask_moves_inside():
    q, k, v = Q, K[:, :, :8], V[:, :, :8]
    _, node = single(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    assert node.attrs["causal"] is True and node.attrs["mask"] is None and node.attrs["mask_kind"] == "none"
    assert [v.name for v in node.inputs] == ["args_0", "args_1", "args_2"]  # the arange/where mask is inside

    class Causal(nn.Module):  # the GPT way: a registered lower-triangular buffer and masked_fill
        def __init__(self):
            super().__init__()
            self.register_buffer("tril", torch.ones(8, 8, dtype=torch.bool).tril(), persistent=False)

        def forward(self, q, k, v):
            s = (q @ k.transpose(-2, -1)) / 4.0
            return s.masked_fill(~self.tril, float("-inf")).softmax(-1) @ v

    g = from_export(Causal(), (q, k, v))
    assert fuse(g, (q, k, v))["attention"] == 1
    (node,) = groups(g)
    assert node.attrs["causal"] is True and node.attrs["mask"] is None
    assert set(node.subgraph.weights) == {"tril"} and not any(n.op is WEIGHT for n in g.nodes)


def test_constant_mask_that_is_not_causal_stays_a_mask():
    class Banded(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("band", torch.ones(8, 8, dtype=torch.bool).tril().triu(-2), persistent=False)

        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1)).masked_fill(~self.band, float("-inf")).softmax(-1) @ v

    q, k, v = Q, K[:, :, :8], V[:, :, :8]
    g = from_export(Banded(), (q, k, v))
    get_pass("constant-fold").run(g, PassContext())  # ~band becomes a weight
    assert fuse(g, (q, k, v))["attention"] == 1
    (node,) = groups(g)
    assert node.attrs["causal"] is False and node.attrs["mask_kind"] == "fill"
    assert node.attrs["mask"] in node.subgraph.weights  # a weight held inside, referred to by name


def test_single_sdpa_op_is_wrapped():
    _, node = single(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.2),
                     Q, K, V, PAD, decompose=False)
    a = node.attrs
    assert (a["form"], a["mask_kind"], a["mask_fill"], a["scale"], a["outputs"]) == \
        ("sdpa", "keep", -math.inf, 0.2, ["output"])
    assert [n.op.name for n in node.subgraph.nodes] == ["aten.scaled_dot_product_attention"]


def test_flash_attention_for_cpu_with_logsumexp_read_by_a_backward():
    g = Graph("aot_forward")
    q, k, v = (g.add_input(TensorType(t.shape, F32), n) for t, n in ((Q, "q"), (K, "k"), (K, "v")))
    b = Builder(g)
    out, lse = b.call(aten._scaled_dot_product_flash_attention_for_cpu, q, k, v, 0.0, True)
    g.set_outputs([out, lse])
    assert fuse(g, (Q, K, K)) == {"attention": 1, "sdpa": 1, "skipped_dropout": 0}
    (node,) = groups(g)
    assert node.attrs["outputs"] == ["output", "logsumexp"] and node.attrs["causal"] is True
    assert node.attrs["scale"] == pytest.approx(0.25) and len(node.results) == 2


class MultiHead(nn.Module):
    """Projections, view + transpose into heads, attention with the scale on q, heads merged back."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)) * (d // self.heads) ** -0.5, split(self.k(x)), split(self.v(x))
        s = q @ k.transpose(-2, -1) + mask
        y = s.softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, d))


def test_multi_head_attention_with_reshapes_and_permutes():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 6, 16), torch.zeros(2, 1, 1, 6)
    mask[1, ..., -2:] = float("-inf")
    model = MultiHead().eval()
    g = from_export(model, (x, mask))
    assert fuse(g, (x, mask))["attention"] == 1
    (node,) = groups(g)
    assert node.attrs["scale"] == pytest.approx(8 ** -0.5)
    assert all(node.inputs[node.attrs[r]].type.shape[:2] == (2, 2) for r in ("q", "k", "v"))
    with torch.no_grad():
        assert_match(to_fx(g)(x, mask)[0], model(x, mask), "multi-head vs eager")


def test_single_head_attention_on_matrices():
    def core(q, k, v):
        return torch.softmax(q @ k.T * 0.25, dim=-1) @ v

    g, node = single(core, Q[0, 0], K[0, 0], V[0, 0])
    assert [n.op.name for n in node.subgraph.nodes].count("aten.mm") == 2


# -- near misses ------------------------------------------------------------------------------------------

def unchanged(core, *inputs) -> dict[str, int]:
    g = from_export(Attention(core), inputs)
    text = print_graph(g)
    stats = fuse(g, inputs)
    assert stats["attention"] == 0 and print_graph(g) == text
    return stats


def test_softmax_over_the_wrong_dim():
    unchanged(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v[:, :, :8], Q, K[:, :, :8], V)


def test_scores_or_probabilities_read_elsewhere():
    def scores_out(q, k, v):
        s = q @ k.transpose(-2, -1)
        return torch.softmax(s, -1) @ v, s

    def probs_out(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1), -1)
        return p @ v, p.sum()

    unchanged(scores_out, Q, K, V)
    unchanged(probs_out, Q, K, V)


def test_other_contractions():
    sq = torch.randn(2, 4, 16, 16, generator=GEN)
    unchanged(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), -1).transpose(-2, -1) @ v, sq, sq, sq)
    unchanged(lambda q, k, v: torch.softmax(q.transpose(-2, -1) @ k, -1) @ v, sq, sq, sq)
    unchanged(lambda q, kt, v: torch.softmax(q @ kt, -1) @ v, Q, K.transpose(-2, -1).contiguous(), V)
    unchanged(lambda q, k, v: v.transpose(-2, -1) @ torch.softmax(q @ k.transpose(-2, -1), -1).transpose(-2, -1),
              sq, sq, sq)


def attention_with_dropout(train: bool) -> Graph:
    g = Graph("dropout")
    q, k, v = (g.add_input(TensorType(t.shape, F32), n) for t, n in ((Q, "q"), (K, "k"), (V, "v")))
    b = Builder(g)
    kt = b.call(aten.permute, k, [0, 1, 3, 2])
    s = b.call(aten.view, b.call(aten.bmm, b.call(aten.view, q, [8, 8, 16]), b.call(aten.view, kt, [8, 16, 10])),
               [2, 4, 8, 10])
    p = b.call(aten._softmax, b.call(aten.mul.Tensor, s, 0.25), -1, False)
    dropped = b.call(aten.native_dropout, p, 0.1, train)[0]
    out = b.call(aten.bmm, b.call(aten.view, dropped, [8, 8, 10]), b.call(aten.view, v, [8, 10, 12]))
    g.set_outputs([b.call(aten.view, out, [2, 4, 8, 12])])
    return g


def test_live_dropout_is_not_fused_but_eval_dropout_is():
    g = attention_with_dropout(train=True)
    result = get_pass("fuse-attention").run(g, PassContext())
    assert result.stats == {"attention": 0, "sdpa": 0, "skipped_dropout": 1}
    g = attention_with_dropout(train=False)
    assert fuse(g, (Q, K, V))["attention"] == 1


def test_training_forward_graph_keeps_what_the_backward_reads():
    captured = []

    def compiler(gm, _):
        captured.append(gm)
        return gm

    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v

    from torch._functorch.aot_autograd import aot_function

    from kiln.frontend.dynamo import training_decompositions

    q, k, v = (t.clone().requires_grad_() for t in (Q, K, V))
    aot_function(attention, fw_compiler=compiler, decompositions=training_decompositions())(q, k, v)
    g = import_fx(captured[0], "forward").graph
    text = print_graph(g)
    assert fuse(g, (Q, K, V))["attention"] == 0  # softmax output and views are saved for the backward
    assert print_graph(g) == text


# -- the zoo ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pipeline", ["O0", "O1"])
@pytest.mark.parametrize("name", ["transformer", "gpt"])
def test_zoo_attention_layers_become_one_group_each(name, pipeline):
    model, inputs = REGISTRY[name]()
    g = from_export(model, inputs)
    PassManager.from_pipeline(pipeline).run(g)
    stats = fuse(g, inputs)
    layers = len(model.blocks)
    assert stats["attention"] == layers and len(groups(g)) == layers
    assert not g.find(aten._softmax)
    if name == "gpt":  # even blocks call SDPA(is_causal=True), odd blocks mask by hand: both causal
        assert all(n.attrs["causal"] for n in groups(g))
    with torch.no_grad():
        assert_match(to_fx(g)(*inputs)[0], model(*inputs), f"{name} fused vs eager")


@pytest.mark.parametrize("name", ["resnet18", "mlp"])
def test_models_without_attention_are_untouched(name):
    model, inputs = REGISTRY[name]()
    g = from_export(model, inputs)
    text = print_graph(g)
    assert fuse(g, inputs)["attention"] == 0
    assert print_graph(g) == text
