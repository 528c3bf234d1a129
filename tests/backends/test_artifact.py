"""Quantized artifact: bit-for-bit round trip, dynamic length, size, and clear errors for bad files."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from sq_plugin.backends.artifact import (
    METADATA_FILE,
    PROGRAM_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    architecture_fingerprint,
    artifact_bytes,
    layer_qparams,
    load,
    read_metadata,
    save,
)
from sq_plugin.backends.pt2e import calibrate, count_quantized_ops, lower_x86, prepare_stablequant, strip_weight_norm
from sq_plugin.backends.x86_isa import x86_policy


def audio(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, generator=g) * 0.1


def quantize(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    prepared = prepare_stablequant(model, (x,))
    calibrate(prepared, [x, audio(12000, 5)])
    return convert_pt2e(prepared)


@pytest.fixture(scope="module")
def saved_hubert(tmp_path_factory):
    """Quantized + saved once per module (the `tiny_hubert` fixture's model; fixtures of function scope
    cannot feed a module-scoped one, so it is built from the same config)."""
    from transformers import HubertForCTC

    from tests.conftest import tiny_ctc_config

    torch.manual_seed(0)
    model = strip_weight_norm(HubertForCTC(tiny_ctc_config("hubert", stable=True)).eval())
    x = audio(8000, 0)
    converted = quantize(model, x)
    path = save(converted, tmp_path_factory.mktemp("art") / "hubert.sqa", example_inputs=(x,), fp_model=model,
                metadata={"model": "tiny-hubert", "recipe": {"method": "percentile_then_mse"}})
    return converted, path, model


@pytest.fixture
def hubert_artifact(saved_hubert, tmp_path):
    """A private copy of the saved artifact, which the test may damage."""
    converted, path, model = saved_hubert
    copy = shutil.copytree(path, tmp_path / "hubert.sqa")
    return converted, copy, model


def test_round_trip_is_bit_for_bit_and_keeps_dynamic_length(hubert_artifact):
    converted, path, model = hubert_artifact
    loaded, meta = load(path, expect_model="tiny-hubert")
    with torch.no_grad():
        for n, seed in ((8000, 0), (23456, 1), (5000, 2)):  # the saved length and two others
            x = audio(n, seed)
            assert torch.equal(loaded(x).logits, converted(x).logits)
    assert meta["dynamic_dims"] == [[1]]
    assert count_quantized_ops(loaded) == count_quantized_ops(converted) == meta["op_counts"]


def test_metadata_records_model_qparams_versions_and_recipe(hubert_artifact):
    converted, path, model = hubert_artifact
    meta = read_metadata(path)
    assert meta["model"] == "tiny-hubert"
    assert meta["fingerprint"] == architecture_fingerprint(model)
    assert meta["model_config"]["hidden_size"] == 64
    assert meta["user"]["recipe"] == {"method": "percentile_then_mse"}
    assert set(meta["versions"]) >= {"torch", "torchao"}
    layer = meta["layers"]["hubert.encoder.layers.0.attention.q_proj"]
    lo, hi = layer["input"]["range"]
    # weights on -128..127 where oneDNN sums in int32 (VNNI/AMX), on -64..63 without VNNI (sq_plugin.backends.x86_isa)
    policy = x86_policy()
    assert lo < 0 < hi and layer["input"]["quant_max"] == 255
    assert layer["weight"]["quant_min"] == (-128 if policy.int32_accumulation else -64)
    assert meta["x86_isa"]["kind"] == policy.kind
    assert meta["x86_isa"]["weight_bits"] == (8 if policy.int32_accumulation else 7)
    assert meta["x86_isa"]["activation_bits"] == 8
    # Every quantized layer's INT8 weight is stored, as int8, in the safetensors file.

    tensors = load_file(str(path / WEIGHTS_FILE))
    weights = [entry["weight"] for entry in meta["layers"].values() if entry["weight"]]
    assert len(weights) == sum(v for k, v in count_quantized_ops(converted).items() if not k.endswith("_float"))
    assert all(tensors[w["int8"]].dtype == torch.int8 for w in weights)
    assert all(tensors[w["scale"]].dtype == torch.float32 for w in weights)


def test_size_no_fp32_copy_of_quantized_weights(hubert_artifact):
    _, path, model = hubert_artifact
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    weights = (path / WEIGHTS_FILE).stat().st_size
    meta, tensors = read_metadata(path), load_file(str(path / WEIGHTS_FILE))
    n_int8 = sum(tensors[e["weight"]["int8"]].numel() for e in meta["layers"].values() if e["weight"])
    # 1 byte per quantized weight (+ per-channel scales), 4 for every other parameter: a stored FP32
    # copy of the quantized weights would add 4 bytes each. (On AMX CPUs the positional conv stays float.)
    assert n_int8 > 0.5 * fp32 / 4
    assert weights < (fp32 - 4 * n_int8) + 1.25 * n_int8 + 8192
    # The graph and metadata are a fixed ~25 kB here; on the shipped refs the total is <= 0.27x
    # (benchmarks/results/size.json).
    assert artifact_bytes(path) < 0.6 * fp32


def test_save_replaces_an_existing_artifact_atomically(hubert_artifact, tmp_path):
    converted, path, _ = hubert_artifact
    x = audio(8000, 0)
    save(converted, path, example_inputs=(x,), metadata={"model": "second"})
    assert read_metadata(path)["model"] == "second"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_wrong_model_is_a_clear_error(hubert_artifact, tiny_wav2vec2):
    _, path, _ = hubert_artifact
    with pytest.raises(ArtifactError, match=r"made for model 'tiny-hubert'.*not for 'sq/wav2vec2-ref'.*Fix"):
        load(path, expect_model="sq/wav2vec2-ref")
    with pytest.raises(ArtifactError, match=r"metadata\.json.*made for model 'tiny-hubert'"):
        load(path, expect_model=architecture_fingerprint(tiny_wav2vec2))


@pytest.mark.parametrize("fname", [WEIGHTS_FILE, PROGRAM_FILE])
def test_truncated_file_is_a_clear_error(hubert_artifact, fname):
    _, path, _ = hubert_artifact
    data = (path / fname).read_bytes()
    (path / fname).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"{fname} is \d+ bytes but was written as \d+ bytes.*truncated.*Fix"):
        load(path)


def test_corrupted_bytes_are_a_clear_error(hubert_artifact):
    _, path, _ = hubert_artifact
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF  # same size, one flipped weight byte
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors is corrupted.*sha256.*Fix"):
        load(path)


def test_damaged_or_missing_metadata_is_a_clear_error(hubert_artifact, tmp_path):
    _, path, _ = hubert_artifact
    text = (path / METADATA_FILE).read_text()
    (path / METADATA_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match=r"metadata\.json is damaged.*Fix"):
        load(path)
    (path / METADATA_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"metadata\.json is missing.*Fix"):
        load(path)
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        load(tmp_path / "nope")


def test_weights_from_another_save_are_rejected(hubert_artifact, tmp_path):
    _, path, _ = hubert_artifact
    torch.manual_seed(0)
    x = audio(4000, 0)
    other = save(quantize(_ConvLinear().eval(), x), tmp_path / "small.sqa", example_inputs=(x,),
                 metadata={"model": "small"})
    # Swap the weights file and fix up the checksum, as a careless manual copy would.
    shutil.copy(other / WEIGHTS_FILE, path / WEIGHTS_FILE)
    meta = json.loads((path / METADATA_FILE).read_text())
    meta["files"][WEIGHTS_FILE] = json.loads((other / METADATA_FILE).read_text())["files"][WEIGHTS_FILE]
    (path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors.*(lacks|expects).*Fix"):
        load(path)


class _ConvLinear(torch.nn.Module):
    """Smallest CTC-like net (Conv1d front end, Linear head): lowers in seconds, unlike a transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 16, kernel_size=10, stride=5)
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.conv(x[:, None, :]))
        return self.fc(h.transpose(1, 2))


