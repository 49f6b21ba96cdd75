"""vLLM for real, no mocks: the one-token score against `score_completions`, `trl-laser eval --backend vllm` end to
end, and LaSeR training on vLLM generation (TRL's colocate mode) against plain forwards and hand computations.

Without vLLM the module is skipped; with `TRL_LASER_REQUIRE_VLLM=1` (CI: `make test-vllm`, which builds the CPU vLLM
environment with .ci/install_vllm_cpu.sh) a missing vLLM is a failure. The model is SmolLM2-135M-Instruct (the
packaged GGUF's float32 copy): vLLM's CPU attention takes its head size, not the tiny test model's. Each engine takes
about 1.5 minutes to start on 2 cores and only one runs at a time: the scoring tests share one in this process (class
scope, released before the others start); eval and training each run in a process of their own.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from trl_laser.vllm_scoring import is_vllm_available


if not is_vllm_available():
    if os.environ.get("TRL_LASER_REQUIRE_VLLM") == "1":
        pytest.fail(
            "TRL_LASER_REQUIRE_VLLM=1 but vLLM cannot be imported: build the environment with "
            ".ci/install_vllm_cpu.sh VENV and run the tests with VENV/bin/python.",
            pytrace=False,
        )
    pytest.skip(
        "vLLM is not installed (CPU build: .ci/install_vllm_cpu.sh VENV, then `make test-vllm`)",
        allow_module_level=True,
    )

import torch  # noqa: E402
from conftest import ROOT  # noqa: E402
from test_eval_cli import hand_votes  # noqa: E402

from trl_laser.core import append_self_reward_token  # noqa: E402
from trl_laser.data import make_conversation  # noqa: E402
from trl_laser.metrics import auroc  # noqa: E402
from trl_laser.models import convert_smollm2, load_model_and_tokenizer  # noqa: E402
from trl_laser.scoring import score_completions, tokenize_prompt  # noqa: E402
from trl_laser.vllm_scoring import (  # noqa: E402
    iter_generate_with_vllm,
    load_vllm,
    next_token_logprobs,
    score_completions_vllm,
)


pytestmark = pytest.mark.vllm

TOKEN, C_REF, BETA = "<gh_stars>", -15.6, 0.1
OVERRIDES = {"self_reward_token": TOKEN, "self_reward_ref_constant": C_REF}
# vLLM (float32, CPU) against transformers (float32): log-probs agree to about 5e-5 nats (measured).
LOGP_TOLERANCE = 2e-4
PROBLEMS = ["What is 2 + 3?", "What is 7 - 4?", "What is 12 + 9?", "What is 8 - 6?"]
ENV = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    return str(convert_smollm2())


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    """The transformers model and tokenizer (float32) that every vLLM number is checked against."""
    model, tokenizer = load_model_and_tokenizer(smollm2_dir)
    return model.eval(), tokenizer


def prompts() -> list:
    return [make_conversation(p, instruction="Answer with just the number.") for p in PROBLEMS]


def teacher_forced_logps(model, prompt_ids: list[int], completion_ids: list[int], excluded=()) -> list[float]:
    """Each completion token's log-prob from one plain forward of prompt + completion (temperature 1), with the
    `excluded` tokens' logits set to -inf."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double()
    logits[:, list(excluded)] = float("-inf")
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1).tolist()


