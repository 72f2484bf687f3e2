"""One kiln graph of lowerable ops -> one compiled TVM function, called on torch tensors without copies.

Contract:
- ``build_kernel(graph, target=None, schedule=schedule_cpu) -> TVMKernel``: every node of ``graph`` must
  satisfy ``te_ops.can_lower`` (weights are allowed: they become extra parameters bound at build time);
  otherwise ``UnsupportedError`` names the first node that cannot be lowered. The whole graph becomes one
  ``PrimFunc`` (inputs, weights, then outputs as parameters), scheduled by ``schedule`` and compiled by
  ``tvm.compile`` for ``target`` (default: ``cpu_target()``, LLVM for this host with its core count).
- ``TVMKernel(*inputs)`` allocates the outputs with torch, hands every tensor to TVM through DLPack
  (zero-copy; non-contiguous or less than 64-byte aligned inputs are copied first) and returns the
  outputs as a tuple, in the graph's output order. Values typed ``layout="channels_last"`` (4-d) are NHWC
  buffers in the compiled function: such inputs and weights are passed as their NHWC permutation (no copy
  when they are channels-last), such outputs are allocated channels-last and written in NHWC order.
  Inputs must have the shapes and dtypes the graph was built for (``KilnInputError`` otherwise).
- ``kernel.with_weights(graph)`` shares the compiled function with another graph of the same structure
  (weights are parameters, bound at call time).
- ``kernel.source`` is the scheduled TIR (TVMScript), for reports and debugging (None when the compiled
  function came from the cache).
- With a ``cache`` (``kiln.backends.tvm.cache.KernelCache``), the compiled library is looked up by
  workload key (``kernel.key``) before scheduling and stored after compiling; ``kernel.cached`` says which
  happened.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Callable
from functools import cache

import torch
import tvm  # noqa: E402  (te_ops raised a clear ImportError already if TVM is missing)
import tvm_ffi  # noqa: E402
from tvm import te, tirx  # noqa: E402
from tvm.tirx import Buffer  # noqa: E402

from kiln.errors import KilnInputError, UnsupportedError
from kiln.ir.graph import Graph, Value, map_values
from kiln.ir.ops import WEIGHT
from kiln.ir.types import TensorType

from .cache import KernelCache, workload_key
from .schedule import schedule_cpu
from .te_ops import TVM_DTYPES, can_lower, lower_node


@cache
def cpu_target() -> tvm.target.Target:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                              "num-cores": max(1, min(cores, torch.get_num_threads()))})


ALIGNMENT = 64  # bytes: TVM's DLPack import refuses less-aligned data


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 64-byte aligned (a copy only when it is not: a slice at an offset, or a tensor
    read from a file buffer such as an artifact's safetensors)."""
    t = t.contiguous()
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


NHWC = (0, 2, 3, 1)  # the memory order of a channels-last NCHW tensor, as a permutation of its dims


def is_channels_last(t: TensorType) -> bool:
    return t.layout == "channels_last" and len(t.shape) == 4


def row_strided(t: TensorType) -> bool:
    """A value the compiled function takes with any strides but a contiguous last dim: a strided view
    (``layout="strided"``, e.g. one time step ``x[:, t]`` of a sequence) is then passed as it is, where a
    compact parameter would need a copy per call."""
    return t.layout == "strided" and len(t.shape) >= 2


def physical(x: torch.Tensor, channels_last: bool, strided: bool = False) -> torch.Tensor:
    """``x`` as the compiled function takes it: its elements in the memory order the kernel was built for
    (NHWC for a channels-last value), contiguous (for a ``row_strided`` parameter: its last dim contiguous)
    and aligned; a copy only when ``x`` is not already so."""
    x = x.permute(*NHWC) if channels_last else x
    if strided and x.stride(-1) == 1 and x.data_ptr() % ALIGNMENT == 0:
        return x
    return x if x.is_contiguous() and x.data_ptr() % ALIGNMENT == 0 else aligned(x)


def _placeholder(v: Value, name: str) -> tuple[te.Tensor, te.Tensor]:
    """(the function parameter, the logical NCHW-indexed tensor the ops read): a channels-last value is
    an NHWC buffer read through an index permutation that the schedule inlines away."""
    t = v.type
    shape = [int(d) for d in t.shape]
    if not is_channels_last(t):
        p = te.placeholder(shape, TVM_DTYPES[t.dtype], name=name)
        return p, p
    n, c, h, w = shape
    p = te.placeholder([n, h, w, c], TVM_DTYPES[t.dtype], name=name)
    return p, te.compute(shape, lambda i, j, k, m: p[i, k, m, j], name=f"{name}_nchw")


def _to_nhwc(t: te.Tensor) -> te.Tensor:
    n, c, h, w = t.shape
    return te.compute([n, h, w, c], lambda i, k, m, j: t[i, j, k, m], name="out_nhwc")


