"""`trl-laser train`: LaSeR (or its GRPO baseline) from a recipe, the way `trl grpo` trains GRPO.

    trl-laser train --config recipes/quickstart/laser/config_smollm2_arithmetic.yaml [--key value ...]
    trl-laser train --config recipes/Qwen2.5-7B/laser/config_deepmath.yaml --accelerate_config zero3

The recipe (YAML) gives defaults and the command line wins, over `LaSeRScriptArguments` (data and rewards),
`LaSeRConfig` (training, LaSeR included) and TRL's `ModelConfig`; a key that none of them has is an error naming the
nearest valid key (`trl_laser.recipe`). Keys of `accelerate launch` (`--num_processes`, `--machine_rank`, ...) and
`--accelerate_config NAME|PATH` relaunch this script through `accelerate launch` (`trl_laser.launch`, which also adapts
the launch to a machine without a GPU).
"""

import functools
import gc
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence

from trl import ModelConfig

from trl_laser.config import LaSeRConfig, LaSeRScriptArguments
from trl_laser.launch import LaunchedRunFailed, LaunchError, relaunch, skip_deepspeed_shm_build
from trl_laser.launch_lifetime import die_with_launcher, launched_by_launcher
from trl_laser.recipe import RecipeError, RecipeParser, parse_args, recipe_text
from trl_laser.run_dir import (
    OutputDirWriter,
    RunFinished,
    check_output_dir,
    checkpoints,
    fit_dir,
    is_complete,
    resumed_recipe,
)


TRACEBACK_ENV = "TRL_LASER_TRACEBACK"  # set to 1 for the full trace of an error raised while training
# The refit the end of a run suggests: on 1,024 problems x 8 it read the quickstart's trained states better than on
# 512, and those better than on 256 (docs/miniature.md, "A fit on 1,024 problems").
SUGGESTED_FIT_ROW_PROBLEMS = 1024


def make_parser(prog: str | None = None) -> RecipeParser:
    """The `TrlParser` over `LaSeRScriptArguments`, `LaSeRConfig` and `ModelConfig`, checking recipes strictly."""
    return RecipeParser(prog)


