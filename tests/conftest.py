"""Shared fixtures: a tiny Llama built locally with the real SmolLM2 tokenizer (pad == EOS), no network."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

SELF_REWARD_TOKEN = "<gh_stars>"
ZC = 7  # id of <gh_stars> in the SmolLM2 tokenizer
EOS = 2  # <|im_end|>, also the pad token
EOS2 = 0  # <|endoftext|>, a second EOS id for the several-EOS case
MAX_LEN = 6

# Completions as TRL returns them (cut after the first EOS), 4 per prompt for two prompts: EOS at the last allowed
# position (row 2), the second EOS id (row 4), an EOS-only completion (row 7), and truncated rows 3 and 6.
FIXED = [
    [105, 106, EOS],
    [109, EOS],
    [111, 112, 113, 114, 115, EOS],
    [120, 121, 122, 123, 124, 125],
    [130, EOS2],
    [131, 132, EOS],
    [140, 141, 142, 143, 144, 145],
    [EOS],
]
FINISHED = [True, True, True, False, True, True, False, True]


def _tokenizer_dir(root) -> str:
    from trl_laser.models import smollm2_gguf_path

    path = os.path.join(root, "tokenizer")
    if not os.path.isdir(path):
        gguf = smollm2_gguf_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)
    return path


def build_tiny_model(tokenizer, seed: int = 0, eos_logit: float = 8.8) -> LlamaForCausalLM:
    """A 2-layer Llama in which EOS has probability about 0.12 at every position, whatever the context.

    Every input embedding carries a large constant feature in dimension 0, which survives to the final norm; only
    the EOS row of the LM head reads it, so the EOS logit is about `eos_logit` everywhere (the others are near 0).
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        ids = torch.randint(0, len(tokenizer), (4, 32))
        feature = model.model(ids).last_hidden_state[..., 0].mean()
        model.lm_head.weight[tokenizer.eos_token_id, 0] = eos_logit / feature
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def answering_model(tokenizer, zc: int = 7, four: int = 36) -> LlamaForCausalLM:
    """A tiny model that answers "", "4", "44", "444", ... (p("4") ~ 0.6, p(EOS) ~ 0.4 at every step), with a z_c
    logit that depends on the context (`zc`: <gh_stars>, `four`: the token "4")."""
    model = build_tiny_model(tokenizer, eos_logit=13.8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight[four] = model.lm_head.weight[tokenizer.eos_token_id] * (14.2 / 13.8)
        model.lm_head.weight[zc, 1:] = torch.randn(model.lm_head.weight.shape[1] - 1, generator=generator) * 3.0
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Directory with the tiny model and the SmolLM2 tokenizer, saved once per session."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(root))
    path = os.path.join(root, "model")
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def force_completions(trainer, completions=FIXED) -> None:
    """Replace the trainer's sampling by fixed completion ids (as TRL returns them: cut after the first EOS)."""
    trainer._generate_single_turn = lambda prompt_ids, *args, **kwargs: (
        [list(c) for c in completions[: len(prompt_ids)]],
        None,
    )


def training_zc_logps(trainer, batch) -> torch.Tensor:
    """z_c's log-prob as the trainer's training forward computes it (TRL's fused LM head, z_c appended)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, batch["completion_ids"].size(1)
        )
    index = batch["self_reward_index"]
    return logps.gather(1, index.clamp(min=0)[:, None]).squeeze(1)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they import their shared helpers as siblings)."""
    if os.path.join(ROOT, "benchmarks") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def uploads(monkeypatch):
    """Replace the Hub calls: `create_repo` answers (its calls are in `.created`), `upload_folder` records the
    folder's files as uploaded."""

    class Calls(list):
        created: list[dict] = []

    calls = Calls()
    calls.created = []

    def create_repo(self, repo_id, **kwargs):
        calls.created.append({"repo_id": repo_id, "token": self.token, **kwargs})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = {}
        for name in os.listdir(folder_path):
            path = os.path.join(folder_path, name)
            if os.path.isfile(path) and not name.startswith("_") and name.endswith((".md", ".json", ".yaml")):
                with open(path, encoding="utf-8") as f:
                    files[name] = f.read()
            elif os.path.isfile(path):
                files[name] = None
        calls.append({"repo_id": repo_id, "files": files, **kwargs})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def dataset_with_configs(root, configs: dict[str, list[tuple[str, str]]], split: str = "test") -> str:
    """A local dataset folder with several configurations (as GSM8K's `main` and `socratic`), declared in its README."""
    folder = root / "with_configs"
    header = ["---", "configs:"]
    for name, problems in configs.items():
        (folder / name).mkdir(parents=True)
        lines = "".join(json.dumps({"question": p, "solution": a}) + "\n" for p, a in problems)
        (folder / name / f"{split}.jsonl").write_text(lines)
        header += [f"- config_name: {name}", "  data_files:", f"  - split: {split}", f"    path: {name}/{split}.jsonl"]
    (folder / "README.md").write_text("\n".join([*header, "---", ""]))
    return str(folder)
