"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this directory
is on sys.path)."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# Where latency.py keeps the INT8 artifacts it builds, which other scripts load instead of re-quantizing.
ARTIFACTS = Path(os.environ.get("SQ_PLUGIN_CACHE", Path.home() / ".cache" / "sq_plugin")) / "bench_artifacts"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory: readers see the old
    file or the new one, never a partial one; a failure leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_results(out: Path, name: str, payload: Any, lines: list[str], failures: list[str]) -> None:
    """Write `out/name.json` (the payload) and `out/name.md` (the lines, then a "Failed" section listing `failures`),
    each atomically; say where on stderr, and exit 1 if anything failed (after writing what did not)."""
    import json
    import sys

    if failures:
        lines = [*lines, "## Failed", "", *[f"* {f}" for f in failures], ""]
    atomic_write(out / f"{name}.json", json.dumps(payload, indent=1) + "\n")
    atomic_write(out / f"{name}.md", "\n".join(lines) + "\n")
    print(f"wrote {out}/{name}.json and {name}.md; failures: {failures or 'none'}", file=sys.stderr)
    if failures:
        sys.exit(1)


def device_name() -> str:
    """The CPU model and the kind oneDNN runs as (`sq_plugin.backends.x86_isa`: avx2, avx512, vnni or amx;
    ONEDNN_MAX_CPU_ISA lowers it), e.g. "cpu: AMD EPYC (2 cores; oneDNN as avx2, ONEDNN_MAX_CPU_ISA=AVX2)"."""
    from sq_plugin.backends.x86_isa import x86_policy

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    policy = x86_policy()
    cap = f", ONEDNN_MAX_CPU_ISA={policy.cap}" if policy.cap else ""
    return f"cpu: {model} ({os.cpu_count()} cores; oneDNN as {policy.kind}{cap})"


def paired_wer(references: list[str], baseline: list[str], texts: list[str]) -> dict:
    """WER of `texts`, and its ΔWER against `baseline` on the same references in percentage points, with the
    95 % paired-bootstrap interval: {"wer", "delta_pp", "ci95_pp": [low, high]}."""
    from sq_plugin.core.significance import paired_bootstrap
    from sq_plugin.speech.evaluate import wer, word_errors

    base_errors, words = word_errors(references, baseline)
    delta = paired_bootstrap(base_errors, word_errors(references, texts)[0], words)
    return {"wer": wer(references, texts), "delta_pp": 100 * delta.delta,
            "ci95_pp": [100 * delta.low, 100 * delta.high]}


def require_unsaturated_int_mm() -> None:
    """Exit, saying why, where `torch._int_mm` would saturate (no VNNI: `sq_plugin.backends.x86_isa`)."""
    from sq_plugin.backends.x86_isa import int8_attention_problem, x86_policy

    problem = int8_attention_problem(x86_policy())
    if problem:
        raise SystemExit(f"torch._int_mm would saturate here: {problem}")


def decode_in_batches(whisper: Any, encode: Any, step: Any, features: Any, tokenizer: Any, settings: Any, *,
                      batch: int = 8, caches: dict | None = None) -> list[str]:
    """Greedy transcripts of log-mel `features` [N, 80, 3000] on a Whisper graph pair (`greedy_decode_batch`), `batch`
    utterances at a time. caches: the decoder caches by batch size, kept across calls when given (one is allocated
    per size, not per batch)."""
    from sq_plugin.families.whisper_int8 import empty_cache, greedy_decode_batch

    caches = {} if caches is None else caches
    texts = []
    for i in range(0, features.shape[0], batch):
        chunk = features[i:i + batch]
        if chunk.shape[0] not in caches:  # not setdefault: that would allocate a zeroed cache every batch
            caches[chunk.shape[0]] = empty_cache(whisper, batch=chunk.shape[0])
        texts += [tokenizer.decode(t, skip_special_tokens=True).strip()
                  for t in greedy_decode_batch(encode, step, chunk, caches[chunk.shape[0]], settings)]
    return texts


def searched_and_percentile_whisper(bundle: Any, plan_path: str, calibration: list[Any]) -> tuple[dict[str, Any], str]:
    """A searched Whisper plan (QuantPlan JSON) and the percentile rule applied to every layer on `calibration`
    (the search's usual starting point), as fake-quant models {"search": ..., "percentile_clip everywhere": ...},
    and their bits ("w6a6")."""
    from sq_plugin.core.defaults import DEFAULT_BASELINE_PERCENTILE
    from sq_plugin.core.plan import QuantPlan
    from sq_plugin.core.ranges import RangeRule
    from sq_plugin.families.whisper import quantize_whisper_simulated, whisper_statistics
    from sq_plugin.search.rules import layer_ops, rule_plan

    searched = QuantPlan.load(plan_path)
    w_bits, a_bits = searched.provenance["w_bits"], searched.provenance["a_bits"]
    base = rule_plan(whisper_statistics(bundle, calibration), layer_ops(bundle.model),
                     RangeRule("percentile", percentile=DEFAULT_BASELINE_PERCENTILE), w_bits=w_bits, a_bits=a_bits)
    models = {name: quantize_whisper_simulated(bundle, calibration, plan=plan).bundle.model
              for name, plan in (("search", searched), ("percentile_clip everywhere", base))}
    return models, f"w{w_bits}a{a_bits}"
