"""Attention for packed multi-crop student batches: ours (packed) vs per-group vs dense mask.

Measures ONE ViT-S attention layer (qkv linear + attention + output projection,
dim 384, 6 heads) forward and forward+backward, fp32, on the CPU, for a DINOv2
student batch: B images x (2 global 224 crops + 8 local 98 crops), i.e.
2B x 257 and 8B x 50 tokens.

Methods:
  packed     our ``Attention`` on all crops' tokens concatenated into one [T, D]
             tensor (one qkv/proj matmul), SDPA once per equal-length crop group
             (tokens stay packed between blocks, so packing is not timed);
  per-group  the same module called separately on the [2B,257,D] and [8B,50,D]
             batches (no packing);
  dense-mask each image's 10 crops packed into one 914-token sequence, one SDPA
             call with a dense block-diagonal boolean mask (the baseline).

Memory: each method runs in its own subprocess; "peak MiB" is the increase of
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` over its value after setup (inputs
and weights allocated), i.e. the high-water mark of the work itself.

    python bench/attention.py                 # batch 16 (the issue's setting)
    python bench/attention.py --batch 4 --iters 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dinov2.models.drop_path import TokenLayout
from dinov2.models.layers import Attention

METHODS = ("packed", "per-group", "dense-mask")


def make_inputs(batch: int, dim: int, global_size: int, local_size: int, patch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    global_tokens = (global_size // patch) ** 2 + 1
    local_tokens = (local_size // patch) ** 2 + 1
    global_x = torch.randn(2 * batch, global_tokens, dim, generator=gen)
    local_x = torch.randn(8 * batch, local_tokens, dim, generator=gen)
    return global_x, local_x


def dense_block_mask(global_tokens: int, local_tokens: int) -> torch.Tensor:
    lengths = [global_tokens] * 2 + [local_tokens] * 8
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids.unsqueeze(0) == ids.unsqueeze(1)  # [L, L], True = may attend


def to_layout(method: str, global_x: torch.Tensor, local_x: torch.Tensor):
    """The crops' tokens in the layout each method keeps them in between blocks."""
    dim = global_x.shape[-1]
    if method == "packed":
        return torch.cat([global_x.reshape(-1, dim), local_x.reshape(-1, dim)])
    if method == "per-group":
        return [global_x, local_x]
    if method == "dense-mask":
        # Per image: its 2 global crops then its 8 local crops, one sequence of 2*257 + 8*50 tokens.
        batch = global_x.shape[0] // 2
        return torch.cat([global_x.reshape(batch, -1, dim), local_x.reshape(batch, -1, dim)], dim=1)
    raise ValueError(method)


def from_layout(method: str, out, global_x: torch.Tensor, local_x: torch.Tensor):
    """Back to ([2B, Ng, D], [8B, Nl, D]) to compare methods."""
    if method == "packed":
        g, l_ = out.split([global_x[..., 0].numel(), local_x[..., 0].numel()])
        return g.view_as(global_x), l_.view_as(local_x)
    if method == "per-group":
        return tuple(out)
    split = 2 * global_x.shape[1]
    return out[:, :split].reshape_as(global_x), out[:, split:].reshape_as(local_x)


