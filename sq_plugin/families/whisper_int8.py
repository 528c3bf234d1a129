"""Whisper end to end on INT8 kernels: encoder and decoder as two static PT2E graphs, greedy decoding.

HF `generate` runs the decoder with a growing `EncoderDecoderCache` (a new sequence length and new
Python objects every step), which PT2E cannot export. So the decoder is rewritten here as one
*step* with a static cache, built from the HF model's own submodules (same weights, same layer names):

    WhisperEncoderKV     features [B, 80, 3000] -> cross-attention keys and values of every decoder
                         layer, [L, B, H, 1500, D] each (the encoder and the decoder's encoder_attn
                         k/v projections, run once per utterance)
    WhisperDecoderStep   (token [B, 1], position [1], self keys/values [L, B, H, S, D], cross keys/values)
                         -> (logits [B, 1, V], this token's keys and values [L, B, H, 1, D])

Both have fixed shapes but the batch (exported dynamic), so each compiles once per batch size. The step
reads the self-attention cache and returns the new token's keys/values instead of writing into its input
(graphs stay functional, which export and Inductor freezing need); `greedy_decode` / `greedy_decode_batch`
write them into the cache between steps. Every Linear layer
is quantized, including the 384x51864 logits projection, which is most of a step's MACs.

    from sq_plugin.families.whisper_int8 import quantize_whisper_int8
    int8 = quantize_whisper_int8(bundle, calibration_features)   # StableQuant PT2E ranges, oneDNN INT8
    tokens = int8.transcribe(features)
    save_whisper_int8(int8, "whisper.sqa", metadata={"recipe": ...})  # two artifacts + decoding settings
    int8 = load_whisper_int8("whisper.sqa", bundle)                 # no recalibration

`greedy_decode` matches HF greedy `generate` for English-only checkpoints: prompt
<|startoftranscript|><|notimestamps|>, the generation config's `suppress_tokens` at every step and
`begin_suppress_tokens` at the first, stop at <|endoftext|> or after `max_length` new tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

Step = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class WhisperEncoderKV(nn.Module):
    """The Whisper encoder followed by every decoder layer's cross-attention key/value projections."""

    def __init__(self, whisper: nn.Module) -> None:
        super().__init__()
        self.encoder = whisper.model.encoder
        self.decoder_layers = whisper.model.decoder.layers  # only encoder_attn.k_proj / v_proj are used here
        config = whisper.config
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads

    def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_features).last_hidden_state
        batch, frames, _ = hidden.shape
        shape = (batch, frames, self.heads, self.head_dim)
        keys = [layer.encoder_attn.k_proj(hidden).view(shape).transpose(1, 2) for layer in self.decoder_layers]
        values = [layer.encoder_attn.v_proj(hidden).view(shape).transpose(1, 2) for layer in self.decoder_layers]
        return torch.stack(keys), torch.stack(values)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query position, written out: for q of length 1, Inductor's code for these
    three ops runs a decode step in 8.2 ms against 11.4 ms through `scaled_dot_product_attention`
    (tiny.en INT8, 2 threads, this Xeon)."""
    scores = q @ keys.transpose(-1, -2)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(dim=-1) @ values


class WhisperDecoderStep(nn.Module):
    """One decoder step with a static self-attention cache of `max_positions` slots."""

    def __init__(self, whisper: nn.Module) -> None:
        super().__init__()
        self.decoder = whisper.model.decoder
        self.proj_out = whisper.proj_out
        config = whisper.config
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        self.max_positions = config.max_target_positions
        self.register_buffer("slots", torch.arange(self.max_positions), persistent=False)

    def forward(self, token: torch.Tensor, position: torch.Tensor, self_keys: torch.Tensor,
                self_values: torch.Tensor, cross_keys: torch.Tensor,
                cross_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        decoder = self.decoder
        batch = token.shape[0]
        hidden = decoder.embed_tokens(token) * decoder.embed_scale + decoder.embed_positions.weight[position]
        # The slot this token writes, and the slots it may attend to (itself and earlier ones).
        write = (self.slots == position).view(1, 1, -1, 1)
        visible = (self.slots <= position).view(1, 1, 1, -1)
        heads_shape = (batch, 1, self.heads, self.head_dim)
        new_keys, new_values = [], []
        for i, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            x = layer.self_attn_layer_norm(hidden)
            # HF scales q after its projection (kept: it is the order the weights were trained with).
            q = (attn.q_proj(x) * attn.scaling).view(heads_shape).transpose(1, 2)
            k = attn.k_proj(x).view(heads_shape).transpose(1, 2)
            v = attn.v_proj(x).view(heads_shape).transpose(1, 2)
            keys = torch.where(write, k, self_keys[i])
            values = torch.where(write, v, self_values[i])
            out = _attend(q, keys, values, visible)
            hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(batch, 1, -1))
            new_keys.append(k)
            new_values.append(v)

            cross = layer.encoder_attn
            x = layer.encoder_attn_layer_norm(hidden)
            q = (cross.q_proj(x) * cross.scaling).view(heads_shape).transpose(1, 2)
            out = _attend(q, cross_keys[i], cross_values[i], None)
            hidden = hidden + cross.out_proj(out.transpose(1, 2).reshape(batch, 1, -1))

            x = layer.final_layer_norm(hidden)
            hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(x)))
        logits = self.proj_out(decoder.layer_norm(hidden))
        return logits, torch.stack(new_keys), torch.stack(new_values)


@dataclass(frozen=True)
class GreedySettings:
    """What HF greedy `generate` applies for an English-only Whisper checkpoint."""

    prompt: tuple[int, ...]
    eos: int
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    max_new_tokens: int
    # HF's no_repeat_ngram_size (0: off, as Whisper's generation_config): a guard against runaway repetition,
    # "I was in the game, and I was in the game, ..." to the token limit, which a quantized model can fall into.
    no_repeat_ngram_size: int = 0

    @classmethod
    def from_model(cls, whisper: nn.Module, max_new_tokens: int | None = None) -> GreedySettings:
        """Settings from the model's generation config. Like HF Whisper `generate`, its `max_length`
        counts tokens after the prompt; it is capped so that every fed token has a position."""
        gen = whisper.generation_config
        if getattr(gen, "no_timestamps_token_id", None) is None:
            raise ValueError("the model's generation_config has no no_timestamps_token_id: greedy_decode transcribes "
                             "without timestamps (prompt <|startoftranscript|>[<|en|><|transcribe|>]<|notimestamps|>)")
        if getattr(gen, "is_multilingual", False):
            # A multilingual model transcribes in the configured language (default English), as `generate` does.
            task = gen.task or "transcribe"
            if task not in (getattr(gen, "task_to_id", None) or {}):
                raise ValueError(f"the multilingual model's generation_config lacks task_to_id[{task!r}]: set it (as "
                                 "openai's generation_config does)")
            prompt = (gen.decoder_start_token_id, language_token_id(gen, gen.language or "en"), gen.task_to_id[task],
                      gen.no_timestamps_token_id)
        else:
            prompt = (gen.decoder_start_token_id, gen.no_timestamps_token_id)
        limit = max_new_tokens or gen.max_length or whisper.config.max_target_positions
        return cls(prompt=prompt, eos=gen.eos_token_id, suppress=tuple(gen.suppress_tokens or ()),
                   begin_suppress=tuple(gen.begin_suppress_tokens or ()),
                   max_new_tokens=min(limit, max_new_tokens_limit(whisper, prompt)),
                   no_repeat_ngram_size=gen.no_repeat_ngram_size or 0)


def language_token_id(generation_config: Any, language: str) -> int:
    """A multilingual checkpoint's token id for `language`, named as HF Whisper `generate` takes it: a code
    ("en"), a name ("english") or a token ("<|en|>"). Raises ValueError naming what the checkpoint has."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    lang_to_id = getattr(generation_config, "lang_to_id", None) or {}
    name = str(language).lower()
    token = name if name in lang_to_id else (
        f"<|{TO_LANGUAGE_CODE[name]}|>" if name in TO_LANGUAGE_CODE else f"<|{name.strip('<|>')}|>")
    if token not in lang_to_id:
        some = ", e.g. " + ", ".join(list(lang_to_id)[:3]) if lang_to_id else ""
        raise ValueError(f"language {language!r}: the model's generation_config.lang_to_id has no {token!r} ("
                         f"{len(lang_to_id)} languages{some}); pass a language code such as 'en', or set lang_to_id as "
                         "openai's generation_config does")
    return int(lang_to_id[token])


