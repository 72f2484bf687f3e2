"""``kiln bisect``: deliberately broken passes in a test pipeline are named, and the reproducer reruns
just that pass (in a fresh process) and still fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kiln.bisect import IMPORT, bisect_pipeline, write_reproducer
from kiln.cli import load_plugin, main
from kiln.frontend.export import from_export
from kiln.ir.ops import aten

REPO = Path(__file__).resolve().parents[1]

BROKEN_PASSES = textwrap.dedent('''
    """Deliberately broken passes for the bisect tests."""
    from dataclasses import dataclass

    from kiln.ir.ops import aten
    from kiln.ir.rewrite import pattern
    from kiln.ir.types import TensorType
    from kiln.passes.base import Pass, PassResult, RewritePass, register_pass


    @register_pass("test-add-to-sub")
    @dataclass(frozen=True)
    class AddToSub(RewritePass):
        """Wrong on purpose: a + b -> a - b."""

        @pattern(aten.add.Tensor)
        def flip(self, node, rw):
            a, b = node.args[:2]
            rw.replace_node(node, [rw.call(aten.sub.Tensor, a, b)])
            return True


    @register_pass("test-raise")
    class Raises(Pass):
        def run(self, graph, ctx):
            raise RuntimeError("this pass always crashes")


    @register_pass("test-bad-type")
    class BadType(Pass):
        """Leaves a declared type that the op does not produce."""

        def run(self, graph, ctx):
            node = graph.find(aten.relu)[0]
            t = node.output.type
            node.output.type = TensorType((1,) * t.rank, t.dtype)
            return PassResult(changed=True)
''')


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x)) + x


def make_tiny():
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(3, 8),)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "broken_passes.py"
    path.write_text(BROKEN_PASSES)
    load_plugin(str(path))  # registers the passes in this process, as `kiln --plugin` does
    models = path.parent / "tiny_model.py"
    models.write_text("import torch\n\n" + textwrap.dedent(_tiny_source()))
    return path


def _tiny_source() -> str:
    import inspect

    return inspect.getsource(Tiny) + "\n\n" + inspect.getsource(make_tiny)


def _bisect(passes, scale=1.0):
    model, inputs = make_tiny()
    with torch.no_grad():
        expected = model(*inputs)
    return bisect_pipeline(from_export(model, inputs), inputs, expected, passes, scale)


def test_names_the_pass_that_changes_results(plugin):
    result = _bisect(["canonicalize", "cse", "test-add-to-sub", "dce"])
    assert (result.culprit, result.index, result.kind, result.checked) == ("test-add-to-sub", 2, "numerics", 3)
    assert "not close" in result.message
    assert result.before.find(aten.add) and not result.before.find(aten.sub)  # the IR the pass received


def test_clean_pipeline_has_no_culprit(plugin):
    result = _bisect(["canonicalize", "constant-fold", "cse", "dce"])
    assert result.culprit is None and result.checked == 4


@pytest.mark.parametrize("bad, kind, words", [("test-raise", "error", "always crashes"),
                                              ("test-bad-type", "verify", "invalid IR")])
def test_crashing_and_ir_breaking_passes(plugin, bad, kind, words):
    result = _bisect(["cse", bad, "test-add-to-sub"])
    assert (result.culprit, result.kind, result.index) == (bad, kind, 1)
    assert words in result.message


def test_mismatch_before_any_pass_is_the_import():
    model, inputs = make_tiny()
    with torch.no_grad():
        wrong = model(*inputs) + 1.0
    result = bisect_pipeline(from_export(model, inputs), inputs, wrong, ["cse"])
    assert (result.culprit, result.index, result.checked) == (IMPORT, -1, 0)


def test_reproducer_reruns_just_that_pass_in_a_fresh_process(plugin, tmp_path):
    result = _bisect(["canonicalize", "constant-fold", "test-add-to-sub"])
    out = write_reproducer(result, tmp_path / "repro", plugins=[str(plugin)], model_ref="tiny")
    assert sorted(p.name for p in out.iterdir()) == [
        "before.kir", "bisect.json", "expected.safetensors", "inputs.safetensors", "repro.py", "weights.safetensors"]
    info = json.loads((out / "bisect.json").read_text())
    assert info["pass"] == "test-add-to-sub" and info["index"] == 2 and info["kind"] == "numerics"
    assert info["weight_strides"]  # constant-fold pre-transposed the Linear weight: a permuted layout
    assert "aten.add.Tensor" in (out / "before.kir").read_text()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(out / "repro.py")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "pass 'test-add-to-sub' still breaks the graph (numerics)" in proc.stdout

    # the same directory is replaced by the next reproducer; anything else is refused
    write_reproducer(_bisect(["test-raise"]), out, plugins=[str(plugin)])
    assert json.loads((out / "bisect.json").read_text())["pass"] == "test-raise"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="not a kiln bisect reproducer"):
        write_reproducer(result, tmp_path / "other")


def test_cli_bisect_exit_codes(plugin, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_ref = f"{plugin.parent / 'tiny_model.py'}:make_tiny"
    out = tmp_path / "found"
    rc = main(["bisect", model_ref, "--plugin", str(plugin), "-O", "O1,test-add-to-sub,dce", "-o", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 1, stdout
    assert "first bad pass: test-add-to-sub (#4)" in stdout and (out / "repro.py").is_file()
    assert main(["bisect", model_ref, "-O", "O1", "-o", str(tmp_path / "none")]) == 0
    assert "no pass changed the outputs beyond tolerance" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()
    assert main(["bisect", model_ref, "-O", "O1,no-such-pass"]) == 2
    assert "unknown pass or pipeline 'no-such-pass'" in capsys.readouterr().err
