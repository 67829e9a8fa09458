"""Collective costs of a tensor-parallel decode step (run under torchrun on the multi-GPU machine), and the
data for two choices the decoder has to make by measurement.

1. All-reduce per decode step. The sharded decoder all-reduces 2 x n_layers tensors of (B, dim) bf16 (after
   wo and w2). Measured per batch size: the whole step's all-reduces replayed from one CUDA graph (as they
   run inside the decode graph), with
     nccl      dist.all_reduce (what FastDecoder does now),
     symm-1    torch symmetric memory, one-shot (each rank reads every peer's buffer over NVLink P2P),
     symm-2    torch symmetric memory, two-shot (reduce-scatter + all-gather through P2P).
   Multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1): no multimem variant.
   Data: random, scaled so that repeated in-place sums stay finite (see _variants).
   Beside it NCCL's own bus bandwidth on a 256 MB all-reduce (busbw = 2 (n-1)/n x bytes / t, nccl-tests'
   definition) and the time the step's bytes would take at that bandwidth (the floor). A variant that fails
   here prints NOT MEASURED with the reason and the others go on.
2. lm_head: replicated (rank 0 reads the whole (vocab, dim) matrix per step) or vocab-parallel (each rank
   reads vocab / n rows, then an all-gather of the (B, vocab / n) logits). Measured: the lm_head GEMM at
   full and 1/n vocab, and the all-gather in a graph; vocab-parallel wins when the GEMM time it saves is
   more than the all-gather costs.

    torchrun --nproc_per_node 2 -m benchmarks.bench_allreduce [--preset Pixtral-12B-2409]
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.common import bench_ms, record
from pixtral_rt.config import PRESETS


def _graph_ms(body) -> float:
    """Time `body` replayed from one CUDA graph (warmed up eagerly once first)."""
    body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return bench_ms(g.replay)


def _variants(B: int, dim: int, n: int, world: int):
    """name -> a step body of n all-reduces of (B, dim) bf16 (or the reason it cannot run here).

    Like the decoder, each variant sums one (B, dim) buffer at a time. In-place sums multiply the values by
    `world` per call, so every body starts from values of 2^-100 and restores them every `k` calls (one
    small copy, k = 200 / log2(world): at most 2^100 growth, no inf): timing on finite, non-zero data."""
    import math
    x0 = torch.randn(B, dim, device="cuda", dtype=torch.bfloat16) * 2.0 ** -100
    k = n if world == 1 else max(1, int(200 / math.log2(world)))

    def step(call, buf):
        def body():
            for i in range(n):
                if i % k == 0:
                    buf.copy_(x0)
                call(buf)
        return body

    x = x0.clone()
    out = {"nccl": step(dist.all_reduce, x)}
    try:
        import torch.distributed._symmetric_memory as symm_mem
        gname = dist.group.WORLD.group_name
        # the decoder would write each row-parallel GEMM's output straight into this symmetric buffer
        buf = symm_mem.empty((B, dim), dtype=torch.bfloat16, device="cuda")
        symm_mem.rendezvous(buf, gname)
        res = torch.empty_like(buf)
        one, two = torch.ops.symm_mem.one_shot_all_reduce_out, torch.ops.symm_mem.two_shot_all_reduce_
        out["symm-1"] = step(lambda b: one(b, "sum", gname, res), buf)
        out["symm-2"] = step(lambda b: two(b, "sum", gname), buf)
    except Exception as exc:  # noqa: BLE001 - reported, the NCCL figure still stands
        out["symm-1"] = out["symm-2"] = f"symmetric memory unavailable: {type(exc).__name__}: {exc}"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="Pixtral-12B-2409", choices=list(PRESETS))
    ap.add_argument("--batches", default="1,8,64", help="comma list of decode batch sizes")
    a = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    t = PRESETS[a.preset].text
    big = torch.randn(128 << 20, device="cuda", dtype=torch.bfloat16)          # 256 MB
    ms = bench_ms(lambda: dist.all_reduce(big, op=dist.ReduceOp.AVG))   # AVG: repeated calls stay finite
    busbw = 2 * (world - 1) / world * big.numel() * 2 / ms / 1e9               # GB/s
    big = None                                                                  # free 256 MB
    n = 2 * t.n_layers
    batches = [int(b) for b in a.batches.split(",")]
    for B in batches:
        nbytes = 2 * (world - 1) / world * n * B * t.dim * 2
        base = None
        for name, body in _variants(B, t.dim, n, world).items():
            if isinstance(body, str):
                if rank == 0:
                    print(f"NOT MEASURED: {name} B={B}: {body}")
                continue
            try:
                step_ms = _graph_ms(body)
            except Exception as exc:  # noqa: BLE001 - one variant failing must not hide the others
                if rank == 0:
                    print(f"NOT MEASURED: {name} B={B}: {type(exc).__name__}: {exc}")
                continue
            if rank == 0:     # floor: the step's bytes at NCCL's own bus bandwidth (256 MB all-reduce)
                record("allreduce", f"{a.preset} TP={world} decode step B={B} {name}", "allreduce_ms_per_step",
                       step_ms, "ms", None if name == "nccl" else "NCCL all-reduces of the same step (same run)",
                       None if name == "nccl" else base, nbytes / busbw / 1e6 if world > 1 else None,
                       impl=name, n_allreduce=n, per_call_us=round(step_ms * 1e3 / n, 2),
                       nccl_busbw_GBps=round(busbw, 1))
            base = step_ms if name == "nccl" else base
    # lm_head: replicated vs vocab-parallel
    V, D = t.vocab_size, t.dim
    w = torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * 0.02
    for B in batches:
        x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
        full_ms = bench_ms(lambda: F.linear(x, w))
        part_ms = bench_ms(lambda: F.linear(x, w[: V // world]))
        part = torch.randn(B, V // world, device="cuda", dtype=torch.float32)
        gathered = torch.empty(world * B, V // world, device="cuda", dtype=torch.float32)
        try:
            ag_ms = _graph_ms(lambda: dist.all_gather_into_tensor(gathered, part))
        except Exception as exc:  # noqa: BLE001
            if rank == 0:
                print(f"NOT MEASURED: lm_head all-gather B={B}: {type(exc).__name__}: {exc}")
            continue
        if rank == 0:
            saved = full_ms - part_ms
            record("allreduce", f"{a.preset} TP={world} lm_head B={B}", "vocab_parallel_gain_ms", saved - ag_ms,
                   "ms", None, None, None, lm_head_full_ms=round(full_ms, 4), lm_head_shard_ms=round(part_ms, 4),
                   logits_all_gather_ms=round(ag_ms, 4),
                   choice="vocab-parallel" if saved > ag_ms else "replicated")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
