"""kernels/decode_attention.py vs reference.attention.causal_attention (one query per sequence).

Batch rows of different lengths (1 .. a few thousand), split counts 1 .. more than the tiles, the cache
beyond each row's length and the output poisoned with NaN, an idle row (length 0 -> zeros), and replay
inside a CUDA graph with lengths changed between replays (GPU).
Tolerance: error vs the fp32 reference <= 2x PyTorch's same-dtype error + eps.
"""
import pytest
import torch

from pixtral_rt.kernels.decode_attention import decode_attention
from pixtral_rt.reference.attention import causal_attention
from tests.conftest import requires_gpu


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def lowp_decode(q, k, v):  # q (Hq, D), k/v (L, Hkv, D) all in the low dtype
    Hq, D = q.shape
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("hd,khd->hk", q, k) * D ** -0.5
    p = torch.softmax(s.float(), -1).to(q.dtype)
    return torch.einsum("hk,khd->hd", p, v)


def make(device, dtype, lens, hq, hkv, D=128, max_seq=None, seed=0):
    torch.manual_seed(seed + sum(lens))
    B = len(lens)
    max_seq = max_seq or max(max(lens), 1) + 5
    kc = torch.full((B + 1, hkv, max_seq, D), float("nan"), device=device, dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    for b, L in enumerate(lens):
        kc[b, :, :L] = torch.randn(hkv, L, D, device=device, dtype=dtype)
        vc[b, :, :L] = torch.randn(hkv, L, D, device=device, dtype=dtype)
    q = torch.randn(B, hq, D, device=device, dtype=dtype)
    return q, kc, vc


def check(q, kc, vc, lens, out):
    errs = []
    for b, L in enumerate(lens):
        if L == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        k, v = kc[b, :, :L].transpose(0, 1), vc[b, :, :L].transpose(0, 1)
        ref = causal_attention(q[b:b + 1].float(), k.float(), v.float())[0]
        err, err_torch = rel(out[b], ref), rel(lowp_decode(q[b], k, v), ref)
        assert err <= 2 * err_torch + 1e-5, (b, L, err, err_torch)
        errs.append(err)
    return errs


def run(device, dtype, lens, hq=4, hkv=2, **kw):
    q, kc, vc = make(device, dtype, lens, hq, hkv)
    lens_t = torch.tensor(lens, device=device, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kc, vc, lens_t, out=out, **kw)
    assert not torch.isnan(out).any()
    return check(q, kc, vc, lens, out)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_batch_lengths(device, dtype, num_splits):
    run(device, dtype, [1, 7, 97, 40], num_splits=num_splits, block_n=16)


def test_decode_idle_row_and_group_12(device):
    run(device, torch.float16, [0, 33, 5], hq=24, hkv=2, num_splits=4, block_n=16)


def test_decode_default_splits(device):
    run(device, torch.float16, [130, 1], num_splits=None, block_n=32)


def test_decode_q_view_of_qkv(device):
    # q as a strided view of the fused qkv output, as the decoder passes it
    torch.manual_seed(3)
    hq, hkv, D, lens = 4, 2, 128, [9, 50]
    _, kc, vc = make(device, torch.float16, lens, hq, hkv)
    qkv = torch.randn(2, (hq + 2 * hkv) * D, device=device, dtype=torch.float16)
    q = qkv[:, :hq * D].view(2, hq, D)
    out = decode_attention(q, kc, vc, torch.tensor(lens, device=device, dtype=torch.int32), num_splits=2,
                           block_n=16)
    check(q, kc, vc, lens, out)


def test_decode_bad_inputs(device):
    q = torch.zeros(2, 4, 128, device=device)
    kc = torch.zeros(2, 3, 8, 128, device=device)
    with pytest.raises(ValueError, match="kv heads"):
        decode_attention(q, kc, kc.clone(), torch.ones(2, dtype=torch.int32, device=device))
    kc = torch.zeros(2, 2, 8, 128, device=device)
    with pytest.raises(ValueError, match="cache_lens"):
        decode_attention(q, kc, kc.clone(), torch.ones(3, dtype=torch.int32, device=device))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[1], [7], [97], [1025], [4097], [1, 7, 97, 1025, 4097], [32768 + 17]])
@pytest.mark.parametrize("block_n,num_warps,num_stages", [(64, 4, 3), (32, 4, 4), (128, 8, 2)])
def test_decode_bf16(lens, block_n, num_warps, num_stages):
    run("cuda", torch.bfloat16, lens, hq=32, hkv=8, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


@requires_gpu
@pytest.mark.gpu
def test_decode_bf16_batch64_and_graph():
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(1, 3000, (64,), generator=g).tolist()
    run("cuda", torch.bfloat16, lens, hq=32, hkv=8)
    # CUDA graph: capture once, change lengths in device memory, replay
    q, kc, vc = make("cuda", torch.bfloat16, [2000] * 4, 32, 8)
    lens_t = torch.tensor([5, 2000, 77, 1], device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    decode_attention(q, kc, vc, lens_t, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, kc, vc, lens_t, out=out)
    for new in ([5, 2000, 77, 1], [1999, 3, 1024, 640]):
        lens_t.copy_(torch.tensor(new))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(q, kc, vc, new, out)


def test_decode_workspace_reused(device):
    """Preallocated partials: a second call with other lengths reuses (and fully rewrites) the buffers."""
    ws = {}
    run(device, torch.float16, [50, 3], num_splits=3, block_n=16, workspace=ws)
    bufs = next(iter(ws.values()))
    for b in bufs:
        b.fill_(float("nan"))
    run(device, torch.float16, [7, 64], num_splits=3, block_n=16, workspace=ws)
    assert len(ws) == 1 and next(iter(ws.values()))[0] is bufs[0]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[1], [1025], [4097, 7]])
def test_decode_bf16_pdl(lens):
    run("cuda", torch.bfloat16, lens, hq=32, hkv=8, pdl=True, workspace={})
