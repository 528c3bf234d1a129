"""The compressed checkpoint of a mixed-precision model: saving is plan + weights.

    from sq_plugin.backends.packed import fp32_nbytes, load_packed, save_packed
    from sq_plugin.backends.weights import quantize_weight

    weights = {name: quantize_weight(layers[name].weight, plan.layers[name].weight.bits, rule="mse")
               for name in plan.quantized if plan.layers[name].weight is not None}
    info = save_packed("w2v.sqp", model, plan, weights, metadata={"model": "sq/wav2vec2-ref"})
    print(info.bytes / fp32_nbytes(model), info.avg_bits)          # e.g. 0.16x at 4.3 bits on average

    fresh = Wav2Vec2ForCTC(config)                                 # same class and config, any init
    plan, weights = load_packed("w2v.sqp", fresh)                  # fresh now holds the dequantized weights

Layout (one directory, written to a temporary sibling and moved into place: `core.files.atomic_directory`):

    plan.json           the QuantPlan (`QuantPlan.save` format): grids, ranges, widths, why-float
    model.safetensors   per quantized layer `<name>.weight.packed` (uint8, the codes packed at the layer's
                        width by `core.packing.pack_codes`) and `<name>.weight.scale` (float32, one per
                        output channel); every other state_dict entry as it is (biases, norms, embeddings,
                        float layers, buffers). The safetensors metadata holds one JSON document under
                        `METADATA_KEY`: format, version, per quantized layer {bits, shape}, the tied map
                        and the caller's metadata.

Why this design: a mixed-precision plan gives each layer its own width (2-8 bits) and, at 2-6 bits, a
clipped or learned step size that no backend observer can re-derive from float weights, so the codes and
scales themselves are what is stored; the plan says how activations are quantized. Packing at the real
width is what makes the size follow the plan (a 4-bit layer takes half the bytes of an 8-bit one).
Tensors tied to a quantized weight (Whisper's `model.decoder.embed_tokens.weight` is `proj_out.weight`)
are not stored a second time: `tied` maps each alias to its layer and `load_packed` restores it from the
dequantized weight, so the tie holds after loading as it did before. Float entries tied to each other are
stored once as well (`aliases`). The checkpoint holds no code and no graph: it loads into the model class
it was saved from, which `load_packed` checks key by key and shape by shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sq_plugin.backends.simulate import quantizable_layers
from sq_plugin.backends.weights import StoredWeight
from sq_plugin.core.files import atomic_directory
from sq_plugin.core.packing import pack_codes, unpack_codes
from sq_plugin.core.plan import PlanError, QuantPlan

FORMAT = "sq-plugin-packed"
FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
METADATA_KEY = "sq_plugin_packed"  # the one safetensors metadata entry; its value is the JSON document
PACKED_SUFFIX = ".weight.packed"
SCALE_SUFFIX = ".weight.scale"

_FIX_RESAVE = ("Fix: save it again with sq_plugin.backends.packed.save_packed(path, model, plan, weights), "
               "or copy the checkpoint again from its source.")
_FIX_MODEL = ("the checkpoint was made for another model. Fix: load it into a model of the class and config it "
              "was saved from, or save a packed checkpoint for this model.")


class PackedError(ValueError):
    """A packed checkpoint that cannot be loaded (missing files, another format or version, or made for another
    model); the message names the file or key and the fix."""


@dataclass(frozen=True)
class PackedInfo:
    """What `save_packed` wrote.

    bytes: all files of the directory on disk. weight_bytes: packed codes + scales of the quantized layers
    (the sum of their `StoredWeight.nbytes`). float_bytes: the tensors stored as they are (biases, norms,
    float layers, buffers). The remainder, `overhead_bytes`, is the safetensors header and plan.json.
    avg_bits: the quantized weights' mean width, weighted by parameter count (0.0 when none is quantized).
    """

    path: Path
    bytes: int
    weight_bytes: int
    float_bytes: int
    layers: int
    avg_bits: float

    @property
    def overhead_bytes(self) -> int:
        return self.bytes - self.weight_bytes - self.float_bytes


# ----------------------------------------------------------------------------------------------------
# Storage identity: which state_dict entries are the same tensor
# ----------------------------------------------------------------------------------------------------


def _view_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Identity of the memory a tensor reads: equal keys mean one tensor under two names (a tie). None for an
    empty tensor (nothing to share) or one without storage (meta)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype)


def _storage_ptr(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def fp32_nbytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state_dict as float32 (floating tensors at 4 bytes per value, others at their own
    size), counting tensors that share storage (tied weights) once: the baseline the compression ratio of a
    packed checkpoint is measured against, so a tie the checkpoint does not repeat is not counted as saved."""
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for t in model.state_dict(keep_vars=False).values():
        key = _view_key(t)
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


