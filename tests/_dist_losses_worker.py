"""Worker for tests/test_sinkhorn_distributed.py (launched by torchrun, 2 ranks, gloo).

Each rank holds its part of a global batch (deliberately of unequal sizes) and runs
the collective centering code and an FSDP2-sharded DINOHead; it saves its local
results to ``OUT/rank<r>.pt`` for the test to compare with one process on the
concatenated batch.  ``make_inputs`` is shared with the test so both see the same data.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

N_PROTOTYPES = 50
ROW_SPLITS = (7, 5)  # local batch sizes of rank 0 and rank 1 (unequal on purpose)
HEAD_DIMS = {"in_dim": 24, "out_dim": 37, "hidden_dim": 32, "bottleneck_dim": 8}  # 37: uneven FSDP shards


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    rows = sum(ROW_SPLITS)
    return {
        "logits": torch.randn(rows, N_PROTOTYPES, generator=g),
        # Same 1/64 grid as the unit test so the +4096 shift is exact in fp32.
        "large_logits": torch.round(torch.randn(rows, N_PROTOTYPES, generator=g) * 64 * 30) / 64 + 4096,
        "center_step1": torch.randn(rows, N_PROTOTYPES, generator=g),
        "center_step2": torch.randn(rows, N_PROTOTYPES, generator=g) * 3,
        "head_inputs": torch.randn(rows, HEAD_DIMS["in_dim"], generator=g),
    }


def local_rows(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(ROW_SPLITS[:rank])
    return tensor[start : start + ROW_SPLITS[rank]]


def build_head(seed: int):
    from dinov2.models.head import DINOHead

    torch.manual_seed(seed)
    return DINOHead(**HEAD_DIMS)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out_dir: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    from dinov2.loss import SoftmaxCenter, sinkhorn_knopp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = {k: local_rows(v, rank) for k, v in make_inputs().items()}
    result: dict[str, torch.Tensor] = {}

    from dinov2.train.distill import batch_standardize

    result["standardized"] = batch_standardize(data["head_inputs"] * 3 + 1)
    result["sk"] = sinkhorn_knopp(data["logits"], teacher_temp=0.07, n_iterations=3)
    result["sk_large"] = sinkhorn_knopp(data["large_logits"], teacher_temp=0.04, n_iterations=3)

    center = SoftmaxCenter(N_PROTOTYPES, momentum=0.9)
    center.update(data["center_step1"])
    center.update(data["center_step2"], async_op=True)
    result["center_probs"] = center.probs(data["logits"], 0.05)  # applies the async update
    result["center"] = center.center.clone()

    # FSDP2 head: forward, backward (gradients averaged over ranks), DCP round trip.
    head = build_head(seed=0)
    for layer in head.mlp:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(head)
    result["last_layer_is_sharded"] = torch.tensor(type(head.last_layer.weight).__name__ == "DTensor")
    out = head(data["head_inputs"])
    out.pow(2).sum().backward()
    result["head_out"] = out.detach()
    result["grad_last_layer"] = _full(head.last_layer.weight.grad).clone()
    result["grad_mlp0"] = _full(head.mlp[0].weight.grad).clone()

    ckpt = out_dir / "ckpt"
    dcp.save({"head": head.state_dict()}, checkpoint_id=str(ckpt))
    restored = build_head(seed=99)
    for layer in restored.mlp:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(restored)
    state = {"head": restored.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt))
    restored.load_state_dict(state["head"])
    with torch.no_grad():
        result["restored_out"] = restored(data["head_inputs"])

    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: torchrun --nproc_per_node 2 _dist_losses_worker.py OUT_DIR")
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
