"""Run a kiln graph with every activation in one planned arena, and measure what the run really allocates.

Contract:
- ``compile_with_arena(graph, order=None, method="greedy", alignment=64, views="auto", **plan_options)``
  returns an ``ArenaExecutor`` (whose constructor takes the same arguments, ``views`` "alias" or "copy").
  ``order`` is a list of the graph's compute nodes, a ``schedule`` method name (``"program"`` is the
  graph's own order), or None for ``schedule(graph, "best")``. The buffers come from
  ``liveness.buffers_for_order``; ``method``/``alignment``/``plan_options`` go to ``plan_arena``.
- Plan model and execution agree on views. ``views="alias"`` honours a view as a view: a node
  whose tensor results all share storage with one of its inputs (decided by running the op on fake
  tensors, so ``view``, ``permute``, ``select``, ``split_with_sizes``, ``_unsafe_view``... of a
  ``kiln.passes.analysis.VIEW_OPS`` kind, and any op that really aliases) gets no buffer; the value it
  views (its *root*: the first non-view producer) stays live until the view's last use. A view whose
  root is a graph input or a weight needs no arena memory at all. ``views="copy"`` is liveness's own
  model unchanged: every value, views included, gets a slot, and a view is computed (no allocation)
  then copied into it. ``views="auto"`` (``compile_with_arena``'s default) plans both on the same order
  and keeps the smaller arena: aliasing keeps a whole root alive for a small late view, so copying can
  win (``executor.views`` says which was kept). Any other value raises ``KilnInputError``.
- Every tensor result of a non-view node has a ``Slot``: its planned byte offset, shape, dtype and
  strides. Strides are the ones PyTorch's functional kernel would produce (propagated through the graph
  on fake tensors), or contiguous when those are not dense; so out= kernels see the layout they want.
- Execution: each call allocates ONE ``torch.empty(plan.size, dtype=torch.uint8)`` and runs the order;
  every result is written straight into a typed, strided view of its slot by, in this order of choice:
  a ``WRITERS`` entry (ops whose own out overload is generated, i.e. computes into a temporary and copies,
  mapped to the kernel their functional form runs: ``relu`` -> ``clamp_min.out``, eval batch norm ->
  ``_native_batch_norm_legit.out``, a ``Slow2d`` convolution -> ``_slow_conv2d_forward.output``,
  ``embedding`` -> ``index_select.out``, ``clone``/``full_like``/``scalar_tensor`` -> ``copy_``/``fill_``,
  ``add/sub/mul/div.Scalar`` -> the Tensor overload's ``.out``; each is bit-exact), else the op's out
  variant (an overload of the same packet whose non-``is_out`` arguments are the functional's, less
  tensor options ``dtype/layout/device/pin_memory`` it may drop when the slot agrees with them, with one
  ``is_out`` argument per result, or one list argument). Any other node (no out variant, or a
  ``kiln.fused``/``kiln.partition`` region) is computed, copied into its slots and the temporary freed:
  its result bytes are ``transients`` (node -> bytes; ops in ``no_out_variant``), reported, never hidden.
  Nodes without tensor results (``sym.*``, asserts) run as they are. Mutating or side-effecting ops and
  symbolic shapes raise ``UnsupportedError``.
- Graph inputs are caller-owned (never in the arena; shape and dtype are checked). Outputs are *copied
  out*: each returned tensor is a fresh ``clone`` of its arena slot (or of the input/weight it views),
  so it survives the next call; the arena is freed when the call returns.
- ``measure(*inputs)`` runs once (after a warm-up call) under ``torch.profiler`` with ``profile_memory=True``
  and replays every CPU-allocator allocation and free (matched by address) it saw. The ``ArenaRunReport``
  holds ``planned_bytes`` (the plan's arena), ``arena_bytes`` (the allocation actually made for it),
  ``measured_peak_bytes`` (max live bytes until the outputs are copied out: the arena, temporaries, scratch),
  ``transient_bytes`` (that peak less the arena: the largest set of temporaries live together),
  ``node_transients`` (per node, the bytes it had live on top of the arena at its worst: copy-ins and
  kernels' own scratch, e.g. out variants that compute into a temporary and copy), ``output_copy_bytes``
  and ``call_peak_bytes`` (the copy-out included), and ``placements``: for every tensor result, the byte
  range of its actual storage relative to the arena (None when it is not in the arena); ``misplaced``
  lists every result whose ``data_ptr`` is not where the plan put it. Memory that libraries allocate
  with their own malloc (MKL, oneDNN scratch) and allocations on worker threads are invisible to it.
- ``eager_activation_peak(graph, inputs)`` measures the same way the peak of ``to_fx(graph)(*inputs)``
  (intermediates, kernel scratch and outputs; inputs and weights excluded), after one warm-up call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense
from torch._subclasses.fake_tensor import FakeTensorMode

from kiln.errors import KilnError, KilnInputError, UnsupportedError
from kiln.ir.graph import Graph, Node, Value, iter_values, map_values
from kiln.ir.ops import WEIGHT
from kiln.ir.to_fx import to_fx
from kiln.ir.types import TensorType
from kiln.scheduler.arena import plan_arena
from kiln.scheduler.buffers import ArenaPlan, Buffer, check_plan
from kiln.scheduler.liveness import buffers_for_order, compute_nodes
from kiln.scheduler.ordering import schedule

VIEW_MODES = ("alias", "copy")
_TENSOR_OPTIONS = frozenset({"dtype", "layout", "device", "pin_memory"})
_PROFILE_TAG = "kiln.arena"


# ---------------------------------------------------------------------------------------------- out variants


@dataclass(frozen=True)
class OutVariant:
    op: torch._ops.OpOverload
    out_args: tuple[str, ...]  # the is_out arguments, one per result (or one list argument)
    dropped: frozenset[str]  # tensor-options arguments of the functional the out overload has not got
    list_out: bool = False


@functools.cache
def out_variant(op: torch._ops.OpOverload) -> OutVariant | None:
    """The out= overload of ``op``'s packet taking the same arguments (tensor options aside), or None."""
    schema = op._schema
    if not schema.returns or any(a.is_out for a in schema.arguments):
        return None
    packet = op.overloadpacket
    for name in packet.overloads():
        cand = getattr(packet, name)
        outs = [a for a in cand._schema.arguments if a.is_out]
        if not outs:
            continue
        ins = [(a.name, str(a.type)) for a in cand._schema.arguments if not a.is_out]
        kept = {n for n, _ in ins}
        want = [(a.name, str(a.type)) for a in schema.arguments if a.name in kept or a.name not in _TENSOR_OPTIONS]
        if ins != want or len(outs) != len(schema.returns):
            continue
        dropped = frozenset(a.name for a in schema.arguments if a.name not in kept)
        list_out = len(outs) == 1 and str(outs[0].type).endswith("[]")
        return OutVariant(cand, tuple(a.name for a in outs), dropped, list_out)
    return None


