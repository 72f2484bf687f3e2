"""TVM kernels travel inside kiln artifacts: loading one on the same target compiles, tunes and measures
nothing, and a tampered kernel library is refused by the manifest's sha256."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tvm", reason="the tvm extra is not installed")

import kiln  # noqa: E402
from examples.models import REGISTRY  # noqa: E402
from kiln.backends.tvm import backend as tvm_backend  # noqa: E402
from kiln.backends.tvm import kernel as kernel_mod  # noqa: E402
from kiln.backends.tvm import tune as tune_mod  # noqa: E402
from kiln.errors import ArtifactError  # noqa: E402
from kiln.numerics import assert_match  # noqa: E402
from kiln.options import CompileOptions  # noqa: E402
from kiln.runtime.artifact import load_artifact, save_artifact  # noqa: E402


def _save(tmp_path, monkeypatch, **options):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache-a"))
    model, inputs = REGISTRY["mlp"](size="small", seed=0)
    cm = kiln.compile(model, inputs, target="tvm", pipeline="O2", **options)
    opts = CompileOptions(target="tvm", pipeline="O2", **options)
    out = save_artifact(cm, tmp_path / "art", model_ref=None, options=opts, example_inputs=inputs)
    with torch.no_grad():
        return out, inputs, cm(*inputs)


def _forbid_building(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("loading the artifact compiled a kernel")

    monkeypatch.setattr(kernel_mod.tvm, "compile", refuse)
    monkeypatch.setattr(tune_mod, "tune_prim_func", refuse)
    tvm_backend._KERNEL_CACHE.clear()


def _load_fresh(out, tmp_path, monkeypatch):
    """Load in what is, for the caches, a new machine user: empty kernel and tuning caches."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache-b"))
    _forbid_building(monkeypatch)
    return load_artifact(out)


def test_untuned_kernels_are_shipped_and_loaded_without_compiling(tmp_path, monkeypatch):
    out, inputs, expected = _save(tmp_path, monkeypatch)
    manifest = json.loads((out / "manifest.json").read_text())
    libs = [n for n in manifest["files"] if n.startswith("kernels/") and n.endswith(".so")]
    assert libs and all((out / n).is_file() for n in libs)
    loaded = _load_fresh(out, tmp_path, monkeypatch)
    with torch.no_grad():
        assert_match(loaded(*inputs), expected)
    assert not (tmp_path / "cache-b" / "tvm").exists() or not any((tmp_path / "cache-b" / "tvm").iterdir())


def test_tuned_kernels_and_their_records_are_shipped(tmp_path, monkeypatch):
    out, inputs, expected = _save(tmp_path, monkeypatch, tune_trials=2)
    names = json.loads((out / "manifest.json").read_text())["files"]
    assert any(n.startswith("kernels/tuning-") for n in names)
    loaded = _load_fresh(out, tmp_path, monkeypatch)  # no tuning, no GEMM measurement, no build
    with torch.no_grad():
        assert_match(loaded(*inputs), expected)


def test_a_tampered_kernel_library_is_refused(tmp_path, monkeypatch):
    out, _, _ = _save(tmp_path, monkeypatch)
    lib = next(p for p in (out / "kernels").iterdir() if p.suffix == ".so")
    lib.write_bytes(lib.read_bytes()[:-7] + b"tamper!")
    with pytest.raises(ArtifactError, match=rf"{lib.name}: corrupted"):
        load_artifact(out)
