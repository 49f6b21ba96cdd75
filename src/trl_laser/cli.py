"""`trl-laser`: the command line of the package (also `python -m trl_laser`).

    trl-laser train --config RECIPE.yaml [--key value ...] [--accelerate_config zero3|PATH] [accelerate flags]
    trl-laser estimate-ref-constant --model MODEL --token TOKEN [--dataset ...] [--num-samples N] [--json]
    trl-laser eval --model MODEL --dataset DATASET [...]
    trl-laser probe --model MODEL --dataset DATASET [--self-reward-token TOKEN] [--num-samples N] [--json]
    trl-laser fit-row --model MODEL --dataset DATASET --output-dir DIR [--max-problems K] [--num-samples N]

`eval` reports a model's LaSeR score beside the free confidence signals (token log-probs, answer agreement);
`probe` asks, before any training, how well the EOS state (a cross-validated linear read-out: the ceiling), those free
signals and the current z_c score tell right from wrong; `fit-row` refits a trained model's z_c row to its own answers
on training problems.

Each subcommand's module is imported only when it runs, so `trl-laser --help` is fast and one missing module does
not break the others.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trl_laser.scripts.common import exit_status


_TRAIN_HELP = "Train with LaSeR (or the GRPO baseline) from a recipe; `trl-laser train --help` lists every key."


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; `eval`, `probe` and `fit-row` are added when the evaluation modules are installed."""
    from trl_laser.scripts import estimate_ref_constant

    parser = argparse.ArgumentParser(
        prog="trl-laser", description="LaSeR (arXiv 2510.14943) for Hugging Face TRL.", allow_abbrev=False
    )
    subparsers = parser.add_subparsers(dest="command")
    # `train` parses its own arguments (a TrlParser over three dataclasses, plus accelerate's): registered bare here.
    subparsers.add_parser("train", help=_TRAIN_HELP, add_help=False)
    estimate_ref_constant.make_parser(subparsers).set_defaults(run=estimate_ref_constant.main)
    try:
        from trl_laser.scripts import eval as eval_script
        from trl_laser.scripts import fit_row as fit_row_script
        from trl_laser.scripts import probe as probe_script
    except ImportError:  # the evaluation modules are optional: the other commands work without them
        eval_script = probe_script = fit_row_script = None
    if eval_script is not None:
        eval_script.make_parser(subparsers).set_defaults(run=eval_script.main)
        probe_script.make_parser(subparsers).set_defaults(run=probe_script.main)
        fit_row_script.make_parser(subparsers).set_defaults(run=fit_row_script.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to `train`, `estimate-ref-constant`, `eval`, `probe` or `fit-row`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from trl_laser.scripts import train

        return train.run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    return exit_status(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
