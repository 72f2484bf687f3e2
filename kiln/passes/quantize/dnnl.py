"""oneDNN int8 convolutions called through oneDNN's C API, with each primitive created once.

PyTorch's ``onednn.qconv_pointwise`` runs the same oneDNN convolution, but on every call it looks up
the primitive, builds the scale and zero-point memories and wraps each tensor. That set-up is paid per
call: session 4 measured about 45 µs of it per convolution. kiln creates one ``QConv`` per layer: the
primitive is built once, and the weight is reordered once into the layout oneDNN chose for this CPU
(AMX/VNNI blocked). A call then only points the source and destination memories at the tensors and
executes.

Contract:
- ``available() -> str | None``: None when oneDNN's shared library loads, else why not. The library is
  the pip package ``onednn-cpu-gomp`` (oneDNN 3.2, GNU OpenMP; in the ``quant`` extra). Its OpenMP is
  the ``libgomp.so.1`` PyTorch ships, so ``torch.set_num_threads`` governs both. The binding is
  ``ctypes`` over the C API: no compiler is needed.
- ``QConvSpec``: one convolution, frozen. Fields: input shape ``(n, c, h, w)`` (the input is a
  channels-last ``uint8``/``int8`` tensor; ``n`` None: any batch size, one primitive built per size the
  first time it is seen), ``out_channels``, ``kernel (kh, kw)``, ``stride``, ``padding``,
  ``dilation``, ``groups``, ``x_scale``, ``x_zp``, ``w_scales`` (one per output channel), ``bias``
  (present or not), ``out_dtype`` (``"uint8"``, ``"int8"``, ``"float32"``), ``out_scale``, ``out_zp``,
  ``post_op`` (``"none"``/``"relu"``) and ``other`` (None or ``(other_scale, other_zp)``).
- ``QConv(spec, qw, bias)`` builds the primitive and the reordered weight (for a static batch at once).
  ``qw`` is the ``int8`` ``[O, I/groups, kh, kw]`` weight (symmetric: oneDNN's int8 convolution takes no
  weight zero point); ``bias`` is float32 ``[O]`` or None. ``qconv(x, acc=None)`` returns a new
  channels-last tensor of ``out_dtype``, ``[n, O, oh, ow]``.
  - With ``other``, ``acc`` (channels-last, ``out_dtype``, the output's shape) holds the residual. It is
    accumulated in place and returned.
  - The result is kiln.qconv2d's (``kiln/ir/quant_ops.py``):
    ``y = (x_scale * w_scale[o]) * sum((x - x_zp) * w) + bias[o]``, then
    ``+ other_scale * (acc - other_zp)``, then relu, then ``round(y / out_scale) + out_zp`` saturated.
    oneDNN's own float rounding order applies, so results are within one quantization step of the
    reference, not bit-exact. ``kiln.passes.quantize.lower`` checks every candidate against the
    reference on real inputs before it can be chosen.
  - ``impl`` is oneDNN's implementation name (``jit:avx512_core_amx`` on this machine).
  - One call at a time per layer: a call points the layer's memory objects at its tensors, so two
    threads running the same compiled model concurrently would race (as kiln's models are run: one
    thread, PyTorch's intra-op pool inside).
- Errors: a oneDNN call that fails raises ``UnsupportedError`` naming the call and oneDNN's status, and a
  malformed input raises ``KilnInputError``. A missing library is ``available()``'s reason; ``QConv``
  then raises ``UnsupportedError`` with it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import KilnInputError, UnsupportedError

MAX_NDIMS = 12  # DNNL_MAX_NDIMS
# values from oneDNN 3.2's headers (dnnl_types.h, dnnl_common_types.h); the loader checks the major version
_SUCCESS = 0
_DT = {"float32": 3, "int32": 4, "int8": 5, "uint8": 6}
_DT_UNDEF = 0
_TAG_ANY = 1
_CPU = 1
_STREAM_IN_ORDER = 1
_FORWARD_INFERENCE = 96
_CONVOLUTION_DIRECT = 1
_ELTWISE_RELU = 0x20
_QUERY_IMPL_INFO_STR = 8
_QUERY_EXEC_ARG_MD = 255
ARG_SRC, ARG_DST, ARG_WEIGHTS, ARG_BIAS = 1, 17, 33, 41
ARG_FROM, ARG_TO = 1, 17
ARG_SCALES, ARG_ZERO_POINTS = 4096, 8192
_TORCH_DT = {"uint8": torch.uint8, "int8": torch.int8, "float32": torch.float32}
_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}

_Dims = ctypes.c_int64 * MAX_NDIMS
_h = ctypes.c_void_p


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


def _library_candidates() -> list[Path]:
    names = ("libdnnl.so.3", "libdnnl.so")
    roots = [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"]
    if os.environ.get("KILN_DNNL_LIBRARY"):
        return [Path(os.environ["KILN_DNNL_LIBRARY"])]
    return [r / n for r in roots for n in names if (r / n).exists()]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    candidates = _library_candidates()
    if not candidates:
        return None, ("oneDNN's shared library (libdnnl.so.3) is not installed: pip install 'kiln[quant]' "
                      "(the onednn-cpu-gomp package)")
    try:
        lib = ctypes.CDLL(str(candidates[0]))
    except OSError as e:
        return None, f"cannot load {candidates[0]}: {e}"
    lib.dnnl_version.restype = ctypes.POINTER(_Version)
    v = lib.dnnl_version().contents
    if v.major != 3:
        return None, f"{candidates[0]} is oneDNN {v.major}.{v.minor}; kiln's binding is for oneDNN 3"
    for name in ("dnnl_primitive_desc_query_md",):
        getattr(lib, name).restype = ctypes.c_void_p
    lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
    lib.dnnl_primitive_execute.argtypes = [_h, _h, ctypes.c_int, ctypes.POINTER(_ExecArg)]
    lib.dnnl_memory_set_data_handle.argtypes = [_h, _h]
    return lib, None


def available() -> str | None:
    """None when oneDNN's library is usable here, else the reason it is not."""
    return _load()[1]