class TestScoring:
    """One in-process engine, released when the class is done."""

    @pytest.fixture(scope="class")
    def engine(self, smollm2_dir):
        engine = load_vllm(smollm2_dir, max_model_len=256, seed=0)
        yield engine
        del engine
        gc.collect()

    @pytest.fixture(scope="class")
    def sampled(self, engine, reference):
        _, tokenizer = reference
        batches = list(
            iter_generate_with_vllm(
                engine, tokenizer, prompts(), 4, overrides=OVERRIDES, batch_size=8, seed=0, max_new_tokens=24
            )
        )
        return [c for batch in batches for c in batch]

    def test_samples_finish_and_truncate_as_generate_does(self, sampled, reference):
        _, tokenizer = reference
        assert [(c.prompt_index, c.sample_index) for c in sampled] == [(p, s) for p in range(4) for s in range(4)]
        finished = [c for c in sampled if c.finished]
        assert finished, "no completion ended with EOS: z_c would never be read"
        for c in sampled:
            assert c.finished == (c.token_ids[-1] == tokenizer.eos_token_id)
            assert c.token_ids.count(tokenizer.eos_token_id) == int(c.finished)  # cut at the first EOS
            assert c.finished or len(c.token_ids) == 24
            assert (c.self_reward is None) == (not c.finished)
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)

    def test_score_equals_score_completions(self, sampled, reference, engine):
        model, tokenizer = reference
        rows = [prompts()[c.prompt_index] for c in sampled]
        ids = [c.token_ids for c in sampled]
        expected = score_completions(model, tokenizer, rows, ids, overrides=OVERRIDES)
        differences = []
        for c, r_s in zip(sampled, expected):
            assert (r_s is None) == (not c.finished)
            if c.finished:
                assert c.self_reward == pytest.approx(BETA * (c.self_reward_logprob - C_REF), abs=1e-9)
                differences.append(abs(c.self_reward_logprob - (r_s / BETA + C_REF)))
        print(f"max |log pi(z_c)| difference, vLLM vs score_completions: {max(differences):.2e} nats")
        assert max(differences) < LOGP_TOLERANCE
        # The same through `score_completions_vllm`: ids, texts and truncated completions (None), as its twin takes.
        texts = [tokenizer.decode(c.token_ids) for c in sampled]
        for given in (ids, texts):
            again = score_completions_vllm(engine, tokenizer, rows, given, overrides=OVERRIDES)
            twin = score_completions(model, tokenizer, rows, given, overrides=OVERRIDES)
            assert [a is None for a in again] == [t is None for t in twin]
            assert all(abs(a - t) < BETA * LOGP_TOLERANCE for a, t in zip(again, twin) if a is not None)

    def test_token_logprobs_equal_a_plain_forward(self, sampled, reference):
        model, tokenizer = reference
        worst = 0.0
        for c in sampled:
            logps = teacher_forced_logps(model, tokenize_prompt(tokenizer, prompts()[c.prompt_index]), c.token_ids)
            assert c.mean_token_logprob == pytest.approx(sum(logps) / len(logps), abs=LOGP_TOLERANCE)
            assert c.min_token_logprob == pytest.approx(min(logps), abs=LOGP_TOLERANCE)
            worst = max(worst, abs(c.mean_token_logprob - sum(logps) / len(logps)))
        print(f"max |mean token log-prob| difference, vLLM vs plain forward: {worst:.2e} nats")

    def test_score_request_reads_the_prefix_cache(self, engine, reference):
        """Right after generation, the score request of a finished completion finds its prefix in the cache: all but
        the tokens of its last, partly filled block (a long system prompt makes sure that some blocks are full)."""
        from vllm import SamplingParams

        _, tokenizer = reference
        system = "You are a careful assistant who checks every step. " * 12
        prompt = tokenize_prompt(
            tokenizer, make_conversation("What is 3 + 4?", system, "Answer with just the number.")
        )
        out = engine.llm.generate(
            [{"prompt_token_ids": prompt}] * 8,
            [SamplingParams(max_tokens=32, seed=s, stop_token_ids=[tokenizer.eos_token_id]) for s in range(8)],
            use_tqdm=False,
        )
        sequences = [prompt + list(o.outputs[0].token_ids) for o in out if o.outputs[0].finish_reason == "stop"]
        assert sequences
        _, cached = next_token_logprobs(engine.llm, sequences, tokenizer.convert_tokens_to_ids(TOKEN))
        block = engine.llm.llm_engine.vllm_config.cache_config.block_size
        print(f"score requests: {cached} of {[len(s) for s in sequences]} tokens cached (block size {block})")
        assert min(map(len, sequences)) > block
        assert all(len(s) - block <= c < len(s) for c, s in zip(cached, sequences))

    def test_suppressed_tokens_are_never_sampled(self, engine, sampled, reference):
        """A token the saved generation config suppresses (z_c after `trl-laser fit-row`) is never sampled, as with
        `generate`; the scores stay those of the raw logits, the token log-probs are those of the distribution without
        it, as `generate_with_self_rewards` reads them."""
        model, tokenizer = reference
        counts = {}
        for c in sampled:
            for t in c.token_ids:
                counts[t] = counts.get(t, 0) + 1
        common = max((t for t in counts if t != tokenizer.eos_token_id), key=counts.get)
        assert counts[common] >= 4  # unsuppressed, the model writes it often
        engine.generation_config.suppress_tokens = [common]
        try:
            assert engine.suppression_bias() == {common: -100.0}
            again = [
                c
                for batch in iter_generate_with_vllm(
                    engine, tokenizer, prompts(), 4, overrides=OVERRIDES, batch_size=8, seed=0, max_new_tokens=24
                )
                for c in batch
            ]
        finally:
            engine.generation_config.suppress_tokens = None
        assert all(common not in c.token_ids for c in again)
        assert [c.token_ids for c in again] != [c.token_ids for c in sampled]
        rows = [prompts()[c.prompt_index] for c in again]
        expected = score_completions(model, tokenizer, rows, [c.token_ids for c in again], overrides=OVERRIDES)
        shares = []
        for c, r_s in zip(again, expected):
            assert (c.self_reward is None) == (r_s is None)
            if r_s is not None:
                assert c.self_reward == pytest.approx(r_s, abs=BETA * LOGP_TOLERANCE)
            prompt_ids = tokenize_prompt(tokenizer, prompts()[c.prompt_index])
            logps = teacher_forced_logps(model, prompt_ids, c.token_ids, excluded=[common])
            raw = teacher_forced_logps(model, prompt_ids, c.token_ids)
            # log(1 - p) carries an error e in log p as e p / (1 - p): where the suppressed token held most of the
            # mass, vLLM's float32 difference from transformers grows by 1 / (1 - p) (p from the two log-probs).
            growth = [math.exp(k - r) for r, k in zip(raw, logps)]  # = 1 / (1 - p) at each position
            bound = LOGP_TOLERANCE * sum(growth) / len(growth)
            assert c.mean_token_logprob == pytest.approx(sum(logps) / len(logps), abs=bound)
            assert c.min_token_logprob == pytest.approx(min(logps), abs=LOGP_TOLERANCE * max(growth))
            shares.append(((sum(logps) - sum(raw)) / len(raw), bound))
        assert max(s - b for s, b in shares) > 1e-2  # the raw log-probs would be off by more than the tolerance
        assert engine.suppression_bias() is None

    def test_seeded_run_resumes_identically(self, engine, sampled, reference):
        _, tokenizer = reference
        resumed = list(
            iter_generate_with_vllm(
                engine, tokenizer, prompts(), 4, overrides=OVERRIDES, batch_size=8, seed=0, start=8, max_new_tokens=24
            )
        )
        assert [c.token_ids for batch in resumed for c in batch] == [c.token_ids for c in sampled[8:]]