def language_name(generation_config: Any, token_id: int) -> str:
    """The token ("<|en|>") of a language id, for messages."""
    names = {v: k for k, v in (getattr(generation_config, "lang_to_id", None) or {}).items()}
    return names.get(token_id, str(token_id))


def repeated_ngram_tokens(sequence: Sequence[int], size: int) -> list[int]:
    """The tokens that would end an n-gram of `size` already in `sequence` (prompt included), as HF's
    `NoRepeatNGramLogitsProcessor` bans them: those that followed an earlier occurrence of the last size - 1
    tokens. Empty when size is 0 or the sequence is shorter than size - 1."""
    if size <= 0 or len(sequence) + 1 < size:
        return []
    start = len(sequence) - size + 1
    last = tuple(sequence[start:])
    return [sequence[i + size - 1] for i in range(start) if tuple(sequence[i:i + size - 1]) == last]


def max_new_tokens_limit(whisper: nn.Module, prompt: Sequence[int]) -> int:
    """The most new tokens one decode can take: every fed token (prompt, then all but the last new one) needs
    one of the decoder's `max_target_positions` positions."""
    return whisper.config.max_target_positions - len(prompt) + 1


def encoder_input_shape(whisper: nn.Module) -> tuple[int, int, int]:
    """The encoder graph's input shape for one utterance: Whisper's 30 s log-mel window (the graph takes any
    batch of them)."""
    return 1, whisper.config.num_mel_bins, 2 * whisper.config.max_source_positions