def _lib() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise UnsupportedError(why)
    return lib


def _check(status: int, what: str) -> None:
    if status != _SUCCESS:
        raise UnsupportedError(f"oneDNN {what} failed with status {status}")


def _dims(values) -> _Dims:
    return _Dims(*[int(v) for v in values])


class _Objects:
    """oneDNN handles owned by one layer, destroyed with it."""

    def __init__(self):
        self.memory_descs: list[_h] = []
        self.memories: list[_h] = []
        self.others: list[tuple[str, _h]] = []

    def md(self, dims, dtype: str, strides=None) -> _h:
        md = _h()
        if strides is None:
            _check(_lib().dnnl_memory_desc_create_with_tag(ctypes.byref(md), len(dims), _dims(dims), _DT[dtype],
                                                            _TAG_ANY), "memory_desc_create_with_tag")
        else:
            _check(_lib().dnnl_memory_desc_create_with_strides(ctypes.byref(md), len(dims), _dims(dims),
                                                                _DT[dtype], _dims(strides)),
                   "memory_desc_create_with_strides")
        self.memory_descs.append(md)
        return md

    def memory(self, md, handle) -> _h:
        mem = _h()
        _check(_lib().dnnl_memory_create(ctypes.byref(mem), md, _engine()[0], ctypes.c_void_p(handle)),
               "memory_create")
        self.memories.append(mem)
        return mem

    def __del__(self):
        lib, _ = _load()
        if lib is None:
            return
        for kind, h in reversed(self.others):
            getattr(lib, f"dnnl_{kind}_destroy")(h)
        for mem in self.memories:
            lib.dnnl_memory_destroy(mem)
        for md in self.memory_descs:
            lib.dnnl_memory_desc_destroy(md)


@functools.cache
def _engine() -> tuple[_h, _h]:
    lib = _lib()
    engine, stream = _h(), _h()
    _check(lib.dnnl_engine_create(ctypes.byref(engine), _CPU, ctypes.c_size_t(0)), "engine_create")
    _check(lib.dnnl_stream_create(ctypes.byref(stream), engine, ctypes.c_uint(_STREAM_IN_ORDER)), "stream_create")
    return engine, stream


