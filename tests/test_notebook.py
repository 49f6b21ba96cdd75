"""`examples/laser_quickstart.ipynb` runs top to bottom, offline (nbclient)."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "laser_quickstart.ipynb")


def execute(tmp_path, timeout: int) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") or str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def test_notebook_runs_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LASER_NOTEBOOK_MODEL", tiny_model_dir)
    monkeypatch.setenv("LASER_NOTEBOOK_STEPS", "1")
    text = outputs(execute(tmp_path, timeout=120))
    assert "self_reward/c_ref" in text
    assert '"self_reward_token": "<gh_stars>"' in text
    assert text.count("r_s = ") == 7  # three given answers and four sampled ones
    assert (tmp_path / "outputs" / "notebook-laser" / "self_reward_config.json").is_file()


@pytest.mark.slow
def test_notebook_runs_as_shipped(tmp_path, monkeypatch):
    monkeypatch.delenv("LASER_NOTEBOOK_MODEL", raising=False)
    monkeypatch.delenv("LASER_NOTEBOOK_STEPS", raising=False)
    text = outputs(execute(tmp_path, timeout=900))
    assert "self_reward/auroc" in text or "self_reward/accuracy" in text
