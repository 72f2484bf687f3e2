"""Graphs for scheduling experiments: exported zoo models, random DAGs and NAS-like cells.

Contract (every graph is deterministic for its arguments, verifies, runs through ``to_fx`` and has
static shapes; float32 throughout):
- ``zoo_graphs(names=None, batch_sizes=(1, 4), seed=0) -> dict[str, Graph]``: the zoo models of
  ``examples.models.REGISTRY`` (all, sorted, when ``names`` is None) at size "small", exported with
  ``from_export``, once per batch size: the factory's inputs are repeated (or cut) along dim 0 to that
  batch. A model that does not export at that batch is exported with the factory's own inputs. Keys are
  ``"<model>_b<batch>"``. Exports are cached per process; each call returns fresh copies.
  ``fold_constants=True`` then runs ``constant-fold`` and ``dce``, so weight-only computations (e.g. the
  ``permute`` of a linear layer's weight) become weights instead of activations.
  Needs the repository root on ``sys.path`` (``examples`` is not part of the kiln package).
- ``training_graph(name, batch=None, seed=0, size="small") -> Graph``: one training step of a zoo model
  as a single graph: forward, a mean-of-squares loss over the outputs, and the gradient of every
  parameter (``torch.autograd.grad`` traced by ``make_fx`` with the core ATen decompositions). Parameters
  and buffers are weights; the graph's outputs are the loss and the gradients, so the forward activations saved for
  backward make realistic, long lifetimes.
- ``random_dag(n_nodes, seed, n_inputs=2, ...) -> Graph``: exactly ``n_nodes`` compute nodes over
  ``n_inputs`` graph inputs (fewer if there are fewer nodes: every input is read) of shape
  ``[rows, width]`` (random rows and widths), mixing elementwise
  ops (``relu``/``sigmoid``/``tanh``/``neg``, ``add``/``mul`` with broadcasting), ``mm`` against weights
  that change the width, ``cat`` (wider), ``slice`` (narrower) and ``sum`` (to width 1). Operands come
  mostly from recent values, sometimes from any earlier one (skip connections). Every value nobody
  reads is a graph output.
- ``nas_cell_graph(seed, n_cells=3, n_steps=4) -> Graph``: a DARTS-like network: a conv stem, then cells
  whose two inputs (the previous two cells) are preprocessed by relu+1x1 conv, whose ``n_steps``
  intermediate nodes each add two ops (relu+conv3x3, relu+conv1x1, max/avg pool 3x3, identity) applied
  to earlier nodes of the cell, and whose output concatenates the intermediate nodes along channels;
  some cells reduce (stride 2, twice the channels). A global mean and a linear layer end it.
"""

from __future__ import annotations

import functools
import itertools
import random

import torch

from kiln.errors import KilnError
from kiln.ir.builder import Builder
from kiln.ir.clone import clone_graph
from kiln.ir.graph import Graph, Value
from kiln.ir.ops import aten
from kiln.ir.types import TensorType

F32 = torch.float32


# -- zoo -----------------------------------------------------------------------------------------------

def zoo_graphs(names=None, batch_sizes=(1, 4), seed: int = 0, fold_constants: bool = False) -> dict[str, Graph]:
    try:
        from examples.models import REGISTRY
    except ImportError as e:
        raise KilnError("zoo_graphs needs the kiln repository root on sys.path (examples.models)") from e
    out: dict[str, Graph] = {}
    for name in sorted(REGISTRY) if names is None else names:
        if name not in REGISTRY:
            raise KilnError(f"unknown zoo model {name!r}; available: {sorted(REGISTRY)}")
        for batch in batch_sizes:
            key, graph = _export(name, batch, seed)
            if key not in out:
                out[key] = clone_graph(graph)
                if fold_constants:
                    _fold(out[key])
    return out


def _fold(graph: Graph) -> None:
    from kiln.passes.base import PassContext, get_pass

    for name in ("constant-fold", "dce"):
        get_pass(name).run(graph, PassContext())


def _rebatch(x, batch: int):
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    return x[torch.arange(batch) % x.shape[0]]


@functools.cache
def _export(name: str, batch: int, seed: int) -> tuple[str, Graph]:
    from examples.models import REGISTRY
    from kiln.frontend.export import from_export

    model, inputs = REGISTRY[name](size="small", seed=seed)
    try:
        return f"{name}_b{batch}", from_export(model, tuple(_rebatch(x, batch) for x in inputs),
                                               name=f"{name}_b{batch}")
    except KilnError:
        own = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 0
        return f"{name}_b{own}", from_export(model, inputs, name=f"{name}_b{own}")