def test_lowered_loaded_module_equals_lowered_original(tmp_path):
    torch.manual_seed(0)
    model = _ConvLinear().eval()
    x = audio(4000, 0)
    converted = quantize(model, x)
    path = save(converted, tmp_path / "small.sqa", example_inputs=(x,), metadata={"model": "small"}, fp_model=model)
    loaded, _ = load(path, expect_model="small")
    original, report = lower_x86(converted, (x,))
    reloaded, report2 = lower_x86(loaded, (x,))
    assert report.int8_kernels == report2.int8_kernels == 2
    with torch.no_grad():
        assert torch.equal(reloaded(x), original(x))


@pytest.mark.slow
def test_lowered_tiny_wav2vec2_round_trip_is_bit_for_bit(tiny_wav2vec2, tmp_path, conv1d_counts):
    model = strip_weight_norm(tiny_wav2vec2)
    x = audio(16000, 0)
    converted = quantize(model, x)
    loaded, _ = load(save(converted, tmp_path / "w.sqa", example_inputs=(x,), metadata={"model": "w"}))
    original, _ = lower_x86(converted, (x,))
    reloaded, report = lower_x86(loaded, (x,))
    assert report.int8_kernels == 14 + conv1d_counts(8)["conv1d"]  # every Linear and quantized Conv1d
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, original(x).logits)