def _options_agree(args: dict[str, Any], dropped: frozenset[str], types: list[TensorType]) -> bool:
    """Dropping ``dtype/layout/device/pin_memory`` is safe iff the slots already say the same."""
    for name in dropped:
        v = args.get(name)
        if v is None:
            continue
        if name == "dtype" and any(t.dtype != v for t in types):
            return False
        if name == "device" and torch.device(v).type != "cpu":
            return False
        if name == "layout" and v != torch.strided:
            return False
        if name == "pin_memory" and v:
            return False
    return True


def _named_args(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    names = [a.name for a in op._schema.arguments]
    if len(args) > len(names):
        raise KilnError(f"{op}: {len(args)} positional arguments for a schema of {len(names)}")
    return {**dict(zip(names, args)), **kwargs}


# ---------------------------------------------------------------------------------------------- writers
#
# Ops whose own out= overload is generated: it runs the functional kernel into a temporary and copies it
# (measured with the profiler: a transient as large as the result). Each is mapped to a writer that runs
# the kernel the functional op's CPU implementation runs, straight into the slots, so results are equal
# bit for bit. ``applies(outs, args)`` is checked at plan time on fake tensors.

_aten = torch.ops.aten
_Args = dict[str, Any]


@dataclass(frozen=True)
class Writer:
    write: Callable[[list[torch.Tensor], _Args], Any]
    applies: Callable[[list[torch.Tensor], _Args], bool] = lambda outs, args: True


def _scalar_op(packet) -> Writer:
    """``add/sub/mul/div.Scalar`` wrap the scalar and call the Tensor overload: so does its ``.out``."""
    return Writer(lambda outs, a: packet.out(**a, out=outs[0]))


def _embedding(outs: list[torch.Tensor], a: _Args) -> None:
    weight = a["weight"]
    _aten.index_select.out(weight, 0, a["indices"].reshape(-1), out=outs[0].view(-1, weight.shape[1]))


def _batch_norm_eval(outs: list[torch.Tensor], a: _Args) -> None:
    _aten._native_batch_norm_legit.out(a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
                                       False, a["momentum"], a["eps"], out=outs[0], save_mean=outs[1],
                                       save_invstd=outs[2])


def _conv_backend(a: _Args):
    return torch._C._select_conv_backend(a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                                         a["dilation"], a["transposed"], a["output_padding"], a["groups"])


def _slow_conv2d(outs: list[torch.Tensor], a: _Args) -> None:
    weight = a["weight"]
    _aten._slow_conv2d_forward.output(a["input"], weight, list(weight.shape[2:]), a["bias"], a["stride"],
                                      a["padding"], output=outs[0])


def _applies(writer: Writer, outs: list[torch.Tensor], args: _Args) -> bool:
    """A guard that cannot decide (it raised) leaves the node to its out variant."""
    try:
        return bool(writer.applies(outs, args))
    except Exception:
        return False


WRITERS: dict[torch._ops.OpOverload, Writer] = {
    _aten.relu.default: Writer(lambda outs, a: _aten.clamp_min.out(a["self"], 0, out=outs[0])),
    _aten.clone.default: Writer(lambda outs, a: outs[0].copy_(a["self"])),
    _aten.full_like.default: Writer(lambda outs, a: outs[0].fill_(a["fill_value"])),
    _aten.scalar_tensor.default: Writer(lambda outs, a: outs[0].fill_(a["s"])),
    _aten.add.Scalar: _scalar_op(_aten.add),
    _aten.sub.Scalar: _scalar_op(_aten.sub),
    _aten.mul.Scalar: _scalar_op(_aten.mul),
    _aten.div.Scalar: _scalar_op(_aten.div),
    _aten.embedding.default: Writer(_embedding, lambda outs, a: outs[0].is_contiguous() and a["weight"].dim() == 2),
    _aten._native_batch_norm_legit_no_training.default: Writer(_batch_norm_eval),
    _aten.convolution.default: Writer(
        _slow_conv2d, lambda outs, a: a["input"].dim() == 4 and outs[0].is_contiguous()
        and _conv_backend(a) == torch._C._ConvBackend.Slow2d),
}


# ---------------------------------------------------------------------------------------------- slots and steps


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in the arena: ``offset`` bytes from its start, ``nbytes`` long."""

    value: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    def view(self, arena: _Arena) -> torch.Tensor:
        item = self.dtype.itemsize
        if self.offset % item == 0:
            return arena.typed(self.dtype).as_strided(self.shape, self.stride, self.offset // item)
        typed = arena.bytes.narrow(0, self.offset, self.nbytes).view(self.dtype)
        return typed.as_strided(self.shape, self.stride)


class _Arena:
    """One call's arena: its bytes, and views of them as each dtype (made once, whole items only)."""

    def __init__(self, size: int):
        self.bytes = torch.empty(size, dtype=torch.uint8)
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        t = self._typed.get(dtype)
        if t is None:
            item = dtype.itemsize
            t = self._typed[dtype] = self.bytes[: self.bytes.numel() // item * item].view(dtype)
        return t


@dataclass
class _Step:
    node: Node
    kind: str  # "write" | "out" | "copy" | "region" | "view" | "view-copy" | "host"
    fn: Callable
    bind: Callable[[dict[Value, Any]], tuple[list, dict[str, Any]]]  # env -> the call's args and kwargs
    slots: list[Slot | None]  # per result; None where the result needs no slot
    out: OutVariant | None = None


def _binder(args: tuple, kwargs: dict[str, Any]) -> Callable[[dict[Value, Any]], tuple[list, dict[str, Any]]]:
    """Find once where the Values are in ``args``/``kwargs``; a call then only looks those up."""
    def holes(items) -> tuple[list, list]:
        flat = [(k, a) for k, a in items if isinstance(a, Value)]
        nested = [(k, a) for k, a in items if isinstance(a, (list, tuple)) and any(iter_values(a))]
        return flat, nested

    arg_flat, arg_nested = holes(enumerate(args))
    kw_flat, kw_nested = holes(kwargs.items())

    def bind(env: dict[Value, Any]) -> tuple[list, dict[str, Any]]:
        a, k = list(args), dict(kwargs)
        for i, v in arg_flat:
            a[i] = env[v]
        for i, v in arg_nested:
            a[i] = map_values(v, env.__getitem__)
        for n, v in kw_flat:
            k[n] = env[v]
        for n, v in kw_nested:
            k[n] = map_values(v, env.__getitem__)
        return a, k

    return bind


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(int(d), 1)
    return tuple(reversed(strides))


def _input_strides(t: TensorType) -> tuple[int, ...]:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.rank)
    if t.layout == "channels_last" and fmt is not None:
        return torch.empty(t.shape, device="meta").to(memory_format=fmt).stride()
    return _contiguous_strides(t.shape)


def _result_list(node: Node, res: Any) -> list[Any]:
    if node.subgraph is not None or node.op.multi_result:
        return list(res)
    return [res] if node.results else []


# ---------------------------------------------------------------------------------------------- reports


@dataclass
class ArenaRunReport:
    planned_bytes: int
    arena_bytes: int
    measured_peak_bytes: int
    transient_bytes: int
    planned_transient_bytes: int
    node_transients: dict[str, int]
    output_copy_bytes: int
    call_peak_bytes: int
    placements: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    misplaced: list[str] = field(default_factory=list)

    @property
    def matches_plan(self) -> bool:
        return self.measured_peak_bytes == self.planned_bytes and not self.misplaced


# ---------------------------------------------------------------------------------------------- the executor


class ArenaExecutor:
    """A graph planned into one arena; call it like the graph (returns a tuple of outputs)."""

    def __init__(self, graph: Graph, order: Sequence[Node] | str | None = None, method: str = "greedy",
                 alignment: int = 64, views: str = "alias", **plan_options):
        if views not in VIEW_MODES:
            raise KilnInputError(f"views must be one of {VIEW_MODES}, got {views!r}")
        self.graph, self.views = graph, views
        if order is None or isinstance(order, str):
            order = schedule(graph, order or "best")[0]
        self.order = [n for n in order if n.op is not WEIGHT]
        self.weights = {n.output: self._weight(n) for n in graph.nodes if n.op is WEIGHT}
        self._fake = FakeTensorMode(allow_non_fake_inputs=True)
        self._fakes: dict[Value, Any] = {}
        self._root: dict[Value, Value | None] = {}  # view -> the value whose memory it uses (None: not ours)
        self._kinds: dict[Node, tuple[str, Any]] = {}
        self._propagate()
        self.buffers = self._buffers()
        self.plan: ArenaPlan = plan_arena(self.buffers, method=method, alignment=alignment, **plan_options)
        check_plan(self.buffers, self.plan)
        self.slots = {b.name: self._slot(b) for b in self.buffers}
        self.steps = [self._step(n) for n in self.order]
        self.transients = {_step_name(s): sum(sl.nbytes for sl in s.slots if sl is not None)
                           for s in self.steps if s.kind in ("copy", "region")}
        self.no_out_variant = sorted({s.node.op.name for s in self.steps if s.kind in ("copy", "region")})

    # -- planning --------------------------------------------------------------------------------------

    def _weight(self, node: Node) -> torch.Tensor:
        name = node.attrs["name"]
        if name not in self.graph.weights:
            raise KilnError(f"weight {name!r} of %{node.output.name} has no tensor attached")
        return self.graph.weights[name]

    def _propagate(self) -> None:
        """Run the order on fake tensors with the strides execution will use; classify every node."""
        fakes = self._fakes
        with self._fake:
            for v in self.graph.inputs:
                if isinstance(v.type, TensorType):
                    _static(v)
                    fakes[v] = torch.empty_strided(v.type.shape, _input_strides(v.type), dtype=v.type.dtype)
                else:
                    raise UnsupportedError(f"graph input %{v.name} is a {v.type}; the arena executor takes "
                                           f"tensor inputs only")
        for v, w in self.weights.items():
            fakes[v] = self._fake.from_tensor(w)
        for node in self.order:
            self._propagate_node(node)

    def _propagate_node(self, node: Node) -> None:
        fakes = self._fakes
        if node.op.side_effects or (node.op.schema is not None and node.op.schema.is_mutable):
            raise UnsupportedError(f"{node!r}: the arena executor runs functional graphs only; {node.op.name} "
                                   f"mutates its inputs or has side effects")
        tensor_results = [r for r in node.results if isinstance(r.type, TensorType)]
        for r in tensor_results:
            _static(r)
        fn = self._callable(node)
        args = map_values(node.args, fakes.__getitem__)
        kwargs = {k: map_values(a, fakes.__getitem__) for k, a in node.kwargs.items()}
        try:
            with self._fake:
                res = _result_list(node, fn(*args, **kwargs))
        except Exception as e:
            raise UnsupportedError(f"{node!r}: cannot run {node.op.name} on fake tensors to plan its layout: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if not tensor_results:
            self._kinds[node] = ("host", None)
            fakes.update(zip(node.results, res))
            return
        bases = self._aliased(node, res)
        if bases is not None and self.views == "alias":
            self._kinds[node] = ("view", None)
            for r, base, x in zip(node.results, bases, res):
                fakes[r] = x
                self._root[r] = self._root[base] if base in self._root else self._arena_root(base)
            return
        with self._fake:
            for r, x in zip(node.results, res):
                if isinstance(r.type, TensorType):
                    if tuple(x.shape) != tuple(r.type.shape) or x.dtype != r.type.dtype:
                        raise KilnError(f"{node!r}: result %{r.name} is declared {r.type} but PyTorch computes "
                                        f"{x.dtype}{list(x.shape)}")
                    dense = is_non_overlapping_and_dense(x)
                    stride = tuple(x.stride()) if dense else _contiguous_strides(r.type.shape)
                    fakes[r] = torch.empty_strided(r.type.shape, stride, dtype=r.type.dtype)
                else:
                    fakes[r] = x
            self._kinds[node] = self._kind(node, bases is not None, args, kwargs)

    def _kind(self, node: Node, is_view: bool, args: tuple, kwargs: dict) -> tuple[str, Any]:
        """How a node that needs slots writes them: ("write", Writer), ("out", OutVariant), or by copying
        ("view-copy", "region", "copy": None). Runs under the fake mode, with the slots' fakes known."""
        if is_view:
            return "view-copy", None
        if node.subgraph is not None or not node.op.is_torch_op:
            return ("region" if node.subgraph is not None else "copy"), None
        target = node.op.target
        slots = [self._fakes[r] for r in node.results]
        writer = WRITERS.get(target)
        if writer is not None and _applies(writer, slots, _named_args(target, args, kwargs)):
            return "write", writer
        out = out_variant(target)
        if out is not None and _options_agree(_named_args(target, node.args, node.kwargs), out.dropped,
                                              [r.type for r in node.results]):
            return "out", out
        return "copy", None

    def _aliased(self, node: Node, res: list[Any]) -> list[Value] | None:
        """For a node whose tensor results all share an input's storage: that input per result."""
        storages = {}
        for v in node.inputs:
            x = self._fakes.get(v)
            if isinstance(x, torch.Tensor):
                storages.setdefault(x.untyped_storage()._cdata, v)
        bases = [storages.get(x.untyped_storage()._cdata) if isinstance(x, torch.Tensor) else None for x in res]
        tensors = [b for b, r in zip(bases, node.results) if isinstance(r.type, TensorType)]
        if all(b is None for b in tensors):
            return None
        if any(b is None for b in tensors) or len(tensors) != len(node.results):
            raise UnsupportedError(f"{node!r}: {node.op.name} returns some results that alias an input and some "
                                   f"that do not (or non-tensors beside views); not supported")
        return bases

    def _arena_root(self, base: Value) -> Value | None:
        """``base`` is not a view: it is its own root if it lives in the arena (a node's result)."""
        if base.producer is None or base.producer.op is WEIGHT:
            return None
        return base

    def _buffers(self) -> list[Buffer]:
        buffers = buffers_for_order(self.graph, self.order)
        if self.views == "copy":
            return buffers
        by_name = {b.name: b for b in buffers}
        end = {b.name: b.end for b in buffers}
        for view, root in self._root.items():
            if root is not None:
                end[root.name] = max(end[root.name], by_name[view.name].end)
        views = {v.name for v in self._root}
        return [Buffer(b.name, b.size, b.start, end[b.name]) for b in buffers if b.name not in views]

    def _slot(self, b: Buffer) -> Slot:
        x = self._fakes[self._values[b.name]]
        return Slot(b.name, self.plan.offsets[b.name], tuple(x.shape), tuple(x.stride()), x.dtype, b.size)

    @functools.cached_property
    def _values(self) -> dict[str, Value]:
        return {r.name: r for n in compute_nodes(self.graph) for r in n.results}

    def _callable(self, node: Node) -> Callable:
        if node.subgraph is not None:
            gm = to_fx(node.subgraph)
            return lambda *a: gm(*a)
        if node.op.target is None:
            raise UnsupportedError(f"{node!r}: op {node.op.name} has no executable semantics; lower it first")
        return node.op.target

    def _step(self, node: Node) -> _Step:
        kind, how = self._kinds[node]
        slots = [None if kind in ("view", "host") else self.slots.get(r.name) for r in node.results]
        if kind in ("write", "out"):
            named = _named_args(node.op.target, node.args, node.kwargs)
            if kind == "write":
                return _Step(node, kind, how.write, _binder((), named), slots)
            kwargs = {k: v for k, v in named.items() if k not in how.dropped}
            return _Step(node, kind, how.op, _binder((), kwargs), slots, how)
        return _Step(node, kind, self._callable(node), _binder(node.args, node.kwargs), slots)

    # -- execution -------------------------------------------------------------------------------------

    def __call__(self, *inputs) -> tuple:
        return self._run(inputs, annotate=False)

    def _bind(self, inputs: tuple) -> dict[Value, Any]:
        if len(inputs) != len(self.graph.inputs):
            raise KilnInputError(f"@{self.graph.name} takes {len(self.graph.inputs)} inputs, got {len(inputs)}")
        env: dict[Value, Any] = dict(self.weights)
        for v, x in zip(self.graph.inputs, inputs):
            t = v.type
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(t.shape) or x.dtype != t.dtype:
                got = f"{x.dtype}{list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise KilnInputError(f"input %{v.name} of @{self.graph.name} must be {t}, got {got}")
            if x.device.type != "cpu":
                raise KilnInputError(f"input %{v.name}: the arena executor runs on CPU, got {x.device}")
            env[v] = x
        return env

    def _run(self, inputs: tuple, annotate: bool, trace: Callable | None = None) -> tuple:
        env = self._bind(inputs)
        with _annotate(annotate, "alloc"):
            arena = _Arena(self.plan.size)
        for i, step in enumerate(self.steps):
            with _annotate(annotate, f"step/{i}"):
                try:
                    self._execute(step, env, arena)
                except Exception as e:
                    raise KilnError(f"arena execution of {step.node!r} ({step.kind}) failed: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            if trace is not None:
                trace(step, env, arena)
        with _annotate(annotate, "outputs"):
            copies: dict[int, Any] = {}
            outs = []
            for v in self.graph.outputs:
                x = env[v]
                if isinstance(x, torch.Tensor):
                    if id(x) not in copies:
                        copies[id(x)] = x.clone()
                    x = copies[id(x)]
                outs.append(x)
        return tuple(outs)

    def _execute(self, step: _Step, env: dict[Value, Any], arena: _Arena) -> None:
        node = step.node
        args, kwargs = step.bind(env)
        if step.kind in ("write", "out"):
            views = [s.view(arena) for s in step.slots]
            if step.kind == "write":
                step.fn(views, kwargs)
            elif step.out.list_out:
                step.fn(**kwargs, **{step.out.out_args[0]: views})
            else:
                step.fn(**kwargs, **dict(zip(step.out.out_args, views)))
            env.update(zip(node.results, views))
            return
        res = _result_list(node, step.fn(*args, **kwargs))
        if step.kind in ("view", "host"):
            env.update(zip(node.results, res))
            return
        for r, slot, x in zip(node.results, step.slots, res):  # copy, region, view-copy
            if slot is None:
                env[r] = x
            else:
                target = slot.view(arena)
                target.copy_(x)
                env[r] = target
        del res

    # -- measurement -----------------------------------------------------------------------------------

    def measure(self, *inputs, warmup: bool = True) -> tuple[tuple, ArenaRunReport]:
        """Run once under the memory profiler (after one warm-up run) and check every placement."""
        from torch.profiler import ProfilerActivity, profile

        if warmup:
            self._run(inputs, annotate=False)
        placements: dict[str, tuple[int, int] | None] = {}
        misplaced: list[str] = []

        def trace(step: _Step, env: dict[Value, Any], arena: _Arena) -> None:
            for r, slot in zip(step.node.results, step.slots):
                x = env[r]
                if not isinstance(x, torch.Tensor):
                    continue
                placements[r.name] = where = _placement(x, arena.bytes)
                if x.numel():  # an empty tensor occupies no memory: kernels may give it any (or no) storage
                    misplaced.extend(self._misplacement(r, slot, where))

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            outputs = self._run(inputs, annotate=True, trace=trace)
        phases = _memory_by_phase(prof)
        arena_bytes = phases["alloc"].allocated
        exec_peak = max(p.peak for name, p in phases.items() if name != "outputs")
        node_transients = {}
        for i, step in enumerate(self.steps):
            extra = phases[f"step/{i}"].peak - arena_bytes
            if extra > 0:
                node_transients[_step_name(step)] = extra
        report = ArenaRunReport(
            planned_bytes=self.plan.size, arena_bytes=arena_bytes, measured_peak_bytes=exec_peak,
            transient_bytes=exec_peak - arena_bytes, planned_transient_bytes=max(self.transients.values(), default=0),
            node_transients=node_transients, output_copy_bytes=phases["outputs"].allocated,
            call_peak_bytes=max(p.peak for p in phases.values()), placements=placements, misplaced=misplaced)
        return outputs, report

    def _misplacement(self, r: Value, slot: Slot | None, where: tuple[int, int] | None) -> list[str]:
        if slot is not None:
            if where is None or where[0] != slot.offset or where[1] > slot.offset + slot.nbytes:
                return [f"%{r.name} is at {where}, planned [{slot.offset}, {slot.offset + slot.nbytes})"]
            return []
        root = self._root.get(r)
        if root is None:
            return [] if where is None else [f"%{r.name} views caller memory but lies in the arena at {where}"]
        home = self.slots[root.name]
        if where is None or where[0] < home.offset or where[1] > home.offset + home.nbytes:
            return [f"%{r.name} views %{root.name} [{home.offset}, {home.offset + home.nbytes}) but is at {where}"]
        return []

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for s in self.steps:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        return {"graph": self.graph.name, "views": self.views, "method": self.plan.method,
                "planned_bytes": self.plan.size, "lower_bound_bytes": self.plan.lower_bound,
                "buffers": len(self.buffers), "steps": kinds, "transients": dict(self.transients),
                "no_out_variant": list(self.no_out_variant)}


def compile_with_arena(graph: Graph, order: Sequence[Node] | str | None = None, method: str = "greedy",
                       alignment: int = 64, views: str = "auto", **plan_options) -> ArenaExecutor:
    """An ``ArenaExecutor``; ``views="auto"`` plans both view models on the same order and keeps the smaller
    arena (ties: "alias", which copies nothing)."""
    if views != "auto":
        return ArenaExecutor(graph, order, method=method, alignment=alignment, views=views, **plan_options)
    if order is None or isinstance(order, str):
        order = schedule(graph, order or "best")[0]
    alias, copy = (ArenaExecutor(graph, order, method=method, alignment=alignment, views=mode, **plan_options)
                   for mode in VIEW_MODES)
    return copy if copy.plan.size < alias.plan.size else alias


# ---------------------------------------------------------------------------------------------- helpers


def _static(v: Value) -> None:
    if not v.type.is_static:
        raise UnsupportedError(f"%{v.name} has a symbolic shape {v.type.shape}; the arena executor needs static "
                               f"shapes (specialize the graph first)")


def _step_name(step: _Step) -> str:
    return f"%{step.node.results[0].name}" if step.node.results else repr(step.node)


def _placement(x: torch.Tensor, arena: torch.Tensor) -> tuple[int, int] | None:
    """Byte range [lo, hi) of the memory ``x`` can address, relative to the arena; None if elsewhere."""
    if x.untyped_storage()._cdata != arena.untyped_storage()._cdata:
        return None
    lo = x.data_ptr() - arena.data_ptr()
    if x.numel() == 0:
        return lo, lo
    span = 1 + sum((d - 1) * abs(s) for d, s in zip(x.shape, x.stride()))
    return lo, lo + span * x.element_size()


class _annotate:
    """``record_function`` named ``kiln.arena/<phase>`` when profiling, a no-op otherwise."""

    def __init__(self, on: bool, phase: str):
        self.rf = torch.profiler.record_function(f"{_PROFILE_TAG}/{phase}") if on else None

    def __enter__(self):
        if self.rf is not None:
            self.rf.__enter__()

    def __exit__(self, *exc):
        if self.rf is not None:
            self.rf.__exit__(*exc)


@dataclass
class _Phase:
    allocated: int = 0  # bytes allocated within the phase
    peak: int = 0  # max live bytes (everything allocated during the profile) while the phase ran


def _memory_by_phase(prof) -> dict[str, _Phase]:
    """Replay the profile's CPU allocations and frees in time order, with the ``kiln.arena/<phase>`` ranges:
    an event inside a range belongs to the innermost one, an event outside every range to the phase that
    began last ("" before the first). A phase's peak is the live bytes when it began or after any of its
    events. Frees of memory allocated before the profile are ignored."""
    from torch._C._profiler import _ExtraFields_Allocation

    timeline: list[tuple[int, int, int, int, str | None]] = []  # (ns, 0 begin / 1 event, ptr, bytes, phase)

    def walk(nodes, phase: str | None) -> None:
        for n in nodes:
            fields = n.extra_fields
            if isinstance(fields, _ExtraFields_Allocation):
                if fields.device.type == "cpu":
                    timeline.append((n.start_time_ns, 1, fields.ptr, fields.alloc_size, phase))
                continue
            inner = phase
            if n.name.startswith(_PROFILE_TAG + "/"):
                inner = n.name[len(_PROFILE_TAG) + 1:]
                timeline.append((n.start_time_ns, 0, 0, 0, inner))
            walk(n.children, inner)

    walk(prof.profiler.kineto_results.experimental_event_tree(), None)
    phases: dict[str, _Phase] = {"": _Phase()}
    current = ""
    live_ptrs: dict[int, int] = {}
    live = 0
    for _, is_event, ptr, size, phase in sorted(timeline, key=lambda e: (e[0], e[1])):
        if not is_event:
            current = phase
            begun = phases.setdefault(phase, _Phase(0, live))
            begun.peak = max(begun.peak, live)
            continue
        p = phases.setdefault(phase if phase is not None else current, _Phase(0, live))
        if size > 0:
            live_ptrs[ptr] = size
            live += size
            p.allocated += size
        elif ptr in live_ptrs:
            live -= live_ptrs.pop(ptr)
        p.peak = max(p.peak, live)
    return phases


def eager_activation_peak(graph: Graph, inputs: Sequence[torch.Tensor], warmup: bool = True) -> int:
    """Peak live bytes allocated by ``to_fx(graph)(*inputs)`` (inputs and weights pre-exist), measured."""
    from torch.profiler import ProfilerActivity, profile

    gm = to_fx(graph)
    if warmup:
        gm(*inputs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, _annotate(True, "eager"):
        out = gm(*inputs)
    del out
    return _memory_by_phase(prof)["eager"].peak
