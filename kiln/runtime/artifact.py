"""Portable compiled artifacts: ``save_artifact`` writes one, ``load_artifact`` (``kiln.load``) runs one.

Contract:
- ``save_artifact(compiled, path, *, model_ref, options, example_inputs=None, model_args=None)`` writes
  the directory ``path`` atomically (a reader sees the old artifact or the whole new one); it replaces
  an existing artifact or empty directory, and refuses (``ArtifactError``) to replace anything else:
  ``manifest.json``: format version, kiln/torch versions, target, pipeline, options (without the local
  ``debug_dir``), model ref (+ factory args), graph name, input/output types as IR text, the output
  pytree spec (``treespec_dumps`` JSON) and the sha256 of every other file;
  ``graph.kir``: ``compiled.graph`` (optimized, before partitioning) as IR text;
  ``weights.safetensors``: ``graph.weights`` by name (contiguous copies, so views save fine; the
  manifest's ``weight_strides`` restores permuted layouts such as folded transposes on load);
  ``inputs.safetensors`` (optional): example inputs named ``input_0``, ``input_1``...;
  ``kernels/NAME`` (optional): compiled code the backend offers (``CompiledGraph.artifact_files()``,
  e.g. the tvm target's kernel libraries and their metadata), so loading compiles nothing.
  The same inputs give a byte-identical directory (sorted JSON keys, no timestamps).
- ``load_artifact(path) -> LoadedModel``: checks every file's sha256 before using it, checks the format
  version and the kiln major version, parses and verifies the graph, and compiles it for the recorded
  target, handing the backend the verified ``kernels/`` directory (``options["prebuilt_dir"]``). Nothing
  is unpickled. Every problem is an ``ArtifactError`` naming the file and what is wrong.
- ``LoadedModel`` is a ``CompiledModel`` (same input checks, outputs in the model's structure) with
  ``.path``, ``.manifest``, ``.model_ref`` and ``.example_inputs()`` (the stored inputs, or None).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from kiln.api import CompiledModel
from kiln.errors import ArtifactError, KilnError, KilnInputError
from kiln.options import CompileOptions

log = logging.getLogger("kiln")

FORMAT = "kiln-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH_FILE = "graph.kir"
WEIGHTS_FILE = "weights.safetensors"
INPUTS_FILE = "inputs.safetensors"
KERNELS_DIR = "kernels"
REQUIRED_FILES = (GRAPH_FILE, WEIGHTS_FILE)
_SAFETENSORS_METADATA = {"format": "pt"}


# -- saving --------------------------------------------------------------------------------------

def save_artifact(compiled: CompiledModel, path: str | os.PathLike, *, model_ref: str | None,
                  options: CompileOptions, example_inputs: Any = None,
                  model_args: dict[str, Any] | None = None) -> Path:
    """Write ``compiled`` as an artifact directory at ``path`` (replacing it); returns the path."""
    import kiln
    from kiln.ir.printer import format_type, print_graph

    path = Path(path)
    if path.exists() and not (path / MANIFEST).is_file() and (not path.is_dir() or any(path.iterdir())):
        # atomic_dir replaces the whole directory: never throw away something that is not an artifact
        raise ArtifactError(f"{path}: exists and is not a kiln artifact; refusing to replace it")
    graph = compiled.graph
    weights = _all_weights(graph)
    files: dict[str, bytes] = {
        GRAPH_FILE: (print_graph(graph) + "\n").encode("utf-8"),
        WEIGHTS_FILE: _safetensors_bytes(_contiguous_copies(weights), WEIGHTS_FILE),
    }
    # safetensors stores dense row-major data; remember permuted layouts (e.g. constant-folded transposes,
    # IR layout "strided") so the loaded graph computes exactly what the compiled one did.
    weight_strides = {name: list(t.stride()) for name, t in sorted(weights.items())
                      if not t.is_contiguous() and _is_permuted_dense(t)}
    if example_inputs is not None:
        leaves = pytree.tree_leaves(example_inputs)
        bad = [type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)]
        if bad:
            raise KilnInputError(f"example inputs must all be tensors to be stored in an artifact; got {bad[0]}")
        named = {f"input_{i}": x for i, x in enumerate(leaves)}
        files[INPUTS_FILE] = _safetensors_bytes(_contiguous_copies(named), INPUTS_FILE)
    for name, data in sorted(compiled.compiled.artifact_files().items()):
        if not _safe_name(name):
            raise ArtifactError(f"backend file name {name!r} is not a plain file name")
        files[f"{KERNELS_DIR}/{name}"] = data

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kiln_version": kiln.__version__,
        "torch_version": torch.__version__,
        "target": options.target,
        "pipeline": options.pipeline,
        "options": _options_dict(options),
        "model_ref": model_ref,
        "model_args": dict(model_args or {}),
        "graph_name": graph.name,
        "input_names": [v.name for v in graph.inputs],
        "input_types": [format_type(v.type) for v in graph.inputs],
        "output_types": [format_type(v.type) for v in graph.outputs],
        "out_spec": _dump_spec(compiled.out_spec),
        "weight_strides": weight_strides,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    try:
        manifest_text = json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path / MANIFEST}: cannot write the manifest as JSON ({e}); "
                            "backend_options and model_args must be plain JSON values") from e

    from kiln.runtime.files import atomic_dir

    with atomic_dir(path) as tmp:
        for name, data in sorted(files.items()):
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_text(manifest_text, encoding="utf-8")
    return path


def _all_weights(graph) -> dict[str, torch.Tensor]:
    """The weights of ``graph`` and of every region inside it (fused groups hold their own), by name; the
    parser attaches them to regions by name again."""
    out: dict[str, torch.Tensor] = {}

    def walk(g) -> None:
        for name, t in g.weights.items():
            if name in out and out[name] is not t and not torch.equal(out[name], t):
                raise ArtifactError(f"weight name {name!r} names two different tensors in @{graph.name}")
            out[name] = t
        for node in g.nodes:
            if node.subgraph is not None:
                walk(node.subgraph)

    walk(graph)
    return out


def _contiguous_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous tensors and tensors sharing storage: store independent copies.
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def _safetensors_bytes(tensors: dict[str, torch.Tensor], what: str) -> bytes:
    from safetensors.torch import save

    try:
        return save(tensors, metadata=dict(_SAFETENSORS_METADATA))
    except Exception as e:  # safetensors raises ValueError/TypeError/its own errors for unsupported tensors
        raise ArtifactError(f"{what}: cannot store tensors: {type(e).__name__}: {e}") from e


def _is_permuted_dense(t: torch.Tensor) -> bool:
    """True if ``t``'s strides are a permutation of a dense (gap-free, non-overlapping) layout."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: (p[1], p[0])):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _restride(weights: dict[str, torch.Tensor], strides: Any, manifest_path: Path) -> None:
    if not isinstance(strides, dict):
        raise ArtifactError(f"{manifest_path}: 'weight_strides' must be an object")
    for name, stride in strides.items():
        t = weights.get(name)
        if t is None:
            raise ArtifactError(f"{manifest_path}: 'weight_strides' names {name!r}, which is not in "
                                f"{WEIGHTS_FILE}")
        ok = (isinstance(stride, list) and len(stride) == t.dim()
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in stride))
        if ok:
            out = torch.empty_strided(tuple(t.shape), tuple(stride), dtype=t.dtype)
            ok = _is_permuted_dense(out)
        if not ok:
            raise ArtifactError(f"{manifest_path}: bad 'weight_strides' entry for {name!r}: {stride!r}")
        weights[name] = out.copy_(t)