def empty_cache(whisper: nn.Module, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    config = whisper.config
    heads = config.decoder_attention_heads
    shape = (config.decoder_layers, batch, heads, config.max_target_positions, config.d_model // heads)
    return torch.zeros(shape), torch.zeros(shape)


def greedy_decode(encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], step: Step,
                  features: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
                  settings: GreedySettings) -> list[int]:
    """Greedy tokens (prompt and <|endoftext|> excluded) for one utterance's features [1, 80, 3000].

    `encode` and `step` are `WhisperEncoderKV` / `WhisperDecoderStep` or anything that computes the same
    (their INT8 lowerings). `cache` (`empty_cache(whisper)`) is zeroed here and reused across calls (no
    allocation per utterance). `greedy_decode_batch` decodes several utterances at once.
    """
    if features.shape[0] != 1:
        raise ValueError(f"greedy_decode takes one utterance (features [1, 80, 3000]), got batch {features.shape[0]}; "
                         "greedy_decode_batch takes several")
    return greedy_decode_batch(encode, step, features, cache, settings)[0]


def greedy_decode_batch(encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], step: Step,
                        features: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
                        settings: GreedySettings) -> list[list[int]]:
    """Greedy tokens of each utterance of a batch of features [B, 80, 3000], all decoded in the same steps.

    Every row has the same prompt, so all rows are at the same position at every step and one step call
    serves the batch; a row that has emitted <|endoftext|> is fed it again until the longest one ends (its
    tokens are not kept), so each row's tokens are those it would get alone. `cache` is `empty_cache(whisper,
    batch=B)`, zeroed here.
    """
    batch = features.shape[0]
    self_keys, self_values = cache
    if self_keys.shape[1] != batch:
        raise ValueError(f"the cache is for batch {self_keys.shape[1]}, the features for batch {batch}: pass "
                         f"empty_cache(whisper, batch={batch})")
    with torch.no_grad():
        cross_keys, cross_values = encode(features)
        self_keys.zero_()
        self_values.zero_()
        suppress = torch.tensor(settings.suppress, dtype=torch.long)
        begin_suppress = torch.tensor(settings.begin_suppress, dtype=torch.long)
        prompt = list(settings.prompt)
        rows: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        token = torch.empty(batch, 1, dtype=torch.long)
        position = torch.empty(1, dtype=torch.long)
        for pos in range(len(prompt) - 1 + settings.max_new_tokens):
            for i in range(batch):
                token[i, 0] = prompt[pos] if pos < len(prompt) else (settings.eos if done[i] else rows[i][-1])
            position[0] = pos
            logits, keys, values = step(token, position, self_keys, self_values, cross_keys, cross_values)
            self_keys[:, :, :, pos] = keys[:, :, :, 0]
            self_values[:, :, :, pos] = values[:, :, :, 0]
            if pos + 1 < len(prompt):  # still reading the prompt
                continue
            scores = logits[:, -1].float().clone()
            scores[:, suppress] = float("-inf")
            if pos + 1 == len(prompt):
                scores[:, begin_suppress] = float("-inf")
            for i in range(batch) if settings.no_repeat_ngram_size else ():
                if not done[i]:
                    scores[i, repeated_ngram_tokens(prompt + rows[i], settings.no_repeat_ngram_size)] = float("-inf")
            for i, nxt in enumerate(scores.argmax(dim=-1).tolist()):
                if done[i]:
                    continue
                if nxt == settings.eos:
                    done[i] = True
                else:
                    rows[i].append(nxt)
            if all(done):
                break
    return rows


# HF's beam search pushes a candidate out of contention by adding this (not -inf: sums stay finite and ordered).
_OUT_OF_CONTENTION = -1.0e9


