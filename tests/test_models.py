"""`trl_laser.models`: the packaged SmolLM2 is converted once, never inside a ZeRO-3 process."""

import subprocess
import sys

import pytest

from trl_laser import models


def test_conversion_is_refused_inside_zero3_and_names_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.integrations.is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(RuntimeError, match="not inside a DeepSpeed ZeRO-3 process") as info:
        models.convert_smollm2(tmp_path / "smollm2")
    assert "convert_smollm2()" in str(info.value)
    assert not (tmp_path / "smollm2").exists()


def test_a_converted_copy_is_reused_without_loading(tmp_path, monkeypatch):
    target = tmp_path / "smollm2"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "tokenizer.json").write_text("{}")
    monkeypatch.setattr("transformers.integrations.is_deepspeed_zero3_enabled", lambda: True)  # not even asked
    assert models.convert_smollm2(target) == target


def test_first_conversion_keeps_stdout_clean(tmp_path):
    # A fresh process, as a first `estimate-ref-constant --json`: loading the GGUF imports DeepSpeed, whose import
    # prints a warning; on stdout it broke the JSON that benchmarks/miniature.py reads (2026-12-02, fresh machine).
    code = f"from trl_laser.models import convert_smollm2; convert_smollm2({str(tmp_path / 'smollm2')!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""
    assert (tmp_path / "smollm2" / "config.json").is_file()
