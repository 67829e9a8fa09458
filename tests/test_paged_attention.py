"""Paged KV cache: kernels/paged_decode_attention.py, kernels/paged_prefill_attention.py and
rope_store_kv(cache_pos=...) vs the reference (pages gathered into a contiguous K/V, then
reference.attention.causal_attention in fp32).

Page pools are poisoned with NaN and handed out in a shuffled order (non-contiguous page ids); block tables
are padded past each sequence's length with a trash page (NaN too: a kernel that read it would show);
outputs are poisoned with NaN before each call. Lengths 0, 1, P-1, P, P+1 and several pages.
Tolerance: error vs the fp32 reference <= 2x PyTorch's own same-dtype error + eps.
CPU (interpreter): fp16/fp32, D = 128, small shapes. GPU: bf16 at Hq 32 / Hkv 8, P 64, KV 4k, B 1/16/64,
CUDA-graph replay with tables/lengths changed.
"""
import pytest
import torch

from pixtral_rt.kernels.paged_decode_attention import paged_decode_attention
from pixtral_rt.kernels.paged_prefill_attention import paged_prefill_attention
from pixtral_rt.kernels.prefill_attention import rope_store_kv, rope_table
from pixtral_rt.reference.attention import causal_attention
from pixtral_rt.reference.rope import apply_rope, text_rope_angles
from tests.conftest import requires_gpu
from tests.test_prefill_attention import lowp_causal_attention, rel

THETA = 1e9
D = 128
NAN = float("nan")


