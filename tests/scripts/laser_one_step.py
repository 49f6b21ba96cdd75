"""One LaSeR step on fixed completions, run under torchrun with 1 or 2 CPU processes (gloo), optionally under ZeRO.

    python -m torch.distributed.run --nproc_per_node N laser_one_step.py MODEL_DIR OUT.json [ROW_UPDATE [ZERO_STAGE
        [CAPTURED]]]

Writes, from rank 0, every row's advantage, class coefficient and target, the logged metrics, and the parameter update,
so that a test can check that splitting the generation batch over processes, or sharding it with DeepSpeed ZeRO-2/3,
changes none of them. ZERO_STAGE 0 (default) is plain DDP. With CAPTURED 1, rank 0's generation hands the trainer
the z_c log-probs that `generate` would have read (from a plain, unsharded copy of the model), and the other ranks'
hand none: the mix then takes rank 0's values as read and computes the others' by the forward that every process
joins, which must change nothing. ROW_UPDATE `least_squares+groups` also switches on the levers that act within a
group: the within-group fit of z_c's row, per-group class weights, the pair loss and the MSE's between-group part
weighted down; `least_squares+refit` the end-of-training refit of the row (each process re-reads its own
micro-batches, the sums are reduced);
`optimizer+exclude` leaves z_c out of the loss's softmax (`self_reward_exclude_from_policy`), whose two head rows
ZeRO-3 must gather inside the forward.
"""

import contextlib
import json
import os
import sys

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_laser import LaSeRConfig, LaSeRGRPOTrainer


# Completions per (prompt parity, k-th sample of that prompt): finished (EOS 2) and truncated rows in each group.
TABLE = [
    [[105, 106, 2], [109, 2], [111, 112, 113, 114, 115, 2], [120, 121, 122, 123, 124, 125]],
    [[130, 131, 132, 2], [131, 132, 2], [140, 141, 142, 143, 144, 145], [2]],
]


def parity_reward(completion_ids, **kwargs):
    return [float(len(ids) % 2 == 0) for ids in completion_ids]


def fixed_generation(prompt_ids, *args, **kwargs):
    seen, out = {}, []
    for ids in prompt_ids:
        k = seen.get(tuple(ids), 0)
        seen[tuple(ids)] = k + 1
        out.append(list(TABLE[sum(ids) % 2][k]))
    return out, None


def full_parameters(trainer):
    """The model's parameters, gathered from their ZeRO-3 shards when there are any."""
    if trainer.is_deepspeed_enabled:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(trainer.model.parameters()))
    return contextlib.nullcontext()


def generation_time_zc(model_dir: str):
    """z_c's log-prob after each finished (prompt, completion), as `generate` reads it: a plain forward."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    zc = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<gh_stars>")

    def logp(prompt_ids: list[int], completion: list[int]) -> float:
        if completion[-1] != 2:  # truncated: generate reads nothing
            return float("nan")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + completion])).logits[0, -1]
        return logits.float().log_softmax(-1)[zc].item()

    return logp


def main(model_dir: str, out_path: str, row_update: str, zero_stage: int, captured: bool = False) -> None:
    if zero_stage:  # what `accelerate launch` with recipes/accelerate_configs/zero{2,3}.yaml sets
        from trl_laser.launch import skip_deepspeed_shm_build

        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(zero_stage))
        skip_deepspeed_shm_build()
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)} for i in range(8)]
    )
    # Loaded before the config: under ZeRO-3 a model loaded afterwards would be partitioned (its forward collective).
    logp = generation_time_zc(model_dir) if captured else None
    row_update, *extras = row_update.split("+")
    levers = (
        dict(
            self_reward_row_between_weight=0.0,
            self_reward_class_weights="group",
            self_reward_pair_loss_coef=0.5,
            self_reward_mse_between_weight=0.25,
        )
        if "groups" in extras
        else {}
    )
    if "refit" in extras:
        levers["self_reward_row_refit_steps"] = 1
    if "exclude" in extras:
        levers.update(self_reward_suppress_sampling=True, self_reward_exclude_from_policy=True)
    args = LaSeRConfig(
        output_dir=out_path + ".run",
        per_device_train_batch_size=8 // int(os.environ.get("WORLD_SIZE", "1")),  # one generation batch of 8
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=not zero_stage,  # DeepSpeed picks its CPU accelerator itself; use_cpu would bypass it
        ddp_backend="gloo" if zero_stage else None,
        bf16=False,
        seed=0,
        self_reward_token="<gh_stars>",
        self_reward_ref_constant=-12.0,
        self_reward_advantage_coef=0.3,
        self_reward_std_threshold=0.0,
        self_reward_row_update=row_update,
        **levers,
    )
    world = args.world_size
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = LaSeRGRPOTrainer(model=model, reward_funcs=parity_reward, args=args, train_dataset=dataset)
    trainer._generate_single_turn = fixed_generation
    if captured:

        def generation_with_capture(prompt_ids, *args, **kwargs):
            completions, logprobs = fixed_generation(prompt_ids)
            if trainer.accelerator.process_index == 0:
                trainer._laser_generation_zc = [logp(p, c) for p, c in zip(prompt_ids, completions)]
            return completions, logprobs

        trainer._generate_single_turn = generation_with_capture
    rows = []
    original = trainer._generate_and_score_completions

    def capture(inputs):
        output = original(inputs)
        for i in range(output["completion_ids"].size(0)):
            rows.append(
                {
                    "prompt": inputs[i]["prompt"][0]["content"],
                    "completion": output["completion_ids"][i][output["completion_mask"][i].bool()].tolist(),
                    "advantage": output["advantages"][i].item(),
                    "coef": output["self_reward_coef"][i].item(),
                    "target": output["self_reward_target"][i].item(),
                }
            )
        return output

    trainer._generate_and_score_completions = capture
    with full_parameters(trainer):
        before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.train()
    with full_parameters(trainer):
        delta = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]) - before
    all_rows = gather_object(rows)
    if trainer.accelerator.is_main_process:
        metrics = {k: v for k, v in trainer.state.log_history[0].items() if k.startswith("self_reward/")}
        torch.save(delta.double(), out_path + ".delta.pt")
        with open(out_path, "w") as f:
            json.dump({"rows": all_rows, "metrics": metrics, "world": world}, f)
    # Every process waits for the main one to have written, then tears the gloo group down before the interpreter
    # exits, as `trl-laser train` does: gloo's worker threads still alive at exit abort a rank ("terminate called
    # without an active exception"), which CI saw once with the barrier alone.
    trainer.accelerator.wait_for_everyone()
    trainer.end()


if __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2],
        sys.argv[3] if len(sys.argv) > 3 else "optimizer",
        int(sys.argv[4]) if len(sys.argv) > 4 else 0,
        len(sys.argv) > 5 and sys.argv[5] == "1",
    )