def build_trainer(script_args: LaSeRScriptArguments, training_args: LaSeRConfig, model_args: ModelConfig):
    """The `LaSeRGRPOTrainer` a recipe describes; bad input raises `RecipeError` before any training."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_laser.data import filter_long_prompts, load_split, prompt_settings
    from trl_laser.models import ModelNotFoundError, resolve_model_path
    from trl_laser.rewards import get_reward_funcs
    from trl_laser.trainer import LaSeRGRPOTrainer

    if not model_args.model_name_or_path:
        raise RecipeError("`model_name_or_path` is not set: give a Hub id, a local directory, or an alias.")
    try:
        model_path = resolve_model_path(model_args.model_name_or_path)
        reward_funcs = get_reward_funcs(script_args.reward_funcs)
        seed = script_args.dataset_seed
        train_dataset = load_split(script_args, script_args.dataset_train_split, script_args.max_train_samples, seed)
        eval_dataset = None
        if training_args.eval_strategy != "no":
            eval_dataset = load_split(script_args, script_args.dataset_test_split, script_args.max_eval_samples, seed)
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if script_args.max_prompt_length is not None:
            limit, kwargs = script_args.max_prompt_length, training_args.chat_template_kwargs
            train_dataset = filter_long_prompts(train_dataset, tokenizer, limit, kwargs)
            if eval_dataset is not None:
                eval_dataset = filter_long_prompts(eval_dataset, tokenizer, limit, kwargs)

        model_init_kwargs = dict(
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=model_args.dtype,
        )
        model_init_kwargs.update(training_args.model_init_kwargs or {})
        training_args.model_init_kwargs = model_init_kwargs
        trainer = LaSeRGRPOTrainer(
            model=model_path,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
        )
        trainer.prompt_settings = prompt_settings(script_args)  # saved with the model, read back by `trl-laser eval`
        return trainer
    except RecipeError:
        raise
    except ModelNotFoundError as err:
        raise RecipeError(str(err)) from None
    except (ValueError, TypeError, OSError, ImportError) as err:  # missing column, unknown model, offline Hub, ...
        raise RecipeError(f"{type(err).__name__}: {' '.join(str(err).split())}") from err


def main(
    script_args: LaSeRScriptArguments, training_args: LaSeRConfig, model_args: ModelConfig, recipe: str | None = None
) -> None:
    """Train, save (weights, tokenizer, `self_reward_config.json`, `trainer_state.json`) and optionally push, as TRL's
    grpo.py does.

    `recipe` is the recipe text written next to the model (and into the model card) for reproducibility, once the
    first step has run (a resumed run's after the recipe of the run it continues). `output_dir` is checked first
    (`check_output_dir`: raises `RunFinished` when a resumed run has nothing left to train). A `ValueError` or
    `OSError` raised while the trainer sets up (before its first step: resuming with other self-reward settings, a
    checkpoint that does not fit the model) is one of the run's settings: `RecipeError`.
    """
    from trl_laser.hub import CARD_METRICS, final_self_reward_metrics

    # a `trl-laser train` launcher has checked the output dir and said what it skipped, once
    say = (lambda _: None) if launched_by_launcher() else None
    old_checkpoints = check_output_dir(script_args, training_args, say=say)
    if recipe is not None and training_args.resume_from_checkpoint is not None:
        recipe = resumed_recipe(training_args.resume_from_checkpoint, recipe)
    trainer = build_trainer(script_args, training_args, model_args)
    writer = OutputDirWriter(recipe, old_checkpoints)
    trainer.add_callback(writer)

    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except BaseException as err:  # end the progress bar's line, so that the error is reported on a line of its own
        for callback in trainer.callback_handler.callbacks:
            if getattr(callback, "training_bar", None) is not None:
                callback.training_bar.close()
        if isinstance(err, (ValueError, OSError)) and not writer.training_began:
            raise RecipeError(f"{type(err).__name__}: {' '.join(str(err).split())}") from err
        raise
    trainer.accelerator.print("Training completed.")

    if trainer.accelerator.is_main_process:  # the per-step logs (curves), which TRL keeps only in checkpoints
        os.makedirs(training_args.output_dir, exist_ok=True)
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))

    # Only the main process of the main node reports what was saved: it alone writes (`accelerator.print` would
    # print on the local main process of every node).
    report = print if trainer.accelerator.is_main_process else lambda *_: None
    metrics = final_self_reward_metrics(trainer.state.log_history)
    if metrics:
        summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in CARD_METRICS if k in metrics)
        report(f"Final self-verification metrics (step {metrics.get('step')}): {summary}")

    if training_args.push_to_hub:  # saves into output_dir, then uploads it once, with the LaSeR model card
        trainer.push_to_hub(dataset_name=_hub_dataset_name(script_args.dataset_name))
        report(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    else:
        trainer.save_model(training_args.output_dir)
        trainer.create_model_card(dataset_name=_hub_dataset_name(script_args.dataset_name))
    report(f"Model, tokenizer, self-reward settings and model card saved to {training_args.output_dir}.")
    model = training_args.output_dir
    hub_model_id = trainer.hub_model_id if training_args.push_to_hub else None
    if script_args.fit_row_problems:
        model = refit_row(script_args, training_args, trainer, report)
    elif training_args.self_reward_row_update == "least_squares":  # row-only runs too (the config requires it)
        # the row was fitted on the way, to states the model has since left: its refit on the final states comes next
        model = fit_dir(training_args.output_dir)
        report(
            "Its score's row was fitted on the way, to earlier states (self_reward_row_update: least_squares): refit "
            "it to the final model's own answers on training problems (`--fit_row_problems "
            f"{SUGGESTED_FIT_ROW_PROBLEMS}` does it at the end of training):\n  "
            + fit_row_command(script_args, training_args, model, hub_model_id)
        )
    report(
        "Check its self-verification on problems it never saw, beside the free mean-token-log-prob baseline:\n  "
        + eval_command(script_args, training_args, model)
    )
    # Every process waits until the main one has written everything: a process that tore its gloo group down while
    # another still used it was aborted by the C++ runtime ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    trainer.end()


class RowRefitFailed(RuntimeError):
    """The refit after training (`fit_row_problems`) failed; the trained model is saved."""


def refit_row(
    script_args: LaSeRScriptArguments, training_args: LaSeRConfig, trainer, report: Callable[[str], None]
) -> str:
    """`trl-laser fit-row` on the saved model, by the main process while the others wait: z_c's row refitted to the
    final model's answers on the first `fit_row_problems` training problems, with the command's defaults (8 answers
    each, sampling seed 0, 5 folds), into `<output_dir>-fit`, then pushed after the trained model with `push_to_hub`.
    It loads a second copy of the model on the main process's device, once the optimizer's state is released
    (`release_training_state`). Returns the fitted model's directory."""
    from trl_laser.evaluation import Sampling
    from trl_laser.hub import push_row_fit
    from trl_laser.row_fit import fit_row, format_row_fit

    fitted = fit_dir(training_args.output_dir)
    hub_model_id = trainer.hub_model_id if training_args.push_to_hub else None
    release_training_state(trainer)
    if trainer.accelerator.is_main_process:
        report(f"Refitting z_c's row on {script_args.fit_row_problems} training problems (fit_row_problems) ...")
        sampling = Sampling(
            num_samples=8,
            max_new_tokens=training_args.max_completion_length,
            batch_size=training_args.generation_batch_size,
        )
        try:
            result = fit_row(
                training_args.output_dir,
                str(script_args.dataset_name),
                fitted,
                split=fit_row_split(script_args),
                problem_column=script_args.problem_column,
                answer_column=script_args.answer_column,
                dataset_config=script_args.dataset_config,
                max_problems=script_args.fit_row_problems,
                sampling=sampling,
                device=str(trainer.accelerator.device),
                overwrite=True,  # a used folder was refused before training, unless overwrite_output_dir
                hub_model_id=hub_model_id,
            )
        except (ValueError, OSError) as err:
            command = fit_row_command(script_args, training_args, fitted, hub_model_id, script_args.fit_row_problems)
            raise RowRefitFailed(
                f"the refit after training (fit_row_problems) failed: {err} The trained model is saved in "
                f"{training_args.output_dir}; refit it with: {command} --batch-size "
                f"{training_args.generation_batch_size} --overwrite"
            ) from err
        report(format_row_fit(result))
        if hub_model_id:  # a failed upload says how to upload the saved fit later
            repo_id = push_row_fit(fitted, hub_model_id, training_args.hub_token, training_args.hub_private_repo)
            report(f"Model with the refitted row pushed to the Hub in https://huggingface.co/{repo_id}.")
        report(f"Model with the refitted row saved to {fitted}.")
    trainer.accelerator.wait_for_everyone()
    return fitted


def fit_row_split(script_args: LaSeRScriptArguments) -> str:
    """The split the refit samples: `fit_row_split`, else the training split."""
    return script_args.fit_row_split or script_args.dataset_train_split


def release_training_state(trainer) -> None:
    """Drop what only training needs before the refit loads its own copy of the model: the optimizer's state (Adam's
    is twice the weights in float32), the scheduler, a DeepSpeed engine's partitions and hooks, the reference model.
    The trainer cannot train afterwards; it can still `end()`."""
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
    trainer.deepspeed = None
    trainer.model_wrapped = trainer.model
    trainer.ref_model = None
    trainer.accelerator.free_memory()  # its own references (and the DeepSpeed engine's), then gc and the device cache
    gc.collect()


def _hub_dataset_name(name: str | None) -> str | None:
    """The dataset to name in the model card: a Hub dataset only (not a file, not the built-in set)."""
    if not name or name.startswith("builtin:") or os.path.exists(name):
        return None
    return name


def _columns(script_args: LaSeRScriptArguments) -> list[str]:
    """The dataset options of a command that reads the run's dataset, where they differ from the command's defaults."""
    command = []
    if script_args.dataset_config is not None:
        command += ["--dataset-config", script_args.dataset_config]
    if script_args.problem_column != "problem":
        command += ["--problem-column", script_args.problem_column]
    if script_args.answer_column != "answer":
        command += ["--answer-column", script_args.answer_column]
    return command


def fit_row_command(
    script_args: LaSeRScriptArguments,
    training_args: LaSeRConfig,
    fitted: str,
    hub_model_id: str | None = None,
    max_problems: int | None = None,
) -> str:
    """The `trl-laser fit-row` command that refits z_c's row of the saved model on `max_problems` training problems
    (`SUGGESTED_FIT_ROW_PROBLEMS` by default), into `fitted`, then pushes it to `hub_model_id` when given (a new commit over the trained
    model's: the fitted model is the one to score with)."""
    command = ["trl-laser", "fit-row", "--model", training_args.output_dir, "--dataset", str(script_args.dataset_name)]
    max_problems = max_problems or SUGGESTED_FIT_ROW_PROBLEMS
    command += ["--split", fit_row_split(script_args), "--max-problems", str(max_problems), "--num-samples", "8"]
    command += ["--max-new-tokens", str(training_args.max_completion_length), *_columns(script_args)]
    command += ["--output-dir", fitted]
    if hub_model_id:
        command += ["--push-to-hub", "--hub-model-id", hub_model_id]
    return shlex.join(command)


def eval_command(script_args: LaSeRScriptArguments, training_args: LaSeRConfig, model: str) -> str:
    """The `trl-laser eval` command that scores `model` on the held-out split (the prompt settings of training are
    saved with the model, and eval reads them back)."""
    command = ["trl-laser", "eval", "--model", model, "--dataset", str(script_args.dataset_name)]
    command += ["--split", script_args.dataset_test_split, "--num-samples", "4"]
    command += ["--max-new-tokens", str(training_args.max_completion_length), *_columns(script_args)]
    command += ["--output-dir", os.path.normpath(model) + "-eval"]  # beside the model, not in it
    return shlex.join(command)


def report_failure(err: BaseException, output_dir: str | None, launched: bool = False) -> int:
    """Report an error raised while training (or an interrupt) in one line, the trace only with
    `TRL_LASER_TRACEBACK=1`; return the exit status (1, or 130 for an interrupt, which the launcher of a launched
    process reports: `launched` is true only in the processes that `accelerate launch` started)."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exception(err)
        hint = ""
    else:
        hint = f" (run with {TRACEBACK_ENV}=1 for the full traceback)"
    if isinstance(err, KeyboardInterrupt):
        if launched and launched_by_launcher():  # the `trl-laser train` launcher says it, once
            return 130
        done = [c for c in checkpoints(output_dir) if is_complete(c)] if output_dir else []
        resume = (
            f" Its latest checkpoint is {done[-1]}: continue with `--resume_from_checkpoint true`."
            if done
            else " It saved no checkpoint (`save_strategy: steps` with `save_steps` saves them)."
        )
        print(f"trl-laser train: interrupted.{resume}", file=sys.stderr, flush=True)
        return 130
    message = " ".join(str(err).split())
    print(f"trl-laser train: error: {type(err).__name__}: {message}{hint}", file=sys.stderr, flush=True)
    return 1


def prepare_model(model_args: ModelConfig) -> None:
    """Before a relaunch: find the model once, in this one process, so that a missing one is one line here, and the
    packaged SmolLM2 is converted here rather than by every launched process at once (under ZeRO-3 their loading is
    partitioned and cannot write the float copy)."""
    from trl_laser.models import ModelNotFoundError, resolve_model_path

    if model_args.model_name_or_path:
        try:
            resolve_model_path(model_args.model_name_or_path)
        except ModelNotFoundError as err:
            raise RecipeError(str(err)) from None


def run(argv: Sequence[str], launched: bool = False) -> int:
    """`trl-laser train ARGS`: relaunch through accelerate if the arguments ask for it, else train in this process.

    `launched` is true in the processes that `accelerate launch` started (`python train.py ARGS`): they train, whatever
    launch keys the recipe holds, since those were used already, and die with their launcher. A relaunch checks the
    output dir first, so that what it refuses is said once, before any process starts.

    Returns the exit status: 0, 2 for a usage error (a setting, the command line, the output dir; found before the
    run or while the trainer sets up), 1 for an error while training, 130 for an interrupt, or a launched process's.
    """
    if launched:
        die_with_launcher()
        skip_deepspeed_shm_build()
    parser = make_parser()
    parsed = None
    try:
        parsed = parse_args(argv, parser)
        if parsed.launch_args and not launched:
            check_output_dir(parsed.script_args, parsed.training_args)
            prepare = functools.partial(prepare_model, parsed.model_args)
            relaunch(__file__, parsed.script_argv, parsed.launch_args, parsed.training_args, prepare=prepare)
            return 0
        main(parsed.script_args, parsed.training_args, parsed.model_args, recipe=recipe_text(parsed))
    except RunFinished as finished:
        if parsed.training_args.process_index == 0:
            print(finished, flush=True)
    except (RecipeError, LaunchError) as err:
        parser.error(str(err))
    except LaunchedRunFailed as err:  # the launched run has printed its error: say which process, in one line
        print(f"trl-laser train: error: {err}", file=sys.stderr, flush=True)
        return err.returncode
    except (Exception, KeyboardInterrupt) as err:  # raised while training: one line, the trace when asked
        return report_failure(err, parsed.training_args.output_dir if parsed else None, launched)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], launched=True))