def test_an_artifact_made_under_another_isa_policy_runs_right_or_is_refused(tmp_path, monkeypatch):
    """A full-grid artifact (made where VNNI sums in int32) is refused by lower_x86 on a CPU without VNNI,
    naming the fix; narrowed-grid artifacts lower everywhere and equal their fake-quant graphs."""
    from transformers import HubertForCTC

    from sq_plugin.backends.pt2e import stablequant_x86_quantizer
    from sq_plugin.backends.x86_isa import IsaError
    from tests.conftest import tiny_ctc_config

    torch.manual_seed(0)
    model = HubertForCTC(tiny_ctc_config("hubert", stable=True)).eval()
    x = audio(8000, 0)
    paths = {}
    for grid in ("full", "narrow_weights", "narrow_activations"):
        if grid == "full" and not x86_policy().int32_accumulation:
            # made "there"
            monkeypatch.setattr("sq_plugin.backends.x86_isa.detect_kind", lambda flags=None, cap=None: "vnni")
        prepared = prepare_stablequant(model, (x,), stablequant_x86_quantizer(int8_grid=grid))
        calibrate(prepared, [x])
        paths[grid] = save(convert_pt2e(prepared), tmp_path / f"{grid}.sqa", example_inputs=(x,),
                           metadata={"model": grid})
        monkeypatch.undo()
    full, meta = load(paths["full"])
    assert (meta["x86_isa"]["weight_bits"], meta["x86_isa"]["activation_bits"]) == (8, 8)
    # 22 INT8 ops, or 21 where the artifact was made on AMX (the grouped positional conv is weight-only there)
    int8_ops = sum(1 for e in layer_qparams(full).values() if e["input"] is not None and e["weight"] is not None)
    assert int8_ops == (22 if x86_policy().grouped_conv_int8 else 21)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the policy of a CPU without VNNI (kernels unchanged)
    with pytest.raises(IsaError, match=rf"{int8_ops} INT8 op\(s\) .*0\.\.255.*conv_layers.0.conv.*and "
                                       rf"{int8_ops - 3} more.*an artifact made with 7-bit weights or 7-bit "
                                       "activations runs"):
        lower_x86(full, (x,))
    monkeypatch.undo()
    for grid, bits in (("narrow_weights", (7, 8)), ("narrow_activations", (8, 7))):
        narrowed, meta = load(paths[grid])
        assert (meta["x86_isa"]["weight_bits"], meta["x86_isa"]["activation_bits"]) == bits
        compiled, _ = lower_x86(narrowed, (x,))
        with torch.no_grad():
            want = narrowed(x).logits
            assert float((compiled(x).logits - want).norm() / want.norm()) < 0.02