def cdiv(a, b):
    return -(-a // b)


def make_pool(device, dtype, lens, P, hkv, spare=3, extra_rows=1, seed=0):
    """Random K/V of sequences with lens[i] cached tokens in a NaN-poisoned pool of (n_pages, hkv, P, D) pages,
    page ids handed out in a shuffled order (+ `spare` unused pages, + a trash page, the last one).
    Returns k_pages, v_pages and the block table (len(lens) + extra_rows, max_pages) int32, every entry past
    a sequence's pages (and every spare row) = the trash page."""
    torch.manual_seed(seed + 7 * sum(lens) + P)
    need = [cdiv(L, P) for L in lens]
    n_pages = sum(need) + spare + 1
    trash = n_pages - 1
    kp = torch.full((n_pages, hkv, P, D), NAN, device=device, dtype=dtype)
    vp = torch.full_like(kp, NAN)
    ids = torch.randperm(n_pages - 1)
    table = torch.full((len(lens) + extra_rows, max(need, default=0) + 2), trash, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        table[b, :n] = ids[i:i + n].int()
        i += n
    table = table.to(device)
    for b, L in enumerate(lens):
        pos = torch.arange(L, device=device)
        pages, rows = table[b, pos // P].long(), pos % P
        kp[pages, :, rows] = torch.randn(L, hkv, D, device=device, dtype=dtype)
        vp[pages, :, rows] = torch.randn(L, hkv, D, device=device, dtype=dtype)
    return kp, vp, table


def gather(pages, table_row, L):
    """Positions 0..L-1 of one sequence -> contiguous (L, Hkv, D)."""
    P = pages.shape[2]
    pos = torch.arange(L, device=pages.device)
    return pages[table_row[pos // P].long(), :, pos % P]


def check_attention(q, kp, vp, table_row, n_keys, out):
    """q (T, Hq, D) = the last T positions of a sequence with n_keys keys in the pages; out (T, Hq, D)."""
    k, v = gather(kp, table_row, n_keys), gather(vp, table_row, n_keys)
    ref = causal_attention(q.float(), k.float(), v.float())
    err, err_torch = rel(out, ref), rel(lowp_causal_attention(q, k, v), ref)
    assert err <= 2 * err_torch + 1e-5, (n_keys, err, err_torch)


# ----------------------------------------------------------------------------- decode
def run_decode(device, dtype, lens, P, hq, hkv, q_view=False, **kw):
    kp, vp, table = make_pool(device, dtype, lens, P, hkv)
    B = len(lens)
    if q_view:  # q as a strided view of the fused qkv output, as the decoder passes it
        q = torch.randn(B, (hq + 2 * hkv) * D, device=device, dtype=dtype)[:, :hq * D].view(B, hq, D)
    else:
        q = torch.randn(B, hq, D, device=device, dtype=dtype)
    out = torch.full((B, hq, D), NAN, device=device, dtype=dtype)
    paged_decode_attention(q, kp, vp, table, torch.tensor(lens, device=device, dtype=torch.int32), out=out, **kw)
    assert not torch.isnan(out).any()
    for b, L in enumerate(lens):
        if L == 0:  # idle batch row
            assert torch.equal(out[b], torch.zeros_like(out[b]))
        else:
            check_attention(q[b:b + 1], kp, vp, table[b], L, out[b:b + 1])
    return q, kp, vp, table, out


def page_lens(P):
    return [0, 1, P - 1, P, P + 1, 3 * P + 5]


@pytest.mark.parametrize("hq,hkv", [(4, 2), (8, 1)])
@pytest.mark.parametrize("P", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_paged_decode(device, dtype, P, hq, hkv):
    # 3 splits: empty splits, splits ending mid-page; block_n 16: several tiles per 64-row page
    run_decode(device, dtype, page_lens(P), P, hq, hkv, num_splits=3, block_n=16)


@pytest.mark.parametrize("num_splits,block_n", [(1, 64), (None, 64), (8, 32)])
def test_paged_decode_splits_and_tiles(device, num_splits, block_n):
    # block_n 64 > P 16 is capped at the page size; 8 splits of a few tiles each
    run_decode(device, torch.float16, [16 * 9 + 3, 2, 0, 40], 16, 4, 2, num_splits=num_splits, block_n=block_n)


def test_paged_decode_q_view_of_qkv(device):
    run_decode(device, torch.float16, [70, 5], 16, 8, 1, q_view=True, num_splits=2, block_n=16)


def test_paged_decode_workspace_reused(device):
    """One workspace dict keeps the partials per shape; a call with other lengths fully rewrites the reused
    (here NaN-poisoned) partials."""
    ws = {}
    run_decode(device, torch.float16, [40, 3], 16, 4, 2, num_splits=3, block_n=16, workspace=ws)
    bufs = next(iter(ws.values()))
    for buf in bufs:
        buf.fill_(NAN)
    run_decode(device, torch.float16, [50, 3], 16, 4, 2, num_splits=3, block_n=16, workspace=ws)
    assert len(ws) == 1 and next(iter(ws.values()))[0] is bufs[0]


def test_paged_decode_bad_inputs(device):
    q = torch.zeros(2, 4, D, device=device)
    kp = torch.zeros(5, 2, 16, D, device=device)
    table = torch.zeros(2, 3, dtype=torch.int32, device=device)
    lens = torch.ones(2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="kv heads"):
        paged_decode_attention(q, kp[:, :1].expand(5, 3, 16, D), kp[:, :1].expand(5, 3, 16, D), table, lens)
    with pytest.raises(ValueError, match="v_pages"):
        paged_decode_attention(q, kp, kp[:, :, :8], table, lens)
    with pytest.raises(ValueError, match="q must"):
        paged_decode_attention(q.transpose(1, 2), kp, kp.clone(), table, lens)
    with pytest.raises(ValueError, match="block_table"):
        paged_decode_attention(q, kp, kp.clone(), table.long(), lens)
    with pytest.raises(ValueError, match="block_table"):
        paged_decode_attention(q, kp, kp.clone(), table[:1], lens)
    with pytest.raises(ValueError, match="cache_lens"):
        paged_decode_attention(q, kp, kp.clone(), table, lens[:1])
    with pytest.raises(ValueError, match="cache_lens"):
        paged_decode_attention(q, kp, kp.clone(), table, lens.long())
    kp48 = torch.zeros(5, 2, 48, D, device=device)
    with pytest.raises(ValueError, match="block_n"):   # 32-key tiles would cross 48-row pages
        paged_decode_attention(q, kp48, kp48.clone(), table, lens, block_n=32)


# ----------------------------------------------------------------------------- varlen prefill
def run_prefill(device, dtype, chunks, starts, P, hq, hkv, config=None):
    """chunks[s] new tokens of sequence s at positions starts[s].. (K/V of all of them already in the pages)."""
    kp, vp, table = make_pool(device, dtype, [s + t for s, t in zip(starts, chunks)], P, hkv)
    T = sum(chunks)
    cu = [0]
    for t in chunks:
        cu.append(cu[-1] + t)
    q = torch.randn(T, (hq + 2 * hkv) * D, device=device, dtype=dtype)[:, :hq * D].view(T, hq, D)  # qkv view
    out = torch.full((T, hq, D), NAN, device=device, dtype=dtype)
    bm, bn, nw, ns, pf = (tuple(config) + (None,))[:5] if config else (None,) * 5
    paged_prefill_attention(q, kp, vp, table, torch.tensor(cu, device=device, dtype=torch.int32),
                            torch.tensor(starts, device=device, dtype=torch.int32), max(chunks), out=out,
                            block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, prefetch_table=pf)
    assert not torch.isnan(out).any()
    for s, (t, start) in enumerate(zip(chunks, starts)):
        if t:
            check_attention(q[cu[s]:cu[s + 1]], kp, vp, table[s], start + t, out[cu[s]:cu[s + 1]])


def prefill_cases(P):
    # (chunk lengths, start positions): 1 token, odd > block_m, from 0 / mid-page / on a page boundary
    return [([37, 1, 20], [0, P // 2 + 3, P]), ([1, 20, 37], [P, 0, P // 2 + 3])]


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (8, 1)])
@pytest.mark.parametrize("P", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_paged_prefill(device, dtype, P, hq, hkv, case, prefetch):
    # 16x16 tiles: several q blocks, unmasked + diagonal loops, several key tiles per 64-row page; page ids
    # loaded in their own iteration or one ahead (prefetch_table)
    chunks, starts = prefill_cases(P)[case]
    run_prefill(device, dtype, chunks, starts, P, hq, hkv, config=(16, 16, 4, 1, prefetch))


@pytest.mark.parametrize("P", [16, 64])
def test_paged_prefill_default_tiles(device, P):
    # prefill_attention's default tiles (64 x 64; block_n capped at 16 for P = 16)
    run_prefill(device, torch.float16, [70, 3, 1], [P + 1, 0, 2 * P], P, 4, 2)


@pytest.mark.parametrize("prefetch", [False, True])
def test_paged_prefill_empty_sequences(device, prefetch):
    run_prefill(device, torch.float16, [5, 0, 33, 0], [17, 7, 0, 0], 16, 4, 2, config=(16, 16, 4, 1, prefetch))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_chunked_prefill_through_pages(device, dtype):
    """The serving flow: two sequences prefilled in two varlen chunks, each chunk = rope_store_kv into the pages
    (slots = page ids, cache_pos = position % P) then paged_prefill_attention; equals one-shot causal attention
    of the whole sequences."""
    torch.manual_seed(11)
    P, hq, hkv = 16, 4, 2
    lens, cuts = [45, 6], [17, 5]                      # chunk 1: tokens [0, cut), chunk 2: [cut, len)
    kp, vp, table = make_pool(device, dtype, lens, P, hkv)   # shuffled pages; only the table is kept:
    kp.fill_(NAN)                                            # every K/V read must come from rope_store_kv
    vp.fill_(NAN)
    cs = rope_table(64, D, THETA, device)
    qkv = [torch.randn(L, (hq + 2 * hkv) * D, device=device, dtype=dtype) for L in lens]
    outs = [[] for _ in lens]
    for chunk in range(2):
        spans = [(0, c) if chunk == 0 else (c, L) for c, L in zip(cuts, lens)]
        x = torch.cat([qkv[s][a:b] for s, (a, b) in enumerate(spans)])   # (T, (hq + 2 hkv) D) packed chunk
        pos = torch.cat([torch.arange(a, b) for a, b in spans]).to(device)
        seq = torch.cat([torch.full((b - a,), s) for s, (a, b) in enumerate(spans)]).to(device)
        rope_store_kv(x, pos.int(), table[seq, pos // P], kp, vp, cs, hq, hkv, cache_pos=(pos % P).int())
        cu = torch.tensor([0, spans[0][1] - spans[0][0], x.shape[0]], device=device, dtype=torch.int32)
        starts = torch.tensor([a for a, _ in spans], device=device, dtype=torch.int32)
        out = torch.full((x.shape[0], hq, D), NAN, device=device, dtype=dtype)
        paged_prefill_attention(x[:, :hq * D].view(-1, hq, D), kp, vp, table, cu, starts,
                                max(b - a for a, b in spans), out=out, block_m=16, block_n=16)
        for s in range(2):
            outs[s].append(out[cu[s]:cu[s + 1]])
    for s, L in enumerate(lens):
        q, k, v = qkv[s].float().split([hq * D, hkv * D, hkv * D], -1)
        ang = text_rope_angles(torch.arange(L, device=device), D, THETA)
        q, k, v = apply_rope(q.view(L, hq, D), ang), apply_rope(k.view(L, hkv, D), ang), v.view(L, hkv, D)
        ref = causal_attention(q, k, v)
        err = rel(torch.cat(outs[s]), ref)
        err_torch = rel(lowp_causal_attention(q.to(dtype), k.to(dtype), v.to(dtype)), ref)
        assert err <= 2 * err_torch + 1e-5, (s, err, err_torch)


def test_paged_prefill_bad_inputs(device):
    q = torch.zeros(6, 4, D, device=device)
    kp = torch.zeros(5, 2, 16, D, device=device)
    table = torch.zeros(2, 3, dtype=torch.int32, device=device)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    starts = torch.zeros(2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cu_q"):
        paged_prefill_attention(q, kp, kp.clone(), table, cu[:2], starts, 4)
    with pytest.raises(ValueError, match="start_pos"):
        paged_prefill_attention(q, kp, kp.clone(), table, cu, starts.long(), 4)
    with pytest.raises(ValueError, match="block_table"):
        paged_prefill_attention(q, kp, kp.clone(), table[:1], cu, starts, 4)
    with pytest.raises(ValueError, match="max_q_len"):
        paged_prefill_attention(q, kp, kp.clone(), table, cu, starts, 7)
    with pytest.raises(ValueError, match="block_m"):
        paged_prefill_attention(q, kp, kp.clone(), table, cu, starts, 4, block_m=24)
    with pytest.raises(ValueError, match="k_pages"):
        paged_prefill_attention(q, kp[..., :64], kp[..., :64].clone(), table, cu, starts, 4)


# ----------------------------------------------------------------------------- rope_store_kv into pages
def check_rope_store_paged(device, dtype, P, hq, hkv, pdl=False):
    """Tokens of 3 sequences at scattered positions written through cache_pos = pos % P into their pages:
    k = the reference rotation (angles of `positions`, one rounding), v copied, q rotated in place, every other
    page row still NaN."""
    torch.manual_seed(P + hq)
    seq_lens = [3 * P + 5, P, 2 * P + 1]
    _, _, table = make_pool(device, dtype, seq_lens, P, hkv)
    n_pages = int(table.max()) + 1
    kp = torch.full((n_pages, hkv, P, D), NAN, device=device, dtype=dtype)
    vp = torch.full_like(kp, NAN)
    seq = torch.cat([torch.full((L,), s) for s, L in enumerate(seq_lens)])
    pos = torch.cat([torch.arange(L) for L in seq_lens])
    pick = torch.randperm(len(seq))[:max(len(seq) // 3, 1)]          # a scattered subset of (seq, position)
    seq, pos = seq[pick].to(device), pos[pick].to(device)
    T = len(pick)
    slots, cache_pos = table[seq, pos // P], (pos % P).int()
    cs = rope_table(4 * P, D, THETA, device)
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=device, dtype=dtype)
    q, k, v = qkv.float().split([hq * D, hkv * D, hkv * D], -1)
    ang = text_rope_angles(pos, D, THETA)
    q_rot, k_rot = apply_rope(q.view(T, hq, D), ang), apply_rope(k.view(T, hkv, D), ang)
    rope_store_kv(qkv, pos.int(), slots, kp, vp, cs, hq, hkv, pdl=pdl, cache_pos=cache_pos)
    tol = lambda r: 2 * rel(r.to(dtype), r) + 1e-6  # noqa: E731 - one rounding of the exact rotation
    assert rel(qkv[:, :hq * D].view(T, hq, D), q_rot) <= tol(q_rot)
    assert rel(kp[slots.long(), :, cache_pos.long()], k_rot) <= tol(k_rot)
    assert torch.equal(vp[slots.long(), :, cache_pos.long()], v.view(T, hkv, D).to(dtype))
    written = torch.zeros(n_pages, P, dtype=torch.bool, device=device)
    written[slots.long(), cache_pos.long()] = True
    assert torch.isnan(kp.transpose(1, 2)[~written]).all() and torch.isnan(vp.transpose(1, 2)[~written]).all()


@pytest.mark.parametrize("P", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rope_store_kv_cache_pos(device, dtype, P):
    check_rope_store_paged(device, dtype, P, 4, 2)


def test_rope_store_kv_cache_pos_bad(device):
    kp = torch.zeros(4, 2, 16, D, device=device)
    qkv = torch.zeros(3, 8 * D, device=device)
    pos = torch.arange(3, device=device, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_pos"):
        rope_store_kv(qkv, pos, pos, kp, kp.clone(), rope_table(16, D, THETA, device), 4, 2, cache_pos=pos[:2])


# ----------------------------------------------------------------------------- GPU, bf16, realistic shapes
@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16, 64])
def test_paged_decode_bf16(B):
    g = torch.Generator().manual_seed(B)
    lens = torch.randint(1, 4097, (B,), generator=g).tolist()
    lens[0] = 4096
    if B > 1:
        lens[1] = 0
    run_decode("cuda", torch.bfloat16, lens, 64, 32, 8)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_n,num_warps,num_stages", [(64, 4, 3), (32, 4, 4), (64, 8, 2)])
def test_paged_decode_bf16_configs(block_n, num_warps, num_stages):
    run_decode("cuda", torch.bfloat16, [4096, 1, 63, 64, 65, 1025, 4000], 64, 32, 8, block_n=block_n,
               num_warps=num_warps, num_stages=num_stages)


@requires_gpu
@pytest.mark.gpu
def test_paged_decode_bf16_graph_and_pdl():
    """Capture once; change lengths AND the block table in device memory between replays."""
    lens = [2000, 5, 77, 1]
    q, kp, vp, table, _ = run_decode("cuda", torch.bfloat16, lens, 64, 32, 8, pdl=True, workspace={})
    lens_t = torch.tensor(lens, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    ws = {}
    paged_decode_attention(q, kp, vp, table, lens_t, out=out, workspace=ws)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, kp, vp, table, lens_t, out=out, workspace=ws)
    # new state: sequences 0 and 1 swap tables, lengths change (all within each one's pages)
    new_lens = [5, 1999, 64, 0]
    table[[0, 1]] = table[[1, 0]]
    lens_t.copy_(torch.tensor(new_lens))
    out.fill_(NAN)
    graph.replay()
    torch.cuda.synchronize()
    for b, L in enumerate(new_lens):
        if L == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
        else:
            check_attention(q[b:b + 1], kp, vp, table[b], L, out[b:b + 1])


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("chunks,starts", [([4097], [0]), ([1, 777, 1025, 0], [4096, 130, 64, 5]),
                                           ([1024] * 4, [3072, 3000, 64, 0])])
def test_paged_prefill_bf16(chunks, starts):
    run_prefill("cuda", torch.bfloat16, chunks, starts, 64, 32, 8)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("config", [(64, 64, 4, 2), (128, 64, 8, 3), (128, 32, 4, 4), (64, 128, 4, 3),
                                    (64, 64, 4, 3, True), (128, 64, 8, 5, True)])
def test_paged_prefill_bf16_configs(config):
    # (64, 128, ...): block_n capped at P = 64
    run_prefill("cuda", torch.bfloat16, [777, 33], [130, 4000], 64, 32, 8, config=config)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_rope_store_kv_cache_pos_bf16(pdl):
    check_rope_store_paged("cuda", torch.bfloat16, 64, 32, 8, pdl=pdl)