def schedule_id(schedule: Callable) -> str:
    """A schedule's identity in cache keys: its own ``schedule_id`` attribute when it has one (a tuned
    schedule: the hash of its trace), else its qualified name and its ``SCHEDULE_VERSION``."""
    own = getattr(schedule, "schedule_id", None)
    if isinstance(own, str):
        return own
    version = getattr(schedule, "SCHEDULE_VERSION", getattr(importlib.import_module(schedule.__module__),
                                                             "SCHEDULE_VERSION", "?"))
    return f"{schedule.__module__}.{schedule.__qualname__}@{version}"


def lower_graph(graph: Graph) -> tuple[list[te.Tensor], list[te.Tensor], list[torch.Tensor]]:
    """``graph`` as tensor expressions: (parameters: inputs then weights, outputs, weight tensors)."""
    env: dict[Value, object] = {}
    params: list[te.Tensor] = []
    for i, v in enumerate(graph.inputs):
        param, env[v] = _placeholder(v, f"in{i}")
        params.append(param)
    weights: list[torch.Tensor] = []
    for node in graph.nodes:
        if node.op is WEIGHT:
            param, env[node.output] = _placeholder(node.output, f"w{len(weights)}")
            params.append(param)
            weights.append(physical(graph.weights[node.attrs["name"]], is_channels_last(node.output.type)))
            continue
        if not can_lower(node):
            raise UnsupportedError(f"TVM cannot lower %{node.results[0].name if node.results else '?'} = "
                                   f"{node.op.name} in @{graph.name}")
        args = map_values(node.args, env.__getitem__)
        kwargs = {k: map_values(a, env.__getitem__) for k, a in node.kwargs.items()}
        env.update(zip(node.results, lower_node(node, args, kwargs)))
    outs, seen = [], set()
    for v in graph.outputs:
        t = env[v]
        if is_channels_last(v.type):  # written in NHWC order (its loop nest then runs in memory order)
            t = _to_nhwc(t)
        elif any(t.same_as(p) for p in params) or id(t) in seen:  # a parameter or a repeated output needs
            # its own buffer (same_as: ``in`` would call te's ``==``, which refuses rank-0 tensors)
            t = te.compute(t.shape, lambda *i, t=t: t(*i), name="out_copy")
        seen.add(id(t))
        outs.append(t)
    return params, outs, weights


def graph_prim_func(graph: Graph):
    """The unscheduled PrimFunc of ``graph`` (what schedules and MetaSchedule start from)."""
    params, outs, _ = lower_graph(graph)
    return _prim_func(graph, params, outs)


def _prim_func(graph: Graph, params: list[te.Tensor], outs: list[te.Tensor]):
    """The PrimFunc over ``params`` then ``outs``; the buffers of ``row_strided`` inputs get symbolic
    strides for all but their last dim (which stays 1, so loads along it still vectorise), bound at call
    time from the tensor's own strides."""
    func = te.create_prim_func([*params, *outs])
    names = {p.name for v, p in zip(graph.inputs, params) if row_strided(v.type)}
    if not names:
        return func
    found: list[Buffer] = []
    tvm_ffi.structural_walk(func, (Buffer, found.append), order="post")
    new: dict[str, Buffer] = {}
    for b in found:
        if b.name in names and b.name not in new:
            strides = [tirx.Var(f"{b.name}_stride{i}", "int32") for i in range(len(b.shape) - 1)] + [1]
            new[b.name] = tirx.decl_buffer(b.shape, b.dtype, name=b.name, strides=strides)
    return tvm_ffi.structural_map(func, [(Buffer, lambda b: new.get(b.name, b) if b.name in names else b)],
                                  order="pre")