@dataclass(frozen=True)
class QConvSpec:
    input_shape: tuple[int | None, int, int, int]  # batch None: any batch size (one primitive per size seen)
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    x_scale: float
    x_zp: int
    x_dtype: str
    w_scales: tuple[float, ...]
    bias: bool
    out_dtype: str
    out_scale: float
    out_zp: int
    post_op: str = "none"
    other: tuple[float, int] | None = None

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        n, _, h, w = self.input_shape
        return n, self.out_channels, *conv_output_hw((h, w), self.kernel, self.stride, self.padding, self.dilation)


def conv_output_hw(hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    """A convolution's output height and width (floor mode, symmetric padding)."""
    h, w = (int((size + 2 * p - d * (k - 1) - 1) // s + 1)
            for size, k, s, p, d in zip(hw, kernel, stride, padding, dilation))
    return h, w


def _channels_last_strides(shape) -> list[int]:
    n, c, h, w = shape
    return [h * w * c, 1, w * c, c]


class QConv:
    """One int8 convolution layer (see the module contract): one oneDNN primitive per batch size."""

    def __init__(self, spec: QConvSpec, qw: torch.Tensor, bias: torch.Tensor | None):
        _lib()
        if spec.post_op not in ("none", "relu"):
            raise UnsupportedError(f"oneDNN convolution: post_op {spec.post_op!r}")
        if spec.out_dtype not in _TORCH_DT or spec.x_dtype not in ("uint8", "int8"):
            raise UnsupportedError(f"oneDNN convolution: {spec.x_dtype} -> {spec.out_dtype}")
        o, g = spec.out_channels, spec.groups
        kh, kw = spec.kernel
        c = spec.input_shape[1]
        if qw.dtype != torch.int8 or tuple(qw.shape) != (o, c // g, kh, kw):
            raise KilnInputError(f"oneDNN convolution: weight must be int8 {[o, c // g, kh, kw]}, got "
                                 f"{qw.dtype} {list(qw.shape)}")
        if len(spec.w_scales) != o or (bias is not None) != spec.bias:
            raise KilnInputError("oneDNN convolution: w_scales/bias do not match the spec")
        self.spec = spec
        self._qw = qw.detach().contiguous()
        self._bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self._by_batch: dict[int, _Primitive] = {}
        self._x_dtype, self._out_dtype = _TORCH_DT[spec.x_dtype], _TORCH_DT[spec.out_dtype]
        if spec.input_shape[0] is not None:  # a static batch: build now, so a refusal shows when lowering
            self._primitive(int(spec.input_shape[0]))

    @property
    def impl(self) -> str:
        """oneDNN's implementation name (of the first primitive built)."""
        return next(iter(self._by_batch.values())).impl if self._by_batch else "?"

    def _primitive(self, batch: int) -> _Primitive:
        prim = self._by_batch.get(batch)
        if prim is None:
            prim = self._by_batch[batch] = _Primitive(self.spec, batch, self._qw, self._bias)
        return prim

    def __call__(self, x: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        prim = self._by_batch.get(x.shape[0]) if x.dim() == 4 else None
        if prim is None:
            fixed = self.spec.input_shape[0]
            if x.dim() != 4 or (fixed is not None and x.shape[0] != fixed):
                raise KilnInputError(f"oneDNN convolution: input must be {list(self.spec.input_shape)}, got "
                                     f"{list(x.shape)}")
            prim = self._primitive(int(x.shape[0]))
        return prim(x, acc)


class _Primitive:
    """The convolution primitive for one batch size, its reordered weight and its argument list."""

    def __init__(self, spec: QConvSpec, batch: int, qw: torch.Tensor, bias: torch.Tensor | None):
        lib = _lib()
        o, g = spec.out_channels, spec.groups
        kh, kw = spec.kernel
        in_shape = (batch, *spec.input_shape[1:])
        c = in_shape[1]
        self.spec = spec
        self._objects = objs = _Objects()
        engine, self._stream = _engine()
        out_shape = (batch, *spec.output_shape[1:])
        src_md = objs.md(in_shape, spec.x_dtype, _channels_last_strides(in_shape))
        dst_md = objs.md(out_shape, spec.out_dtype, _channels_last_strides(out_shape))
        w_dims = [g, o // g, c // g, kh, kw] if g > 1 else [o, c // g, kh, kw]
        w_any = objs.md(w_dims, "int8")
        bias_md = objs.md([o], "float32", [1]) if spec.bias else None

        attr = _h()
        _check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "primitive_attr_create")
        objs.others.append(("primitive_attr", attr))
        _check(lib.dnnl_primitive_attr_set_scales_mask(attr, ARG_SRC, 0), "set_scales_mask(src)")
        _check(lib.dnnl_primitive_attr_set_scales_mask(attr, ARG_WEIGHTS, 3 if g > 1 else 1),
               "set_scales_mask(weights)")
        _check(lib.dnnl_primitive_attr_set_zero_points_mask(attr, ARG_SRC, 0), "set_zero_points_mask(src)")
        integer_out = spec.out_dtype != "float32"
        if integer_out:
            _check(lib.dnnl_primitive_attr_set_scales_mask(attr, ARG_DST, 0), "set_scales_mask(dst)")
            _check(lib.dnnl_primitive_attr_set_zero_points_mask(attr, ARG_DST, 0), "set_zero_points_mask(dst)")
        post_ops = _h()
        _check(lib.dnnl_post_ops_create(ctypes.byref(post_ops)), "post_ops_create")
        objs.others.append(("post_ops", post_ops))
        if spec.other is not None:
            scale, zp = spec.other
            _check(lib.dnnl_post_ops_append_sum(post_ops, ctypes.c_float(scale), ctypes.c_int32(int(zp)), _DT_UNDEF),
                   "post_ops_append_sum")
        if spec.post_op == "relu":
            _check(lib.dnnl_post_ops_append_eltwise(post_ops, _ELTWISE_RELU, ctypes.c_float(0), ctypes.c_float(0)),
                   "post_ops_append_eltwise")
        _check(lib.dnnl_primitive_attr_set_post_ops(attr, post_ops), "set_post_ops")

        pd = _h()
        _check(lib.dnnl_convolution_forward_primitive_desc_create(
            ctypes.byref(pd), engine, _FORWARD_INFERENCE, _CONVOLUTION_DIRECT, src_md, w_any, bias_md, dst_md,
            _dims(spec.stride), _dims([d - 1 for d in spec.dilation]), _dims(spec.padding), _dims(spec.padding), attr),
            "convolution_forward_primitive_desc_create")
        objs.others.append(("primitive_desc", pd))
        impl = ctypes.c_char_p()
        lib.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO_STR, 0, ctypes.byref(impl))
        self.impl = (impl.value or b"?").decode()
        prim = _h()
        _check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), "primitive_create")
        objs.others.append(("primitive", prim))
        self._prim = prim

        # the weight, reordered once into the primitive's layout (oneDNN adds what it needs, e.g. the
        # compensation of a non-zero source zero point)
        w_md = ctypes.c_void_p(lib.dnnl_primitive_desc_query_md(pd, _QUERY_EXEC_ARG_MD, ARG_WEIGHTS))
        size = lib.dnnl_memory_desc_get_size(w_md)
        self.weight = torch.empty(size, dtype=torch.uint8)
        plain_md = objs.md(w_dims, "int8", list(qw.reshape(w_dims).stride()))
        self._reorder(plain_md, qw.data_ptr(), w_md, self.weight.data_ptr())

        def const(values, dtype):
            t = torch.tensor(values, dtype=dtype)
            self._consts.append(t)
            return t

        self._consts: list[torch.Tensor] = []
        args = [(ARG_SRC, objs.memory(src_md, 0)),
                (ARG_WEIGHTS, objs.memory(w_md, self.weight.data_ptr())),
                (ARG_DST, objs.memory(dst_md, 0))]
        if spec.bias:
            self._consts.append(bias)
            args.append((ARG_BIAS, objs.memory(bias_md, bias.data_ptr())))
        scalar_f32 = objs.md([1], "float32", [1])
        scalar_i32 = objs.md([1], "int32", [1])
        args.append((ARG_SCALES | ARG_SRC, objs.memory(scalar_f32, const([spec.x_scale], torch.float32).data_ptr())))
        ws = const(list(spec.w_scales), torch.float32)
        args.append((ARG_SCALES | ARG_WEIGHTS, objs.memory(objs.md([o], "float32", [1]), ws.data_ptr())))
        args.append((ARG_ZERO_POINTS | ARG_SRC,
                     objs.memory(scalar_i32, const([spec.x_zp], torch.int32).data_ptr())))
        if integer_out:
            args.append((ARG_SCALES | ARG_DST,
                         objs.memory(scalar_f32, const([spec.out_scale], torch.float32).data_ptr())))
            args.append((ARG_ZERO_POINTS | ARG_DST,
                         objs.memory(scalar_i32, const([spec.out_zp], torch.int32).data_ptr())))
        self._src_mem, self._dst_mem = args[0][1], args[2][1]
        self._args = (_ExecArg * len(args))(*[_ExecArg(a, m) for a, m in args])
        self._nargs = len(args)
        self._out_dtype = _TORCH_DT[spec.out_dtype]
        self._out_shape = out_shape
        self._in_shape = in_shape
        self._x_dtype = _TORCH_DT[spec.x_dtype]

    def _reorder(self, src_md, src_ptr: int, dst_md, dst_ptr: int) -> None:
        lib = _lib()
        engine, stream = _engine()
        rpd, prim = _h(), _h()
        _check(lib.dnnl_reorder_primitive_desc_create(ctypes.byref(rpd), src_md, engine, dst_md, engine, None),
               "reorder_primitive_desc_create")
        try:
            _check(lib.dnnl_primitive_create(ctypes.byref(prim), rpd), "primitive_create(reorder)")
            src, dst = self._objects.memory(src_md, src_ptr), self._objects.memory(dst_md, dst_ptr)
            args = (_ExecArg * 2)(_ExecArg(ARG_FROM, src), _ExecArg(ARG_TO, dst))
            _check(lib.dnnl_primitive_execute(prim, stream, 2, args), "primitive_execute(reorder)")
            _check(lib.dnnl_stream_wait(stream), "stream_wait")
        finally:
            if prim.value:
                lib.dnnl_primitive_destroy(prim)
            lib.dnnl_primitive_desc_destroy(rpd)

    def __call__(self, x: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        if (x.dtype != self._x_dtype or tuple(x.shape) != self._in_shape
                or not x.is_contiguous(memory_format=torch.channels_last)):
            raise KilnInputError(f"oneDNN convolution: input must be channels-last {self.spec.x_dtype} "
                                 f"{list(self._in_shape)}, got {x.dtype} {list(x.shape)} strides {x.stride()}")
        if self.spec.other is not None:
            if (acc is None or acc.dtype != self._out_dtype or tuple(acc.shape) != self._out_shape
                    or not acc.is_contiguous(memory_format=torch.channels_last)):
                raise KilnInputError("oneDNN convolution: the residual must be a channels-last "
                                     f"{self.spec.out_dtype} {list(self._out_shape)}")
            out = acc
        else:
            out = torch.empty(self._out_shape, dtype=self._out_dtype, memory_format=torch.channels_last)
        lib = _lib()
        lib.dnnl_memory_set_data_handle(self._src_mem, x.data_ptr())
        lib.dnnl_memory_set_data_handle(self._dst_mem, out.data_ptr())
        status = lib.dnnl_primitive_execute(self._prim, self._stream, self._nargs, self._args)
        if status != _SUCCESS:
            raise UnsupportedError(f"oneDNN convolution ({self.impl}) failed with status {status}")
        return out

