"""Save and load a quantized (PT2E-converted) speech model as a self-checking artifact directory.

    from sq_plugin.backends.artifact import save, load
    save(converted, "w2v.sqa", example_inputs=(audio,), metadata={"model": "sq/wav2vec2-ref",
         "recipe": {...}}, fp_model=fp_model)
    module, meta = load("w2v.sqa", expect_model="sq/wav2vec2-ref")
    compiled, report = lower_x86(module, (audio,))             # real INT8 kernels, as for `converted`

Layout (one directory, written to a temporary sibling and moved into place with `os.replace`):

    metadata.json        format/version, model name + config, FP architecture fingerprint, per-layer
                         qparams (input scale/zero point/range, weight scale keys), op counts, the
                         x86 ISA policy it was made under and its grids, the caller's
                         metadata (recipe ...), torch/torchao versions, size + sha256 of the two
                         files below
    weights.safetensors  every tensor the graph reads: INT8 weights, per-channel scales/zero points,
                         float biases/norms; keyed by the graph's attribute names, which
                         metadata.json["layers"] maps to layer names. Open it with any safetensors tool.
    program.pt2.xz       `torch.export.save` of the converted graph re-exported with the same dynamic
                         dims, its tensors replaced by empty placeholders, xz-compressed

Why this design: `torch.export` is the format PT2E already lives in, so the loaded module is the same
q/dq aten graph that `lower_x86` lowers (no re-tracing of the FP model, no dependence on the quantizer
config or on transformers' modeling code, dynamic audio length kept as a symbolic dim). Storing the
tensors apart from the graph keeps the weights inspectable and counted once. xz shrinks the graph's
JSON ~50x; the pt2 zip stores entries uncompressed and its reader needs that, hence compressing the
whole stripped file (xz is half the size of gzip here, which matters for the 0.27x size target).
The FP32 parameters that `convert_pt2e` leaves behind unused are dropped before export: otherwise
the artifact would carry the FP weights too. `save` checks that the re-exported program reproduces
`converted` bit for bit on `example_inputs`; `load` checks sizes, checksums and tensor shapes before
building the module, so a damaged or foreign file fails with a message that names the file and the
fix instead of running garbage.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import lzma
import os
from pathlib import Path
from typing import Any

import torch

from sq_plugin.core.files import atomic_directory

FORMAT = "sq-plugin-quantized-artifact"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "weights.safetensors"
PROGRAM_FILE = "program.pt2.xz"
PLAN_FILE = "plan.json"  # the QuantPlan the graph was built from, when there is one

_LAYER_OPS = {
    torch.ops.aten.linear.default: "linear",
    torch.ops.aten.conv1d.default: "conv1d",
    torch.ops.aten.conv2d.default: "conv2d",
}


class ArtifactError(RuntimeError):
    """The artifact cannot be loaded: missing, damaged, or made for another model. The message says which
    file and how to fix it."""


# ----------------------------------------------------------------------------------------------------
# Fingerprints and per-layer qparams
# ----------------------------------------------------------------------------------------------------


def architecture_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the FP model's class and the names, shapes and dtypes of its parameters and buffers.

    Weight values are left out on purpose: a retrained checkpoint of the same architecture has the same
    fingerprint, a different architecture (other layer count, width, vocabulary) does not.
    """
    h = hashlib.sha256(type(model).__qualname__.encode())
    entries = sorted((name, tuple(t.shape), str(t.dtype)) for name, t in model.state_dict().items())
    h.update(json.dumps(entries).encode())
    return h.hexdigest()


def _graph_fingerprint(gm: torch.fx.GraphModule) -> str:
    """sha256 over the op sequence and constant shapes of a quantized graph (used when no FP model is
    passed to `save`)."""
    h = hashlib.sha256()
    for node in gm.graph.nodes:
        h.update(f"{node.op}:{node.target}".encode())
        if node.op == "get_attr":
            t = _get_attr(gm, node.target)
            if isinstance(t, torch.Tensor):
                h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
    return h.hexdigest()


