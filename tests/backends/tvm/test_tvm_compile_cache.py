"""The compile cache on the tvm target: a hit runs the same TVM kernels, packed MKL/oneDNN weights and SDPA
calls as the compile it stored (bit-for-bit), builds and exports nothing, and an entry whose kernel left the
kernel cache is a warned miss, never a crash."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm", reason="the tvm extra is not installed")

import kiln  # noqa: E402
import kiln.api  # noqa: E402
from examples.models import REGISTRY  # noqa: E402
from kiln.backends.tvm import backend as tvm_backend  # noqa: E402
from kiln.backends.tvm import kernel as kernel_mod  # noqa: E402
from kiln.options import CompileOptions  # noqa: E402
from kiln.report.bench import kernel_paths  # noqa: E402
from kiln.runtime.artifact import load_artifact, save_artifact  # noqa: E402
from kiln.runtime.compile_cache import KilnCacheWarning  # noqa: E402


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))
    return tmp_path / "kiln-cache"


def _forbid_building(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a compile-cache hit must not export or build kernels")

    monkeypatch.setattr(kiln.api, "from_export", fail)
    monkeypatch.setattr(kernel_mod.tvm, "compile", fail)


@pytest.mark.parametrize("name", ["resnet18", "transformer", "mamba"])
def test_hit_runs_the_same_program(cache_dir, monkeypatch, name):
    # resnet18: oneDNN-packed convolutions (weights rebuilt from their recipe); transformer: MKL-packed
    # linears and SDPA; mamba: scan kernels reading strided slices
    model, inputs = REGISTRY[name]()
    cold = kiln.compile(model, inputs, target="tvm", pipeline="O2")
    assert cold.cache == "stored"
    tvm_backend.clear_process_caches()
    _forbid_building(monkeypatch)
    warm = kiln.compile(model, inputs, target="tvm", pipeline="O2")
    assert warm.cache == "hit"
    with torch.no_grad():
        expected, got = cold(*inputs), warm(*inputs)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert kernel_paths(warm) == kernel_paths(cold)


@pytest.mark.parametrize("name, scheme", [("resnet18", "int8"), ("mlp", "int8-dynamic")])
def test_quantized_model_hit_runs_the_same_program(cache_dir, monkeypatch, name, scheme):
    # oneDNN's packed int8 weights are rebuilt from their recipe; int8-dynamic on tvm also lowers a rank-0
    # scale output (te's == refuses rank-0 tensors: kernel.lower_graph compares by identity)
    model, inputs = REGISTRY[name](size="small", seed=0)
    cold = kiln.compile(model, inputs, target="tvm", pipeline="O2", quantize=scheme)
    assert cold.cache == "stored" and cold.compiled.quant_lowering.rows
    tvm_backend.clear_process_caches()
    _forbid_building(monkeypatch)
    warm = kiln.compile(model, inputs, target="tvm", pipeline="O2", quantize=scheme)
    assert warm.cache == "hit"
    with torch.no_grad():
        torch.testing.assert_close(warm(*inputs), cold(*inputs), rtol=0, atol=0)


def test_missing_kernel_is_a_warned_miss(cache_dir):
    model, inputs = REGISTRY["mlp"]()
    kiln.compile(model, inputs, target="tvm", pipeline="O2")
    for lib in (cache_dir / "tvm").glob("*.so"):
        lib.unlink()
    tvm_backend.clear_process_caches()
    with pytest.warns(KilnCacheWarning, match="kernel"):
        cm = kiln.compile(model, inputs, target="tvm", pipeline="O2")
    assert cm.cache == "stored"
    with torch.no_grad():
        torch.testing.assert_close(cm(*inputs), model(*inputs), rtol=1e-4, atol=1e-4)


def test_a_hit_saves_a_loadable_artifact(cache_dir, tmp_path):
    model, inputs = REGISTRY["mlp"]()
    kiln.compile(model, inputs, target="tvm", pipeline="O2")
    warm = kiln.compile(model, inputs, target="tvm", pipeline="O2")
    assert warm.cache == "hit"
    path = save_artifact(warm, tmp_path / "art", model_ref=None, options=CompileOptions(target="tvm", pipeline="O2"),
                         example_inputs=inputs)
    assert any(p.suffix == ".so" for p in (path / "kernels").iterdir())
    loaded = load_artifact(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), warm(*inputs), rtol=0, atol=0)
