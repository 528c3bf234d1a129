"""The recipe schema: errors name the file and the key path; valid recipes round-trip."""

from pathlib import Path

import pytest

from sq_plugin.recipe import CORPUS_SIZES, Recipe, RecipeError, load_recipe, parse_recipe, with_overrides

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))

MINIMAL = """\
model: sq/wav2vec2-ref
calibration: {dataset: corpus-dev, size: 8}
evaluation: {dataset: corpus-test, size: 16}
methods: [fp, stablequant, max]
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message  # the CLI prints it as one line
    return message


def test_minimal_recipe_gets_defaults_and_the_file_name(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL, "my-run.yaml"))
    assert recipe.name == "my-run"
    assert recipe.models == ("sq/wav2vec2-ref",)
    assert [b.label for b in recipe.bits] == ["w8a8"]
    assert recipe.backend == "x86" and recipe.quantized_methods == ["stablequant", "max"]
    opts = recipe.method_options.stablequant
    assert opts.threshold is None and opts.threshold_for() == 0.0025  # wer's: the paper's 0.25 % absolute


def test_the_threshold_defaults_to_the_metric_s_own_and_a_given_one_wins(tmp_path):
    def config(options):
        recipe = load_recipe(write(tmp_path, MINIMAL + f"method_options: {{stablequant: {options}}}\n"))
        return recipe.method_options.stablequant.search_config(w_bits=8, a_bits=8, int8_grid="full")

    assert config("{metric: ctc_kl}").threshold == 1e-4
    assert config("{metric: ctc_loss}").threshold == 0.001
    assert config("{metric: ctc_kl, threshold: 0.002}").threshold == 0.002
    assert config("{metric: cer}").threshold == 0.0025


def test_unknown_key_names_its_path_and_the_valid_keys(tmp_path):
    message = error_of(tmp_path, MINIMAL + "method_options: {stablequant: {treshold: 0.01}}\n")
    assert message.startswith("recipe.yaml: method_options.stablequant.treshold: unknown key 'treshold'")
    assert "threshold" in message.split("valid keys here:")[1]
    assert "recipe.yaml: colour: unknown key" in error_of(tmp_path, MINIMAL + "colour: red\n")


def test_unknown_method_names_its_index_and_the_choices(tmp_path):
    message = error_of(tmp_path, MINIMAL.replace("[fp, stablequant, max]", "[fp, kll]"))
    assert message.startswith("recipe.yaml: methods[1]: unknown method 'kll'; choose one of fp, stablequant, max")


@pytest.mark.parametrize("bits, expected", [
    ("[w8a8, w9a9]", "bits[1].w: bit width must be an integer from 2 to 8 (got 9)"),
    ("[int8]", "bits[0]: bad bits 'int8'"),
    ("[{w: 8}]", "bits[0].a: required key is missing"),
    ("[w8a8, w8a8]", "bits: bits lists ['w8a8'] more than once"),
])
def test_bad_bits(tmp_path, bits, expected):
    assert expected in error_of(tmp_path, MINIMAL + f"bits: {bits}\n")


def test_a_mixed_bits_item_parses_round_trips_and_labels_itself(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL.replace("max]", "max, mixed_one_stage]")
                               + "bits: [w8a8, {mixed: {budget_bits: 4.5, widths: [8, 4, 2]}}]\n"))
    mixed = recipe.bits[1]
    assert mixed.is_mixed and not recipe.bits[0].is_mixed
    assert (mixed.budget_bits, mixed.widths, mixed.a, mixed.w, mixed.label) == (4.5, (2, 4, 8), 8, 8, "mixed4.5a8")
    assert type(recipe).model_validate(recipe.to_dict()) == recipe
    alone = load_recipe(write(tmp_path, MINIMAL.replace("stablequant, ", "") + "bits: {mixed: {budget_bits: 3}}\n"))
    assert [b.label for b in alone.bits] == ["mixed3a8"]
    # no widths: each method's default (the PTQ allocation 4-8 bits, the trained methods 2-8)
    assert alone.bits[0].widths is None
    assert alone.bits[0].widths_for("stablequant") == (4, 5, 6, 8)
    assert alone.bits[0].widths_for("one-stage") == (2, 3, 4, 5, 6, 8)
    assert type(alone).model_validate(alone.to_dict()) == alone


def test_the_ptq_allocation_refuses_a_budget_below_its_default_widths(tmp_path):
    message = error_of(tmp_path, MINIMAL + "bits: {mixed: {budget_bits: 3}}\n")
    assert "bits[0].mixed: stablequant's PTQ allocation takes [4, 5, 6, 8] bits" in message
    assert "Fix: a budget >= 4, or widths: [2, 3, 4, 5, 6, 8]" in message
    explicit = load_recipe(write(tmp_path, MINIMAL + "bits: {mixed: {budget_bits: 3, widths: [2, 3, 4, 8]}}\n"))
    assert explicit.bits[0].widths_for("stablequant") == (2, 3, 4, 8)


@pytest.mark.parametrize("bits, expected", [
    ("{mixed: {budget_bits: 1.5}}", "bits[0].mixed: budget_bits 1.5 is below the smallest candidate width (2 bits)"),
    ("{mixed: {budget_bits: 2.5, widths: [3, 4]}}", "below the smallest candidate width (3 bits)"),
    ("{mixed: {budget_bits: 4, widths: [4, 7]}}", "bits[0].mixed.widths: unknown weight width(s) [7]"),
    ("{mixed: {budget: 4}}", "bits[0].mixed.budget_bits: required key is missing"),
    ("{mixed: {budget_bits: 4}, a: 9}", "bits[0].a: bit width must be an integer from 2 to 8 (got 9)"),
])
def test_bad_mixed_bits(tmp_path, bits, expected):
    assert expected in error_of(tmp_path, MINIMAL + f"bits: {bits}\n")


def test_a_mixed_only_method_needs_a_mixed_bits_item(tmp_path):
    message = error_of(tmp_path, MINIMAL.replace("max]", "mixed_two_stage]") + "bits: [w8a8]\n")
    assert "methods ['mixed_two_stage'] learn per-layer weight widths, but bits has no mixed item" in message


def test_bits_as_mappings(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL + "bits: [{w: 8, a: 8}, w6a6, {w: 4, a: 8}]\n"))
    assert [b.label for b in recipe.bits] == ["w8a8", "w6a6", "w4a8"]


def test_size_zero_and_too_large(tmp_path):
    message = error_of(tmp_path, MINIMAL.replace("size: 8", "size: 0"))
    assert message.startswith("recipe.yaml: calibration.size: size must be an integer >= 1 (got 0)")
    message = error_of(tmp_path, MINIMAL.replace("size: 16", "size: 601"))
    assert "evaluation: size 601 exceeds the 600 utterances of corpus-test" in message


def test_malformed_yaml_and_wrong_shapes(tmp_path):
    message = error_of(tmp_path, "model: sq/wav2vec2-ref\ncalibration: {dataset: corpus-dev, size: 8\n")
    assert message.startswith("recipe.yaml: malformed YAML at line")
    assert "recipe.yaml: the file is empty" in error_of(tmp_path, "")
    assert "expected a mapping" in error_of(tmp_path, "- a\n- b\n")
    assert "calibration: required key is missing" in error_of(tmp_path, "model: x\nevaluation: {dataset: "
                                                                         "corpus-test}\nmethods: [fp]\n")
    assert "backend: unknown backend 'cuda'" in error_of(tmp_path, MINIMAL + "backend: cuda\n")
    assert "calibration.dataset: unknown calibration dataset 'corpus-test'" in error_of(
        tmp_path, MINIMAL.replace("dataset: corpus-dev", "dataset: corpus-test"))


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "nope.yaml")


def test_round_trip(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL + "bits: [w8a8, {w: 6, a: 6}]\nthreads: 2\n"))
    assert Recipe.model_validate(recipe.to_dict()) == recipe
    again = load_recipe(write(tmp_path, recipe.to_yaml(), "again.yaml"))
    assert again == recipe
    two = parse_recipe({**recipe.to_dict(), "model": ["sq/wav2vec2-ref", "sq/hubert-ref"]})
    assert Recipe.model_validate(two.to_dict()) == two and two.models == ("sq/wav2vec2-ref", "sq/hubert-ref")


def test_overrides_are_validated(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    changed = with_overrides(recipe, output_dir="x", eval_size=3, calib_size=2)
    assert (changed.output_dir, changed.evaluation.size, changed.calibration.size) == ("x", 3, 2)
    with pytest.raises(RecipeError, match="command line: calibration.size"):
        with_overrides(recipe, calib_size=0)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate_and_can_run_here(path):
    from sq_plugin.runner import check_runnable

    recipe = load_recipe(path)
    assert recipe.name and Recipe.model_validate(recipe.to_dict()) == recipe
    check_runnable(recipe)  # no method that this version refuses


def test_shipped_recipes_are_the_expected_ones():
    assert {p.name for p in RECIPES} >= {"wav2vec2-ref-w8a8.yaml", "offline-full-comparison.yaml",
                                         "hubert-large-ls960-w8a8.yaml", "wav2vec2-base-960h-w8a8.yaml",
                                         "whisper-tiny-en-w8a8.yaml", "wav2vec2-ref-mixed.yaml"}


def test_corpus_sizes_match_the_corpus_config():
    from sq_plugin.speech.corpus import CorpusConfig, corpus_config

    config = CorpusConfig()
    assert CORPUS_SIZES == {"corpus-dev": config.dev_size, "corpus-dev-v1": corpus_config("v1").dev_size,
                            "corpus-test": config.test_size}


def test_int8_attention_is_an_x86_option(tmp_path):
    assert load_recipe(write(tmp_path, MINIMAL)).int8_attention is False
    assert load_recipe(write(tmp_path, MINIMAL + "int8_attention: true\n")).int8_attention is True
    with pytest.raises(RecipeError, match="int8_attention: true runs attention on oneDNN INT8 GEMMs, which backend: "
                                          "simulate does not use. Fix: backend: x86"):
        load_recipe(write(tmp_path, MINIMAL + "int8_attention: true\nbackend: simulate\n"))


def test_int8_grid_choices_match_the_x86_policy_and_bad_ones_are_refused(tmp_path):
    from sq_plugin.backends.x86_isa import GRID_CHOICES
    from sq_plugin.recipe import INT8_GRIDS

    assert INT8_GRIDS == GRID_CHOICES
    assert load_recipe(write(tmp_path, MINIMAL + "int8_grid: narrow_activations\n")).int8_grid == "narrow_activations"
    with pytest.raises(RecipeError, match="int8_grid: unknown int8_grid '7bit'; choose one of auto, full"):
        load_recipe(write(tmp_path, MINIMAL + "int8_grid: 7bit\n"))


def test_search_options_reach_the_search_config_and_bad_ones_name_their_key(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL + "method_options: {stablequant: {refine_passes: 1, "
                                                   "builtin_candidates: false, threshold: 0.01, shortlist: 2}}\n"))
    config = recipe.method_options.stablequant.search_config(w_bits=6, a_bits=6, int8_grid="full")
    assert (config.refine_passes, config.builtin_candidates, config.threshold, config.w_bits) == (1, False, 0.01, 6)
    assert config.shortlist == 2
    assert recipe.method_options.stablequant.search_config(w_bits=8, a_bits=8, int8_grid="full",
                                                           threshold=0.5).threshold == 0.5
    message = error_of(tmp_path, MINIMAL + "method_options: {stablequant: {refine_passes: -1}}\n")
    assert message.startswith("recipe.yaml: method_options.stablequant.refine_passes:")
    message = error_of(tmp_path, MINIMAL + "method_options: {stablequant: {shortlist: -2}}\n")
    assert message.startswith("recipe.yaml: method_options.stablequant.shortlist:")
    v1 = load_recipe(write(tmp_path, MINIMAL.replace("corpus-dev,", "corpus-dev-v1,")))
    assert v1.calibration.dataset == "corpus-dev-v1"
