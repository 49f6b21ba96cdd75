"""LaSeR training on vLLM generation (TRL's colocate mode) with a real vLLM engine: the measurements that
tests/test_vllm.py checks, taken in a process of their own (one engine, released when the process ends).

    python tests/scripts/vllm_colocate_train.py MODEL_DIR OUTPUT_DIR

TRL's weight sync calls the vLLM model's `load_weights`, which vLLM's CPU model lacks; here, and only here, it is
replaced by the model runner's `reload_weights` of the trainer's current weights, then `reset_prefix_cache()`. The
rest is TRL's and the package's own: TRL's colocate engine (vLLM's automatic dtype: bfloat16 for this float32 model),
the trainer in float32. The verifier calls the longer half of each group right, so that every group holds both classes
(SmolLM2-135M rarely gets arithmetic right, and often writes one answer four times). Writes OUTPUT_DIR/result.json
with, in this order:

1. `config` (the settings a hand computation of the mix needs), `vllm_dtype`, and `trl_sync_error`: what TRL's own
   sync raised on this build (None if it worked).
2. `train`: `max_steps` optimizer steps with `log_completions`; per generation batch (`describe`) the completion ids,
   finished, the verifier reward recomputed by hand, the advantage the trainer computed, z_c's log-prob from TRL's old
   log-probs and from a plain transformers forward, and how far vLLM's sampling log-probs are from the current policy
   (synced) and from the initial one (what a missing sync would leave); the completions tables; the log history.
3. `mix_is_on` / `mix_is_off`: one more generation batch each, with vLLM's importance-sampling correction on (TRL
   computes old log-probs) and off, described the same way, with the number of LaSeR's own no-grad forwards
   (`laser_forwards`) and its logged `self_reward/zc_forward_rows`.
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import sys

import pandas as pd
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_laser import LaSeRConfig, LaSeRGRPOTrainer
from trl_laser.data import make_conversation


TOKEN = "<gh_stars>"
# The LaSeR settings that a hand computation of the mix needs (tests/test_vllm.py reads them from result.json).
MIX = {"self_reward_beta": 0.1, "self_reward_ref_constant": -15.6, "self_reward_advantage_coef": 0.5}
MIX["self_reward_std_threshold"] = 0.0
PROBLEMS = [("What is 2 + 3?", "5"), ("What is 7 - 4?", "3"), ("What is 6 + 1?", "7"), ("What is 9 - 5?", "4")]
INSTRUCTION = "Answer with just the number."


def dataset() -> Dataset:
    return Dataset.from_list(
        [{"prompt": make_conversation(p, instruction=INSTRUCTION), "answer": a} for p, a in PROBLEMS * 4]
    )


def generation_inputs(first: int) -> list[dict]:
    """Two prompts x 4 completions, as TRL's sampler repeats them."""
    rows = [PROBLEMS[(first + i // 4) % len(PROBLEMS)] for i in range(8)]
    return [{"prompt": make_conversation(p, instruction=INSTRUCTION), "answer": a} for p, a in rows]


def longer_half_reward(completion_ids, **kwargs) -> list[float]:
    """A 0/1 verifier that splits every group of 4 (TRL keeps a prompt's completions together) two to two: the two
    longest completions are right, ties going to the earlier one. A content-only verifier (say, an even length) left
    whole groups uniform where the model wrote one answer four times, and then A_v is zero there."""
    rewards = []
    for g in range(0, len(completion_ids), 4):
        group = range(g, min(g + 4, len(completion_ids)))
        longest = sorted(group, key=lambda i: (-len(completion_ids[i]), i))[:2]
        rewards += [float(i in longest) for i in group]
    return rewards


def reload_sync(trainer: LaSeRGRPOTrainer) -> None:
    """The trainer's current weights into vLLM through the model runner's `reload_weights`, then a fresh prefix
    cache (what TRL's sync does through `load_weights`)."""
    llm = trainer.vllm_generation.llm
    model = trainer.accelerator.unwrap_model(trainer.model)
    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(
        weights_iterator=((name, p.data) for name, p in model.named_parameters()), is_checkpoint_format=True
    )
    llm.reset_prefix_cache()


def plain_zc_logps(model, zc, prompt_ids, prompt_mask, completion_ids, finished, eos_ends) -> list[float | None]:
    """log pi(z_c | x, y, EOS) of each finished row from a plain full-logits forward of its unpadded x, y."""
    values = []
    for row in range(prompt_ids.size(0)):
        if not finished[row]:
            values.append(None)
            continue
        prompt = prompt_ids[row][prompt_mask[row].bool()]
        ids = torch.cat([prompt, completion_ids[row, : eos_ends[row] + 1]])[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()
        values.append(torch.log_softmax(logits, -1)[zc].item())
    return values


def token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Each completion token's log-prob under `model` (plain forward, temperature 1), (rows, completion length)."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt_ids.size(1) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)


def describe(trainer, batch, tokenizer, initial) -> dict:
    """One generation batch: what the trainer computed, and the same by hand from a plain forward."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    index = batch["self_reward_index"]
    finished = (index >= 0).tolist()
    ends = [int(i) - 1 for i in index.tolist()]  # the EOS column: z_c follows it
    # The generated ids: up to the EOS (z_c follows it), or all of a truncated row's.
    lengths = [ends[r] + 1 if finished[r] else int(batch["completion_mask"][r].sum()) for r in range(index.numel())]
    generated = [batch["completion_ids"][r, : lengths[r]].tolist() for r in range(index.numel())]
    zc = tokenizer.convert_tokens_to_ids(TOKEN)
    plain = plain_zc_logps(
        model, zc, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], finished, ends
    )
    old = batch.get("old_per_token_logps")
    out = {
        "finished": finished,
        "completion_ids": generated,
        "rewards": longer_half_reward(generated),
        "advantages": batch["advantages"].tolist(),
        "plain_zc_logp": plain,
        "old_zc_logp": None
        if old is None
        else [old[r, index[r]].item() if finished[r] else None for r in range(index.numel())],
        "has_old_per_token_logps": old is not None,
    }
    sampling = batch.get("sampling_per_token_logps")
    if sampling is not None:
        mask = (batch["completion_mask"] * batch["tool_mask"]).bool()  # the sampled tokens (not z_c: vLLM gave NaN)
        for key, policy in (("sampling_vs_current", model), ("sampling_vs_initial", initial)):
            logps = token_logps(
                policy, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
            )
            out[key] = (logps - sampling).abs()[mask].mean().item()
    return out


def colocate_config(output_dir: str, **overrides) -> LaSeRConfig:
    """The colocate scripts' training arguments: 2 prompts x 4 completions of up to 24 tokens on CPU, generated by
    TRL's colocated vLLM engine with the importance-sampling correction on; `overrides` add the script's own."""
    return LaSeRConfig(
        output_dir=os.path.join(output_dir, "train"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=24,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        beta=0.0,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=128,
        vllm_importance_sampling_correction=True,
        self_reward_token=TOKEN,
        **overrides,
    )


def main(model_dir: str, output_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    initial = copy.deepcopy(model).eval()
    args = colocate_config(
        output_dir,
        max_steps=3,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        log_completions=True,
        **MIX,
    )
    trainer = LaSeRGRPOTrainer(model=model, reward_funcs=[longer_half_reward], args=args, train_dataset=dataset())
    result: dict = {"config": MIX, "vllm_dtype": str(trainer.vllm_generation.llm.llm_engine.model_config.dtype)}
    try:
        trainer.vllm_generation.sync_weights()
        result["trl_sync_error"] = None
    except Exception as err:  # noqa: BLE001 - recorded for the test and docs/vllm.md
        result["trl_sync_error"] = f"{type(err).__name__}: {err}"
    trainer.vllm_generation.sync_weights = lambda: reload_sync(trainer)

    batches = []
    original_generate = trainer._generate_and_score_completions

    def recording(inputs):
        batch = original_generate(inputs)
        batches.append(describe(trainer, batch, tokenizer, initial))
        return batch

    trainer._generate_and_score_completions = recording
    trainer.train()
    trainer._generate_and_score_completions = original_generate
    tables = []
    for path in sorted(glob.glob(os.path.join(args.output_dir, "completions", "*.parquet"))):
        table = pd.read_parquet(path)
        tables.append({c: [None if isinstance(v, float) and math.isnan(v) else v for v in table[c]] for c in table})
    result["train"] = {"batches": batches, "tables": tables, "log_history": trainer.state.log_history}

    # The mix on one more generation batch each, with the importance-sampling correction on and off, counting LaSeR's
    # own no-grad forwards (its source of the generation-time z_c when TRL computed no old log-probs).
    laser_forwards = []
    original_logps = trainer._laser_logps

    def counting(batch, reference=False):
        laser_forwards.append(reference)
        return original_logps(batch, reference)

    trainer._laser_logps = counting
    trainer.model.train()
    for name, correction, first in (("mix_is_on", True, 0), ("mix_is_off", False, 2)):
        trainer.vllm_importance_sampling_correction = correction
        laser_forwards.clear()
        trainer._metrics["train"].clear()
        inputs = generation_inputs(first)
        batch = trainer._generate_and_score_completions(inputs)
        result[name] = describe(trainer, batch, tokenizer, initial)
        result[name]["laser_forwards"] = len(laser_forwards)
        result[name]["zc_forward_rows"] = list(trainer._metrics["train"].get("self_reward/zc_forward_rows", []))
    with open(os.path.join(output_dir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":  # vLLM spawns workers: the guard keeps them from running the script again
    main(sys.argv[1], sys.argv[2])