def _options_dict(options: CompileOptions) -> dict[str, Any]:
    # debug_dir is a local path that does not change the artifact; leaving it out keeps artifacts
    # byte-identical whether or not $KILN_DEBUG_DIR was set.
    return {"target": options.target, "pipeline": options.pipeline, "verify": options.verify,
            "check": options.check, "backend_options": options.backend_config(), "quantize": options.quantize}


def _dump_spec(spec) -> Any:
    if spec is None:
        return None
    try:
        return json.loads(pytree.treespec_dumps(spec))
    except Exception as e:
        raise ArtifactError(f"cannot store the model's output structure {spec}: {type(e).__name__}: {e}") from e


# -- loading -------------------------------------------------------------------------------------

class LoadedModel(CompiledModel):
    """A compiled model read back from an artifact directory; call it like the original model."""

    def __init__(self, path: Path, manifest: dict[str, Any], graph, compiled, out_spec,
                 inputs: dict[str, torch.Tensor] | None):
        super().__init__(graph, compiled, out_spec)
        self.path = path
        self.manifest = manifest
        self._inputs = inputs

    @property
    def model_ref(self) -> str | None:
        return self.manifest.get("model_ref")

    @property
    def model_args(self) -> dict[str, Any]:
        return dict(self.manifest.get("model_args") or {})

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def example_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """The inputs stored with the artifact (``inputs.safetensors``), or None if there are none."""
        return _input_tuple(self._inputs)

    def __repr__(self) -> str:
        return f"<LoadedModel {str(self.path)!r}: graph @{self.graph.name}, target {self.target!r}>"