def run_method(method: str, attn: Attention, tokens, layout: TokenLayout, mask: torch.Tensor | None):
    """One attention-layer forward on ``tokens`` (in ``method``'s layout)."""
    if method == "packed":
        return attn(tokens, layout)
    if method == "per-group":
        return [attn(x) for x in tokens]
    batch, seq_len, dim = tokens.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(tokens).view(batch, seq_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.proj(out.transpose(1, 2).reshape(batch, seq_len, dim))


def setup(args):
    torch.manual_seed(0)
    attn = Attention(args.dim, args.heads)
    global_x, local_x = make_inputs(args.batch, args.dim, args.global_size, args.local_size, args.patch)
    mask = dense_block_mask(global_x.shape[1], local_x.shape[1])
    layout = TokenLayout((tuple(global_x.shape[:2]), tuple(local_x.shape[:2])))
    return attn, global_x, local_x, mask, layout


def child(args) -> None:
    torch.set_num_threads(args.threads)
    attn, global_x, local_x, mask, layout = setup(args)
    tokens = to_layout(args.method, global_x, local_x)
    leaves = tokens if isinstance(tokens, list) else [tokens]
    for leaf in leaves:
        leaf.requires_grad_(True)
    mask = mask if args.method == "dense-mask" else None
    del global_x, local_x
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step(backward: bool) -> None:
        out = run_method(args.method, attn, tokens, layout, mask)
        if backward:
            sum(o.sum() for o in (out if isinstance(out, list) else [out])).backward()
            attn.zero_grad(set_to_none=True)
            for leaf in leaves:
                leaf.grad = None

    step(backward=True)  # warm-up (also reaches the steady-state memory high-water mark)
    timings = {}
    for backward in (False, True):
        wall, cpu = [], []
        for _ in range(args.iters):
            start, start_cpu = time.perf_counter(), time.process_time()
            if backward:
                step(True)
            else:
                with torch.no_grad():
                    step(False)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        name = "fwd_bwd" if backward else "fwd"
        timings[name] = sorted(wall)[len(wall) // 2] * 1e3
        timings[name + "_cpu"] = sorted(cpu)[len(cpu) // 2] * 1e3
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # ru_maxrss is KiB
    print(json.dumps({"method": args.method, **timings, "peak_mib": peak_mib}))


def check_equal(args) -> float:
    """Max abs difference of every method's outputs vs per-group, on a small batch."""
    small = argparse.Namespace(**{**vars(args), "batch": 2})
    attn, global_x, local_x, mask, layout = setup(small)
    with torch.no_grad():
        ref = run_method("per-group", attn, [global_x, local_x], layout, None)
        worst = 0.0
        for method in ("packed", "dense-mask"):
            out = run_method(method, attn, to_layout(method, global_x, local_x), layout, mask)
            outs = from_layout(method, out, global_x, local_x)
            worst = max(worst, *[(a - b).abs().max().item() for a, b in zip(outs, ref)])
    return worst


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch", type=int, default=16, help="images per batch (each: 2 global + 8 local crops)"
    )
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per mode (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args()
    if args.method:
        child(args)
        return

    max_diff = check_equal(args)
    results = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--method", method] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "method"
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    g_tokens = (args.global_size // args.patch) ** 2 + 1
    l_tokens = (args.local_size // args.patch) ** 2 + 1
    print(f"# one attention layer (qkv + attention + proj), dim {args.dim}, {args.heads} heads, fp32, CPU")
    print(
        f"# batch {args.batch}: {2 * args.batch}x{g_tokens} + {8 * args.batch}x{l_tokens} tokens; "
        f"median of {args.iters}; torch {torch.__version__}, {args.threads} threads, "
        f"{cpu_name()}"
    )
    print(f"# outputs agree with per-group to max abs diff {max_diff:.1e} (batch 2)")
    base = results["dense-mask"]
    print(
        "# wall = median elapsed ms; cpu = median process CPU ms (all threads; less sensitive to other load)"
    )
    print(
        "| method | fwd wall | fwd cpu | fwd+bwd wall | fwd+bwd cpu | peak MiB "
        "| fwd+bwd speed-up vs dense (wall / cpu) | memory vs dense |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        r = results[method]
        mem_ratio = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else float("nan")
        print(
            f"| {method} | {r['fwd']:.0f} | {r['fwd_cpu']:.0f} | {r['fwd_bwd']:.0f} | {r['fwd_bwd_cpu']:.0f} "
            f"| {r['peak_mib']:.0f} | {base['fwd_bwd'] / r['fwd_bwd']:.2f}x / "
            f"{base['fwd_bwd_cpu'] / r['fwd_bwd_cpu']:.2f}x | {mem_ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