def beam_decode(encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], step: Step,
                features: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], settings: GreedySettings,
                num_beams: int, *, length_penalty: float = 1.0) -> list[int]:
    """Beam search of width `num_beams` for one utterance's features [1, 80, 3000], as HF `generate(num_beams=k)`
    does it (its defaults: early_stopping=False, `length_penalty` on the finished hypotheses' summed log-probs):
    each step scores the 2k best continuations of the k running beams; those that end (<|endoftext|>, or the
    length limit) among the first k join the k best finished hypotheses; the k best that go on keep running. It
    stops when no running beam can beat the worst finished one. The k beams are the rows of one batch: the step
    runs once per token for all of them, and the self-attention cache is reordered to follow each beam's origin.
    `cache` is `empty_cache(whisper, batch=num_beams)`. Returns the best hypothesis' tokens (no prompt, no
    <|endoftext|>); num_beams=1 is greedy decoding."""
    if features.shape[0] != 1:
        raise ValueError(f"beam_decode takes one utterance (features [1, 80, 3000]), got batch {features.shape[0]}")
    if not 1 <= num_beams <= 16:
        raise ValueError(f"num_beams must be 1 to 16 (got {num_beams})")
    self_keys, self_values = cache
    if self_keys.shape[1] != num_beams:
        raise ValueError(f"the cache is for batch {self_keys.shape[1]}; beam search of width {num_beams} needs "
                         f"empty_cache(whisper, batch={num_beams})")
    prompt = list(settings.prompt)
    max_length = len(prompt) + settings.max_new_tokens  # HF's max_length, prompt included
    keep = 2 * num_beams  # candidates scored per step: k that may end and k that go on
    with torch.no_grad():
        # The beams read the utterance's one copy of the cross keys/values (a stride-0 view, no copy per beam): the
        # same numbers, and a beam-5 step of tiny.en INT8 takes 6.5 ms against 11.1 with k copies (Xeon AMX).
        cross_keys, cross_values = (x.expand(-1, num_beams, *x.shape[2:]) for x in encode(features))
        self_keys.zero_()
        self_values.zero_()
        suppress = torch.tensor(settings.suppress, dtype=torch.long)
        begin_suppress = torch.tensor(settings.begin_suppress, dtype=torch.long)
        running = [list(prompt) for _ in range(num_beams)]
        running_scores = torch.full((num_beams,), _OUT_OF_CONTENTION)
        running_scores[0] = 0.0  # all beams start equal: only the first may expand at the first step
        finished: list[tuple[float, list[int]]] = [(_OUT_OF_CONTENTION, [])] * num_beams
        finished_real = [False] * num_beams
        improvable = True
        token = torch.empty(num_beams, 1, dtype=torch.long)
        position = torch.empty(1, dtype=torch.long)
        cur_len = len(prompt)
        for pos in range(len(prompt) - 1):  # read the prompt
            token.fill_(prompt[pos])
            position[0] = pos
            _, keys, values = step(token, position, self_keys, self_values, cross_keys, cross_values)
            self_keys[:, :, :, pos], self_values[:, :, :, pos] = keys[:, :, :, 0], values[:, :, :, 0]
        while True:
            pos = cur_len - 1
            for i, seq in enumerate(running):
                token[i, 0] = seq[-1]
            position[0] = pos
            logits, keys, values = step(token, position, self_keys, self_values, cross_keys, cross_values)
            self_keys[:, :, :, pos], self_values[:, :, :, pos] = keys[:, :, :, 0], values[:, :, :, 0]
            log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)  # normalized before suppression, as HF
            log_probs[:, suppress] = float("-inf")
            if cur_len == len(prompt):
                log_probs[:, begin_suppress] = float("-inf")
            for i, seq in enumerate(running if settings.no_repeat_ngram_size else ()):
                log_probs[i, repeated_ngram_tokens(seq, settings.no_repeat_ngram_size)] = float("-inf")
            vocab = log_probs.shape[-1]
            top_scores, top_index = torch.topk((log_probs + running_scores[:, None]).reshape(-1), keep)
            origins, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
            ends = torch.tensor([t == settings.eos or cur_len + 1 >= max_length for t in tokens])
            candidates = [running[o] + [t] for o, t in zip(origins, tokens, strict=True)]
            # the k best that do not end run on
            going = top_scores + ends.float() * _OUT_OF_CONTENTION
            order = torch.topk(going, num_beams).indices.tolist()
            running = [candidates[j] for j in order]
            running_scores = going[order]
            followed = [origins[j] for j in order]  # the beam each running beam continues
            # the first k candidates that end compete with the finished hypotheses, length-normalized
            ended = top_scores / ((cur_len + 1 - len(prompt)) ** length_penalty)
            ended = ended + (0.0 if improvable else _OUT_OF_CONTENTION)
            first_k = torch.arange(keep) < num_beams
            ended = ended + (~(ends & first_k)).float() * _OUT_OF_CONTENTION
            merged = [*finished, *zip(ended.tolist(), candidates, strict=True)]
            merged_real = [*finished_real, *(ends & first_k).tolist()]
            best = torch.topk(torch.tensor([score for score, _ in merged]), num_beams).indices.tolist()
            finished = [merged[j] for j in best]
            finished_real = [merged_real[j] for j in best]
            if followed != list(range(num_beams)):
                # Only the written slots (0..pos) follow their beams; the rest are zero and masked out until written:
                # 0.5 against 2.9 ms per step for tiny.en's 448 slots at beam 5, ~60 tokens in.
                reorder = torch.tensor(followed)
                for cache_part in (self_keys, self_values):
                    cache_part[:, :, :, :pos + 1] = cache_part[:, :, :, :pos + 1].index_select(1, reorder)
            cur_len += 1
            worst_finished = min(score for score, _ in finished)
            best_possible = float(running_scores[0]) / ((cur_len - len(prompt)) ** length_penalty)
            improvable = improvable and any(best_possible > (worst_finished if real else _OUT_OF_CONTENTION)
                                            for real in finished_real)
            if not improvable or bool(ends.all()):
                break
    tokens = finished[0][1][len(prompt):]
    return tokens[:-1] if tokens and tokens[-1] == settings.eos else tokens


# The batch dimension of each graph input (encoder: features; step: token, position, self keys, self values,
# cross keys, cross values; the position has none): the graphs are exported with it dynamic.
BATCH_DIMS: dict[str, dict[int, int]] = {"encoder": {0: 0}, "decoder_step": {0: 0, 2: 1, 3: 1, 4: 1, 5: 1}}


