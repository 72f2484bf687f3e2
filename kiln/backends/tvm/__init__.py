"""The TVM backend (issue 6): kiln graphs lowered to TIR and compiled by TVM for the CPU.

Modules: ``te_ops`` (the lowering table: ATen pointwise ops, views, reductions, softmax, layer/batch norm,
and with tuning mm/addmm/bmm/conv2d, as tensor expressions), ``schedule`` (kiln's default CPU schedule:
inline pointwise producers, reductions row by row, rfactor vectorisation, parallel loops), ``kernel`` (one
graph -> one PrimFunc -> one compiled function called with DLPack), ``cache`` (compiled kernels on disk),
``tune``/``tune_db`` (MetaSchedule tuning per kernel, in-process builder/runner, the persistent tuning
database, the measured TIR-vs-PyTorch choice per GEMM group), ``int8`` (an AVX-512 VNNI int8 GEMM, a
candidate of the quantized-op lowering) and ``backend`` (the ``tvm`` target: partitions -> kernels,
the report of which path each kernel took, kernels and tuning records for artifacts).
"""
