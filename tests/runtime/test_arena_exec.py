"""The arena executor: outputs equal the reference bit for bit, every result lives at its planned offset,
results live together never overlap, the measured peak is the plan when nothing else allocates, and
whatever does allocate (ops without out variants, kernels' scratch) is measured and reported."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from examples.models import REGISTRY
from kiln.errors import KilnError, KilnInputError
from kiln.ir.builder import Builder
from kiln.ir.graph import Graph
from kiln.ir.ops import FUSED, aten
from kiln.ir.outline import outline_region
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.runtime.arena_exec import WRITERS, ArenaExecutor, compile_with_arena, eager_activation_peak, out_variant
from kiln.scheduler.graphs import nas_cell_graph, random_dag, zoo_graphs
from kiln.scheduler.liveness import buffers_for_order
from kiln.scheduler.ordering import schedule

F32 = torch.float32


# ---------------------------------------------------------------------------------------------- helpers


def inputs_for(graph: Graph, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(v.type.shape, generator=gen, dtype=v.type.dtype) for v in graph.inputs]


def assert_exact(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


def assert_placed(ex, report) -> None:
    """Every result whose storage the plan gives lies at its offset; results live together never share a
    byte (checked on the real data_ptr ranges); a view lies inside the memory of the value it views."""
    assert report.misplaced == []
    for b in ex.buffers:
        where = report.placements[b.name]
        if b.size:
            assert where is not None and where[0] == ex.plan.offsets[b.name] and where[1] <= where[0] + b.size, b
    sized = [b for b in ex.buffers if b.size]
    for i, a in enumerate(sized):
        for b in sized[i + 1:]:
            if a.conflicts(b):
                (alo, ahi), (blo, bhi) = report.placements[a.name], report.placements[b.name]
                assert ahi <= blo or bhi <= alo, (a, b)
    for view, root in ex._root.items():
        where = report.placements[view.name]
        if root is None:
            assert where is None
        elif where is not None and where[0] != where[1]:
            home = report.placements[root.name]
            assert home[0] <= where[0] and where[1] <= home[1]


def run_and_check(graph: Graph, inputs, **kw):
    ex = compile_with_arena(graph, **kw)
    outputs, report = ex.measure(*inputs)
    assert_exact(outputs, to_fx(graph)(*inputs))
    assert_placed(ex, report)
    assert report.arena_bytes == report.planned_bytes == ex.plan.size
    assert report.measured_peak_bytes >= report.planned_bytes
    return ex, report


def allocated_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.nbytes(), 0) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def zoo_cases(names=None) -> dict[str, tuple[Graph, list[torch.Tensor]]]:
    """Zoo graphs (small, folded) with their factory's inputs cut to the graph's batch."""
    out = {}
    for key, g in zoo_graphs(names=names, batch_sizes=(1,), fold_constants=True).items():
        name, batch = key.rsplit("_b", 1)
        _, inputs = REGISTRY[name](size="small", seed=0)
        out[name] = (g, [x[torch.arange(int(batch)) % x.shape[0]] if x.dim() else x for x in inputs])
    return out


@pytest.fixture(scope="module")
def zoo():
    return zoo_cases(["mlp", "rnn"])


# ---------------------------------------------------------------------------------------------- synthetic graphs


@pytest.mark.parametrize("views", ["alias", "copy"])
@pytest.mark.parametrize("seed", range(4))
def test_random_dag_runs_in_its_plan(seed, views):
    g = random_dag(25, seed)
    ex, report = run_and_check(g, inputs_for(g, seed), views=views)
    # mm/add/cat/sum/... write through out variants, relu through clamp_min.out: nothing else allocates
    assert ex.transients == {}
    assert report.transient_bytes == 0 and report.node_transients == {}
    assert report.measured_peak_bytes == report.planned_bytes


@pytest.mark.parametrize("seed", range(2))
def test_nas_cell_outputs_and_placements(seed):
    g = nas_cell_graph(seed)
    ex, report = run_and_check(g, inputs_for(g, seed))
    # convolution kernels allocate scratch of their own (im2col, or mean's wrapped divisor): measured,
    # attributed to their nodes, never hidden
    assert ex.transients == {}
    assert report.transient_bytes == max(report.node_transients.values()) > 0
    by_name = {f"%{s.node.results[0].name}": s.node for s in ex.steps}
    assert {by_name[n].op.name for n in report.node_transients} <= {"aten.convolution", "aten.mean.dim"}


def _view_graph() -> Graph:
    """a = relu(x), v = permute(a), then sigmoid/tanh of x, and add(t(v), ...) last: v keeps a alive."""
    g = Graph("views")
    b = Builder(g)
    x = g.add_input(TensorType((8, 16), F32), "x")
    a = b.call(aten.relu, x, name="a")
    v = b.call(aten.permute, a, [1, 0], name="v")
    s = b.call(aten.sigmoid, x, name="s")
    s2 = b.call(aten.tanh, s, name="s2")
    xt = b.call(aten.t, x, name="xt")  # a view of a graph input: no arena memory at all
    out = b.call(aten.add.Tensor, b.call(aten.t, v, name="vt"), s2, name="out")
    g.set_outputs([out, b.call(aten.neg, xt, name="negxt")])
    return g


def test_alias_mode_extends_roots_and_drops_view_buffers():
    g = _view_graph()
    alias = compile_with_arena(g, order="program", views="alias")
    copy = compile_with_arena(g, order="program", views="copy")
    assert copy.buffers == buffers_for_order(g, copy.order)  # the materialising model, unchanged
    names = {b.name: b for b in alias.buffers}
    assert not {"v", "vt", "xt"} & set(names)
    last_use_of_vt = [n.results[0].name for n in alias.order].index("out")
    assert names["a"].end == last_use_of_vt > {b.name: b for b in copy.buffers}["a"].end
    assert alias.plan.size <= copy.plan.size
    for ex in (alias, copy):
        outputs, report = ex.measure(*inputs_for(g))
        assert_exact(outputs, to_fx(g)(*inputs_for(g)))
        assert_placed(ex, report)
        assert report.measured_peak_bytes == report.planned_bytes
    assert alias._root[g.outputs[1].producer.input(0)] is None  # xt views the caller's x


def test_auto_copies_a_small_late_view_of_a_big_value():
    g = Graph("late_view")
    b = Builder(g)
    x = g.add_input(TensorType((64, 64), F32), "x")
    row = b.call(aten.select.int, b.call(aten.relu, x), 0, 0)  # aliasing would keep all of relu(x) alive
    tail = b.call(aten.neg, b.call(aten.tanh, b.call(aten.sigmoid, x)))
    g.set_outputs([b.call(aten.add.Tensor, tail, row)])
    alias = compile_with_arena(g, order="program", views="alias")
    copy = compile_with_arena(g, order="program", views="copy")
    auto = compile_with_arena(g, order="program")
    assert copy.plan.size < alias.plan.size
    assert auto.views == "copy" and auto.plan.size == copy.plan.size
    outputs, report = auto.measure(*inputs_for(g))
    assert_exact(outputs, to_fx(g)(*inputs_for(g)))
    assert_placed(auto, report)
    assert report.measured_peak_bytes == report.planned_bytes


def test_op_without_out_variant_reports_its_transient():
    g = Graph("layer_norm")
    b = Builder(g)
    x = g.add_input(TensorType((4, 64), F32), "x")
    h = b.call(aten.relu, x)
    ln = b.call(aten.layer_norm, h, [64], name="ln")  # CompositeImplicit: no out overload
    g.set_outputs([b.call(aten.add.Tensor, ln, h)])
    assert out_variant(aten.layer_norm.default.target) is None
    ex, report = run_and_check(g, inputs_for(g))
    assert ex.no_out_variant == ["aten.layer_norm"]
    assert ex.transients == {"%ln": 4 * 64 * 4}
    assert report.planned_transient_bytes == 4 * 64 * 4
    assert report.node_transients["%ln"] >= 4 * 64 * 4  # the temporary, plus the kernel's own
    assert report.measured_peak_bytes >= report.planned_bytes + 4 * 64 * 4


def test_region_nodes_run_and_copy_their_results():
    g = random_dag(12, 3)
    region = [n for n in g.nodes if n.op.name != "kiln.weight"][2:6]
    expected = to_fx(g)(*inputs_for(g))
    fused = outline_region(g, region, FUSED, {"kind": "test"}, "r0")
    ex, report = run_and_check(g, inputs_for(g))
    assert_exact(ex(*inputs_for(g)), expected)
    assert ex.steps[[s.node for s in ex.steps].index(fused)].kind == "region"
    assert sum(ex.transients.values()) == sum(r.type.nbytes() for r in fused.results)


# ---------------------------------------------------------------------------------------------- zoo graphs


@pytest.mark.parametrize("name", ["mlp", "rnn"])
def test_zoo_graph_outputs_and_placements(zoo, name):
    g, inputs = zoo[name]
    run_and_check(g, inputs)


@pytest.mark.slow
def test_every_zoo_graph_runs_in_its_arena():
    for name, (g, inputs) in zoo_cases().items():
        ex, report = run_and_check(g, inputs)
        assert ex.no_out_variant == [], name  # every op of the zoo has an out variant or a writer
        assert report.transient_bytes == max(report.node_transients.values(), default=0), name  # no leaks


def test_zoo_rnn_measured_peak_is_the_plan(zoo):
    g, inputs = zoo["rnn"]
    ex, report = run_and_check(g, inputs)
    assert report.transient_bytes == 0 and report.measured_peak_bytes == report.planned_bytes
    assert eager_activation_peak(g, inputs) >= sum(v.type.nbytes() for v in g.outputs)


def test_zoo_mlp_layer_norm_allocates_inside_its_out_variant(zoo):
    g, inputs = zoo["mlp"]
    ex, report = run_and_check(g, inputs)
    assert ex.transients == {}  # every op has an out variant...
    norms = [f"%{s.node.results[0].name}" for s in ex.steps if s.node.is_a(aten.native_layer_norm)]
    assert norms and set(report.node_transients) <= set(norms)  # ...but native_layer_norm.out is generated
    assert report.transient_bytes > 0


# ---------------------------------------------------------------------------------------------- pieces


def test_out_variant_lookup():
    A = torch.ops.aten
    assert out_variant(A.add.Tensor).op is A.add.out
    assert out_variant(A.mul.Scalar).op is A.mul.Scalar_out
    assert out_variant(A.sum.dim_IntList).op is A.sum.IntList_out
    full = out_variant(A.full.default)
    assert full.op is A.full.out and full.dropped == {"dtype", "layout", "device", "pin_memory"}
    assert out_variant(A.native_layer_norm.default).out_args == ("out0", "out1", "out2")
    assert out_variant(A.max_pool2d_with_indices.default).out_args == ("out", "indices")
    assert out_variant(A.layer_norm.default) is None
    assert out_variant(A.split_with_sizes.default) is None  # a view
    assert out_variant(A.add.out) is None


def _writer_cases():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 12, generator=gen)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), -0.0, 0.0])
    w, bias = torch.randn(8, 8, 3, 3, generator=gen), torch.randn(8, generator=gen)
    A = torch.ops.aten
    return [
        (A.relu.default, (x,), {}),
        (A.clone.default, (x.permute(0, 2, 3, 1),), {}),
        (A.full_like.default, (x, 2.5), {}),
        (A.scalar_tensor.default, (3.0,), {"dtype": F32}),
        (A.add.Scalar, (x, 0.5), {"alpha": 2}),
        (A.sub.Scalar, (x, 0.5), {}),
        (A.mul.Scalar, (x, 0.1), {}),
        (A.div.Scalar, (x, 3.0), {}),
        (A.embedding.default, (torch.randn(10, 6, generator=gen), torch.tensor([[1, 2, 9], [0, 0, 4]])), {}),
        (A._native_batch_norm_legit_no_training.default,
         (x, bias.abs(), bias, torch.randn(8, generator=gen), torch.rand(8, generator=gen) + 0.5, 0.1, 1e-5), {}),
        (A.convolution.default, (x[:1], w, bias, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {}),
    ]


WRITER_CASES = _writer_cases()


@pytest.mark.parametrize("op,args,kwargs", WRITER_CASES, ids=[str(c[0]) for c in WRITER_CASES])
def test_writers_are_exact_and_write_in_place(op, args, kwargs):
    assert op in WRITERS
    expected = op(*args, **kwargs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    outs = [torch.empty_strided(e.shape, e.stride(), dtype=e.dtype) for e in expected]
    names = [a.name for a in op._schema.arguments]
    named = {**dict(zip(names, args)), **kwargs}
    writer = WRITERS[op]
    assert writer.applies(outs, named)
    writer.write(outs, named)
    assert_exact(outs, expected)
    # the generated out overload allocates the whole result; the writer at most scalars and scratch
    result_bytes = sum(e.numel() * e.element_size() for e in expected)
    used = allocated_bytes(lambda: writer.write(outs, named))
    if op is torch.ops.aten.convolution.default:
        used -= 9 * 8 * 12 * 12 * 4  # the im2col matrix of _slow_conv2d_forward: scratch, not a copy
    assert used < result_bytes or result_bytes <= 16


def test_outputs_survive_the_next_call_and_inputs_are_checked():
    g = random_dag(15, 7)
    ex = compile_with_arena(g)
    first_in, second_in = inputs_for(g, 0), inputs_for(g, 1)
    first = ex(*first_in)
    first_copy = [t.clone() for t in first]
    ex(*second_in)
    assert_exact(first, first_copy)
    assert_exact(first, to_fx(g)(*first_in))
    with pytest.raises(KilnInputError, match="must be"):
        ex(*[torch.zeros(1, 1)] * len(g.inputs))
    with pytest.raises(KilnInputError, match="takes"):
        ex()
    with pytest.raises(KilnInputError, match="views"):
        compile_with_arena(g, views="share")


def test_orders_and_planners():
    g = random_dag(20, 11)
    inputs = inputs_for(g)
    program = compile_with_arena(g, order="program")
    assert program.order == [n for n in g.nodes if n.op.name != "kiln.weight"]
    explicit = compile_with_arena(g, order=schedule(g, "bfs")[0], method="cpsat", time_limit_s=1.0)
    assert explicit.order == schedule(g, "bfs")[0] and explicit.plan.method == "cpsat"
    for ex in (program, explicit):
        outputs, report = ex.measure(*inputs)
        assert_exact(outputs, to_fx(g)(*inputs))
        assert_placed(ex, report)


def test_symbolic_shapes_are_refused():
    from kiln.ir.types import sym

    g = Graph("sym")
    x = g.add_input(TensorType((sym("s0"), 4), F32), "x")
    g.set_outputs([Builder(g).call(aten.relu, x)])
    with pytest.raises(KilnError, match="symbolic shape"):
        compile_with_arena(g, order="program")


def test_reference_backend_runs_from_the_arena_on_request():
    from kiln.backends.driver import compile_graph
    from kiln.scheduler.graphs import random_dag

    graph = random_dag(25, seed=3)
    inputs = [torch.randn([int(d) for d in v.type.shape]) for v in graph.inputs]
    compiled = compile_graph(graph, "reference", {"arena": True})
    (exe,) = [m.fn for m in compiled.module.modules() if hasattr(m, "fn")]
    assert isinstance(exe, ArenaExecutor)
    for got, ref in zip(compiled(*inputs), to_fx(graph)(*inputs)):
        assert torch.equal(got, ref)