def test_eval_backend_vllm_end_to_end(smollm2_dir, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "trl_laser", "eval", "--backend", "vllm", "--model", smollm2_dir]
    command += [
        "--dataset",
        "builtin:arithmetic",
        "--max-problems",
        "3",
        "--num-samples",
        "4",
        "--max-new-tokens",
        "32",
    ]
    command += ["--batch-size", "12", "--instruction", "Answer with just the number.", "--output-dir", str(out)]
    command += ["--vllm-kwargs", json.dumps({"max_model_len": 200})]  # over the computed context length
    command += ["--self-reward-token", TOKEN, "--self-reward-ref-constant", str(C_REF)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "eval_run.json").read_text())["backend"] == "vllm"

    assert len(samples) == 12 and (summary["n_problems"], summary["n_samples"]) == (3, 12)
    assert any(s["finished"] for s in samples)
    for s in samples:
        assert (s["self_reward"] is None) == (not s["finished"])
        if s["finished"]:
            assert s["self_reward"] == pytest.approx(BETA * (s["self_reward_logprob"] - C_REF), abs=1e-9)
        assert s["min_token_logprob"] <= s["mean_token_logprob"] < 0
    # The summary recomputed from samples.jsonl alone.
    assert summary["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 12)
    assert all(s["pred"] is None or s["pred"].lstrip("-").isdigit() for s in samples)  # premise of `hand_votes`
    votes = [hand_votes([s for s in samples if s["problem_index"] == p]) for p in range(3)]
    for k, key in enumerate(("majority_at_n", "weighted_at_n", "best_of_n")):
        assert summary[key] == pytest.approx(sum(v[k] for v in votes) / 3), key
    scored = [s for s in samples if s["self_reward"] is not None]
    assert summary["sv_accuracy"] == pytest.approx(
        sum((s["self_reward"] > 0.5) == s["correct"] for s in scored) / len(scored)
    )
    labels = [s["correct"] for s in scored]
    if len(set(labels)) == 2:
        assert summary["auroc"] == pytest.approx(auroc([s["self_reward"] for s in scored], labels))
        for key in ("mean_token_logprob", "min_token_logprob"):
            assert summary["baselines"][key]["auroc"] == pytest.approx(auroc([s[key] for s in scored], labels))
    else:
        assert summary["auroc"] is None or math.isnan(summary["auroc"])


# ------------------------------------------------------------------------------------------ training (colocate)
def hand_mix(batch: dict, config: dict, num_generations: int = 4) -> list[float]:
    """The mixed advantage written out: TRL's group-normalised verifier advantage A_v, the clipped score of the
    generating policy (from a plain forward; 0 when truncated), its group-normalised advantage A_s (A_v where a group's
    scores do not spread beyond the threshold), and (1 - tau) A_v + tau A_s."""
    tau, beta = config["self_reward_advantage_coef"], config["self_reward_beta"]
    c_ref, threshold = config["self_reward_ref_constant"], config["self_reward_std_threshold"]
    mixed = []
    for g in range(0, len(batch["rewards"]), num_generations):
        rewards = batch["rewards"][g : g + num_generations]
        mean = sum(rewards) / num_generations
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (num_generations - 1))
        a_v = [(r - mean) / (std + 1e-4) for r in rewards]
        scores = [
            min(max(beta * (logp - c_ref), 0.0), 1.0) if done else 0.0
            for logp, done in zip(
                batch["plain_zc_logp"][g : g + num_generations], batch["finished"][g : g + num_generations]
            )
        ]
        s_mean = sum(scores) / num_generations
        s_std = math.sqrt(sum((s - s_mean) ** 2 for s in scores) / (num_generations - 1))
        for k in range(num_generations):
            a_s = (scores[k] - s_mean) / s_std if s_std > threshold else a_v[k]
            mixed.append((1 - tau) * a_v[k] + tau * a_s)
    return mixed


