"""The TVM backend (issue 6): kiln graphs lowered to TIR and compiled by TVM for the CPU.

Status: the lowering table (``te_ops``: ATen pointwise ops, views, reductions, softmax, layer/batch norm
as tensor expressions), kiln's default CPU schedule (``schedule``: inline pointwise producers, compute
reductions row by row, vectorise with rfactor, parallelise) and single-kernel compilation with DLPack
exchange (``kernel``) exist and are tested op by op. Not yet: the ``tvm`` target registered with the
backend registry (partitioning whole graphs, GEMM/conv through PyTorch's kernels, fused groups from the
fusion pass), MetaSchedule tuning and its database, artifact export. Until then
``options={"target": "tvm"}`` raises ``UnsupportedError`` naming issue 6.
"""
