"""The compile cache: a second ``kiln.compile`` of the same model loads the compiled program (no export, no
passes) with the same outputs; anything that changes the computation misses; damaged entries are ignored
with a warning and rewritten; what cannot be cached compiles every time."""

from __future__ import annotations

import pytest
import torch

import kiln
import kiln.api
from examples.models import REGISTRY
from kiln.errors import KilnInputError
from kiln.ir.printer import print_graph
from kiln.runtime.compile_cache import KilnCacheWarning


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))
    return tmp_path / "kiln-cache" / "compiled"


def _no_export(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a compile-cache hit must not export")

    monkeypatch.setattr(kiln.api, "from_export", fail)


def test_second_compile_is_a_hit_without_export(cache_dir, monkeypatch):
    model, inputs = REGISTRY["transformer"]()
    cold = kiln.compile(model, inputs, pipeline="O2")
    assert cold.cache == "stored"
    assert len(list(cache_dir.iterdir())) == 1
    _no_export(monkeypatch)
    warm = kiln.compile(model, inputs, pipeline="O2")
    assert warm.cache == "hit" and warm.pass_records == []
    with torch.no_grad():
        for a, b in zip(warm(*inputs), cold(*inputs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert print_graph(warm.graph) == print_graph(cold.graph)  # parsed from the entry on first use
    assert warm.report.to_dict() == cold.report.to_dict()
    with pytest.raises(KilnInputError, match="input 0"):
        warm(inputs[0][:, :1])


def test_changes_miss(cache_dir):
    model, inputs = REGISTRY["mlp"]()
    assert kiln.compile(model, inputs).cache == "stored"
    assert kiln.compile(model, inputs, pipeline="O2").cache == "stored"  # other options
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    cm = kiln.compile(model, inputs)
    assert cm.cache == "stored"  # other weights
    with torch.no_grad():
        torch.testing.assert_close(cm(*inputs), model(*inputs))
    assert kiln.compile(model, inputs).cache == "hit"
    assert len(list(cache_dir.iterdir())) == 3


def test_off_switches(cache_dir, monkeypatch):
    model, inputs = REGISTRY["mlp"]()
    assert kiln.compile(model, inputs, compile_cache=False).cache == "off: disabled"
    assert kiln.compile(model, inputs, debug_dir=str(cache_dir.parent / "dumps")).cache == "off: disabled"
    monkeypatch.setenv("KILN_CACHE_DIR", "off")
    assert kiln.compile(model, inputs).cache == "off: disabled"
    assert not cache_dir.exists()
    with pytest.raises(KilnInputError, match="compile_cache"):
        kiln.compile(model, inputs, compile_cache="yes")


def test_uncacheable_models_compile_every_time(cache_dir):
    class Hooked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).relu()

    model = Hooked().eval()
    model.lin.register_forward_hook(lambda m, i, o: o + 1)
    x = torch.randn(2, 4)
    cm = kiln.compile(model, (x,))
    assert cm.cache.startswith("off:") and "hook" in cm.cache
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_entries_warn_and_are_rewritten(cache_dir, monkeypatch, damage):
    model, inputs = REGISTRY["mlp"]()
    kiln.compile(model, inputs)
    entry = next(cache_dir.iterdir())
    if damage == "manifest":
        (entry / "entry.json").write_text("{")
    else:
        path = entry / "storages.safetensors"
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.warns(KilnCacheWarning, match=str(entry.name)):
        cm = kiln.compile(model, inputs)
    assert cm.cache == "stored"
    with torch.no_grad():
        torch.testing.assert_close(cm(*inputs), model(*inputs))
    assert kiln.compile(model, inputs).cache == "hit"


def test_least_recently_used_entries_are_pruned(cache_dir, monkeypatch):
    model, inputs = REGISTRY["mlp"]()
    kiln.compile(model, inputs)
    first = next(cache_dir.iterdir()).name
    size = sum(f.stat().st_size for f in (cache_dir / first).iterdir())
    monkeypatch.setenv("KILN_COMPILE_CACHE_MAX_GB", str(1.5 * size / 1e9))  # room for one entry
    kiln.compile(model, inputs, pipeline="O2")
    assert [p.name for p in cache_dir.iterdir()] != [first] and len(list(cache_dir.iterdir())) == 1
    assert kiln.compile(model, inputs, pipeline="O2").cache == "hit"
    assert kiln.compile(model, inputs).cache == "stored"  # it was pruned
