"""int8 GEMM on AVX-512 VNNI through TVM: ``y[M, N] = epilogue(sum_k u8 x[m, k] * i8 w[n, k])``.

Contract:
- ``vnni_target()`` is ``cpu_target()`` when its LLVM CPU has ``avx512vnni`` (and ``avx512bw``); otherwise it
  raises ``UnsupportedError`` naming the CPU, so callers (``kiln.passes.quantize.lower``) do not apply.
- ``pack_weight(qw)``: an ``int8 [N, K]`` weight in the VNNI layout ``[Np/16, Kp/4, 16, 4]`` (``Np``/``Kp``:
  N and K rounded up to 16 and 4, the padding zeros), packed once when a graph is lowered.
- ``GemmSpec`` fixes one kernel: shapes ``m, n, k`` (padded ``np_``/``kp`` derived), whether a bias is
  added, ``post_op`` (``"none"``/``"relu"``), ``out_dtype`` (``"float32"``, ``"uint8"`` or ``"int8"``) and the
  output quantization (``out_scale``, ``out_zp``). ``gemm_kernel(spec)`` compiles it once per process
  (``functools.cache``) and returns the TVM function
  ``f(x: u8[m, kp], w: i8[np/16, kp/4, 16, 4], corr: i32[np], mult: f32[np], bias: f32[np], out[m, np])``
  computing exactly kiln.qlinear's semantics (``kiln/ir/quant_ops.py``) for a symmetric weight:
  ``acc = (sum_k x*w) - corr[n]`` in wrapping int32 (``corr = x_zp * sum_k w[n, k]``, so ``acc`` is
  ``sum (x - x_zp) * w``), ``y = f32(acc) * mult[n]`` (``mult = f32(x_scale) * w_scale[n]``), ``+ bias[n]``
  as a separate rounding (an ``llvm.arithmetic.fence`` on the product: TVM compiles with FP-op fusion on, and
  an FMA would round once), ``max(y, 0)`` for relu, and for integer outputs
  ``clamp(nearbyint(y / out_scale) + out_zp)`` (round half to even, a true division).
- The schedule is kiln's, fixed (no tuning): the output is tiled into ``mr x (nr*16)`` tiles (``GemmSpec.tile``:
  up to 4 x 4 zmm accumulators, 1 x 8 for one row) whose int32 accumulators are compacted to the tile and
  kept in registers by LLVM; the reduction runs ``kiln_dot_16x4_vnni`` (TVM's ``dot_16x4_vnni`` made to
  compile with LLVM 22: ``vpdpbusd``, 16 int32 lanes x 4 u8*i8 products) over the whole K per tile, the
  ``mr x nr`` calls unrolled so one weight load serves ``mr`` rows; the epilogue is vectorised
  per tile; the tile loop (N tiles outer, M tiles inner, so a weight panel stays in cache while the rows
  stream) is parallel when the work is at least ``PARALLEL_MACS`` multiply-adds.
- Run time: ``PackedLinear.of(qw, w_scales, bias)`` prepares a layer once (packed weight, per-channel row
  sums, scales, bias, padded to Np); ``static_vectors(x_scale, x_zp, x_dtype)`` gives its ``(corr, mult)``.
  ``gemm(xu, packed, corr, mult, bias, n, post_op, out_dtype, out_scale, out_zp)`` runs the kernel on uint8
  activations of any leading shape (flattened to M rows; M is a run-time value: one compiled kernel per M,
  cached; a ragged K is zero-padded per call, a ragged N is sliced off the padded output).
  ``static_qlinear`` is kiln.qlinear on it (int8 activations are shifted to uint8, ``x ^ 0x80`` being
  ``x + 128``, with the zero point shifted alike); ``dynamic_qlinear`` is kiln.dynamic_qlinear (``x``
  quantized at run time by the reference's own PyTorch ops, so the integers are the same, then the kernel
  with per-call ``corr``/``mult``). ``Int8Linear`` bundles both for tests and benchmarks.
- What is refused: weights that are not int8 or not symmetric (callers check: the kernel has no weight
  zero point term), other post-ops, other output dtypes (``UnsupportedError``); mismatched inputs raise
  ``KilnInputError``. A fused residual is left to the caller (lower.py adds it in float ops).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kiln.errors import KilnInputError, UnsupportedError

try:  # the TVM backend is an optional extra
    import tvm
    import tvm.s_tir as st
    from tvm import te
    from tvm.s_tir import Schedule, TensorIntrin
    from tvm.script import tirx as T
    from tvm.target import codegen
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("kiln's TVM int8 kernels need apache-tvm: pip install 'kiln[tvm]'") from e

from .kernel import aligned, cpu_target

LANES = 16  # int32 lanes of one zmm accumulator; the packed weight's inner N block
KPACK = 4  # u8*i8 products one vpdpbusd lane sums; the packed weight's inner K block
PARALLEL_MACS = 1 << 22  # below this the thread pool's wake-up costs more than the second core gains
REQUIRED_FEATURES = ("avx512bw", "avx512vnni")
OUT_DTYPES = {"float32": torch.float32, "uint8": torch.uint8, "int8": torch.int8}
_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


# The tensor intrinsic, as TVM's ``tvm.s_tir.tensor_intrin.x86`` defines it, with two changes: TVM 0.27's
# implementation passes i32 vectors that LLVM >= 20's vpdpbusd (v64i8 operands) rejects, and importing that
# module imports every target's intrinsics (about a minute, mostly CUDA's).
@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"), a_u8x64, B.vload([0, 0], dtype="int8x64"), dtype="int32x16")


DOT_16X4_INTRIN = "kiln_dot_16x4_vnni"
TensorIntrin.register(DOT_16X4_INTRIN, _dot_16x4_desc, _dot_16x4_vnni_impl, override=True)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


@functools.cache
def vnni_target() -> tvm.target.Target:
    target = cpu_target()
    missing = [f for f in REQUIRED_FEATURES if not codegen.target_has_features(f, target)]
    if missing:
        raise UnsupportedError(f"the TVM int8 kernels need AVX-512 VNNI; LLVM CPU {target.attrs.get('mcpu')!r} "
                               f"lacks {', '.join(missing)}")
    return target


def pack_weight(qw: torch.Tensor) -> torch.Tensor:
    """``int8 [N, K]`` -> ``int8 [Np/16, Kp/4, 16, 4]``, zero-padded: ``p[a, b, c, d] = w[16a + c, 4b + d]``."""
    if qw.dtype != torch.int8 or qw.dim() != 2:
        raise KilnInputError(f"pack_weight takes an int8 [N, K] weight, got {qw.dtype} {list(qw.shape)}")
    n, k = qw.shape
    np_, kp = _round_up(n, LANES), _round_up(k, KPACK)
    w = torch.zeros(np_, kp, dtype=torch.int8)
    w[:n, :k] = qw
    return w.reshape(np_ // LANES, LANES, kp // KPACK, KPACK).permute(0, 2, 1, 3).contiguous()


@dataclass(frozen=True)
class GemmSpec:
    m: int
    n: int
    k: int
    has_bias: bool = True
    post_op: str = "none"
    out_dtype: str = "float32"
    out_scale: float = 1.0
    out_zp: int = 0

    def __post_init__(self):
        if min(self.m, self.n, self.k) < 1:
            raise KilnInputError(f"GemmSpec needs positive shapes, got m={self.m} n={self.n} k={self.k}")
        if self.post_op not in ("none", "relu"):
            raise UnsupportedError(f"TVM int8 GEMM: post_op {self.post_op!r} (only 'none' and 'relu')")
        if self.out_dtype not in OUT_DTYPES:
            raise UnsupportedError(f"TVM int8 GEMM: out_dtype {self.out_dtype!r} (only {', '.join(OUT_DTYPES)})")

    @property
    def np_(self) -> int:
        return _round_up(self.n, LANES)

    @property
    def kp(self) -> int:
        return _round_up(self.k, KPACK)

    def tile(self) -> tuple[int, int]:
        """(rows, 16-column blocks) of one register tile: up to 4 x 4 zmm accumulators (1 x 8 for a single row),
        dividing M and Np/16 (a partial tile would not match the tensor intrinsic)."""
        nb = self.np_ // LANES
        if self.m == 1:
            return 1, _largest_divisor(nb, 8)
        return _largest_divisor(self.m, 4), _largest_divisor(nb, 4)


def _largest_divisor(v: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if v % d == 0)


def gemm_func(spec: GemmSpec) -> tvm.tirx.PrimFunc:
    """The unscheduled TIR of ``spec`` (TE compute: VNNI-layout reduction, product, epilogue)."""
    m, np_, kp = spec.m, spec.np_, spec.kp
    x = te.placeholder((m, kp), "uint8", name="x")
    w = te.placeholder((np_ // LANES, kp // KPACK, LANES, KPACK), "int8", name="w")
    corr = te.placeholder((np_,), "int32", name="corr")
    mult = te.placeholder((np_,), "float32", name="mult")
    bias = te.placeholder((np_,), "float32", name="bias")
    r = te.reduce_axis((0, kp), name="k")
    acc = te.compute(
        (m, np_),
        lambda i, j: te.sum(x[i, r].astype("int32")
                            * w[j // LANES, r // KPACK, j % LANES, r % KPACK].astype("int32"), axis=r),
        name="acc")
    # the fence keeps LLVM (TVM compiles with FP-op fusion on) from contracting product and bias into an FMA
    prod = te.compute((m, np_), lambda i, j: tvm.tirx.call_llvm_pure_intrin(
        "float32", "llvm.arithmetic.fence", (acc[i, j] - corr[j]).astype("float32") * mult[j]), name="prod")

    def epilogue(i, j):
        y = prod[i, j]
        if spec.has_bias:
            y = y + bias[j]
        if spec.post_op == "relu":
            y = te.max(y, tvm.tirx.const(0.0, "float32"))
        if spec.out_dtype == "float32":
            return y
        lo, hi = _RANGES[spec.out_dtype]
        q = tvm.tirx.nearbyint(y / tvm.tirx.const(spec.out_scale, "float32")) + tvm.tirx.const(spec.out_zp,
                                                                                                 "float32")
        q = te.min(te.max(q, tvm.tirx.const(lo, "float32")), tvm.tirx.const(hi, "float32"))
        return q.astype(spec.out_dtype)

    out = te.compute((m, np_), epilogue, name="out")
    return te.create_prim_func([x, w, corr, mult, bias, out])


def schedule_gemm(spec: GemmSpec, func) -> tvm.IRModule:
    mr, nr = spec.tile()
    sch = Schedule(tvm.IRModule({"main": func}))
    acc, prod, out = sch.get_sblock("acc"), sch.get_sblock("prod"), sch.get_sblock("out")
    i, j = sch.get_loops(out)
    io, ii = sch.split(i, [None, mr])
    jo, ji = sch.split(j, [None, nr * LANES])
    sch.reorder(jo, io, ii, ji)
    tile = sch.fuse(jo, io)
    # the product and the accumulators of one tile, computed right before its epilogue
    sch.compute_at(prod, tile, preserve_unit_loops=True)
    sch.compute_at(acc, tile, preserve_unit_loops=True)
    sch.set_scope(prod, 0, "local")
    if spec.m * spec.np_ * spec.kp >= PARALLEL_MACS and _extent(sch, tile) > 1:
        sch.parallel(tile)
    a_i, a_j, a_k = sch.get_loops(acc)[-3:]
    a_jo, a_ji = sch.split(a_j, [None, LANES])
    a_ko, a_ki = sch.split(a_k, [None, KPACK])
    sch.reorder(a_ko, a_i, a_jo, a_ji, a_ki)
    init = sch.decompose_reduction(acc, a_ko)
    sch.vectorize(sch.split(sch.fuse(*sch.get_loops(init)[-2:]), [None, LANES])[1])
    sch.tensorize(a_ji, DOT_16X4_INTRIN)
    sch.unroll(a_i)
    sch.unroll(a_jo)
    for block in (prod, out):
        b_i, b_j = sch.get_loops(block)[-2:]
        sch.vectorize(sch.split(b_j, [None, LANES])[1])
    st.analysis.verify_well_formed(sch.mod)
    return sch.mod


def _extent(sch: Schedule, loop) -> int:
    return int(sch.get(loop).extent)


@functools.cache
def gemm_kernel(spec: GemmSpec):
    """The compiled kernel of ``spec`` (one per process and spec)."""
    return tvm.compile(schedule_gemm(spec, gemm_func(spec)), target=vnni_target())["main"]


def _wrap_int32(v: torch.Tensor) -> torch.Tensor:
    return (((v.to(torch.int64) + 2**31) % 2**32) - 2**31).to(torch.int32)


def _dl(t: torch.Tensor):
    return tvm.runtime.from_dlpack(aligned(t))


_OUT_NAMES = {v: k for k, v in OUT_DTYPES.items()}


@dataclass(frozen=True)
class PackedLinear:
    """A symmetric int8 ``[N, K]`` weight prepared once: ``packed`` (VNNI layout), and per padded channel
    ``wsum`` (int64 row sums), ``w_scales`` (f32) and ``bias`` (f32; None without a bias)."""

    packed: torch.Tensor
    wsum: torch.Tensor
    w_scales: torch.Tensor
    bias: torch.Tensor | None
    n: int
    k: int

    @staticmethod
    def of(qw: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear:
        n, k = qw.shape
        np_ = _round_up(n, LANES)

        def padded(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            out = torch.zeros(np_, dtype=dtype)
            out[:n] = v.reshape(-1).to(dtype)
            return out

        return PackedLinear(pack_weight(qw), padded(qw.to(torch.int64).sum(dim=1), torch.int64),
                            padded(w_scales, torch.float32), None if bias is None else padded(bias, torch.float32),
                            n, k)

    def static_vectors(self, x_scale: float, x_zp: int, x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(corr, mult) of a static activation quantization (the zero point shifted by 128 for int8 inputs)."""
        zp = int(x_zp) + (128 if x_dtype == torch.int8 else 0)
        return _wrap_int32(zp * self.wsum), torch.tensor(float(x_scale), dtype=torch.float32) * self.w_scales


