"""All-reduce cost of a tensor-parallel decode step (run under torchrun on the multi-GPU machine).

Per decode step the sharded decoder all-reduces 2 x n_layers tensors of (B, dim) bf16 (after wo and w2).
Measured: the whole step's all-reduces replayed from one CUDA graph (as they run inside the decode graph),
per batch size; beside it NCCL's own bus bandwidth on a 256 MB all-reduce (busbw = 2 (n-1)/n x bytes / t,
nccl-tests' definition) and the time those step bytes would take at that bandwidth (the floor).

    torchrun --nproc_per_node 2 -m benchmarks.bench_allreduce [--preset Pixtral-12B-2409]
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from benchmarks.common import bench_ms, record
from pixtral_rt.config import PRESETS


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="Pixtral-12B-2409", choices=list(PRESETS))
    a = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    t = PRESETS[a.preset].text
    big = torch.randn(128 << 20, device="cuda", dtype=torch.bfloat16)          # 256 MB
    ms = bench_ms(lambda: dist.all_reduce(big))
    busbw = 2 * (world - 1) / world * big.numel() * 2 / ms / 1e9               # GB/s
    for B in (1, 8, 64):
        xs = [torch.randn(B, t.dim, device="cuda", dtype=torch.bfloat16) for _ in range(2 * t.n_layers)]
        for x in xs:
            dist.all_reduce(x)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for x in xs:
                dist.all_reduce(x)
        step_ms = bench_ms(g.replay)
        nbytes = 2 * (world - 1) / world * sum(x.numel() * 2 for x in xs)
        if rank == 0:
            record("allreduce", f"{a.preset} TP={world} decode step B={B}", "allreduce_ms_per_step", step_ms, "ms",
                   "NCCL bus bandwidth (256 MB all-reduce), GB/s", busbw, nbytes / busbw / 1e6,
                   n_allreduce=len(xs), per_call_us=round(step_ms * 1e3 / len(xs), 2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
