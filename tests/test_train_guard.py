"""NaN poisoning: with an exploding learning rate the weights after a bad optimizer step may be
finite but exploded, and the non-finite loss only shows one step later.  The run must exit 3
naming a checkpoint that really is good (kept through rotation), with the unverified ones after it
moved aside, so resuming starts from the good one."""
from __future__ import annotations

import json

import torch
from test_train_distributed import CONFIG, GSIZE, tiny_overrides
from test_train_resume import _shards

from dinov2.cli import main
from dinov2.train.checkpoint import is_verified, list_checkpoints, load_checkpoint, read_checkpoint_tensors
from dinov2.train.config import load_train_config
from dinov2.train.guard import StepGuard, tensors_finite
from dinov2.train.ssl_meta_arch import SSLMetaArch


def test_guard_flags_first_bad_step_and_finite_state():
    g = StepGuard(torch.device("cpu"))
    assert bool(g.check(1, [torch.tensor(1.0), torch.tensor(2.0)])) and int(g.first_bad) == 0
    assert not bool(g.check(2, [torch.tensor(float("nan"))])) and float(g.found_inf) == 1.0
    g.check(3, [torch.tensor(float("inf"))])
    assert bool(g.check(4, [torch.tensor(0.0)])) and float(g.found_inf) == 0.0
    assert int(g.first_bad) == 2  # sticky: the first bad step is reported
    assert bool(tensors_finite([torch.ones(3), torch.zeros(2, 2), torch.arange(3)]))
    assert not bool(tensors_finite([torch.ones(3), torch.tensor([1.0, float("nan")])]))
    assert not bool(tensors_finite([torch.full((4,), 1e30)]))  # overflows fp32: exploded


def test_exploding_lr_exits_3_naming_a_good_checkpoint_and_resumes(tmp_path, capsys):
    pattern = _shards(tmp_path / "shards")
    out = tmp_path / "run"
    args = ["train", "-c", str(CONFIG), *tiny_overrides(out, 10), f'data.sources=[{{pattern: "{pattern}"}}]',
            "data.batch_size=4", "data.num_workers=0", "data.streams_per_rank=2", "data.shuffle_buffer=8",
            "checkpoint.every_n_steps=1", "checkpoint.keep_last=1"]
    assert main([*args, "optim.base_lr=1000"]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dinov2 train: stopped: non-finite") and "Last good checkpoint: " in err
    named = err.split("Last good checkpoint: ")[1].split(". ")[0]
    # keep_last=1 did not rotate the good checkpoint out; the unverified one after it is set aside.
    assert [str(p) for p in list_checkpoints(out)] == [named] and is_verified(named)
    assert list((out / "ckpt").glob("*.unverified"))
    good_step = json.loads((out / "ckpt" / named.split("/")[-1] / "meta.json").read_text())["step"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) > good_step  # the failure came after the named checkpoint

    # The named checkpoint loads and its weights give a finite loss.
    cfg = load_train_config(CONFIG, tiny_overrides(out, 10))
    arch = SSLMetaArch(cfg.model, cfg.head, cfg.loss, GSIZE)
    opt = torch.optim.AdamW(arch.student.parameters())
    load_checkpoint(named, arch, opt, load_optimizer=False)
    state = read_checkpoint_tensors(named)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    x = torch.randn(4, 3, GSIZE, GSIZE)
    assert torch.isfinite(arch.teacher["backbone"](x)).all()

    # Resuming with the same command starts from it and stops at the same step again (deterministic);
    # with a sane learning rate the run continues from it to the end.
    assert main([*args, "optim.base_lr=1000"]) == 3
    assert capsys.readouterr().err.strip().splitlines()[-1] == err
    assert main([*args, "optim.base_lr=0.001"]) == 0
    assert f"trained steps {good_step}..10" in capsys.readouterr().out
    final = read_checkpoint_tensors(out)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