def as_uint8(qx: torch.Tensor) -> torch.Tensor:
    """uint8 activations as they are; int8 ones shifted by +128 (``x ^ 0x80`` reinterpreted as uint8)."""
    if qx.dtype == torch.uint8:
        return qx
    if qx.dtype == torch.int8:
        return qx.view(torch.uint8) ^ 0x80
    raise KilnInputError(f"TVM int8 GEMM takes uint8 or int8 activations, got {qx.dtype}")


def gemm(xu: torch.Tensor, packed: torch.Tensor, corr: torch.Tensor, mult: torch.Tensor, bias: torch.Tensor | None,
         n: int, post_op: str = "none", out_dtype: torch.dtype = torch.float32, out_scale: float = 1.0,
         out_zp: int = 0) -> torch.Tensor:
    """``y[..., n]`` of uint8 activations ``xu[..., k]`` (see the module docstring for the vectors' meaning)."""
    if xu.dtype != torch.uint8:
        raise KilnInputError(f"TVM int8 GEMM: activations must be uint8 here, got {xu.dtype}")
    if out_dtype not in _OUT_NAMES:
        raise UnsupportedError(f"TVM int8 GEMM: out_dtype {out_dtype}")
    k = xu.shape[-1]
    lead = xu.shape[:-1]
    x2 = xu.reshape(-1, k)
    kp = _round_up(k, KPACK)
    if tuple(packed.shape[1:]) != (kp // KPACK, LANES, KPACK) or packed.shape[0] * LANES < n:
        raise KilnInputError(f"TVM int8 GEMM: packed weight {list(packed.shape)} does not fit k={k}, n={n}")
    if x2.shape[0] == 0:
        return torch.empty(*lead, n, dtype=out_dtype)
    if kp != k:
        x2 = torch.nn.functional.pad(x2, (0, kp - k))
    spec = GemmSpec(x2.shape[0], n, k, bias is not None, post_op, _OUT_NAMES[out_dtype], float(out_scale),
                    int(out_zp))
    out = torch.empty(spec.m, spec.np_, dtype=out_dtype)
    b = bias if bias is not None else mult  # an unread parameter when the spec has no bias
    gemm_kernel(spec)(_dl(x2), _dl(packed), _dl(corr), _dl(mult), _dl(b), _dl(out))
    if spec.np_ != n:
        out = out[:, :n].contiguous()
    return out.reshape(*lead, n)


def static_qlinear(qx: torch.Tensor, packed: torch.Tensor, corr: torch.Tensor, mult: torch.Tensor,
                   bias: torch.Tensor | None, n: int, post_op: str = "none", out_dtype: torch.dtype = torch.float32,
                   out_scale: float = 1.0, out_zp: int = 0) -> torch.Tensor:
    """kiln.qlinear with precomputed ``(corr, mult)`` (``PackedLinear.static_vectors``)."""
    return gemm(as_uint8(qx), packed, corr, mult, bias, n, post_op, out_dtype, out_scale, out_zp)


def dynamic_qlinear(x: torch.Tensor, packed: torch.Tensor, wsum: torch.Tensor, w_scales: torch.Tensor,
                    bias: torch.Tensor | None, n: int, qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    """kiln.dynamic_qlinear: ``x`` quantized with run-time parameters by the reference's own PyTorch ops
    (so the integers are the same), then the GEMM with per-call ``corr``/``mult``."""
    from kiln.ir.quant_ops import dynamic_qparams

    scale, zp = dynamic_qparams(x, qmin, qmax)
    q = torch.clamp(torch.round(x.to(torch.float32) / scale) + zp, qmin, qmax)
    shift = 0 if qmin >= 0 else 128
    xu = (q + shift).to(torch.uint8)
    corr = _wrap_int32((zp.to(torch.int64) + shift) * wsum)
    return gemm(xu, packed, corr, scale * w_scales, bias, n)


class Int8Linear:
    """A quantized linear layer ready to run (tests, benchmarks): ``PackedLinear`` plus its epilogue."""

    def __init__(self, qw: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None,
                 post_op: str = "none", out_dtype: torch.dtype = torch.float32, out_scale: float = 1.0,
                 out_zp: int = 0):
        vnni_target()
        self.weight = PackedLinear.of(qw, w_scales, bias)
        self.post_op, self.out_dtype, self.out_scale, self.out_zp = post_op, out_dtype, out_scale, out_zp
        self._vectors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, qx: torch.Tensor, x_scale: float, x_zp: int) -> torch.Tensor:
        key = (float(x_scale), int(x_zp), qx.dtype)
        if key not in self._vectors:
            self._vectors[key] = self.weight.static_vectors(*key)
        w = self.weight
        return static_qlinear(qx, w.packed, *self._vectors[key], w.bias, w.n, self.post_op, self.out_dtype,
                              self.out_scale, self.out_zp)

    def dynamic(self, x: torch.Tensor, qmin: int = 0, qmax: int = 255) -> torch.Tensor:
        w = self.weight
        return dynamic_qlinear(x, w.packed, w.wsum, w.w_scales, w.bias, w.n, qmin, qmax)
