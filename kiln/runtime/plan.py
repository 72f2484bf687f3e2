"""Flat execution plans: a compiled model as one straight-line fx program, saved and loaded without
re-running the compiler (the compile cache's entries, ``kiln.runtime.compile_cache``).

A compiled model is a tree of fx modules: the driver's top-level module calls one executable per
partition, a backend executable calls one module per fused group, and those call kernels. ``flatten``
inlines that tree into one ``fx.GraphModule`` whose nodes call torch ops and *leaf* callables (a TVM
kernel, an SDPA call) directly; ``save_plan``/``load_plan`` write and read it.

Contract:
- ``flatten(module) -> fx.GraphModule`` computes exactly what ``module(*inputs)`` computes (same calls,
  same order, same tensors). Inlined: ``fx.GraphModule``s, and ``to_fx``'s wrapped executables whose
  ``graph_module`` attribute is set (``kiln.backends.base``: such an executable computes exactly
  ``graph_module(*inputs)``). A call of anything else that is not a ``call_function`` target
  ``plan_target`` accepts must be a leaf: an object with ``to_plan() -> (loader, spec, tensors)``, where
  ``loader`` is a kiln function such that ``loader(spec, tensors)`` rebuilds an equivalent callable,
  ``spec`` is JSON and ``tensors`` a list of tensors. Anything else raises ``PlanUnsupported``.
- ``save_plan(gm, directory, extra_tensors=None)`` writes ``plan.json`` (format version, nodes, targets,
  leaves, tensor table) and ``storages.safetensors`` into ``directory`` (the caller makes the write
  atomic). Tensors are stored once per storage and rebuilt as the same views (offset, shape, strides), so
  aliasing survives. Storages with equal bytes are stored once (a weight and its contiguous copy; the
  rebuilt tensors then share memory, which is safe: plans only read their tensors). A tensor carrying
  ``kiln_recipe = (loader, spec, sources)`` (an opaque packed weight, e.g. oneDNN's blocked layout) is
  stored as its recipe and rebuilt on load by ``loader(spec, sources)``. Call
  targets are stored by name: torch op overloads (``aten::add.Tensor``), functions of ``operator``,
  ``math`` and ``builtins``, and kiln functions (``module:qualname``, resolved only under ``kiln.``).
  Constants: None, bool, int, float (also inf/nan), str, tuples, lists, dicts with str keys, slices,
  torch dtypes, devices, memory formats and layouts. Anything else raises ``PlanUnsupported``.
  ``extra_tensors`` (name -> tensor, e.g. the optimized graph's weights) are stored in the same table.
- ``load_plan(directory) -> (fx.GraphModule, extra_tensors)``: every problem (missing or malformed file, unknown format
  version, a target or loader that does not resolve, a leaf whose loader fails, e.g. a kernel missing
  from the kernel cache) raises ``ArtifactError`` naming the file and the problem. Nothing is unpickled.
- ``plan_target(target) -> dict`` / ``resolve_target(dict)``: the name encoding of call targets.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import json
import math
import operator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from kiln.errors import ArtifactError, KilnError

FORMAT = "kiln-plan"
FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
STORAGES_FILE = "storages.safetensors"
_PY_MODULES = {"operator": operator, "math": math, "builtins": builtins}


class PlanUnsupported(KilnError):
    """The compiled model holds something a plan cannot name (a closure, an opaque object)."""


# -- flattening ----------------------------------------------------------------------------------

def flatten(module: Any) -> fx.GraphModule:
    if not isinstance(module, fx.GraphModule):
        module = _inlinable(module)
        if module is None:
            raise PlanUnsupported("the compiled model is not an fx module")
    flat = _Flattener()
    inputs = [flat.graph.placeholder(n.target) for n in module.graph.nodes if n.op == "placeholder"]
    outputs = flat.inline(module, inputs)
    flat.graph.output(outputs)
    return fx.GraphModule(flat.root, flat.graph, class_name="kiln_plan")


def _inlinable(obj: Any) -> fx.GraphModule | None:
    if isinstance(obj, fx.GraphModule):
        return obj
    fn = getattr(obj, "fn", None)  # to_fx's wrapper of a compiled executable
    if fn is not None and type(obj).__name__ == "_CallableModule":
        return _inlinable(fn)
    gm = getattr(obj, "graph_module", None)
    return gm if isinstance(gm, fx.GraphModule) else None


class _Flattener:
    def __init__(self):
        self.root = torch.nn.Module()
        self.graph = fx.Graph()
        self.tensor_attrs: dict[int, str] = {}  # id(tensor) -> attribute name on root
        self.keep: list[torch.Tensor] = []  # keeps ids unique while flattening

    def attr(self, tensor: torch.Tensor) -> fx.Node:
        name = self.tensor_attrs.get(id(tensor))
        if name is None:
            name = self.tensor_attrs[id(tensor)] = f"t{len(self.tensor_attrs)}"
            self.root.register_buffer(name, tensor, persistent=False)
            self.keep.append(tensor)
        return self.graph.get_attr(name)

    def inline(self, gm: fx.GraphModule, args: list) -> Any:
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(args):
            raise PlanUnsupported(f"{type(gm).__name__} takes {len(placeholders)} inputs, called with {len(args)}")
        env.update(zip(placeholders, args))
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                return fx.node.map_arg(node.args[0], env.__getitem__)
            args_, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            if node.op == "get_attr":
                value = _fetch(gm, node.target)
                if not isinstance(value, torch.Tensor):
                    raise PlanUnsupported(f"get_attr {node.target} is a {type(value).__name__}, not a tensor")
                env[node] = self.attr(value)
            elif node.op == "call_function":
                if node.target is operator.getitem and isinstance(args_[0], (tuple, list)):
                    env[node] = args_[0][args_[1]]  # an inlined module's output tuple
                else:
                    plan_target(node.target)  # refuse unnamed targets now, not at save time
                    env[node] = self.graph.call_function(node.target, tuple(args_), dict(kwargs))
            elif node.op == "call_module":
                sub = _fetch(gm, node.target)
                inner = _inlinable(sub)
                if inner is not None:
                    if kwargs:
                        raise PlanUnsupported(f"call of {node.target} with keyword arguments")
                    env[node] = self.inline(inner, list(args_))
                else:
                    leaf = getattr(sub, "fn", sub)
                    if not callable(getattr(leaf, "to_plan", None)):
                        raise PlanUnsupported(f"{node.target} is a {type(leaf).__name__}, which a plan cannot "
                                              "name (no to_plan())")
                    env[node] = self.graph.call_function(leaf_function(leaf), tuple(args_), dict(kwargs))
            else:
                raise PlanUnsupported(f"fx node op {node.op!r} ({node.name})")
        raise PlanUnsupported(f"{type(gm).__name__} has no output node")


def leaf_function(leaf: Any):
    """``leaf`` as a plain function fx can name in generated code (``kiln_leaf`` is the leaf itself)."""
    def call(*args, **kwargs):
        return leaf(*args, **kwargs)

    call.__name__ = call.__qualname__ = "".join(c if c.isalnum() else "_" for c in type(leaf).__name__.lower())
    call.kiln_leaf = leaf
    return call


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# -- call targets --------------------------------------------------------------------------------

def plan_target(target: Any) -> dict[str, str]:
    if isinstance(target, torch._ops.OpOverload):
        return {"op": target.name()}
    if getattr(target, "kiln_leaf", None) is not None:
        return {"leaf": ""}  # leaves are stored in the plan's leaf table, by the node that calls them
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module == "_operator":
        module = "operator"
    if (not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname
            or not (module in _PY_MODULES or module == "kiln" or module.startswith("kiln."))):
        raise PlanUnsupported(f"call target {target!r} cannot be named in a plan")
    if resolve_target({"py": f"{module}:{qualname}"}) is not target:
        raise PlanUnsupported(f"call target {module}:{qualname} does not resolve to itself")
    return {"py": f"{module}:{qualname}"}


def resolve_target(spec: dict[str, str]) -> Any:
    if "op" in spec:
        name = spec["op"]
        ns, _, rest = name.partition("::")
        opname, _, overload = rest.partition(".")
        packet = getattr(getattr(torch.ops, ns), opname)
        return getattr(packet, overload or "default")
    module, _, qualname = spec["py"].partition(":")
    if module in _PY_MODULES:
        obj: Any = _PY_MODULES[module]
    elif module == "kiln" or module.startswith("kiln."):
        obj = importlib.import_module(module)
    else:
        raise KilnError(f"{spec['py']}: only operator, math, builtins and kiln functions may be called")
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# -- constants -----------------------------------------------------------------------------------

_MEMORY_FORMATS = {str(f): f for f in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d,
                                        torch.preserve_format)}
_LAYOUTS = {str(v): v for v in (torch.strided, torch.sparse_coo, torch._mkldnn)}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128, torch.qint8, torch.quint8,
    torch.qint32)}


def _encode(value: Any, nodes: dict[fx.Node, int]) -> Any:
    if isinstance(value, fx.Node):
        return {"$n": nodes[value]}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$f": repr(value)}
    if isinstance(value, tuple):
        return {"$t": [_encode(v, nodes) for v in value]}
    if isinstance(value, list):
        return [_encode(v, nodes) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$d": {k: _encode(v, nodes) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"$slice": [_encode(v, nodes) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in _DTYPES:
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, torch.memory_format) and str(value) in _MEMORY_FORMATS:
        return {"$mf": str(value)}
    if isinstance(value, torch.layout) and str(value) in _LAYOUTS:
        return {"$layout": str(value)}
    if value is Ellipsis:
        return {"$ellipsis": True}
    raise PlanUnsupported(f"a plan cannot store the constant {value!r} ({type(value).__name__})")


def _decode(value: Any, nodes: list) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    (tag, body), = value.items()
    if tag == "$n":
        return nodes[body]
    if tag == "$t":
        return tuple(_decode(v, nodes) for v in body)
    if tag == "$d":
        return {k: _decode(v, nodes) for k, v in body.items()}
    if tag == "$f":
        return float(body)
    if tag == "$slice":
        return slice(*(_decode(v, nodes) for v in body))
    if tag == "$dtype":
        return _DTYPES[body]
    if tag == "$device":
        return torch.device(body)
    if tag == "$mf":
        return _MEMORY_FORMATS[body]
    if tag == "$layout":
        return _LAYOUTS[body]
    if tag == "$ellipsis":
        return Ellipsis
    raise KilnError(f"unknown constant tag {tag!r}")


# -- saving --------------------------------------------------------------------------------------

class _TensorTable:
    """Tensors by id -> table entries; one stored byte buffer per distinct storage."""

    def __init__(self):
        self.entries: list[dict] = []
        self.index: dict[int, int] = {}
        self.storages: dict[int, str] = {}  # storage data_ptr -> stored name
        self.by_content: dict[tuple[int, str], str] = {}  # (bytes, sha1) -> stored name
        self.buffers: dict[str, torch.Tensor] = {}
        self.keep: list = []

    def add(self, t: torch.Tensor) -> int:
        i = self.index.get(id(t))
        if i is not None:
            return i
        recipe = getattr(t, "kiln_recipe", None)
        if recipe is not None:
            loader, spec, sources = recipe
            entry = {"recipe": plan_target(loader)["py"], "spec": spec, "sources": [self.add(s) for s in sources]}
        elif t.layout is not torch.strided or t.device.type != "cpu" or t.is_quantized:
            raise PlanUnsupported(f"a plan cannot store a {t.layout} {t.device} tensor without a recipe")
        else:
            storage = t.untyped_storage()
            name = self.storages.get(storage.data_ptr())
            if name is None:
                data = torch.empty(0, dtype=torch.uint8).set_(storage)
                # a copy with the same bytes (a weight and its contiguous copy) is stored once
                content = (data.numel(), hashlib.sha1(data.numpy() if data.numel() else b"").hexdigest())
                name = self.by_content.get(content)
                if name is None:
                    name = self.by_content[content] = f"s{len(self.buffers)}"
                    self.buffers[name] = data
                self.storages[storage.data_ptr()] = name
            entry = {"storage": name, "dtype": str(t.dtype).removeprefix("torch."), "offset": t.storage_offset(),
                     "shape": list(t.shape), "stride": list(t.stride())}
            if entry["dtype"] not in _DTYPES:
                raise PlanUnsupported(f"a plan cannot store {t.dtype} tensors")
        self.keep.append(t)
        self.index[id(t)] = len(self.entries)
        self.entries.append(entry)
        return self.index[id(t)]


def save_plan(gm: fx.GraphModule, directory: str | Path, extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    table = _TensorTable()
    nodes: dict[fx.Node, int] = {}
    records: list[dict] = []
    leaves: list[dict] = []
    leaf_index: dict[int, int] = {}
    for node in gm.graph.nodes:
        nodes[node] = len(records)
        if node.op == "placeholder":
            records.append({"op": "placeholder", "name": node.target})
        elif node.op == "get_attr":
            records.append({"op": "tensor", "index": table.add(_fetch(gm, node.target))})
        elif node.op == "call_function":
            target = getattr(node.target, "kiln_leaf", None)
            if target is not None:
                if id(target) not in leaf_index:
                    loader, spec, tensors = target.to_plan()
                    leaf_index[id(target)] = len(leaves)
                    leaves.append({"loader": plan_target(loader)["py"], "spec": spec,
                                   "tensors": [table.add(t) for t in tensors]})
                    table.keep.append(target)
                encoded = {"leaf": leaf_index[id(target)]}
            else:
                encoded = plan_target(node.target)
            records.append({"op": "call", "target": encoded, "args": _encode(node.args, nodes),
                            "kwargs": _encode(dict(node.kwargs), nodes)})
        elif node.op == "output":
            records.append({"op": "output", "value": _encode(node.args[0], nodes)})
        else:
            raise PlanUnsupported(f"fx node op {node.op!r} in a flat plan")
    named = {name: table.add(t) for name, t in sorted((extra_tensors or {}).items())}
    plan = {"format": FORMAT, "format_version": FORMAT_VERSION, "tensors": table.entries, "leaves": leaves,
            "nodes": records, "named": named}
    try:
        text = json.dumps(plan, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PlanUnsupported(f"the plan is not plain JSON: {e}") from e
    directory.mkdir(parents=True, exist_ok=True)
    save_file(table.buffers, str(directory / STORAGES_FILE), metadata={"format": "pt"})
    (directory / PLAN_FILE).write_text(text, encoding="utf-8")


# -- loading -------------------------------------------------------------------------------------

def load_plan(directory: str | Path) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    directory = Path(directory)
    path = directory / PLAN_FILE
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read the plan: {e}") from e
    if not isinstance(plan, dict) or plan.get("format") != FORMAT or plan.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: not a {FORMAT} version {FORMAT_VERSION} file")
    try:
        storages = _load_storages(directory / STORAGES_FILE)
        return _build(plan, storages)
    except ArtifactError:
        raise
    except Exception as e:  # a malformed entry surfaces as KeyError/TypeError/...; name the file
        raise ArtifactError(f"{path}: {type(e).__name__}: {e}") from e


def _load_storages(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise ArtifactError(f"{path}: cannot read the stored tensors: {type(e).__name__}: {e}") from e


def _build(plan: dict, storages: dict[str, torch.Tensor]) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    tensors: list[torch.Tensor] = []
    for entry in plan["tensors"]:
        if "recipe" in entry:
            loader = resolve_target({"py": entry["recipe"]})
            tensors.append(loader(entry["spec"], [tensors[i] for i in entry["sources"]]))
        else:
            dtype = _DTYPES[entry["dtype"]]
            data = storages[entry["storage"]]
            base = data.view(dtype) if data.numel() else torch.empty(0, dtype=dtype)
            tensors.append(base.as_strided(entry["shape"], entry["stride"], entry["offset"]))
    leaves = []
    for leaf in plan["leaves"]:
        loader = resolve_target({"py": leaf["loader"]})
        leaves.append(leaf_function(loader(leaf["spec"], [tensors[i] for i in leaf["tensors"]])))
    root = torch.nn.Module()
    graph = fx.Graph()
    nodes: list = []
    attrs: dict[int, str] = {}
    for record in plan["nodes"]:
        op = record["op"]
        if op == "placeholder":
            nodes.append(graph.placeholder(record["name"]))
        elif op == "tensor":
            i = record["index"]
            if i not in attrs:
                attrs[i] = f"t{i}"
                root.register_buffer(attrs[i], tensors[i], persistent=False)
            nodes.append(graph.get_attr(attrs[i]))
        elif op == "call":
            target = record["target"]
            fn = leaves[target["leaf"]] if "leaf" in target else resolve_target(target)
            nodes.append(graph.call_function(fn, _decode(record["args"], nodes), _decode(record["kwargs"], nodes)))
        elif op == "output":
            nodes.append(graph.output(_decode(record["value"], nodes)))
        else:
            raise KilnError(f"unknown node op {op!r}")
    named = {name: tensors[i] for name, i in plan.get("named", {}).items()}
    return fx.GraphModule(root, graph, class_name="kiln_plan"), named
