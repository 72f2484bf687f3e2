"""Artifacts: save -> load in a fresh process == eager, byte-identical output for the same inputs,
and a clear ``ArtifactError`` (naming the file) for every kind of damage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kiln
from examples.models import REGISTRY
from kiln.api import CompiledModel
from kiln.errors import ArtifactError, KilnInputError
from kiln.ir.clone import clone_graph
from kiln.numerics import assert_match
from kiln.options import CompileOptions
from kiln.runtime.artifact import load_artifact, save_artifact

REPO = Path(__file__).resolve().parents[2]
OPTS = CompileOptions(debug_dir=None)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """mlp and resnet18 (small): (model, inputs, compiled, artifact path)."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for name in ("mlp", "resnet18"):
        model, inputs = REGISTRY[name]()
        compiled = kiln.compile(model, inputs)
        path = save_artifact(compiled, root / name, model_ref=f"examples.models:{name}", options=OPTS,
                             example_inputs=inputs)
        out[name] = (model, inputs, compiled, path)
    return out


@pytest.fixture
def mlp_copy(zoo, tmp_path) -> Path:
    return Path(shutil.copytree(zoo["mlp"][3], tmp_path / "mlp"))


def test_fresh_process_load_matches_eager(zoo, tmp_path):
    script = textwrap.dedent("""
        import sys, torch, kiln
        from safetensors.torch import save_file
        for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
            m = kiln.load(src)
            with torch.no_grad():
                out = m(*m.example_inputs())
            save_file({"out": out.contiguous()}, dst)
    """)
    args = []
    for name in ("mlp", "resnet18"):
        args += [str(zoo[name][3]), str(tmp_path / f"{name}.out.safetensors")]
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("mlp", "resnet18"):
        model, inputs, _, _ = zoo[name]
        with torch.no_grad():
            expected = model(*inputs)
        assert_match(load_file(tmp_path / f"{name}.out.safetensors")["out"], expected, f"{name} from artifact")


def test_artifact_layout_and_manifest(zoo):
    _, inputs, compiled, path = zoo["mlp"]
    assert sorted(p.name for p in path.iterdir()) == ["graph.kir", "inputs.safetensors", "manifest.json",
                                                     "weights.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["kiln_version"] == kiln.__version__
    assert manifest["target"] == "reference" and manifest["pipeline"] == "O1"
    assert manifest["model_ref"] == "examples.models:mlp"
    assert manifest["graph_name"] == compiled.graph.name
    assert manifest["input_types"] == ["f32[4, 32]"]
    assert sorted(manifest["files"]) == ["graph.kir", "inputs.safetensors", "weights.safetensors"]
    assert (path / "graph.kir").read_text().strip() == str(compiled.graph)
    assert set(load_file(path / "weights.safetensors")) == set(compiled.graph.weights)
    loaded = load_artifact(path)
    assert isinstance(loaded, CompiledModel)
    torch.testing.assert_close(loaded.example_inputs()[0], inputs[0], rtol=0, atol=0)
    with torch.no_grad():  # same graph, same weights and weight layouts: bit-identical results
        assert torch.equal(loaded(*inputs), compiled(*inputs))


def test_same_inputs_give_byte_identical_artifacts(zoo, tmp_path):
    model, inputs, _, first = zoo["mlp"]
    again = save_artifact(kiln.compile(model, inputs), tmp_path / "again", model_ref="examples.models:mlp",
                          options=OPTS, example_inputs=inputs)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_output_structure_and_shared_weights_roundtrip(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 6)

        def forward(self, x, ids):
            y = self.fc(x)
            return {"y": y, "rest": (y.sum(), ids + 1)}

    torch.manual_seed(0)
    model = Tied().eval()
    inputs = (torch.randn(3, 6), torch.arange(3))
    compiled = kiln.compile(model, inputs)
    # Weights that are views sharing one storage, one of them non-contiguous, must still save.
    # (the folded transpose of fc.weight is already a non-contiguous weight)
    graph = clone_graph(compiled.graph)
    (bname, b), (wname, w) = sorted(graph.weights.items(), key=lambda kv: kv[1].dim())
    assert w.shape == (6, 6) and w.stride() == (1, 6)
    base = torch.cat([w.t().reshape(-1), b]).clone()
    graph.weights[wname] = base[:36].view(6, 6).t()
    graph.weights[bname] = base[36:]
    path = save_artifact(CompiledModel(graph, compiled.compiled, compiled.out_spec), tmp_path / "tied",
                         model_ref=None, options=OPTS)
    loaded = kiln.load(path)
    assert loaded.example_inputs() is None and loaded.model_ref is None
    with torch.no_grad():
        got, want = loaded(*inputs), model(*inputs)
    assert set(got) == {"y", "rest"} and isinstance(got["rest"], tuple)
    assert_match(got, want)
    assert loaded.graph.weights[wname].stride() == (1, 6)  # the folded transpose keeps its layout
    with pytest.raises(KilnInputError, match="input 0"):
        loaded(torch.randn(2, 6), torch.arange(3))


def test_corrupted_weights_file(mlp_copy):
    weights = mlp_copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors.*corrupted"):
        load_artifact(mlp_copy)


def test_missing_files_and_directory(mlp_copy, tmp_path):
    (mlp_copy / "graph.kir").unlink()
    with pytest.raises(ArtifactError, match=r"graph\.kir: missing"):
        load_artifact(mlp_copy)
    (mlp_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing"):
        load_artifact(mlp_copy)
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        load_artifact(tmp_path / "nothing-here")


def _edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, pattern", [
    ({"format_version": 99}, "incompatible artifact format version 99"),
    ({"kiln_version": "7.0.0"}, "incompatible kiln version"),
    ({"format": "zip"}, "not a kiln artifact manifest"),
    ({"target": 3}, "field 'target' must be a str"),
    ({"files": {"weights.safetensors": "0" * 64}}, "lists no graph.kir"),
    ({"weight_strides": {"nope": [1, 4]}}, "'weight_strides' names 'nope'"),
    ({"out_spec": [1, {"type": "no.such.Type", "context": None, "children_spec": []}]}, "bad 'out_spec'"),
])
def test_tampered_manifest(mlp_copy, change, pattern):
    _edit_manifest(mlp_copy, **change)
    with pytest.raises(ArtifactError, match=pattern) as info:
        load_artifact(mlp_copy)
    assert "manifest.json" in str(info.value)


def test_tampered_hash_and_bad_json(mlp_copy):
    manifest = json.loads((mlp_copy / "manifest.json").read_text())
    manifest["files"]["graph.kir"] = "0" * 64
    (mlp_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"graph\.kir: corrupted"):
        load_artifact(mlp_copy)
    (mlp_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest\.json: not valid JSON"):
        load_artifact(mlp_copy)


def test_save_refuses_to_replace_a_non_artifact(zoo, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "keep.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not a kiln artifact"):
        save_artifact(zoo["mlp"][2], tmp_path / "src", model_ref=None, options=OPTS)
    assert (tmp_path / "src" / "keep.txt").read_text() == "precious"


def test_o2_artifact_keeps_the_weights_inside_fused_groups(tmp_path):
    model, inputs = REGISTRY["mlp"](size="small", seed=0)
    cm = kiln.compile(model, inputs, pipeline="O2")
    assert any(n.subgraph is not None and n.subgraph.weights for n in cm.graph.nodes)  # fused groups hold weights
    out = save_artifact(cm, tmp_path / "o2", model_ref=None, options=CompileOptions(pipeline="O2"),
                        example_inputs=inputs)
    with torch.no_grad():
        assert_match(load_artifact(out)(*inputs), cm(*inputs))
