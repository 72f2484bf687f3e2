"""The persistent kernel cache: reuse across compiles and models, and bad entries ignored with a warning."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("tvm")

from kiln.backends.tvm import backend as tvm_backend  # noqa: E402
from kiln.backends.tvm.cache import KernelCache, KilnCacheWarning, canonical_text  # noqa: E402
from kiln.backends.tvm.kernel import TVMKernel, cpu_target  # noqa: E402
from kiln.ir.builder import Builder  # noqa: E402
from kiln.ir.graph import Graph  # noqa: E402
from kiln.ir.ops import aten  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402


def _graph(name="g", weight="scale", n=64):
    g = Graph(name)
    b = Builder(g)
    x = g.add_input(TensorType((8, n), torch.float32), "x")
    w = b.weight(weight, torch.full((n,), 2.0))
    g.set_outputs([b.call(aten.relu, b.call(aten.mul.Tensor, x, w))])
    return g


def test_canonical_text_ignores_names():
    assert canonical_text(_graph("a", "fc.w")) == canonical_text(_graph("b", "other.w"))
    assert canonical_text(_graph(n=64)) != canonical_text(_graph(n=32))


def test_second_build_loads_from_disk(tmp_path):
    cache = KernelCache(tmp_path)
    first = TVMKernel(_graph(), cpu_target(), cache=cache)
    assert not first.cached and cache.stats.stored == 1
    second = TVMKernel(_graph("other_model", "layer.w"), cpu_target(), cache=KernelCache(tmp_path))
    assert second.cached and second.source is None
    x = torch.randn(8, 64)
    torch.testing.assert_close(second(x)[0], torch.relu(x * 2.0))


def _entry(tmp_path):
    (meta,) = tmp_path.glob("*.json")
    return meta, meta.with_suffix(".so")


@pytest.mark.parametrize("damage, reason", [
    (lambda meta, lib: lib.write_bytes(lib.read_bytes()[:100]), "sha256 mismatch"),
    (lambda meta, lib: meta.write_text(json.dumps({**json.loads(meta.read_text()), "tvm": "0.1"})), "built by TVM 0.1"),
    (lambda meta, lib: meta.write_text("{not json"), "unreadable metadata"),
    (lambda meta, lib: lib.unlink(), "library unreadable"),
])
def test_bad_entry_is_ignored_with_a_warning_and_rebuilt(tmp_path, damage, reason):
    TVMKernel(_graph(), cpu_target(), cache=KernelCache(tmp_path))
    meta, lib = _entry(tmp_path)
    damage(meta, lib)
    cache = KernelCache(tmp_path)
    with pytest.warns(KilnCacheWarning, match=reason):
        kernel = TVMKernel(_graph(), cpu_target(), cache=cache)
    assert not kernel.cached and cache.stats.rejected == 1 and cache.stats.stored == 1
    x = torch.randn(8, 64)
    torch.testing.assert_close(kernel(x)[0], torch.relu(x * 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TVMKernel(_graph(), cpu_target(), cache=KernelCache(tmp_path)).cached  # repaired


def test_backend_second_compile_compiles_nothing(tmp_path, monkeypatch):
    from examples.models import REGISTRY
    from kiln.backends.driver import compile_graph
    from kiln.frontend.export import from_export

    model, inputs = REGISTRY["mlp"]()
    graph = from_export(model, inputs)
    tvm_backend._KERNEL_CACHE.clear()  # kernels other tests compiled in this process would hide the disk
    compile_graph(graph, "tvm", {"cache_dir": tmp_path})
    tvm_backend._KERNEL_CACHE.clear()  # a new process: only the disk remembers
    built = []
    original = TVMKernel.__init__

    def spy(self, *a, **kw):
        original(self, *a, **kw)
        built.append(self.cached)

    monkeypatch.setattr(TVMKernel, "__init__", spy)
    compiled = compile_graph(graph, "tvm", {"cache_dir": tmp_path})
    assert built and all(built)  # every kernel came from disk
    torch.testing.assert_close(compiled(*inputs)[0], model(*inputs))


def test_disabled_cache_writes_nothing(tmp_path):
    cache = KernelCache(False)
    TVMKernel(_graph(), cpu_target(), cache=cache)
    assert cache.stats.stored == 0 and not list(tmp_path.iterdir())
