"""Two CPU processes (gloo) and one process give the same class weights, MSE, mixed advantages and update."""

import json
import os
import subprocess
import sys

import pytest
import torch


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "laser_one_step.py")


def run(model_dir, tmp_path, nproc, row_update):
    out = str(tmp_path / f"world{nproc}.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT]
    result = subprocess.run([*cmd, model_dir, out, row_update], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out) as f:
        data = json.load(f)
    return data, torch.load(out + ".delta.pt")


@pytest.mark.parametrize("row_update", ["optimizer", "least_squares"])
def test_two_processes_match_one(tiny_model_dir, tmp_path, row_update):
    one, delta_one = run(tiny_model_dir, tmp_path, 1, row_update)
    two, delta_two = run(tiny_model_dir, tmp_path, 2, row_update)
    assert (one["world"], two["world"]) == (1, 2)

    def key(row):
        return row["prompt"], tuple(row["completion"])

    rows_one = sorted(one["rows"], key=key)
    rows_two = sorted(two["rows"], key=key)
    assert [key(r) for r in rows_one] == [key(r) for r in rows_two] and len(rows_one) == 8
    for a, b in zip(rows_one, rows_two):
        assert a["coef"] == pytest.approx(b["coef"], abs=1e-7)
        assert a["target"] == b["target"]
        assert a["advantage"] == pytest.approx(b["advantage"], abs=1e-5)
    assert any(r["coef"] > 0 for r in rows_one)
    for name in ("self_reward/mse", "self_reward/w_correct", "self_reward/w_incorrect", "self_reward/mix_groups_used"):
        assert one["metrics"][name] == pytest.approx(two["metrics"][name], rel=1e-5), name
    assert delta_one.abs().max() > 0
    assert torch.allclose(delta_one, delta_two, atol=1e-6, rtol=1e-4)