def _get_attr(gm: torch.nn.Module, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def _module_name(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0].removeprefix("L['self'].")


def _scalar(x: Any) -> float | int:
    return x.item() if isinstance(x, torch.Tensor) else x


def layer_qparams(converted: torch.fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Per quantized layer of a `convert_pt2e` graph: op kind, input activation qparams and range, and
    the weight's INT8/scale/zero-point attribute names.

    {"wav2vec2.encoder.layers.0.attention.q_proj": {"op": "linear",
        "input": {"scale": s, "zero_point": z, "quant_min": 0, "quant_max": 255, "range": [lo, hi],
                  "ndim": 3},
        "weight": {"int8": "_frozen_param8", "scale": "_scale_8", "zero_point": "_zero_point_8",
                   "shape": [...], "quant_min": -128, "quant_max": 127}}, ...}
    Layers that stay float are listed with "input"/"weight" set to None. Convs also carry "groups".
    """
    layers: dict[str, dict[str, Any]] = {}
    for node in converted.graph.nodes:
        kind = _LAYER_OPS.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        name = _module_name(node) or node.name
        entry: dict[str, Any] = {"op": kind, "input": None, "weight": None}
        if kind.startswith("conv"):
            entry["groups"] = int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))
        x, w = node.args[0], node.args[1]
        if isinstance(x, torch.fx.Node) and x.op == "call_function" and "dequantize_per_tensor" in str(x.target):
            scale, zp, qmin, qmax = (_scalar(a) for a in x.args[1:5])
            # The new dq node has no meta; the layer's output has the input's rank for linear.
            val = x.meta.get("val", node.meta.get("val"))
            entry["input"] = {
                "scale": float(scale), "zero_point": int(zp), "quant_min": int(qmin), "quant_max": int(qmax),
                "range": [float((qmin - zp) * scale), float((qmax - zp) * scale)],
                "ndim": int(val.dim()) if isinstance(val, torch.Tensor) else None,
            }
        if isinstance(w, torch.fx.Node) and w.op == "call_function" and "dequantize" in str(w.target):
            q, scale, zp = w.args[0], w.args[1], w.args[2]
            keys = [a.target if isinstance(a, torch.fx.Node) and a.op == "get_attr" else None for a in (q, scale, zp)]
            qt = _get_attr(converted, keys[0]) if keys[0] else None
            entry["weight"] = {
                "int8": keys[0], "scale": keys[1], "zero_point": keys[2],
                "shape": list(qt.shape) if isinstance(qt, torch.Tensor) else None,
                "quant_min": int(_scalar(w.args[4])) if len(w.args) > 5 else None,
                "quant_max": int(_scalar(w.args[5])) if len(w.args) > 5 else None,
            }
        # A module called twice (rare) would collide: keep both under distinct keys.
        key = name if name not in layers else f"{name}#{node.name}"
        layers[key] = entry
    return layers


# ----------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------


def _prune_unused_state(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` without the parameters/buffers its graph never reads.

    `convert_pt2e` keeps each quantized layer's original FP32 weight as a dead attribute next to the
    INT8 constant; exporting it as is would store the FP32 model a second time."""
    gm = copy.deepcopy(gm)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
    return gm


def _dynamic_dims(gm: torch.fx.GraphModule, n_inputs: int) -> list[list[int]]:
    """Per user input, the dims that are symbolic in the converted graph (e.g. the audio length of an
    export made with `export_for_quantization`); they stay dynamic in the artifact."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dims: list[list[int]] = []
    for i in range(n_inputs):
        val = placeholders[i].meta.get("val") if i < len(placeholders) else None
        shape = getattr(val, "shape", ())
        dims.append([d for d, size in enumerate(shape) if not isinstance(size, int)])
    return dims


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_output(a: Any, b: Any) -> bool:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    if len(la) != len(lb):
        return False
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb, strict=True))


def _versions() -> dict[str, str]:
    import torchao

    out = {"torch": torch.__version__, "torchao": torchao.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def _config_dict(fp_model: torch.nn.Module | None, metadata: dict[str, Any]) -> dict[str, Any] | None:
    config = metadata.get("model_config")
    if config is None and fp_model is not None:
        config = getattr(fp_model, "config", None)
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _jsonable(value: Any) -> Any:
    """metadata values made JSON-safe (configs, tensors, paths): what can't be represented becomes str."""
    return json.loads(json.dumps(value, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))


def reexport_checked(converted: torch.fx.GraphModule, example_inputs: tuple, dynamic_dims: list[list[int]] | None = None
                     ) -> tuple[torch.export.ExportedProgram, torch.fx.GraphModule]:
    """`converted` with its unused state pruned (returned too), re-exported for saving with `dynamic_dims` kept
    dynamic (default: the dims symbolic in `converted`), and checked to reproduce `converted` bit for bit on
    `example_inputs`: a saved model is only useful if it is the same model, so this raises before anything is
    written."""
    from torch.export import Dim

    pruned = _prune_unused_state(converted)
    dims = dynamic_dims if dynamic_dims is not None else _dynamic_dims(converted, len(example_inputs))
    dynamic_shapes = tuple({d: Dim.AUTO for d in ds} or None for ds in dims)
    with torch.no_grad():
        program = torch.export.export(pruned, example_inputs, dynamic_shapes=dynamic_shapes)
        if not _same_output(program.module()(*example_inputs), converted(*example_inputs)):
            raise RuntimeError("the re-exported quantized program does not reproduce the model bit for bit on "
                               "example_inputs; not saving. Is the graph non-deterministic (dropout in train mode)?")
    return program, pruned


def save(converted: torch.fx.GraphModule, path: str | os.PathLike, *, example_inputs: tuple,
         metadata: dict[str, Any], fp_model: torch.nn.Module | None = None,
         dynamic_dims: list[list[int]] | None = None, plan: Any = None) -> Path:
    """Write a `convert_pt2e` output to the artifact directory `path` (replaced if it exists).

    example_inputs: inputs the graph accepts (re-export traces them; also used for the bit-for-bit check).
    metadata: JSON-able dict stored as-is under "user" (recipe, calibration set, ...). Its "model" key
        names the model (default "unknown"); "model_config" is stored as the model config (default:
        `fp_model.config`).
    fp_model: the float model that was quantized; gives the architecture fingerprint `load(expect_model=)`
        checks. Without it the fingerprint of the quantized graph is used.
    dynamic_dims: per input, dims to keep dynamic; default: those symbolic in `converted` (the audio
        length after `export_for_quantization`).
    plan: the `QuantPlan` the graph was built from; stored as plan.json (`read_plan` reads it back).
    Returns the artifact path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    dims = dynamic_dims if dynamic_dims is not None else _dynamic_dims(converted, len(example_inputs))
    program, pruned = reexport_checked(converted, tuple(example_inputs), dims)

    # Split: real tensors to safetensors, empty placeholders of the same dtype into the program.
    tensors: dict[str, torch.Tensor] = {}
    for name, value in list(program.state_dict.items()):
        tensors[name] = value.detach().contiguous().clone()
        empty = torch.empty(0, dtype=value.dtype)
        program.state_dict[name] = torch.nn.Parameter(empty, requires_grad=False) if isinstance(
            value, torch.nn.Parameter) else empty
    for name, value in list(program.constants.items()):
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous().clone()
            program.constants[name] = torch.empty(0, dtype=value.dtype)
    # Not stored: the example inputs (a 10 s clip is 640 kB of float32 that xz cannot shrink) and the
    # per-node Python stack traces (source paths, most of the graph JSON); layer names stay in
    # nn_module_stack.
    program._example_inputs = None
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    # Per-channel weight zero points are int64 (8 bytes per output channel) but all fit in int8
    # (symmetric weights: all 0): store them as int8, cast back on load (exact; 7% of the size budget).
    narrowed = [k for k, v in tensors.items()
                if v.dtype == torch.int64 and (v.numel() == 0 or (int(v.min()) >= -128 and int(v.max()) <= 127))]
    for k in narrowed:
        tensors[k] = tensors[k].to(torch.int8)

    from sq_plugin.backends.pt2e import count_quantized_ops, graph_grid_bits
    from sq_plugin.backends.x86_isa import x86_policy

    fp_fingerprint = architecture_fingerprint(fp_model) if fp_model is not None else None
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": str(metadata.get("model", "unknown")),
        "model_config": _jsonable(_config_dict(fp_model, metadata)),
        "fingerprint": fp_fingerprint or _graph_fingerprint(pruned),
        "fingerprint_kind": "fp-architecture" if fp_fingerprint else "quantized-graph",
        "graph_fingerprint": _graph_fingerprint(pruned),
        "dynamic_dims": dims,
        "example_input_shapes": [list(x.shape) for x in example_inputs],
        "op_counts": count_quantized_ops(converted),
        "layers": layer_qparams(converted),
        "int64_stored_as_int8": narrowed,
        # The CPU kind it was made on and the grids in the graph. One with 7-bit weights or activations runs
        # right on every x86 CPU; `lower_x86` refuses, naming the fix, one that this CPU's oneDNN would
        # compute wrong (W8A8 on the full grids without VNNI, an INT8 grouped conv on AMX).
        "x86_isa": {**x86_policy().to_dict(), **dict(zip(("weight_bits", "activation_bits"),
                                                            graph_grid_bits(converted), strict=True))},
        "versions": _versions(),
        "user": _jsonable({k: v for k, v in metadata.items() if k != "model_config"}),  # config stored once
        "files": {},
    }

    # Atomic: everything goes to a temporary sibling directory first, then one rename.
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / PROGRAM_FILE).write_bytes(lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME))
        if plan is not None:
            (tmp / PLAN_FILE).write_text(plan.to_json())
        for fname in (WEIGHTS_FILE, PROGRAM_FILE, *((PLAN_FILE,) if plan is not None else ())):
            meta["files"][fname] = {"bytes": (tmp / fname).stat().st_size, "sha256": _sha256(tmp / fname)}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, separators=(",", ":")))
    return path


def artifact_bytes(path: str | os.PathLike) -> int:
    """Total size of an artifact directory on disk (all files)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------

_FIX_RESAVE = ("Fix: copy the artifact again from its source, or re-create it: quantize the model "
               "(prepare_stablequant -> calibrate -> convert_pt2e) and call sq_plugin.backends.artifact.save().")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """metadata.json of an artifact, validated (clear errors for a missing or damaged file)."""
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory (an artifact is a directory written by "
                            "sq_plugin.backends.artifact.save). Fix: check the path.")
    if not meta_path.is_file():
        raise ArtifactError(f"{meta_path} is missing: {path} is not a complete artifact. {_FIX_RESAVE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{meta_path} is damaged (not valid JSON: {exc}). {_FIX_RESAVE}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path} is not sq-plugin artifact metadata (format {meta.get('format')!r} if "
                            f"it is a dict). {_FIX_RESAVE}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{meta_path}: artifact format version {meta.get('format_version')} is not supported "
                            f"by this sq-plugin (reads version {FORMAT_VERSION}). Fix: re-save it with this "
                            "version of sq_plugin.backends.artifact.save(), or load it with the version that wrote it.")
    return meta


def read_plan(path: str | os.PathLike) -> Any:
    """The `QuantPlan` stored with an artifact (None if it was saved without one); checked against the
    checksum in its metadata."""
    from sq_plugin.core.plan import QuantPlan

    path = Path(path)
    entry = read_metadata(path).get("files", {}).get(PLAN_FILE)
    if entry is None:
        return None
    _check_file(path, PLAN_FILE, entry)
    return QuantPlan.load(path / PLAN_FILE)


def _check_file(path: Path, fname: str, expected: dict[str, Any]) -> None:
    fpath = path / fname
    if not fpath.is_file():
        raise ArtifactError(f"{fpath} is missing. {_FIX_RESAVE}")
    size = fpath.stat().st_size
    if size != expected["bytes"]:
        what = "truncated" if size < expected["bytes"] else "longer than written"
        raise ArtifactError(f"{fpath} is {size} bytes but was written as {expected['bytes']} bytes: the file is "
                            f"{what} (an interrupted copy?). {_FIX_RESAVE}")
    if _sha256(fpath) != expected["sha256"]:
        raise ArtifactError(f"{fpath} is corrupted: its sha256 does not match the one in {METADATA_FILE}. "
                            f"{_FIX_RESAVE}")


def _check_expected_model(path: Path, meta: dict[str, Any], expect_model: str) -> None:
    accepted = {meta.get("model"), meta.get("fingerprint"), meta.get("graph_fingerprint")}
    if expect_model not in accepted:
        raise ArtifactError(
            f"{path / METADATA_FILE}: this artifact was made for model {meta.get('model')!r} (fingerprint "
            f"{str(meta.get('fingerprint'))[:16]}...), not for {expect_model!r}. Fix: load the artifact that was "
            f"saved for {expect_model!r}, or quantize {expect_model!r} and save a new artifact for it."
        )


def load(path: str | os.PathLike, *, expect_model: str | None = None) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """Load an artifact: returns (module, metadata).

    module: the quantized q/dq graph (a GraphModule) with the saved INT8 weights; call it like the
        converted model, or lower it with `sq_plugin.backends.pt2e.lower_x86(module, example_inputs)`.
    expect_model: a model name or architecture fingerprint (`architecture_fingerprint(fp_model)`); if
        given and the artifact was made for another model, raises ArtifactError.
    Raises ArtifactError, naming the file and the fix, for missing/truncated/corrupted files.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    if expect_model is not None:
        _check_expected_model(path, meta, expect_model)
    for fname in (WEIGHTS_FILE, PROGRAM_FILE):
        if fname not in meta.get("files", {}):
            raise ArtifactError(f"{path / METADATA_FILE} lists no {fname}. {_FIX_RESAVE}")
        _check_file(path, fname, meta["files"][fname])

    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path / WEIGHTS_FILE} cannot be read ({exc}). {_FIX_RESAVE}") from exc
    for name in meta.get("int64_stored_as_int8", []):
        if name in tensors:
            tensors[name] = tensors[name].to(torch.int64)
    # The output pytree may be a transformers ModelOutput; its class registers with pytree on import.
    if "transformers" in meta.get("versions", {}):
        import transformers.modeling_outputs  # noqa: F401
    try:
        program = torch.export.load(io.BytesIO(lzma.decompress((path / PROGRAM_FILE).read_bytes())))
    except Exception as exc:  # lzma/zip/deserialization errors come in many types
        raise ArtifactError(f"{path / PROGRAM_FILE} cannot be deserialized ({type(exc).__name__}: {exc}). If the "
                            f"artifact was written by torch {meta.get('versions', {}).get('torch')} and this is "
                            f"torch {torch.__version__}, use the writing version or re-save. {_FIX_RESAVE}") from exc

    missing = [k for k in program.state_dict if k not in tensors]
    missing += [k for k, v in program.constants.items() if isinstance(v, torch.Tensor) and k not in tensors]
    if missing:
        raise ArtifactError(f"{path / WEIGHTS_FILE} lacks {len(missing)} tensors the program needs (e.g. "
                            f"{missing[:3]}): weights and program are from different saves. {_FIX_RESAVE}")
    # Placeholder metadata carries the shape each tensor must have; a mismatch means mixed-up files.
    expected_shapes = {}
    for spec, node in zip(program.graph_signature.input_specs,
                          [n for n in program.graph.nodes if n.op == "placeholder"], strict=True):
        val = node.meta.get("val")
        if spec.target is not None and isinstance(val, torch.Tensor):
            expected_shapes[spec.target] = (tuple(val.shape), val.dtype)
    for name, (shape, dtype) in expected_shapes.items():
        t = tensors.get(name)
        if t is not None and (tuple(t.shape) != shape or t.dtype != dtype):
            raise ArtifactError(f"{path / WEIGHTS_FILE}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, the program "
                                f"expects {shape} {dtype}. {_FIX_RESAVE}")
    for name, value in list(program.state_dict.items()):
        t = tensors[name]
        program.state_dict[name] = torch.nn.Parameter(t, requires_grad=False) if isinstance(
            value, torch.nn.Parameter) else t
    for name, value in list(program.constants.items()):
        if isinstance(value, torch.Tensor):
            program.constants[name] = tensors[name]
    return program.module(), meta
