"""`stablequant`: run, validate and list what a recipe can use.

    stablequant run recipes/wav2vec2-ref-w8a8.yaml [--output-dir D] [--eval-size N] [--calib-size N]
    stablequant validate recipes/offline-full-comparison.yaml
    stablequant models
    stablequant plan show runs/recipes/<run>/plan_sq_wav2vec2-ref_w8a8.json

Exit codes: 0 ok, 2 a recipe problem (one line on stderr, no traceback), 1 a model or data set that
cannot be fetched. The same `run` is reachable as `optimum-cli stablequant` when optimum is installed
(optimum/commands/register/stablequant.py). Heavy imports (torch) happen only inside `run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sq_plugin.recipe import RecipeError, load_recipe, with_overrides

EXIT_RECIPE = 2
EXIT_UNAVAILABLE = 1
EXIT_RANK_FAILED = 3  # under torchrun: another rank died or hung; nothing was written


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `stablequant run` (shared with `optimum-cli stablequant`)."""
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("--output-dir", help="override output_dir (a run writes output_dir/<name>-<timestamp>/)")
    parser.add_argument("--eval-size", type=int, help="override evaluation.size (utterances)")
    parser.add_argument("--calib-size", type=int, help="override calibration.size (utterances)")
    parser.add_argument("--quiet", action="store_true", help="no progress messages, only the summary")


def _fail(message: str, code: int) -> int:
    print(f"stablequant: error: {message}", file=sys.stderr)
    return code


def run_command(args: argparse.Namespace) -> int:
    import warnings

    # Inductor's x86 INT8 lowering warns once per compiled layer about its own tensor copies: noise here.
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
    from sq_plugin import parallel
    from sq_plugin.runner import DataUnavailableError, check_runnable, run_recipe, summary_table
    from sq_plugin.speech.models import HubUnavailableError

    try:
        recipe = load_recipe(args.recipe)
        recipe = with_overrides(recipe, source=f"{args.recipe} (with command-line overrides)",
                                output_dir=args.output_dir, eval_size=args.eval_size, calib_size=args.calib_size)
        check_runnable(recipe)
        parallel.init_from_env()  # under torchrun: join its process group (each rank then evaluates a share)
        result = run_recipe(recipe, progress=not args.quiet)
    except RecipeError as exc:
        return _fail(str(exc), EXIT_RECIPE)
    except (HubUnavailableError, DataUnavailableError) as exc:  # their messages already say how to fix it
        return _fail(str(exc), EXIT_UNAVAILABLE)
    except parallel.RankFailedError as exc:
        return _fail(str(exc), EXIT_RANK_FAILED)
    if not parallel.is_main():
        return 0  # rank 0 prints and writes for all
    print(summary_table(result))
    print(f"\nreport: {result.output_dir / 'report.md'}  (peak RSS {result.peak_rss_mb:.0f} MiB, "
          f"{result.seconds:.0f} s)")
    return 0


def validate_command(args: argparse.Namespace) -> int:
    from sq_plugin.runner import check_runnable

    try:
        recipe = load_recipe(args.recipe)
        check_runnable(recipe)  # static checks only: nothing is loaded
    except RecipeError as exc:
        return _fail(str(exc), EXIT_RECIPE)
    bits = ", ".join(b.label for b in recipe.bits)
    print(f"{args.recipe}: valid. {recipe.name}: {', '.join(recipe.models)}; calibration {recipe.calibration.size} x "
          f"{recipe.calibration.dataset}; evaluation {recipe.evaluation.size or 'all'} x {recipe.evaluation.dataset}; "
          f"methods {', '.join(recipe.methods)}; bits {bits}; backend {recipe.backend}; output {recipe.output_dir}")
    return 0


def plan_show_command(args: argparse.Namespace) -> int:
    from sq_plugin.core.plan import PlanError, QuantPlan

    try:
        plan = QuantPlan.load(args.plan)
    except PlanError as exc:
        return _fail(str(exc), EXIT_RECIPE)
    print(plan.table(), end="")
    return 0


def models_command(_args: argparse.Namespace) -> int:
    from sq_plugin.speech.models import HUB_MODELS, list_models

    print("offline (shipped or converted, no network):")
    for name in list_models():
        note = ("  (Whisper: recipes run it as a labelled fake-quant simulation; INT8 kernels through "
                "sq_plugin.families.whisper_int8)") if "whisper" in name else ""
        print(f"  {name}{note}")
    print("hub (need network or a populated Hugging Face cache):")
    for name in HUB_MODELS:
        if name not in list_models():
            print(f"  {name}")
    print("or a local save_pretrained directory of a CTC model")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablequant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe and write its report")
    add_run_arguments(run)
    run.set_defaults(func=run_command)
    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe")
    validate.set_defaults(func=validate_command)
    models = sub.add_parser("models", help="list the model names a recipe can use")
    models.set_defaults(func=models_command)
    plan = sub.add_parser("plan", help="inspect a quantization plan (plan_*.json of a run)")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    show = plan_sub.add_parser("show", help="print a plan as a per-layer table")
    show.add_argument("plan", help="plan JSON file")
    show.set_defaults(func=plan_show_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