# ----------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------


def _check_weights(model: torch.nn.Module, plan: QuantPlan, weights: Mapping[str, StoredWeight],
                   layers: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    model_name = type(model).__name__
    plan.check_layers(layers, model=model_name)
    for name, stored in weights.items():
        if name not in layers:
            raise ValueError(f"weights[{name!r}]: not a Linear/Conv1d layer of this {model_name} (its layers: "
                             f"{list(layers)[:3]}...). Fix: key the stored weights by the model's module names.")
        if not isinstance(stored, StoredWeight):
            raise ValueError(f"weights[{name!r}]: expected a StoredWeight (sq_plugin.backends.weights."
                             f"quantize_weight), got {type(stored).__name__}")
        if f"{name}.weight" not in state:
            raise ValueError(f"weights[{name!r}]: {name}.weight is not in the model's state_dict (a parametrized "
                             "weight, e.g. weight norm?). Fix: fold it first (sq_plugin.backends.pt2e."
                             "strip_weight_norm), then quantize the folded weight.")
        shape = tuple(layers[name].weight.shape)
        if tuple(stored.codes.shape) != shape:
            raise ValueError(f"weights[{name!r}]: codes have shape {tuple(stored.codes.shape)} but the layer's "
                             f"weight is {shape}. Fix: quantize this model's own {name}.weight.")
        grid = plan.layers[name].weight
        if grid is None:
            raise ValueError(f"weights[{name!r}]: the plan keeps this layer's weight float "
                             f"({plan.layers[name].why_float or 'no weight grid'}), but a {stored.bits}-bit weight "
                             "was given. Fix: drop it from weights, or give the layer a weight grid in the plan.")
        if stored.bits != grid.bits:
            raise ValueError(f"weights[{name!r}]: {stored.bits}-bit codes, but the plan's weight grid for this "
                             f"layer is {grid.bits}-bit ({grid.describe()}). Fix: quantize it at {grid.bits} bits, "
                             "or change the plan.")
    missing = [n for n, layer in plan.layers.items() if layer.weight is not None and n not in weights]
    if missing:
        raise ValueError(f"the plan quantizes the weights of {len(missing)} layer(s) that have no stored weight "
                         f"(e.g. {missing[:3]}). Fix: pass quantize_weight(...) of each of them in weights, or "
                         "mark them float in the plan.")


def save_packed(path: str | os.PathLike, model: torch.nn.Module, plan: QuantPlan,
                weights: Mapping[str, StoredWeight], *, metadata: dict[str, Any] | None = None) -> PackedInfo:
    """Write `model` as a packed checkpoint directory at `path` (replaced if it exists; atomic).

    weights: per quantized layer (module name of a Linear/Conv1d), its codes and scales, at the width of the
        plan's weight grid for that layer; every layer the plan gives a weight grid must have one.
    metadata: JSON-able dict stored under "user" (model name, recipe, ...).
    The model's own float weights of the quantized layers are not stored (nor are tensors tied to them):
    loading gives each `stored.dequantize()`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    layers = quantizable_layers(model)
    state = model.state_dict()
    _check_weights(model, plan, weights, layers, state)

    quantized_keys = {f"{name}.weight": name for name in weights}
    by_view = {_view_key(state[key]): name for key, name in quantized_keys.items()}
    by_storage = {_storage_ptr(state[key]): name for key, name in quantized_keys.items()}
    by_view.pop(None, None)
    by_storage.pop(None, None)

    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    aliases: dict[str, str] = {}
    float_views: dict[tuple[Any, ...], str] = {}
    float_bytes = 0
    for key, t in state.items():
        if key in quantized_keys:
            continue
        view = _view_key(t)
        if view is not None and view in by_view:
            tied[key] = by_view[view]
            continue
        if view is not None and _storage_ptr(t) in by_storage:
            # Part of a quantized weight's memory under another shape: it can be neither stored apart (it
            # would disagree with the dequantized weight) nor restored from it.
            raise ValueError(f"state_dict entry {key!r} shares memory with layer {by_storage[_storage_ptr(t)]!r}'s "
                             f"weight but is another view of it (shape {tuple(t.shape)}). Fix: untie it, or keep "
                             "that layer float in the plan.")
        if view is not None and view in float_views:
            aliases[key] = float_views[view]
            continue
        if view is not None:
            float_views[view] = key
        # A fresh contiguous CPU copy: safetensors refuses tensors that share memory or are not contiguous.
        tensors[key] = t.detach().to("cpu", copy=True).contiguous()
        float_bytes += tensors[key].numel() * tensors[key].element_size()

    layer_meta: dict[str, dict[str, Any]] = {}
    weight_bytes = 0
    weighted_bits = 0
    params = 0
    for name, stored in weights.items():
        codes = stored.codes.detach().cpu()
        tensors[name + PACKED_SUFFIX] = torch.from_numpy(pack_codes(codes.numpy(), stored.bits))
        tensors[name + SCALE_SUFFIX] = stored.scale.detach().to("cpu", torch.float32, copy=True).contiguous()
        layer_meta[name] = {"bits": int(stored.bits), "shape": [int(s) for s in codes.shape]}
        weight_bytes += stored.nbytes
        weighted_bits += stored.bits * codes.numel()
        params += codes.numel()

    document = {"format": FORMAT, "version": FORMAT_VERSION, "layers": layer_meta, "tied": tied,
                "aliases": aliases, "user": metadata or {}}
    try:
        text = json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata is not JSON-serialisable ({exc}). Fix: pass plain str/int/float/list/dict "
                         "values (e.g. config.to_dict() rather than the config).") from None

    with atomic_directory(path) as tmp:
        (tmp / PLAN_FILE).write_text(plan.to_json())
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={METADATA_KEY: text})
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return PackedInfo(path=path, bytes=total, weight_bytes=weight_bytes, float_bytes=float_bytes,
                      layers=len(weights), avg_bits=weighted_bits / params if params else 0.0)


# ----------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------


def packed_size(model: torch.nn.Module, plan: QuantPlan, weights: Mapping[str, StoredWeight]) -> PackedInfo:
    """What `save_packed` would write, measured by writing it to a temporary directory (removed after): the
    size a report quotes is bytes on disk, not an estimate."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return save_packed(Path(tmp) / "packed", model, plan, weights)


def _read_document(file: Path, meta: dict[str, str] | None) -> dict[str, Any]:
    text = (meta or {}).get(METADATA_KEY)
    if text is None:
        raise PackedError(f"{file}: not an sq-plugin packed checkpoint (its safetensors metadata has no "
                          f"{METADATA_KEY!r} entry). {_FIX_RESAVE}")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise PackedError(f"{file}: the {METADATA_KEY!r} metadata is not valid JSON ({exc}). {_FIX_RESAVE}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise PackedError(f"{file}: format {found!r} is not {FORMAT!r}. {_FIX_RESAVE}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise PackedError(f"{file}: packed format version {version!r} is newer than this sq-plugin reads "
                          f"({FORMAT_VERSION}). Fix: upgrade sq-plugin, or re-save it with this version.")
    for key in ("layers", "tied", "aliases"):
        if not isinstance(doc.get(key, {}), dict):
            raise PackedError(f"{file}: metadata {key!r} must be a mapping. {_FIX_RESAVE}")
    return doc


def _key_problems(expected: Mapping[str, tuple[int, ...]], provided: Mapping[str, tuple[int, ...]]) -> list[str]:
    missing = [k for k in expected if k not in provided]
    unexpected = [k for k in provided if k not in expected]
    mismatched = [f"{k}: checkpoint {provided[k]} vs model {expected[k]}" for k in expected
                  if k in provided and tuple(provided[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} key(s) of the model are not in the checkpoint (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) of the checkpoint are not in the model (e.g. {unexpected[:3]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (e.g. {'; '.join(mismatched[:3])})")
    return problems


def load_packed(path: str | os.PathLike, model: torch.nn.Module) -> tuple[QuantPlan, dict[str, StoredWeight]]:
    """Load a packed checkpoint into `model`, in place: the float entries as stored, each quantized layer's
    weight (and any tensor tied to it) as `stored.dequantize()`. Returns (plan, stored weights by layer).

    Raises PackedError for a missing or foreign directory, another format or a newer version, and for a
    checkpoint made for another model (missing/unexpected keys, shape mismatches: named). A plan.json that
    disagrees with model.safetensors or with the model's layers raises PlanError; both are ValueErrors.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_dir():
        raise PackedError(f"{path}: no such packed checkpoint directory (save_packed writes a directory with "
                          f"{PLAN_FILE} and {WEIGHTS_FILE}). Fix: check the path.")
    for fname in (PLAN_FILE, WEIGHTS_FILE):
        if not (path / fname).is_file():
            raise PackedError(f"{path / fname} is missing: {path} is not a complete packed checkpoint. {_FIX_RESAVE}")
    file = path / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            doc = _read_document(file, f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise PackedError(f"{file} cannot be read ({exc}). {_FIX_RESAVE}") from None
    plan = QuantPlan.load(path / PLAN_FILE)

    layer_meta: dict[str, Any] = doc["layers"]
    tied: dict[str, str] = doc.get("tied", {})
    aliases: dict[str, str] = doc.get("aliases", {})
    stored_keys = {k for name in layer_meta for k in (name + PACKED_SUFFIX, name + SCALE_SUFFIX)}
    lacking = sorted(stored_keys - set(tensors))
    if lacking:
        raise PackedError(f"{file} lacks {len(lacking)} tensor(s) its metadata lists (e.g. {lacking[:3]}). "
                          f"{_FIX_RESAVE}")
    float_tensors = {k: t for k, t in tensors.items() if k not in stored_keys}
    for alias, target in {**tied, **aliases}.items():
        if target not in (layer_meta if alias in tied else float_tensors):
            raise PackedError(f"{file}: {alias!r} is tied to {target!r}, which the checkpoint does not hold. "
                              f"{_FIX_RESAVE}")

    # Every key the checkpoint provides, with its shape, against the model's state_dict.
    provided: dict[str, tuple[int, ...]] = {k: tuple(t.shape) for k, t in float_tensors.items()}
    for name, entry in layer_meta.items():
        provided[f"{name}.weight"] = tuple(int(s) for s in entry["shape"])
    provided.update({a: provided[t] for a, t in aliases.items()})
    provided.update({a: provided[f"{t}.weight"] for a, t in tied.items()})
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    problems = _key_problems(expected, provided)
    if problems:
        raise PackedError(f"{file}: " + "; ".join(problems) + f"; {_FIX_MODEL}")
    layers = quantizable_layers(model)
    try:
        plan.check_layers(layers, model=type(model).__name__)
    except PlanError as exc:
        raise PlanError(f"{path / PLAN_FILE}: {exc}") from None

    weights: dict[str, StoredWeight] = {}
    for name, entry in layer_meta.items():
        bits, shape = int(entry["bits"]), tuple(int(s) for s in entry["shape"])
        if name not in layers:
            raise PackedError(f"{file}: {name!r} is stored quantized but is not a Linear/Conv1d of this "
                              f"{type(model).__name__}; {_FIX_MODEL}")
        grid = plan.layers[name].weight
        if grid is None or grid.bits != bits:
            raise PlanError(f"{path}: {name!r} is stored at {bits} bits but {PLAN_FILE} says "
                            f"{'float' if grid is None else f'{grid.bits} bits'}: the two files are from different "
                            f"saves. {_FIX_RESAVE}")
        count = 1
        for s in shape:
            count *= s
        try:
            codes = unpack_codes(tensors[name + PACKED_SUFFIX].numpy(), bits, count).reshape(shape)
            weights[name] = StoredWeight(torch.from_numpy(codes.copy()), tensors[name + SCALE_SUFFIX].float(), bits)
        except ValueError as exc:
            raise PackedError(f"{file}: {name + PACKED_SUFFIX!r} / {name + SCALE_SUFFIX!r} do not hold a {bits}-bit "
                              f"weight of shape {shape} ({exc}). {_FIX_RESAVE}") from None
    missing = [n for n, layer in plan.layers.items() if layer.weight is not None and n not in weights]
    if missing:
        raise PlanError(f"{path / PLAN_FILE} quantizes {len(missing)} layer weight(s) that {WEIGHTS_FILE} does not "
                        f"store quantized (e.g. {missing[:3]}): the two files are from different saves. {_FIX_RESAVE}")

    state: dict[str, torch.Tensor] = dict(float_tensors)
    for name, stored in weights.items():
        state[f"{name}.weight"] = stored.dequantize()
    state.update({a: state[t] for a, t in aliases.items()})
    state.update({a: state[f"{t}.weight"] for a, t in tied.items()})
    model.load_state_dict(state, strict=True)
    return plan, weights


__all__ = ["FORMAT", "FORMAT_VERSION", "METADATA_KEY", "PLAN_FILE", "WEIGHTS_FILE", "PackedError", "PackedInfo",
           "fp32_nbytes", "load_packed", "packed_size", "save_packed"]
