"""The `stablequant` console script and the optimum-cli hook."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sq_plugin.cli import main
from sq_plugin.runner import ROW_KEYS

ROOT = Path(__file__).resolve().parent.parent

TINY = """\
name: tiny
model: sq/wav2vec2-ref
calibration: {dataset: corpus-dev, size: 8}
evaluation: {dataset: corpus-test, size: 16}
methods: [fp, stablequant, max]
bits: [w8a8]
backend: x86
threads: 1
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_validate_ok(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, TINY))]) == 0
    assert "recipe.yaml: valid. tiny: sq/wav2vec2-ref" in capsys.readouterr().out


def test_bad_recipe_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, TINY.replace("[fp, stablequant, max]", "[fp, kll]"))
    for command in ("validate", "run"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith("stablequant: error: recipe.yaml: methods[1]: unknown method 'kll'; choose one of")


def test_bad_override_and_unrunnable_method_exit_2_before_any_work(tmp_path, capsys):
    path = write(tmp_path, TINY)
    assert main(["run", str(path), "--calib-size", "0", "--output-dir", str(tmp_path / "out")]) == 2
    assert "calibration.size: size must be an integer >= 1 (got 0)" in capsys.readouterr().err
    whisper = write(tmp_path, TINY.replace("sq/wav2vec2-ref", "openai/whisper-tiny.en").replace(
        "methods: [", "methods: [inc_minmax, "), "w.yaml")
    assert main(["run", str(whisper), "--output-dir", str(tmp_path / "out")]) == 2
    assert "methods ['inc_minmax'] run on CTC models only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_console_script_exit_code_without_traceback(tmp_path):
    path = write(tmp_path, "model: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "sq_plugin.cli", "validate", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("stablequant: error: recipe.yaml: malformed YAML at line")
    assert "Traceback" not in proc.stderr


def test_plan_show_refuses_a_bad_file_with_one_line(tmp_path, capsys):
    (tmp_path / "plan.json").write_text('{"format": "sq-plugin-quant-plan", "version": 99, "layers": {}}')
    assert main(["plan", "show", str(tmp_path / "plan.json")]) == 2
    assert "schema version 99 is newer" in capsys.readouterr().err


def test_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "sq/wav2vec2-ref" in out and "sq/hubert-ref" in out and "facebook/hubert-large-ls960-ft" in out


def test_optimum_namespace_has_no_init_files():
    for folder in ("optimum", "optimum/commands", "optimum/commands/register"):
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow the optimum package"
    assert (ROOT / "optimum/commands/register/stablequant.py").exists()


@pytest.mark.skipif(importlib.util.find_spec("optimum.commands.base") is None,
                    reason="optimum not installed (sq-plugin[optimum])")
def test_optimum_cli_hook():
    from optimum.commands.base import BaseOptimumCLICommand

    spec = importlib.util.spec_from_file_location("sq_optimum_hook", ROOT / "optimum/commands/register/stablequant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    [command] = module.REGISTER_COMMANDS
    assert issubclass(command, BaseOptimumCLICommand) and command.COMMAND.name == "stablequant"

    exe = shutil.which("optimum-cli")
    registered = importlib.util.find_spec("optimum.commands.register")
    if exe is None or registered is None:
        pytest.skip("optimum-cli does not see this checkout (run `pip install -e .[optimum]`)")
    proc = subprocess.run([exe, "stablequant", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--calib-size" in proc.stdout and "recipe" in proc.stdout


def test_optimum_cli_runs_a_small_recipe_on_real_int8(tmp_path):
    """`optimum-cli stablequant RECIPE` (the CLI plugin in optimum/commands/register) runs a recipe as
    `stablequant run` does: FP and MAX on the shipped wav2vec2 reference, 2 calibration and 4 test utterances."""
    exe = shutil.which("optimum-cli") or str(Path(sys.executable).parent / "optimum-cli")
    if not Path(exe).exists() or importlib.util.find_spec("optimum.commands.base") is None:
        pytest.fail("optimum-cli is missing: the dev extra installs optimum (pip install -e '.[dev]')")
    path = write(tmp_path, TINY.replace("methods: [fp, stablequant, max]", "methods: [fp, max]"), "small.yaml")
    proc = subprocess.run([exe, "stablequant", str(path), "--output-dir", str(tmp_path / "out"), "--calib-size", "2",
                           "--eval-size", "4", "--quiet"], capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run_dir] = list((tmp_path / "out").iterdir())
    data = json.loads((run_dir / "results.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"fp", "max"} and rows["max"]["n_eval"] == 4
    assert rows["max"]["int8_kernels"] > 0 and not rows["max"]["simulated"]
    assert (run_dir / rows["max"]["plan"]).is_file()


@pytest.mark.slow
def test_run_tiny_recipe_end_to_end_on_real_int8(tmp_path):
    path = write(tmp_path, TINY, "tiny.yaml")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sq_plugin.cli", "run", str(path), "--output-dir", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=3000, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout and "stablequant" in proc.stdout
    [run_dir] = list(out.iterdir())
    assert run_dir.name.startswith("tiny-")
    names = {p.name for p in run_dir.iterdir()}
    assert {"report.md", "results.json", "wer_by_method_sq_wav2vec2-ref.png",
            "stablequant_layers_sq_wav2vec2-ref_w8a8.png"} <= names
    data = json.loads((run_dir / "results.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"fp", "stablequant", "max"}
    for row in data["rows"]:
        assert set(ROW_KEYS) <= set(row) and row["n_eval"] == 16
    for method in ("stablequant", "max"):
        assert rows[method]["int8_kernels"] > 0 and not rows[method]["simulated"]
        assert "onednn-int8" in rows[method]["backend"]
    sq = rows["stablequant"]
    assert math.isfinite(sq["wer"]) and abs(sq["wer"] - sq["fp_wer"]) <= 0.1
    assert sq["search_seconds"] > 0 and data["peak_rss_mb"] > 0
    assert "## StableQuant search: sq/wav2vec2-ref w8a8" in (run_dir / "report.md").read_text()
    # the search's decision is saved as a plan, readable with `stablequant plan show`
    plan_file = str(run_dir / "plan_sq_wav2vec2-ref_stablequant_w8a8.json")
    shown = subprocess.run([sys.executable, "-m", "sq_plugin.cli", "plan", "show", plan_file], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "model: sq/wav2vec2-ref" in shown.stdout and "method: stablequant" in shown.stdout
    assert "| wav2vec2.feature_extractor.conv_layers.0.conv | conv1d |" in shown.stdout
    # MAX decided on the search's statistics (one pass), as a plan of its own
    assert "plan_sq_wav2vec2-ref_max_w8a8.json" in names and data["statistics_seconds"]["sq/wav2vec2-ref"] > 0
    assert rows["max"]["plan"] == "plan_sq_wav2vec2-ref_max_w8a8.json"


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed: may really download")
def test_unavailable_librispeech_exits_1_with_the_fix(tmp_path, capsys):
    path = write(tmp_path, TINY.replace("corpus-dev", "librispeech-validation.clean"))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 1
    assert "pip install datasets" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_validate_and_plan_show_import_no_torch(tmp_path):
    """What keeps `stablequant validate` well under a second: it never imports torch (nor numpy)."""
    from sq_plugin.core.plan import LayerPlan, QuantPlan, x86_grids

    weight, act = x86_grids(8, 8)
    plan = QuantPlan({"fc": LayerPlan("linear", act, (-1.0, 1.0), weight)}, {"model": "m"}).save(tmp_path / "p.json")
    recipe = write(tmp_path, TINY, "tiny.yaml")
    code = ("import sys; from sq_plugin.cli import main; "
            f"assert main(['validate', {str(recipe)!r}]) == 0; assert main(['plan', 'show', {str(plan)!r}]) == 0; "
            "heavy = [m for m in ('torch', 'numpy', 'torchao') if m in sys.modules]; assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| fc | linear | 8-bit uint 0..255 affine per tensor |" in proc.stdout