def load_artifact(path: str | os.PathLike) -> LoadedModel:
    """Read, check and compile the artifact directory at ``path``."""
    import kiln
    from kiln.backends.driver import compile_graph
    from kiln.ir.parser import parse_graph
    from kiln.ir.verifier import verify

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact directory")
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory (artifacts are directories with a {MANIFEST})")
    manifest_path = path / MANIFEST
    manifest = _read_manifest(manifest_path)

    fmt_version = manifest.get("format_version")
    if manifest.get("format") != FORMAT or not isinstance(fmt_version, int) or isinstance(fmt_version, bool):
        raise ArtifactError(f"{manifest_path}: not a kiln artifact manifest (format {manifest.get('format')!r}, "
                            f"version {fmt_version!r})")
    if fmt_version != FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: incompatible artifact format version {fmt_version} "
                            f"(this kiln {kiln.__version__} reads version {FORMAT_VERSION})")
    saved_kiln = _field(manifest, "kiln_version", str, manifest_path)
    if _major(saved_kiln) != _major(kiln.__version__):
        raise ArtifactError(f"{manifest_path}: incompatible kiln version: written by kiln {saved_kiln}, "
                            f"this is kiln {kiln.__version__} (the major versions must match)")
    saved_torch = _field(manifest, "torch_version", str, manifest_path)
    if _minor(saved_torch) != _minor(torch.__version__):
        log.warning("kiln: artifact %s was written with torch %s; this is torch %s", path, saved_torch,
                    torch.__version__)

    hashes = _field(manifest, "files", dict, manifest_path)
    for name in REQUIRED_FILES:
        if name not in hashes:
            raise ArtifactError(f"{manifest_path}: the manifest lists no {name}")
    data: dict[str, bytes] = {}
    for name, digest in sorted(hashes.items()):
        if not isinstance(name, str) or not _safe_name(name.removeprefix(f"{KERNELS_DIR}/")) or name == MANIFEST:
            raise ArtifactError(f"{manifest_path}: bad file name {name!r} in 'files'")
        if not isinstance(digest, str):
            raise ArtifactError(f"{manifest_path}: bad sha256 for {name} in 'files'")
        file = path / name
        try:
            blob = file.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{file}: missing from the artifact (listed in {MANIFEST})") from None
        except OSError as e:
            raise ArtifactError(f"{file}: cannot read: {e.strerror or e}") from e
        actual = hashlib.sha256(blob).hexdigest()
        if actual != digest:
            raise ArtifactError(f"{file}: corrupted (sha256 {actual[:16]}..., the manifest says "
                                f"{digest[:16]}...)")
        data[name] = blob

    target = _field(manifest, "target", str, manifest_path)
    options = _field(manifest, "options", dict, manifest_path)
    backend_options = options.get("backend_options") or {}
    if not isinstance(backend_options, dict):
        raise ArtifactError(f"{manifest_path}: 'options.backend_options' must be an object")
    out_spec = _load_spec(manifest.get("out_spec"), manifest_path)

    weights = _load_safetensors(data[WEIGHTS_FILE], path / WEIGHTS_FILE)
    _restride(weights, manifest.get("weight_strides", {}), manifest_path)
    inputs = _load_safetensors(data[INPUTS_FILE], path / INPUTS_FILE) if INPUTS_FILE in data else None
    if inputs is not None and set(inputs) != {f"input_{i}" for i in range(len(inputs))}:
        raise ArtifactError(f"{path / INPUTS_FILE}: tensors must be named input_0, input_1, ...; "
                            f"got {sorted(inputs)}")

    graph_file = path / GRAPH_FILE
    try:
        text = data[GRAPH_FILE].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{graph_file}: not UTF-8 text: {e}") from e
    try:
        graph = parse_graph(text, weights, source=str(graph_file))
        verify(graph)
    except KilnError as e:
        raise ArtifactError(f"{graph_file}: invalid graph: {e}") from e
    if out_spec is not None and out_spec.num_leaves != len(graph.outputs):
        raise ArtifactError(f"{manifest_path}: 'out_spec' has {out_spec.num_leaves} leaves but the graph "
                            f"has {len(graph.outputs)} outputs")
    graph.meta["out_spec"] = out_spec
    if any(name.startswith(f"{KERNELS_DIR}/") for name in hashes):
        backend_options = {**backend_options, "prebuilt_dir": str(path / KERNELS_DIR)}
    try:
        compiled = compile_graph(graph, target, backend_options, example_inputs=_input_tuple(inputs))
    except KilnError as e:
        raise ArtifactError(f"{path}: cannot compile the artifact's graph for target {target!r}: {e}") from e
    return LoadedModel(path, manifest, graph, compiled, out_spec, inputs)