def run_script(name: str, smollm2_dir: str, out) -> dict:
    """Run tests/scripts/NAME on the model into `out` (its own process: one engine, released at exit); its result."""
    script = os.path.join(ROOT, "tests", "scripts", name)
    done = subprocess.run(
        [sys.executable, script, smollm2_dir, str(out)], env=ENV, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "result.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def colocate(smollm2_dir, tmp_path_factory) -> dict:
    """tests/scripts/vllm_colocate_train.py's measurements (TRL's own engine)."""
    result = run_script("vllm_colocate_train.py", smollm2_dir, tmp_path_factory.mktemp("colocate"))
    print(f"TRL's own weight sync on this build: {result['trl_sync_error']}; vLLM dtype {result['vllm_dtype']}")
    return result


def test_colocate_trains_on_completions_that_finish(colocate):
    batches = colocate["train"]["batches"]
    steps = [h for h in colocate["train"]["log_history"] if "loss" in h]
    assert len(batches) == len(steps) == 3 and all(math.isfinite(h["loss"]) for h in steps)
    for batch in batches + [colocate["mix_is_on"], colocate["mix_is_off"]]:
        assert any(batch["finished"]), "no completion ended with EOS: z_c would never be read"
        for ids, done in zip(batch["completion_ids"], batch["finished"]):
            assert (ids[-1] == 2) == done  # EOS id 2 (<|im_end|>) ends exactly the finished rows
            assert done or len(ids) == 24


def test_colocate_zc_from_the_training_forward_equals_a_plain_forward(colocate):
    """The completions table's score is the training forward's (`_compute_loss`), its advantage the trainer's; the
    mix's generation-time z_c is TRL's old log-prob: each against a plain transformers forward of x, y, EOS."""
    beta, c_ref = colocate["config"]["self_reward_beta"], colocate["config"]["self_reward_ref_constant"]
    worst = 0.0
    for table, batch in zip(colocate["train"]["tables"], colocate["train"]["batches"]):
        assert len(table["self_reward"]) == len(batch["finished"])
        for logged, plain, done in zip(table["self_reward"], batch["plain_zc_logp"], batch["finished"]):
            assert (logged is None) == (not done)
            if done:
                worst = max(worst, abs(logged - beta * (plain - c_ref)) / beta)
        assert table["advantage"] == pytest.approx(batch["advantages"], abs=1e-6)
        assert table["step"] == [table["step"][0]] * len(batch["finished"])
        for old, plain in zip(batch["old_zc_logp"], batch["plain_zc_logp"]):
            assert (old is None) == (plain is None)
            if old is not None:
                assert old == pytest.approx(plain, abs=LOGP_TOLERANCE)
    print(f"max |log pi(z_c)| difference, training forward vs plain forward: {worst:.2e} nats")
    assert worst < LOGP_TOLERANCE


def test_colocate_mix_with_and_without_importance_sampling_correction(colocate):
    config = colocate["config"]
    on, off = colocate["mix_is_on"], colocate["mix_is_off"]
    # On: TRL computed old log-probs for the correction; the mix reads z_c there, with no forward of its own.
    assert on["has_old_per_token_logps"] and on["laser_forwards"] == 0
    assert all(v == 0 for v in on["zc_forward_rows"])
    # Off: no old log-probs (steps aligned); LaSeR forwards the finished rows once (vLLM cannot read z_c).
    assert not off["has_old_per_token_logps"] and off["laser_forwards"] == 1
    assert off["zc_forward_rows"] == [pytest.approx(sum(off["finished"]) / len(off["finished"]))]
    for batch in (on, off, *colocate["train"]["batches"]):
        assert batch["advantages"] == pytest.approx(hand_mix(batch, config), abs=1e-4)
        assert any(0 < sum(batch["rewards"][g : g + 4]) < 4 for g in (0, 4))  # A_v is not zero everywhere


def test_colocate_weights_reach_vllm(colocate):
    """After each update the reloaded vLLM samples as the current policy does (to vLLM's bfloat16), at least twice as
    close to it as to the initial policy: without the sync, vLLM would still sample the initial one, and the two
    distances would be equal. (Measured: one step of Adam at 1e-4 moves the policy 0.2-0.5 nats per token from the
    initial one; bfloat16 leaves vLLM 0.03-0.06 from the current one.)"""
    batches = colocate["train"]["batches"] + [colocate["mix_is_on"], colocate["mix_is_off"]]
    current = [b["sampling_vs_current"] for b in batches]
    initial = [b["sampling_vs_initial"] for b in batches]
    print(f"mean |vLLM - policy| token log-prob: current {current}, initial {initial}")
    assert current[0] == pytest.approx(initial[0])  # before the first update they are one policy
    assert all(c < 0.15 for c in current)
    assert all(i > 2 * c for c, i in zip(current[1:], initial[1:]))


@pytest.fixture(scope="module")
def colocate_suppressed(smollm2_dir, tmp_path_factory) -> dict:
    """tests/scripts/vllm_colocate_suppress.py's measurements (TRL's own engine)."""
    return run_script("vllm_colocate_suppress.py", smollm2_dir, tmp_path_factory.mktemp("colocate_suppressed"))


def test_colocate_never_samples_a_suppressed_z_c(colocate_suppressed):
    """z_c's row raised so that a plain forward expects it several times in every answer: vLLM, given the trainer's
    logit bias, samples none, and its processed log-probs are the trainer's renormalised ones (to bfloat16), not the
    raw ones, so that TRL's importance ratio compares one policy with itself."""
    result = colocate_suppressed
    print(
        f"expected z_c per answer unsuppressed {result['expected_zc_draws_per_answer']:.2f}; mean |vLLM - trainer| "
        f"renormalised {result['vllm_vs_renormalised']:.3f}, raw {result['vllm_vs_raw']:.3f}"
    )
    assert result["logit_bias"] == {str(result["zc"]): -100.0}
    assert result["expected_zc_draws_per_answer"] > 1.0
    assert not any(result["zc"] in ids for ids in result["completion_ids"])
    assert any(result["finished"])
    assert result["vllm_vs_renormalised"] < 0.15
    assert result["vllm_vs_raw"] > 2 * result["vllm_vs_renormalised"]
    steps = [h for h in result["log_history"] if "loss" in h]
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"])


# ------------------------------------------------------------------------------------------ server mode
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_metadata_shim(folder) -> str | None:
    """`vllm serve` reads the version of a distribution named `vllm`; the CPU build installs as `vllm-cpu`. A folder
    holding only that metadata (`vllm-VERSION+cpu.dist-info`), put on the server's PYTHONPATH, lets it start
    (docs/vllm.md); None where a `vllm` distribution exists."""
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        version = importlib.metadata.version("vllm-cpu") + "+cpu"
    info = folder / f"vllm-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return str(folder)


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    """`trl vllm-serve` of SmolLM2 (float32) on a free local port, stopped afterwards; yields its base URL."""
    folder = tmp_path_factory.mktemp("server")
    shim = vllm_metadata_shim(folder / "shim")
    env = dict(ENV, PYTHONPATH=os.pathsep.join(filter(None, [shim, ENV["PYTHONPATH"]])))
    trl = shutil.which("trl", path=os.path.dirname(sys.executable)) or "trl"
    port = free_port()
    command = [trl, "vllm-serve", "--model", smollm2_dir, "--dtype", "float32", "--max_model_len", "256"]
    command += ["--enforce_eager", "true", "--host", "127.0.0.1", "--port", str(port)]
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.time() + 600
        while True:
            assert process.poll() is None, (folder / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the vLLM server did not start within 10 minutes"
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        yield url
    finally:
        process.terminate()  # vLLM's server stops its engine processes on SIGTERM
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def test_server_mode_generates_and_scores_for_the_trainer(server, reference):
    """What a trainer in server mode receives from `trl vllm-serve` (TRL's own client), run through LaSeR's step after
    generation; the one-token score asked of the server; and what only a GPU shows: the weight sync (NCCL on CUDA),
    which a trainer in server mode sets up when it starts."""
    import requests
    from trl.generation.vllm_client import VLLMClient

    model, tokenizer = reference
    client = VLLMClient(base_url=server)
    prompt = tokenize_prompt(tokenizer, prompts()[0])
    out = client.generate(prompts=[prompt], n=8, max_tokens=24, logprobs=0, generation_kwargs={"seed": 0})
    assert out["prompt_ids"] == [prompt]
    completions = out["completion_ids"]
    logprobs = [[top[0] for top in seq] for seq in out["logprobs"]]  # the sampled token's, as TRL keeps them
    assert any(ids[-1] == tokenizer.eos_token_id for ids in completions)
    for ids, logps in zip(completions, logprobs):  # float32 server, raw = processed at temperature 1
        assert logps == pytest.approx(teacher_forced_logps(model, prompt, ids), abs=LOGP_TOLERANCE)
    zc = tokenizer.convert_tokens_to_ids(TOKEN)
    ids, mask, with_zc, finished = append_self_reward_token(completions, None, logprobs, [2], zc, False)
    for row, done in enumerate(finished):
        assert ids[row] == completions[row] + [zc] * done and with_zc[row][len(completions[row]) :] == [None] * done
        assert mask[row] == [1] * len(completions[row]) + [0] * done

    # The one-token score of a finished completion, asked of the server as of the engine: prompt + completion as ids.
    row = finished.index(True)
    response = requests.post(
        f"{server}/v1/completions",
        json={
            "model": client.model,
            "prompt": [prompt + completions[row]],
            "max_tokens": 1,
            "logprobs": 0,
            "logprob_token_ids": [zc],
            "return_tokens_as_token_ids": True,
        },
        timeout=120,
    ).json()
    served = response["choices"][0]["logprobs"]["top_logprobs"][0][f"token_id:{zc}"]
    expected = score_completions(model, tokenizer, [prompts()[0]], [completions[row]], overrides=OVERRIDES)[0]
    assert served == pytest.approx(expected / BETA + C_REF, abs=LOGP_TOLERANCE)

    with pytest.raises(NotImplementedError, match="needs a CUDA device"):
        client.init_communicator(device="cpu")


def test_server_mode_never_samples_a_token_the_trainer_suppresses(server, reference):
    """`self_reward_suppress_sampling` in server mode: the sampling arguments the trainer's `suppress_in_generation`
    sets (a logit bias of -100, keyed by token id) go through TRL's client as JSON to `trl vllm-serve`, which samples
    the token no more, and returns the log-probs of the distribution without it (TRL serves with
    `--logprobs-mode processed_logprobs`), those that `self_reward_exclude_from_policy` computes in the loss. The
    token is the one the model writes most (z_c, raised, is what the colocate test suppresses)."""
    from types import SimpleNamespace

    from trl.generation.vllm_client import VLLMClient

    from trl_laser.suppression import suppress_in_generation

    model, tokenizer = reference
    client = VLLMClient(base_url=server)
    prompt = tokenize_prompt(tokenizer, prompts()[0])
    plain = client.generate(prompts=[prompt], n=8, max_tokens=24, logprobs=0, generation_kwargs={"seed": 0})
    counts = {}
    for ids in plain["completion_ids"]:
        for t in ids:
            counts[t] = counts.get(t, 0) + 1
    common = max((t for t in counts if t != tokenizer.eos_token_id), key=counts.get)
    assert counts[common] >= 4  # unsuppressed, the model writes it often

    trainer = SimpleNamespace(  # what `suppress_in_generation` reads of a GRPOTrainer in server mode
        use_vllm=True,
        vllm_generation=SimpleNamespace(generation_kwargs={"seed": 0}),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        model=SimpleNamespace(generation_config=SimpleNamespace(suppress_tokens=None)),
    )
    suppress_in_generation(trainer, common)
    kwargs = trainer.vllm_generation.generation_kwargs
    assert kwargs == {"seed": 0, "logit_bias": {common: -100.0}}
    out = client.generate(prompts=[prompt], n=8, max_tokens=24, logprobs=0, generation_kwargs=kwargs)
    assert all(common not in ids for ids in out["completion_ids"])
    assert out["completion_ids"] != plain["completion_ids"]
    shares = []
    for ids, seq in zip(out["completion_ids"], out["logprobs"]):
        served = [top[0] for top in seq]
        without = teacher_forced_logps(model, prompt, ids, excluded=[common])
        raw = teacher_forced_logps(model, prompt, ids)
        growth = max(math.exp(k - r) for r, k in zip(raw, without))  # 1 / (1 - p): the error's growth (engine test)
        assert served == pytest.approx(without, abs=LOGP_TOLERANCE * growth)
        shares.append(max(k - r for r, k in zip(raw, without)))
    assert max(shares) > 1e-2  # the raw log-probs would be off by more than the tolerance
