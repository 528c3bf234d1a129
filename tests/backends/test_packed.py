"""Packed mixed-precision checkpoint: bit-identical round trip, tied weights, sizes, and clear errors."""

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from sq_plugin.backends.packed import (
    FORMAT,
    METADATA_KEY,
    PLAN_FILE,
    WEIGHTS_FILE,
    PackedError,
    PackedInfo,
    fp32_nbytes,
    load_packed,
    save_packed,
)
from sq_plugin.backends.weights import quantize_weight
from sq_plugin.core.grid import x86_grids
from sq_plugin.core.plan import LayerPlan, PlanError, QuantPlan


class Tiny(nn.Module):
    """Embedding tied to the output Linear (as Whisper ties embed_tokens to proj_out), a Conv1d, a LayerNorm,
    a buffer, and a Linear the plan keeps float."""

    def __init__(self, vocab: int = 40, dim: int = 32, hidden: int = 48, *, extra_buffer: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("offset", torch.randn(dim))
        if extra_buffer:
            self.register_buffer("extra", torch.zeros(3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.norm(x + self.offset)
        x = x + self.proj(torch.relu(self.fc(x)))
        return self.head(x)


BITS = {"conv": 6, "fc": 4, "head": 3}  # proj stays float


def make_plan(bits: dict[str, int | None]) -> QuantPlan:
    ops = {"conv": "conv1d", "fc": "linear", "proj": "linear", "head": "linear"}
    layers = {}
    for name, op in ops.items():
        b = bits.get(name)
        if b is None:
            layers[name] = LayerPlan(op, why_float="keep_float")
        else:
            w_grid, a_grid = x86_grids(b, 8)
            layers[name] = LayerPlan(op, a_grid, (-2.0, 3.0), w_grid)
    return QuantPlan(layers, {"model": "tiny"})


def stored_weights(model: nn.Module, bits: dict[str, int | None]) -> dict:
    return {name: quantize_weight(model.get_submodule(name).weight, b, rule="mse")
            for name, b in bits.items() if b is not None}


def dequantized(model: nn.Module, weights: dict) -> nn.Module:
    """The reference: the original model with each quantized layer's weight replaced by its dequantized one."""
    with torch.no_grad():
        for name, stored in weights.items():
            model.get_submodule(name).weight.copy_(stored.dequantize())
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Tiny().eval()
    plan = make_plan(BITS)
    weights = stored_weights(model, BITS)
    info = save_packed(tmp_path / "tiny.sqp", model, plan, weights, metadata={"model": "tiny", "run": 3})
    return model, plan, weights, info


def test_round_trip_is_bit_identical_to_the_dequantized_model(saved):
    model, plan, weights, info = saved
    torch.manual_seed(123)
    fresh = Tiny().eval()
    assert not torch.equal(fresh.conv.bias, model.conv.bias)  # really another init
    loaded_plan, loaded = load_packed(info.path, fresh)

    reference = dequantized(model, weights)
    with torch.no_grad():
        assert torch.equal(fresh(ids()), reference(ids()))
    for key, value in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert loaded_plan.to_dict() == plan.to_dict()
    assert set(loaded) == {"conv", "fc", "head"}
    for name, stored in weights.items():
        assert loaded[name].bits == BITS[name]
        assert torch.equal(loaded[name].codes, stored.codes)
        assert torch.equal(loaded[name].scale, stored.scale)
    # the float layer comes back as it was, not quantized
    assert torch.equal(fresh.proj.weight, model.proj.weight)


def test_tied_embedding_is_not_stored_and_comes_back_as_the_dequantized_weight(saved):
    model, plan, weights, info = saved
    fresh = Tiny().eval()
    load_packed(info.path, fresh)
    assert torch.equal(fresh.embed.weight, weights["head"].dequantize())
    # still one tensor: the tie holds after loading
    assert fresh.embed.weight.data_ptr() == fresh.head.weight.data_ptr()
    with safe_open(str(info.path / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        doc = json.loads(f.metadata()[METADATA_KEY])
    assert "embed.weight" not in keys and "head.weight" not in keys
    assert keys >= {"head.weight.packed", "head.weight.scale", "conv.weight.packed", "proj.weight", "offset"}
    assert doc["tied"] == {"embed.weight": "head"}
    assert doc["format"] == FORMAT and doc["version"] == 1
    assert doc["layers"] == {"conv": {"bits": 6, "shape": [32, 32, 3]}, "fc": {"bits": 4, "shape": [48, 32]},
                             "head": {"bits": 3, "shape": [40, 32]}}
    assert doc["user"] == {"model": "tiny", "run": 3}


def test_packed_info_counts_the_bytes(saved):
    model, plan, weights, info = saved
    assert isinstance(info, PackedInfo)
    files = sorted(p.name for p in info.path.iterdir())
    assert files == [WEIGHTS_FILE, PLAN_FILE]
    assert info.bytes == sum(p.stat().st_size for p in info.path.iterdir())
    assert info.weight_bytes == sum(w.nbytes for w in weights.values())
    # 32*32*3 at 6 bits + 48*32 at 4 + 40*32 at 3, plus float32 scales
    assert info.weight_bytes == 2304 + 128 + 768 + 192 + 480 + 160
    floats = ["conv.bias", "norm.weight", "norm.bias", "fc.bias", "proj.weight", "proj.bias", "offset"]
    assert info.float_bytes == 4 * sum(model.state_dict()[k].numel() for k in floats)
    assert info.layers == 3
    params = {"conv": 32 * 32 * 3, "fc": 48 * 32, "head": 40 * 32}
    assert info.avg_bits == pytest.approx(sum(BITS[n] * p for n, p in params.items()) / sum(params.values()))
    assert 0 < info.overhead_bytes < info.bytes - info.weight_bytes


def test_fp32_nbytes_counts_tied_tensors_once():
    model = Tiny()
    per_key = {k: v.numel() for k, v in model.state_dict().items()}
    assert fp32_nbytes(model) == 4 * (sum(per_key.values()) - per_key["head.weight"])
    assert fp32_nbytes(model.half()) == fp32_nbytes(Tiny())  # float16 is counted as float32


def test_four_bits_is_under_three_tenths_of_fp32(tmp_path):
    torch.manual_seed(0)
    model = Tiny(vocab=256, dim=256, hidden=512)
    bits = {"conv": 4, "fc": 4, "proj": 4, "head": 4}
    info = save_packed(tmp_path / "w4.sqp", model, make_plan(bits), stored_weights(model, bits))
    ratio = info.bytes / fp32_nbytes(model)
    assert ratio < 0.3
    # what packing gives: ~1/8 plus scales and floats (int8 codes, or the tied embedding stored again, exceed this)
    assert ratio < 0.15
    assert info.avg_bits == 4.0
    # the weights themselves are just over 1/8 of their float32 size (the scales)
    assert info.weight_bytes < 0.13 * 4 * sum(model.get_submodule(n).weight.numel() for n in bits)


def test_loading_into_another_shape_names_the_key(saved):
    *_, info = saved
    with pytest.raises(PackedError, match=r"head\.weight: checkpoint \(40, 32\) vs model \(41, 32\).*another model"):
        load_packed(info.path, Tiny(vocab=41))
    with pytest.raises(PackedError, match=r"not in the checkpoint \(e\.g\. \['extra'\]\).*another model"):
        load_packed(info.path, Tiny(extra_buffer=True))

    class Smaller(Tiny):
        def __init__(self):
            super().__init__()
            del self.offset

    with pytest.raises(PackedError, match=r"not in the model \(e\.g\. \['offset'\]\).*another model"):
        load_packed(info.path, Smaller())


def test_save_refuses_weights_that_do_not_fit_the_plan_or_model(tmp_path):
    model = Tiny()
    plan = make_plan(BITS)
    good = stored_weights(model, BITS)
    target = tmp_path / "bad.sqp"

    with pytest.raises(ValueError, match=r"weights\['fc'\]: 8-bit codes, but the plan's weight grid for this layer "
                                         r"is 4-bit.*Fix: quantize it at 4 bits"):
        save_packed(target, model, plan, {**good, "fc": quantize_weight(model.fc.weight, 8)})
    with pytest.raises(ValueError, match=r"weights\['norm'\]: not a Linear/Conv1d layer"):
        save_packed(target, model, plan, {**good, "norm": quantize_weight(model.fc.weight, 4)})
    with pytest.raises(ValueError, match=r"weights\['fc'\]: codes have shape \(32, 48\) but the layer's weight is "
                                         r"\(48, 32\)"):
        save_packed(target, model, plan, {**good, "fc": quantize_weight(model.proj.weight, 4)})
    with pytest.raises(ValueError, match=r"weights\['proj'\]: the plan keeps this layer's weight float"):
        save_packed(target, model, plan, {**good, "proj": quantize_weight(model.proj.weight, 4)})
    without_conv = {k: v for k, v in good.items() if k != "conv"}
    with pytest.raises(ValueError, match=r"no stored weight \(e\.g\. \['conv'\]\)"):
        save_packed(target, model, plan, without_conv)
    with pytest.raises(PlanError, match="not in the plan"):
        save_packed(target, model, QuantPlan({"fc": plan.layers["fc"]}), {"fc": good["fc"]})
    assert not target.exists()


def test_load_refuses_a_plan_from_another_save(saved):
    model, plan, weights, info = saved
    # plan.json says 8 bits for fc, model.safetensors holds 4-bit codes
    make_plan({**BITS, "fc": 8}).save(info.path / PLAN_FILE)
    with pytest.raises(PlanError, match=r"'fc' is stored at 4 bits but plan.json says 8 bits"):
        load_packed(info.path, Tiny())


def test_partial_write_leaves_no_directory(tmp_path, monkeypatch):
    model = Tiny()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    target = tmp_path / "out.sqp"
    with pytest.raises(OSError, match="disk full"):
        save_packed(target, model, make_plan(BITS), stored_weights(model, BITS))
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary sibling left behind either


def test_failed_save_keeps_the_previous_checkpoint(saved, monkeypatch):
    model, plan, weights, info = saved
    before = {p.name: p.read_bytes() for p in info.path.iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_packed(info.path, model, plan, weights, metadata={"model": "other"})
    assert {p.name: p.read_bytes() for p in info.path.iterdir()} == before


def test_missing_files_wrong_format_and_newer_version_raise(saved, tmp_path):
    model, plan, weights, info = saved
    with pytest.raises(PackedError, match="no such packed checkpoint directory"):
        load_packed(tmp_path / "nowhere", Tiny())

    tensors = safetensors.torch.load_file(str(info.path / WEIGHTS_FILE))
    with safe_open(str(info.path / WEIGHTS_FILE), framework="pt") as f:
        doc = json.loads(f.metadata()[METADATA_KEY])

    def variant(name: str, document: dict | None, with_plan: bool = True):
        d = tmp_path / name
        d.mkdir()
        meta = {METADATA_KEY: json.dumps(document)} if document is not None else {"other": "x"}
        safetensors.torch.save_file(tensors, str(d / WEIGHTS_FILE), metadata=meta)
        if with_plan:
            plan.save(d / PLAN_FILE)
        return d

    with pytest.raises(PackedError, match=r"no_plan/plan\.json is missing"):
        load_packed(variant("no_plan", doc, with_plan=False), Tiny())
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    plan.save(no_weights / PLAN_FILE)
    with pytest.raises(PackedError, match=r"no_weights/model\.safetensors is missing"):
        load_packed(no_weights, Tiny())
    with pytest.raises(PackedError, match="not an sq-plugin packed checkpoint"):
        load_packed(variant("plain", None), Tiny())
    with pytest.raises(PackedError, match="format 'something-else' is not 'sq-plugin-packed'"):
        load_packed(variant("other_format", {**doc, "format": "something-else"}), Tiny())
    with pytest.raises(PackedError, match="version 2 is newer than this sq-plugin reads"):
        load_packed(variant("newer", {**doc, "version": 2}), Tiny())
    # the unchanged document loads: the variants fail for the reason named, not for the copy
    fresh = Tiny()
    load_packed(variant("same", doc), fresh)
    assert torch.equal(fresh.embed.weight, weights["head"].dequantize())
