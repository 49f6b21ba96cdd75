"""z_c kept out of vLLM's sampling in training (`self_reward_suppress_sampling` with `self_reward_exclude_from_policy`,
TRL's colocate mode), with a real vLLM engine: the measurements that tests/test_vllm.py checks, in a process of their
own (one engine, released when the process ends).

    python tests/scripts/vllm_colocate_suppress.py MODEL_DIR OUTPUT_DIR

z_c's row is set along the mean final state of a few arithmetic answers, so that z_c takes about a quarter of the
probability at a typical position of an answer (what the least-squares row does early in training): a sampler that
did not suppress it would write it in every answer. vLLM samples with the trainer's logit bias of -100 and returns
its processed log-probs (after the bias), which TRL's importance-sampling correction compares with the trainer's.
Writes OUTPUT_DIR/result.json: the sampled completions, the logit bias vLLM received, the z_c tokens a plain forward
expects per answer without the suppression, and the mean |vLLM - trainer| token log-prob against the trainer's
renormalised log-probs (TRL's old log-probs) and against the raw ones, then the log history of one training step.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_colocate_train import (
    INSTRUCTION,
    PROBLEMS,
    TOKEN,
    colocate_config,
    dataset,
    generation_inputs,
    longer_half_reward,
    reload_sync,
    token_logps,
)

from trl_laser import LaSeRGRPOTrainer
from trl_laser.data import make_conversation


def raise_zc_row(model, tokenizer, zc: int, scale: float = 1.1) -> None:
    """z_c's output row along the mean final state of the last 15 positions of four worked answers."""
    states = []
    for question, answer in PROBLEMS:
        text = tokenizer.apply_chat_template(
            make_conversation(question, instruction=INSTRUCTION), tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(f"{text}The answer is {answer}. Let me check: it is {answer}.", return_tensors="pt")
        with torch.no_grad():
            states.append(model.model(**ids).last_hidden_state[0, -15:])
    mean = torch.cat(states).mean(0)
    with torch.no_grad():
        model.get_output_embeddings().weight[zc] = scale * 20 * mean / mean.norm() ** 2


def main(model_dir: str, output_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    zc = tokenizer.convert_tokens_to_ids(TOKEN)
    raise_zc_row(model, tokenizer, zc)
    args = colocate_config(
        output_dir,
        max_steps=1,
        learning_rate=1e-4,
        self_reward_ref_constant=-15.6,
        self_reward_advantage_coef=0.0,
        self_reward_suppress_sampling=True,
        self_reward_exclude_from_policy=True,
    )
    trainer = LaSeRGRPOTrainer(model=model, reward_funcs=[longer_half_reward], args=args, train_dataset=dataset())
    trainer.vllm_generation.sync_weights = lambda: reload_sync(trainer)
    reload_sync(trainer)  # vLLM loaded the saved weights: give it the raised row
    trainer.model.train()
    batch = trainer._generate_and_score_completions(generation_inputs(0))

    index = batch["self_reward_index"]
    sampled = (batch["completion_mask"] * batch["tool_mask"]).bool()  # the sampled tokens (not the z_c appended)
    raw = token_logps(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
    )
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, batch["prompt_ids"].size(1) - 1 : -1].float()
    zc_draws = logits.softmax(-1)[..., zc].masked_fill(~sampled, 0).sum(1)
    vllm_logps = batch["sampling_per_token_logps"]
    result = {
        "completion_ids": [
            batch["completion_ids"][r][sampled[r]].tolist() for r in range(batch["completion_ids"].size(0))
        ],
        "finished": (index >= 0).tolist(),
        "zc": zc,
        "logit_bias": {str(k): v for k, v in trainer.vllm_generation.generation_kwargs["logit_bias"].items()},
        "expected_zc_draws_per_answer": zc_draws.mean().item(),
        "vllm_vs_renormalised": (vllm_logps - batch["old_per_token_logps"]).abs()[sampled].mean().item(),
        "vllm_vs_raw": (vllm_logps - raw).abs()[sampled].mean().item(),
    }
    trainer.train()
    result["log_history"] = trainer.state.log_history
    with open(os.path.join(output_dir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":  # vLLM spawns workers: the guard keeps them from running the script again
    main(sys.argv[1], sys.argv[2])