class TVMKernel:
    def __init__(self, graph: Graph, target, schedule: Callable = schedule_cpu, cache: KernelCache | None = None):
        self.input_types = [v.type for v in graph.inputs]
        params, outs, self.weights = lower_graph(graph)
        self.output_types: list[TensorType] = [v.type for v in graph.outputs]
        self._input_specs, self._output_specs = _specs(self.input_types), _specs(self.output_types)
        self._inputs_cl = [is_channels_last(t) for t in self.input_types]
        self._inputs_strided = [row_strided(t) for t in self.input_types]
        self._outputs_cl = [is_channels_last(t) for t in self.output_types]
        key = workload_key(graph, target, schedule_id(schedule)) if cache is not None else None
        self.key = key  # the kernel cache entry (None without a cache): what an artifact ships
        self.cache_root = cache.root if cache is not None else None  # where the entry lives (plans reload it)
        self.cached = False
        function = cache.get(key) if cache is not None else None
        if function is not None:
            self.function, self.source, self.cached = function, None, True
            return
        func = _prim_func(graph, params, outs)
        module = schedule(func)
        self.source = module.script()
        built = tvm.compile(module, target=target)
        self.function = built["main"]
        if cache is not None:
            cache.put(key, built, {"target": str(target), "schedule": schedule_id(schedule)})

    def with_weights(self, graph: Graph) -> TVMKernel:
        """This compiled kernel bound to ``graph``'s weight tensors (a graph of the same structure)."""
        bound = copy.copy(self)
        bound.weights = [physical(graph.weights[n.attrs["name"]], is_channels_last(n.output.type))
                         for n in graph.nodes if n.op is WEIGHT]
        if [tuple(w.shape) for w in bound.weights] != [tuple(w.shape) for w in self.weights]:
            raise KilnInputError(f"@{graph.name}: its weights do not match the kernel's parameters")
        return bound

    def to_plan(self) -> tuple[Callable, dict, list[torch.Tensor]]:
        """How a flat plan (``kiln.runtime.plan``) stores this bound kernel: its kernel cache entry, call
        conventions and weights; ``kernel_from_plan`` rebuilds it from the kernel cache."""
        from kiln.runtime.plan import PlanUnsupported

        if self.key is None or self.cache_root is None:
            raise PlanUnsupported("a TVM kernel outside the on-disk kernel cache cannot be reloaded")
        spec = {"key": self.key, "cache_root": str(self.cache_root),
                "inputs": [[list(s), str(d).removeprefix("torch.")] for s, d in self._input_specs],
                "outputs": [[list(s), str(d).removeprefix("torch.")] for s, d in self._output_specs],
                "input_types": [str(t) for t in self.input_types], "inputs_cl": self._inputs_cl,
                "inputs_strided": self._inputs_strided, "outputs_cl": self._outputs_cl}
        return kernel_from_plan, spec, list(self.weights)

    def artifact_files(self) -> dict[str, bytes]:
        """This kernel's kernel cache entry (``KEY.so``, ``KEY.json``) for an artifact; empty without one."""
        if self.key is None or self.cache_root is None:
            return {}
        return KernelCache(self.cache_root).entry_files(self.key)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # the hot path: one call per kernel per model call, so checks are on precomputed shapes and torch
        # tensors go to TVM as they are (tvm-ffi takes them through DLPack itself, without a Python wrapper)
        if len(inputs) != len(self._input_specs):
            raise KilnInputError(f"kernel takes {len(self._input_specs)} inputs, got {len(inputs)}")
        for i, (x, (shape, dtype)) in enumerate(zip(inputs, self._input_specs)):
            if x.shape != shape or x.dtype != dtype:
                raise KilnInputError(f"kernel input {i}: expected {self.input_types[i]}, got {x.dtype} "
                                     f"{tuple(x.shape)}")
        outs = [torch.empty(shape, dtype=dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)
                for (shape, dtype), cl in zip(self._output_specs, self._outputs_cl)]
        self.function(*[physical(x, cl, st) for x, cl, st in zip(inputs, self._inputs_cl, self._inputs_strided)],
                      *self.weights,
                      *[o.permute(*NHWC) if cl else o for o, cl in zip(outs, self._outputs_cl)])
        return tuple(outs)


_PLAN_FUNCTIONS: dict[tuple[str, str], object] = {}  # (cache root, key) -> loaded function, per process


def clear_plan_functions() -> None:
    _PLAN_FUNCTIONS.clear()


def kernel_from_plan(spec: dict, weights: list[torch.Tensor]) -> TVMKernel:
    """The inverse of ``TVMKernel.to_plan``: the compiled function from the kernel cache (verified by
    ``KernelCache.get``; ``ArtifactError`` when the entry is gone), bound to ``weights``."""
    from kiln.errors import ArtifactError

    root, key = spec["cache_root"], spec["key"]
    function = _PLAN_FUNCTIONS.get((root, key))
    if function is None:
        function = KernelCache(root).get(key)
        if function is None:
            raise ArtifactError(f"kernel {key} is not in the kernel cache {root}")
        _PLAN_FUNCTIONS[(root, key)] = function
    kernel = object.__new__(TVMKernel)
    dtype = {str(d).removeprefix("torch."): d for d in TVM_DTYPES}
    kernel._input_specs = [(torch.Size(s), dtype[d]) for s, d in spec["inputs"]]
    kernel._output_specs = [(torch.Size(s), dtype[d]) for s, d in spec["outputs"]]
    kernel.input_types, kernel.output_types = list(spec["input_types"]), None
    kernel._inputs_cl, kernel._inputs_strided = list(spec["inputs_cl"]), list(spec["inputs_strided"])
    kernel._outputs_cl = list(spec["outputs_cl"])
    kernel.key, kernel.cache_root, kernel.cached, kernel.source = key, root, True, None
    kernel.function = function
    kernel.weights = [aligned(w) for w in weights]
    return kernel


def _specs(types: list[TensorType]) -> list[tuple[torch.Size, torch.dtype]]:
    return [(torch.Size(int(d) for d in t.shape), t.dtype) for t in types]


def build_kernel(graph: Graph, target=None, schedule: Callable = schedule_cpu) -> TVMKernel:
    return TVMKernel(graph, target if target is not None else cpu_target(), schedule)