def batch_examples(whisper: nn.Module, encode: Callable[..., Any],
                   features: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    """Example inputs of both graphs at batch 2 (export specializes a dimension of size 1, so batch 1 examples
    would fix the batch), from one utterance's features."""
    pair = torch.cat([features[:1], features[:1]])
    with torch.no_grad():
        cross = encode(pair)
    return {"encoder": (pair,), "decoder_step": decoder_step_inputs(whisper, cross)}


def decoder_step_inputs(whisper: nn.Module, cross: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Example inputs for exporting `WhisperDecoderStep` (shapes are what matters; values are a valid step)."""
    keys, values = empty_cache(whisper, batch=cross[0].shape[1])
    token = torch.full((cross[0].shape[1], 1), whisper.generation_config.decoder_start_token_id, dtype=torch.long)
    return token, torch.zeros(1, dtype=torch.long), keys, values, cross[0], cross[1]


@dataclass
class QuantizedWhisper:
    """Whisper as two INT8 graphs (see the module docstring). `encode`/`step` are the lowered modules.

    Both graphs take any batch: each new batch size compiles once (about as long as the first), and the
    decoder's static cache is kept per batch size."""

    model_name: str
    whisper: nn.Module
    encode: Callable[..., Any]
    step: Step
    settings: GreedySettings
    converted: dict[str, torch.fx.GraphModule]
    report: dict[str, Any] = field(default_factory=dict)
    _caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def transcribe(self, features: torch.Tensor, *, settings: GreedySettings | None = None) -> list[int]:
        """Greedy tokens for one utterance's log-mel features [1, 80, 3000] (the processor's feature extractor
        output). settings: see `transcribe_batch`."""
        if features.dim() == 3 and features.shape[0] != 1:
            raise ValueError(f"transcribe takes one utterance, features [1, 80, 3000]; got batch {features.shape[0]}: "
                             "call transcribe_batch for several")
        return self.transcribe_batch(features, settings=settings)[0]

    def transcribe_batch(self, features: torch.Tensor, *, settings: GreedySettings | None = None) -> list[list[int]]:
        """Greedy tokens of each utterance of log-mel features [B, 80, 3000], decoded together (one encoder call
        and one decoder step per token for the whole batch).

        settings: other greedy settings for this call (e.g. another `max_new_tokens` or suppress list), default
        the ones the graphs were quantized with; the decoder step's static cache bounds `max_new_tokens`."""
        window = encoder_input_shape(self.whisper)[1:]
        if features.dim() != 3 or tuple(features.shape[1:]) != window or features.shape[0] == 0:
            raise ValueError(f"features of shape {tuple(features.shape)}; the INT8 encoder takes [batch, {window[0]}, "
                             f"{window[1]}] with batch >= 1: log-mel features from the model's feature extractor, "
                             "which pads or cuts 16 kHz audio to 30 s")
        settings = self._checked(settings)
        return greedy_decode_batch(self.encode, self.step, features, self._cache_for(features.shape[0]), settings)

    def _cache_for(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's static cache for `rows` rows (a batch, or the beams), made once per size."""
        if rows not in self._caches:
            self._caches[rows] = empty_cache(self.whisper, batch=rows)
        return self._caches[rows]

    def _checked(self, settings: GreedySettings | None) -> GreedySettings:
        """`settings` (default: the quantized ones), refused if they ask for more tokens than the cache holds."""
        settings = settings or self.settings
        limit = max_new_tokens_limit(self.whisper, settings.prompt)
        if settings.max_new_tokens > limit:
            raise ValueError(f"max_new_tokens={settings.max_new_tokens}: the INT8 decoder step's static cache holds "
                             f"{self.whisper.config.max_target_positions} positions, so at most {limit} new tokens "
                             f"follow the {len(settings.prompt)}-token prompt; ask for {limit} or fewer")
        return settings

    def beam_search(self, features: torch.Tensor, num_beams: int, *, settings: GreedySettings | None = None,
                    length_penalty: float = 1.0) -> list[int]:
        """Beam search of width `num_beams` (`beam_decode`, as HF `generate(num_beams=k)`) for one utterance's
        features [1, 80, 3000]: the beams are one batch of the INT8 graphs (each width compiles once)."""
        window = encoder_input_shape(self.whisper)
        if tuple(features.shape) != window:
            raise ValueError(f"features of shape {tuple(features.shape)}; beam search takes one utterance, "
                             f"{list(window)}, from the model's feature extractor")
        return beam_decode(self.encode, self.step, features, self._cache_for(num_beams), self._checked(settings),
                           num_beams, length_penalty=length_penalty)

    def detect_language(self, features: torch.Tensor) -> list[int]:
        """HF's `detect_language` on the INT8 graphs, for a multilingual checkpoint: per utterance of features
        [B, 80, 3000], the language token that <|startoftranscript|> predicts, every other token masked out."""
        gen = self.whisper.generation_config
        lang_ids = sorted((getattr(gen, "lang_to_id", None) or {}).values())
        if not getattr(gen, "is_multilingual", False) or not lang_ids:
            raise ValueError(f"{self.model_name} is not multilingual (no generation_config.lang_to_id): it has no "
                             "language to detect")
        window = encoder_input_shape(self.whisper)[1:]
        if features.dim() != 3 or tuple(features.shape[1:]) != window or features.shape[0] == 0:
            raise ValueError(f"features of shape {tuple(features.shape)}; language detection takes [batch, "
                             f"{window[0]}, {window[1]}] from the model's feature extractor")
        self_keys, self_values = self._cache_for(features.shape[0])
        with torch.no_grad():
            cross_keys, cross_values = self.encode(features)
            self_keys.zero_()
            self_values.zero_()
            token = torch.full((features.shape[0], 1), gen.decoder_start_token_id, dtype=torch.long)
            logits, _, _ = self.step(token, torch.zeros(1, dtype=torch.long), self_keys, self_values, cross_keys,
                                     cross_values)
        # argmax over the language ids in vocabulary order: HF's tie-break (the first of equal logits)
        best = logits[:, -1].float()[:, lang_ids].argmax(dim=-1).tolist()
        return [lang_ids[i] for i in best]

    @property
    def generation_config(self) -> Any:
        return self.whisper.generation_config

    def _check_language_and_task(self, language: str | None, task: str | None) -> None:
        """The graphs were calibrated with one prompt, so a language / task is honoured only if it is that one."""
        if language is None and task is None:
            return
        gen, prompt = self.whisper.generation_config, tuple(self.settings.prompt)
        if not getattr(gen, "is_multilingual", False):
            raise ValueError(f"language={language!r}, task={task!r}: {self.model_name} is an English-only checkpoint, "
                             f"its graphs decode with the prompt {prompt}; drop language and task")
        asked = (prompt[1] if language is None else language_token_id(gen, language),
                 prompt[2] if task is None else (getattr(gen, "task_to_id", None) or {}).get(task))
        if asked != prompt[1:3]:
            raise ValueError(f"language={language!r}, task={task!r}: the INT8 graphs of {self.model_name} were "
                             f"calibrated with the prompt {prompt} (language and task tokens {prompt[1:3]}); "
                             "quantize again with generation_config.language / task set to what you need, or "
                             "drop them")

    def generate(self, input_features: torch.Tensor, *, max_length: int | None = None, num_beams: int = 1,
                 do_sample: bool = False, return_timestamps: bool = False, language: str | None = None,
                 task: str | None = None) -> torch.Tensor:
        """What `sq_plugin.speech.evaluate` calls on a Whisper model: tokens for a batch of features [B, 80, 3000]
        as HF's token rows (prompt first, padded with <|endoftext|>): greedy with the batch decoded together, or
        with num_beams > 1 a beam search per utterance. `max_length` counts new tokens, as in HF Whisper.
        language / task (multilingual checkpoints): accepted when they are the graphs' prompt, refused otherwise."""
        if do_sample or return_timestamps:
            raise ValueError("the INT8 Whisper decodes without sampling or timestamps: do_sample=False, "
                             "return_timestamps=False")
        self._check_language_and_task(language, task)
        settings = self.settings
        if max_length is not None and max_length < settings.max_new_tokens:
            settings = dataclasses.replace(settings, max_new_tokens=max_length)
        if num_beams == 1:
            decoded = self.transcribe_batch(input_features, settings=settings)
        else:
            decoded = [self.beam_search(f[None], num_beams, settings=settings) for f in input_features]
        rows = [list(settings.prompt) + r for r in decoded]
        width = max(len(r) for r in rows) + 1
        out = torch.full((len(rows), width), settings.eos, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out


def graph_layer_names(whisper: nn.Module, graphs: dict[str, nn.Module] | None = None) -> dict[str, dict[str, str]]:
    """Per INT8 graph ("encoder", "decoder_step"): the HF module name of each Linear/Conv1d it holds ->
    its name in that graph ("model.encoder.layers.0.fc1" -> "encoder.layers.0.fc1", "model.decoder.
    layers.1.encoder_attn.k_proj" -> "decoder_layers.1.encoder_attn.k_proj" in the encoder graph). Found by
    module identity, so a plan made on the HF model (the search's names) applies to both graphs."""
    hf_names = {id(m): name for name, m in whisper.named_modules()}
    graphs = graphs if graphs is not None else _float_graphs(whisper)
    return {g: {hf_names[id(m)]: name for name, m in module.named_modules()
                if isinstance(m, nn.Linear | nn.Conv1d) and id(m) in hf_names}
            for g, module in graphs.items()}


def quantize_whisper_int8(bundle: Any, calibration_features: Sequence[torch.Tensor], *, quantizer: Any = None,
                          lower: bool = True, max_new_tokens: int | None = None,
                          int8_grid: str = "auto", plan: Any = None, weights: Any = None,
                          int8_attention: bool = False) -> QuantizedWhisper:
    """PT2E-quantize Whisper's encoder(+cross K/V) and decoder step, calibrate them by greedy-decoding
    `calibration_features` (each [1, 80, 3000]) through the observed graphs, convert, and (lower=True)
    compile both to oneDNN INT8 kernels with `lower_x86` (which refuses to run them in float).

    quantizer: a PT2E quantizer (default `stablequant_x86_quantizer()`: StableQuant's percentile+MSE
    activation ranges, per-channel symmetric weights, on `int8_grid`: "auto" = 7-bit weights on x86
    without VNNI, where oneDNN saturates the full W8A8 grids; see `sq_plugin.backends.x86_isa`).
    plan: a `QuantPlan` on the HF module names (`search_whisper(...).to_plan()`), applied to both graphs
    through `graph_layer_names`: every input range is the plan's, so only the first calibration
    utterance is decoded (to observe the weights). `report["plan_deviations"]` lists what ran otherwise.
    int8_attention: the encoder's self-attention matmuls on INT8 GEMMs too (`lower_x86`); the decoder step's
    one-query attention stays float (a 1 x d GEMM per head gains nothing).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from sq_plugin.backends.pt2e import plan_deviations, prepare_stablequant, stablequant_x86_quantizer
    from sq_plugin.backends.pt2e import stablequant_x86_quantizer_from_plan as from_plan
    from sq_plugin.backends.simulate import quantizable_layers

    if not calibration_features:
        raise ValueError("quantize_whisper_int8 needs at least one calibration utterance (log-mel features "
                         "[1, 80, 3000]); got none")
    whisper = bundle.model.eval()
    settings = GreedySettings.from_model(whisper, max_new_tokens)
    started = time.perf_counter()
    graphs = _float_graphs(whisper)
    names = graph_layer_names(whisper, graphs)
    per_token: list[str] = []
    if plan is not None:
        plan.check_layers(quantizable_layers(whisper), model=bundle.name)
        if plan.per_token_layers:
            # The per-token Linears become PerTokenInt8Linears in a copy (the caller's model stays float); the graphs'
            # module paths are the same, so `names` still holds. deepcopy keeps proj_out's tie to the embedding.
            from sq_plugin.backends.per_token import swap_per_token_linears

            source = copy.deepcopy(whisper)
            per_token = swap_per_token_linears(source, plan, weights)
            graphs = _float_graphs(source)
        # weights: the plan's stored weights (mixed precision), already installed in `bundle.model`
        quantizers = {g: from_plan(plan, graph_names=names[g], weights=weights) for g in graphs}
        calibration_features = calibration_features[:1]  # weights only: the input ranges are the plan's
    else:
        quantizers = dict.fromkeys(graphs, quantizer or stablequant_x86_quantizer(int8_grid=int8_grid))
    inputs = batch_examples(whisper, graphs["encoder"].eval(), calibration_features[0])
    # Only the batch is dynamic: Whisper always sees a 30 s window, and the step's cache has a fixed size.
    prepared = {name: prepare_stablequant(module, inputs[name], quantizers[name], dynamic_dims=BATCH_DIMS[name])
                for name, module in graphs.items()}
    if not read_embedding_from_quantized_logits_weight(prepared["decoder_step"]):
        raise RuntimeError("the decoder step graph has no embedding lookup that shares its table with a quantized "
                           "Linear (Whisper ties embed_tokens and proj_out); was proj_out excluded from quantization?")
    cache = empty_cache(whisper)
    calibration_tokens = 0
    for features in calibration_features:
        calibration_tokens += len(greedy_decode(prepared["encoder"], prepared["decoder_step"], features, cache,
                                                settings)) + 1
    converted = {name: convert_pt2e(graph) for name, graph in prepared.items()}
    gather_int8_embedding_rows(converted["decoder_step"])
    report: dict[str, Any] = {"calibration_utterances": len(calibration_features),
                              "calibration_decoder_steps": calibration_tokens,
                              "quantize_s": round(time.perf_counter() - started, 1),
                              "per_token_linears": len(per_token)}
    if plan is not None:
        report["plan"] = dict(plan.provenance)
        report["plan_deviations"] = {name: why for g, graph in converted.items()
                                     for name, why in plan_deviations(graph, plan, names[g]).items()}
    return _assemble(bundle, converted, settings, report, lower, int8_attention)


def read_embedding_from_quantized_logits_weight(prepared: torch.fx.GraphModule) -> bool:
    """Make the token embedding read the logits projection's *observed* weight (Whisper ties the two).

    After `convert_pt2e` the lookup then reads the same INT8 table (+ per-row scales) as the quantized
    `proj_out`, instead of keeping the 51864x384 float table next to it: one INT8 copy of the
    vocabulary instead of float + INT8 (the difference between 0.27x and 0.80x of the FP32 size for
    tiny.en). The embedding rows are then INT8-rounded like the logits weights. Returns False if no
    embedding shares its table with an observed Linear weight.
    """
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.embedding.default:
            continue
        table = node.args[0]
        observers = [u for u in table.users if u.op == "call_module"
                     and any(v.target == torch.ops.aten.linear.default for v in u.users)]
        if len(observers) == 1:
            node.replace_input_with(table, observers[0])
            prepared.recompile()
            return True
    return False


def gather_int8_embedding_rows(converted: torch.fx.GraphModule) -> None:
    """Rewrite `embedding(dequantize_per_channel(table_int8, scales, zero_points, 0), token)` into
    `(embedding(table_int8, token) - zero_point[token]) * scale[token]`: the same numbers, but only the
    looked-up rows are dequantized. It also keeps the table's dequantize for `proj_out` alone, as
    Inductor's qlinear pattern needs (a second dequantize of the same table would be merged back by CSE).
    """
    aten = torch.ops.aten
    graph = converted.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.embedding.default:
            continue
        dequant = node.args[0]
        if getattr(dequant, "target", None) != torch.ops.quantized_decomposed.dequantize_per_channel.default:
            continue
        table, scales, zero_points, axis = dequant.args[:4]
        if axis != 0:
            raise RuntimeError(f"the embedding table is quantized along axis {axis}, expected per row (axis 0)")
        token = node.args[1]
        with graph.inserting_before(node):
            rows = graph.call_function(aten.embedding.default, (table, token))
            scale = graph.call_function(aten.embedding.default,
                                        (graph.call_function(aten.view.default, (scales, [-1, 1])), token))
            zero = graph.call_function(aten.embedding.default,
                                       (graph.call_function(aten.view.default, (zero_points, [-1, 1])), token))
            centred = graph.call_function(aten.sub.Tensor, (
                graph.call_function(aten._to_copy.default, (rows,), {"dtype": torch.float32}), zero))
            value = graph.call_function(aten.mul.Tensor, (centred, scale))
        node.replace_all_uses_with(value)
        graph.erase_node(node)
    graph.lint()
    converted.recompile()


def _assemble(bundle: Any, converted: dict[str, torch.fx.GraphModule], settings: GreedySettings,
              report: dict[str, Any], lower: bool, int8_attention: bool = False) -> QuantizedWhisper:
    """A QuantizedWhisper running the converted graphs as they are (lower=False: float q/dq, for checks)
    or compiled to oneDNN INT8 kernels by `lower_x86`, which raises rather than run them in float."""
    from sq_plugin.backends.pt2e import lower_x86

    whisper = bundle.model
    if not lower:
        return QuantizedWhisper(bundle.name, whisper, converted["encoder"], converted["decoder_step"], settings,
                                converted, report)
    # Each graph compiles once, for its only shapes: a 30 s window and the fixed-size cache.
    features = torch.zeros(encoder_input_shape(whisper))
    # The float graphs are the kernel check's referee when INT8 and fake-quant differ by more than rounding: on
    # Whisper base's encoder they do (0.109), with INT8 as close to float as fake-quant.
    reference = _float_graphs(whisper)
    # The checks run row by row (batch_dims): the encoder's first output is the cross keys [L, B, ...], the step's
    # the logits [B, 1, V].
    encode, encoder_report = lower_x86(converted["encoder"], (features,), int8_attention=int8_attention,
                                       reference=reference["encoder"].eval(), batch_dims=BATCH_DIMS["encoder"],
                                       output_batch_dim=1)
    with torch.no_grad():
        cross = encode(features)
    # A decode step runs ~100 small kernels: the C++ wrapper saves ~1 ms of Python per step (8.2 -> 7.3 ms).
    step, step_report = lower_x86(converted["decoder_step"], decoder_step_inputs(whisper, cross), cpp_wrapper=True,
                                  reference=reference["decoder_step"].eval(), batch_dims=BATCH_DIMS["decoder_step"])
    # One backend line for both graphs: the step's grids (the encoder's when its attention is INT8 too), and the
    # per-token Linears of both.
    described = dataclasses.replace(encoder_report if int8_attention else step_report,
                                    per_token_linear=encoder_report.per_token_linear + step_report.per_token_linear)
    report = {**report, "backend": described.backend, "lowering": {
        name: {"qlinear": r.qlinear, "qconv": r.qconv, "per_token_linear": r.per_token_linear}
        for name, r in (("encoder", encoder_report), ("decoder_step", step_report))}}
    return QuantizedWhisper(bundle.name, whisper, encode, step, settings, converted, report)


SETTINGS_FILE = "greedy.json"


def _float_graphs(whisper: nn.Module) -> dict[str, nn.Module]:
    """The two float graphs by name (the name is also the artifact's subdirectory); save and load
    fingerprint them to tie an artifact to its architecture."""
    return {"encoder": WhisperEncoderKV(whisper), "decoder_step": WhisperDecoderStep(whisper)}


def save_whisper_int8(quantized: QuantizedWhisper, path: str | os.PathLike, *, metadata: dict[str, Any]) -> Path:
    """Write both converted graphs as `sq_plugin.backends.artifact` directories under `path` (`encoder/`,
    `decoder_step/`) plus the greedy settings; the whole directory appears at once (temporary sibling,
    then one rename), replacing an existing one."""
    from sq_plugin.backends.artifact import save
    from sq_plugin.core.files import atomic_directory

    path = Path(path)
    whisper = quantized.whisper
    examples = batch_examples(whisper, quantized.converted["encoder"], torch.zeros(encoder_input_shape(whisper)))
    with atomic_directory(path) as tmp:
        for sub, fp in _float_graphs(whisper).items():
            save(quantized.converted[sub], tmp / sub, example_inputs=examples[sub], fp_model=fp,
                 metadata={**metadata, "model": f"{quantized.model_name}:{sub}", "model_config": whisper.config,
                           "report": quantized.report})
        (tmp / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(quantized.settings)))
    return path


def load_whisper_int8(path: str | os.PathLike, bundle: Any, *, lower: bool = True,
                      int8_attention: bool = False) -> QuantizedWhisper:
    """Load `save_whisper_int8`'s directory for `bundle` (the same Whisper checkpoint: its config and
    tokenizer drive decoding) and, with lower=True, compile both graphs to oneDNN INT8 kernels.
    Raises `ArtifactError` if a part is missing, damaged, or was made for another model."""
    from sq_plugin.backends.artifact import ArtifactError, architecture_fingerprint, load

    path = Path(path)
    settings_file = path / SETTINGS_FILE
    if not settings_file.is_file():
        raise ArtifactError(f"{settings_file} is missing: {path} is not a save_whisper_int8 directory "
                            "(re-save it with sq_plugin.families.whisper_int8.save_whisper_int8)")
    try:
        settings = GreedySettings(**{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in json.loads(settings_file.read_text()).items()})
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{settings_file} cannot be read ({exc}); re-save the artifact") from exc
    whisper = bundle.model.eval()
    converted, meta = {}, {}
    for sub, fp in _float_graphs(whisper).items():
        # The architecture fingerprint catches a checkpoint with other shapes; the name, another model.
        converted[sub], meta[sub] = load(path / sub, expect_model=architecture_fingerprint(fp))
        if meta[sub]["model"] != f"{bundle.name}:{sub}":
            raise ArtifactError(f"{path / sub} was made for {meta[sub]['model']!r}, not {bundle.name}:{sub}: "
                                f"load the artifact saved for {bundle.name}, or quantize it and save a new one")
    report = {k: v for k, v in meta["encoder"]["user"].get("report", {}).items() if k not in ("lowering", "backend")}
    return _assemble(bundle, converted, settings, report, lower, int8_attention)


