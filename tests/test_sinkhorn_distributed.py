"""2-process (gloo) run of the collective centering code and an FSDP2-sharded DINOHead.

Each rank holds part of a global batch (7 and 5 rows); Sinkhorn-Knopp, the
SoftmaxCenter EMA update and the head's forward/backward/checkpoint must equal one
process working on the concatenated batch.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2.loss import SoftmaxCenter, sinkhorn_knopp

REPO = Path(__file__).resolve().parents[1]
WORKER_PATH = Path(__file__).with_name("_dist_losses_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("_dist_losses_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(WORKER_PATH), str(out)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_sinkhorn_two_ranks_equal_single_process(dist_results):
    worker = _load_worker()
    inputs = worker.make_inputs()
    for key, logits, temp in (("sk", inputs["logits"], 0.07), ("sk_large", inputs["large_logits"], 0.04)):
        expected = sinkhorn_knopp(logits, teacher_temp=temp, n_iterations=3)
        assert torch.isfinite(expected).all()
        got = torch.cat([dist_results[0][key], dist_results[1][key]])
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_batch_standardize_two_ranks_equal_single_process(dist_results):
    # The distillation random heads standardise teacher features over the *global* batch.
    x = _load_worker().make_inputs()["head_inputs"] * 3 + 1
    expected = (x - x.mean(0)) / x.var(0, unbiased=False).add(1e-6).sqrt()
    got = torch.cat([dist_results[0]["standardized"], dist_results[1]["standardized"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_softmax_center_two_ranks_equal_single_process(dist_results):
    worker = _load_worker()
    inputs = worker.make_inputs()
    center = SoftmaxCenter(worker.N_PROTOTYPES, momentum=0.9)
    center.update(inputs["center_step1"])
    center.update(inputs["center_step2"])
    # Plain EMA of global batch means (unequal local batches weigh rows, not ranks).
    plain = 0.1 * inputs["center_step1"].mean(0, keepdim=True)
    plain = 0.9 * plain + 0.1 * inputs["center_step2"].mean(0, keepdim=True)
    torch.testing.assert_close(center.center, plain, atol=1e-6, rtol=1e-6)
    for rank in range(2):
        torch.testing.assert_close(dist_results[rank]["center"], center.center, atol=1e-6, rtol=1e-6)
    probs = torch.cat([r["center_probs"] for r in dist_results])
    torch.testing.assert_close(probs, center.probs(inputs["logits"], 0.05), atol=1e-6, rtol=1e-5)


def test_fsdp2_head_forward_backward_and_checkpoint(dist_results):
    worker = _load_worker()
    inputs = worker.make_inputs()["head_inputs"]
    assert all(bool(r["last_layer_is_sharded"]) for r in dist_results)
    head = worker.build_head(seed=0)
    out = head(inputs)
    torch.testing.assert_close(torch.cat([r["head_out"] for r in dist_results]), out.detach(), atol=1e-6, rtol=1e-5)
    # FSDP averages gradients over ranks: the single-process equivalent is the mean of
    # the two ranks' summed losses (summation order differs: fp32 rounding tolerance).
    losses = [worker.local_rows(out, rank).pow(2).sum() for rank in range(2)]
    (0.5 * (losses[0] + losses[1])).backward()
    for rank in range(2):
        torch.testing.assert_close(dist_results[rank]["grad_last_layer"], head.last_layer.weight.grad,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dist_results[rank]["grad_mlp0"], head.mlp[0].weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r["restored_out"] for r in dist_results]), out.detach(),
                               atol=1e-6, rtol=1e-5)