def training_graph(name: str, batch: int | None = None, seed: int = 0, size: str = "small") -> Graph:
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    from kiln.frontend.fx_import import import_fx

    try:
        from examples.models import REGISTRY
    except ImportError as e:
        raise KilnError("training_graph needs the kiln repository root on sys.path (examples.models)") from e
    if name not in REGISTRY:
        raise KilnError(f"unknown zoo model {name!r}; available: {sorted(REGISTRY)}")
    model, inputs = REGISTRY[name](size=size, seed=seed)
    if batch is not None:
        inputs = tuple(_rebatch(x, batch) for x in inputs)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    names, n_params = [*params, *buffers], len(params)

    def step(*flat):
        state = dict(zip(names, flat[:len(names)]))
        out = torch.func.functional_call(model, state, flat[len(names):])
        leaves = [t for t in torch.utils._pytree.tree_leaves(out)
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        loss = sum(t.float().pow(2).mean() for t in leaves)
        grads = torch.autograd.grad(loss, flat[:n_params], allow_unused=True)
        return (loss, *[g for g in grads if g is not None])

    model.train(False)  # batch-norm statistics stay fixed: the step is a pure function of its inputs
    with torch.enable_grad():
        gm = make_fx(step, decomposition_table=core_aten_decompositions(), tracing_mode="fake")(
            *[p.detach().requires_grad_(True) for p in params.values()], *buffers.values(), *inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state = {**params, **buffers}
    weights = {ph.name: (w, state[w].detach()) for ph, w in zip(placeholders, names)}
    return import_fx(gm, f"{name}_train_b{batch if batch is not None else 'own'}", weights).graph


# -- random DAGs ---------------------------------------------------------------------------------------

def random_dag(n_nodes: int, seed: int, n_inputs: int = 2, rows: int | None = None,
               widths: tuple[int, ...] = (16, 32, 64, 128, 256), p_far: float = 0.3,
               max_width: int = 1024) -> Graph:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = rows if rows is not None else rng.choice((4, 8, 16, 32))
    n_inputs = max(1, min(n_inputs, n_nodes))
    g = Graph(f"random_dag_{n_nodes}_{seed}")
    b = Builder(g)
    pool: list[Value] = [g.add_input(TensorType((rows, rng.choice(widths)), F32), f"x{i}")
                         for i in range(n_inputs)]

    def width(v: Value) -> int:
        return v.type.shape[1]

    def pick() -> Value:
        if len(pool) > 4 and rng.random() < p_far:
            return rng.choice(pool)
        return rng.choice(pool[-4:])

    for k in range(n_nodes):
        a = pool[k] if k < n_inputs else pick()  # every input gets read
        kind = rng.choices(("unary", "binary", "mm", "cat", "slice", "sum"), (3, 3, 2, 1, 1, 1))[0]
        v = None
        if kind == "binary":
            partners = [u for u in pool if width(u) == width(a) or 1 in (width(u), width(a))]
            v = b.call(rng.choice((aten.add.Tensor, aten.mul.Tensor)), a, rng.choice(partners))
        elif kind == "mm":
            w = torch.randn(width(a), rng.choice(widths), generator=gen) / width(a) ** 0.5
            v = b.call(aten.mm, a, b.weight(f"w{k}", w))
        elif kind == "cat":
            parts = [a] + [pick() for _ in range(rng.choice((1, 2)))]
            if sum(width(u) for u in parts) <= max_width:
                v = b.call(aten.cat, parts, 1)
        elif kind == "slice" and width(a) >= 2 * min(widths):
            v = b.call(aten.slice.Tensor, a, 1, 0, width(a) // 2)
        elif kind == "sum" and width(a) > 1:
            v = b.call(aten.sum.dim_IntList, a, [1], True)
        if v is None:
            v = b.call(rng.choice((aten.relu, aten.sigmoid, aten.tanh, aten.neg)), a)
        pool.append(v)
    g.set_outputs(v for v in pool[n_inputs:] if not v.uses)
    return g


# -- NAS cells -----------------------------------------------------------------------------------------

def nas_cell_graph(seed: int, n_cells: int = 3, n_steps: int = 4) -> Graph:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch, channels, size = rng.choice((1, 2)), rng.choice((8, 16)), rng.choice((8, 16))
    g = Graph(f"nas_cell_{seed}")
    b = Builder(g)
    counter = itertools.count()

    def conv(x: Value, out_ch: int, kernel: int, stride: int, relu: bool = True) -> Value:
        in_ch = x.type.shape[1]
        w = torch.randn(out_ch, in_ch, kernel, kernel, generator=gen) / (in_ch * kernel * kernel) ** 0.5
        x = b.call(aten.relu, x) if relu else x
        pad = kernel // 2
        return b.call(aten.convolution, x, b.weight(f"conv{next(counter)}", w), None, [stride, stride],
                      [pad, pad], [1, 1], False, [0, 0], 1)

    def op(x: Value, out_ch: int, stride: int) -> Value:
        kind = rng.choice(("conv3", "conv1", "max", "avg", "skip"))
        if kind in ("max", "avg") and x.type.shape[1] == out_ch:
            if kind == "max":
                return b.call(aten.max_pool2d_with_indices, x, [3, 3], [stride, stride], [1, 1])[0]
            return b.call(aten.avg_pool2d, x, [3, 3], [stride, stride], [1, 1])
        if kind == "skip" and stride == 1 and x.type.shape[1] == out_ch:
            return x
        return conv(x, out_ch, 3 if kind == "conv3" else 1, stride)

    x = g.add_input(TensorType((batch, 3, size, size), F32), "x")
    stem = conv(x, channels, 3, 1, relu=False)
    states = [stem, stem]
    reductions = {n_cells // 3, 2 * n_cells // 3} - {0} if n_cells >= 3 else set()
    for cell in range(n_cells):
        reduce = cell in reductions
        if reduce:
            channels *= 2
        res = states[-1].type.shape[2]
        inputs = [conv(s, channels, 1, s.type.shape[2] // res) for s in states[-2:]]
        nodes = list(inputs)
        for _ in range(n_steps):
            terms = []
            for _ in range(2):
                j = rng.randrange(len(nodes))
                terms.append(op(nodes[j], channels, 2 if reduce and j < 2 else 1))
            nodes.append(b.call(aten.add.Tensor, *terms))
        states.append(b.call(aten.cat, nodes[2:], 1))
    last = states[-1]
    pooled = b.call(aten.mean.dim, last, [2, 3])
    fc = torch.randn(last.type.shape[1], 10, generator=gen) / last.type.shape[1] ** 0.5
    g.set_outputs([b.call(aten.mm, pooled, b.weight("fc", fc))])
    return g
