"""`stablequant run` with a mixed-precision bits item, end to end on the shipped wav2vec2 reference (real INT8)."""

import json

import pytest

from sq_plugin.recipe import parse_recipe
from sq_plugin.runner import run_recipe


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    recipe = parse_recipe({
        "name": "mixed", "model": "sq/wav2vec2-ref", "calibration": {"dataset": "corpus-dev", "size": 4},
        "evaluation": {"dataset": "corpus-test", "size": 6},
        "methods": ["fp", "stablequant", "max", "mixed_one_stage"],
        "method_options": {"stablequant": {"threshold": 1.0}, "mixed_training": {"train_size": 2, "steps": 2}},
        "bits": ["w8a8", {"mixed": {"budget_bits": 4.5}}], "output_dir": str(out)})
    run = run_recipe(recipe, progress=False)
    return run, run.output_dir


def test_mixed_rows_report_size_bits_and_significance(mixed_run):
    run, _ = mixed_run
    rows = {(r["method"], r.get("bits", f"w{r['w_bits']}a{r['a_bits']}")): r for r in run.rows}
    assert set(rows) == {("fp", "w32a32"), ("stablequant", "w8a8"), ("max", "w8a8"), ("stablequant", "mixed4.5a8"),
                         ("mixed_one_stage", "mixed4.5a8")}
    fp = rows[("fp", "w32a32")]
    for method in ("stablequant", "mixed_one_stage"):
        row = rows[(method, "mixed4.5a8")]
        assert row["avg_bits"] <= 4.5
        assert row["executed"] == "storage-only" and not row["simulated"] and row["int8_kernels"] > 0
        assert row["fp32_bytes"] == fp["bytes"]
        assert row["compression_ratio"] == pytest.approx(fp["bytes"] / row["bytes"], rel=1e-3)
        assert row["compression_ratio"] > 5.2  # ~4.5 bits per weight, plus scales and the float rest
        assert row["lossless"] == (row["wer_ci95"][0] <= 0)
        assert set(row["weight_bits"]) == set(run.plans[f"sq/wav2vec2-ref {method} mixed4.5a8"].quantized)
    # one W8A8 search serves the uniform and the mixed items; max and mixed_one_stage are skipped where they
    # cannot express the bits, with the reason
    assert list(run.searches) == ["sq/wav2vec2-ref w8a8"]
    skipped = {(s["method"], s["bits"]): s["reason"] for s in run.skipped}
    assert set(skipped) == {("max", "mixed4.5a8"), ("mixed_one_stage", "w8a8")}
    assert "one width for every layer" in skipped[("max", "mixed4.5a8")]
    # measured at the PTQ allocation's widths (4, 5, 6, 8: the recipe names none), each layer alone
    sens = run.sensitivities["sq/wav2vec2-ref"]
    assert sens["widths"] == [4, 5, 6, 8]
    assert sens["evaluations"] == 1 + 4 * len(rows[("stablequant", "mixed4.5a8")]["weight_bits"])
    assert set(rows[("stablequant", "mixed4.5a8")]["weight_bits"].values()) <= {4, 5, 6, 8}


def test_mixed_report_has_the_table_and_both_charts(mixed_run):
    _, out = mixed_run
    report = (out / "report.md").read_text()
    assert "## Mixed precision" in report and "storage-only" in report
    assert (out / "mixed_bits_sq_wav2vec2-ref.png").stat().st_size > 1000
    assert (out / "mixed_pareto_sq_wav2vec2-ref.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"]["bits"][1] == {"mixed": {"budget_bits": 4.5, "widths": None}, "a": 8}
    plan = json.loads((out / "plan_sq_wav2vec2-ref_stablequant_mixed4.5a8.json").read_text())
    widths = {layer["weight"]["qmax"] for layer in plan["layers"].values() if layer["weight"]}
    assert len(widths) > 1 and all(layer["weight_rule"] == "stored" for layer in plan["layers"].values()
                                   if layer["weight"])
