"""The train step: masked tokens gathered by the collate's indices give the same numbers as boolean
indexing, and a step that does not log never reads a tensor on the host (no ``.item()``,
``.tolist()``, ``float(t)``, ``bool(t)``): the only reads are in the sync of log/checkpoint steps."""
from __future__ import annotations

import itertools

import pytest
import torch
from test_train_distributed import CONFIG, photo_batch_source, tiny_overrides

from dinov2.train.config import load_train_config
from dinov2.train.distributed import DistInfo
from dinov2.train.phases import plans
from dinov2.train.ssl_meta_arch import MaskLayout
from dinov2.train.trainer import Trainer


def test_mask_layout_gathers_like_boolean_indexing():
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(6, 9, generator=g) < 0.4
    tokens = torch.randn(6, 9, 5, generator=g)
    layout = MaskLayout.from_batch({"collated_masks": masks}, torch.device("cpu"))
    assert torch.equal(layout.gather(tokens), tokens[masks]) and layout.count == int(masks.sum())
    per_image = 1.0 / masks.sum(-1, keepdim=True).clamp_min(1).float()
    assert torch.equal(layout.weights, per_image.expand_as(masks)[masks])


class _HostRead(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """Turn every Python-level read of a tensor's value into an error while ``armed``."""
    state = {"armed": False, "reads": 0}

    def guard(name):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, **k):
            if state["armed"]:
                state["reads"] += 1
                raise _HostRead(f"host read of a tensor ({name}) in a step that does not log")
            return orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapped)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        guard(name)
    return state


def test_non_log_step_reads_nothing_on_the_host(tmp_path, no_host_reads):
    cfg = load_train_config(CONFIG, tiny_overrides(tmp_path / "run", 6) + ["train.log_every=3",
                                                                          "checkpoint.every_n_steps=6"])
    batches = iter(photo_batch_source()(0, 1, 0))
    trainer = Trainer(cfg, plans(cfg, 1)[0][0], DistInfo(), batch_source=lambda r, w, s: batches)
    trainer.setup()
    trainer.result = None
    for _ in range(2):  # steps 1, 2: not sync steps (log every 3, checkpoint every 6)
        assert not trainer._is_sync_step(trainer.step + 1)
        batch = trainer.data.next()
        no_host_reads["armed"] = True
        res = trainer.train_step(batch)
        no_host_reads["armed"] = False
        trainer.step += 1
    assert no_host_reads["reads"] == 0 and not res.out.stats
    no_host_reads["armed"] = True  # the fixture does catch a read (the lazy KoLeo guard count is one)
    with pytest.raises(_HostRead):
        _ = trainer.arch.koleo_loss.guard_counts
    no_host_reads["armed"] = False
    assert trainer._is_sync_step(3) and torch.isfinite(res.out.terms["total_loss"])
    assert trainer.data.state_dict() == {"next_sample": 2 * cfg.data.batch_size}


def test_log_every_rows_and_throughput_window(tmp_path):
    cfg = load_train_config(CONFIG, tiny_overrides(tmp_path / "run", 6) + ["train.log_every=3",
                                                                          "checkpoint.every_n_steps=6"])
    src = photo_batch_source()
    trainer = Trainer(cfg, plans(cfg, 1)[0][0], DistInfo(), batch_source=lambda r, w, s: itertools.islice(
        src(r, w, s), 100))
    trainer.setup()
    res = trainer.fit()
    assert [r["step"] for r in res.metrics] == [3, 6]
    assert all(r["images_per_s"] > 0 and "teacher_entropy" in r for r in res.metrics)
