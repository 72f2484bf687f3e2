"""The TVM backend (issue 6): kiln graphs lowered to TIR and compiled by TVM for the CPU.

Status: the lowering table (``te_ops``: ATen pointwise ops, views, reductions, softmax, layer/batch norm
as tensor expressions), kiln's default CPU schedule (``schedule``: inline pointwise producers, compute
reductions row by row, vectorise with rfactor, parallelise) and single-kernel compilation with DLPack
exchange (``kernel``) exist and are tested op by op; the ``tvm`` target (``backend``) compiles whole
partitions — one TIR kernel per fused group's lowerable region or per lone pointwise/reduction op,
GEMM/conv/pooling through PyTorch's kernels — and every zoo model matches the reference with it.
Not yet: MetaSchedule tuning and its persistent database, GEMM/conv in TIR, export of the kernels as a
shared library inside an artifact, and the e2e benchmark against Inductor/OpenVINO.
"""