def _safe_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _input_tuple(inputs: dict[str, torch.Tensor] | None) -> tuple | None:
    return None if inputs is None else tuple(inputs[f"input_{i}"] for i in range(len(inputs)))


def _read_manifest(manifest_path: Path) -> dict[str, Any]:
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{manifest_path}: missing (not a kiln artifact directory?)") from None
    except OSError as e:
        raise ArtifactError(f"{manifest_path}: cannot read: {e.strerror or e}") from e
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def _field(manifest: dict[str, Any], key: str, kind: type, manifest_path: Path):
    value = manifest.get(key)
    if not isinstance(value, kind):
        got = "missing" if key not in manifest else f"a {type(value).__name__}"
        raise ArtifactError(f"{manifest_path}: field {key!r} must be a {kind.__name__}, it is {got}")
    return value


def _load_spec(spec: Any, manifest_path: Path):
    if spec is None:
        return None
    try:
        return pytree.treespec_loads(json.dumps(spec))
    except Exception as e:
        raise ArtifactError(f"{manifest_path}: bad 'out_spec': {type(e).__name__}: {e}") from e


def _load_safetensors(blob: bytes, file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(blob)
    except Exception as e:  # safetensors raises its own SafetensorError for malformed files
        raise ArtifactError(f"{file}: not a valid safetensors file: {e}") from e


def _major(version: str) -> str:
    return version.split("+")[0].split(".")[0]


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


__all__ = ["FORMAT_VERSION", "LoadedModel", "load_artifact", "save_artifact"]
