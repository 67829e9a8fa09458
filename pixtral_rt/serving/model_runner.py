"""The model runner: executes a StepPlan on the device. It only launches; the scheduler decided.

Per-slot device state (slot = a running sequence's row, fixed until it finishes or is preempted; max_batch
slots):
    tokens (S,) int64       the token each slot feeds to its next decode step (written by the step itself)
    positions (S,) int32    that token's position
    active (S,) int32       1 while the slot decodes; 0 rows compute nothing that lands anywhere (trash page)
    block_table (S, max_pages) int32   page ids; unused entries -> the trash page 0. Pages come on demand:
                            a row is written whole at admission, then only its new entries when the
                            scheduler appends pages (one pinned non-blocking upload per step, no host sync;
                            the decode graphs read the table by address, so in-place writes are seen)
    sampling (SamplingState over S)    temperature / top_p / top_k / seed / step per slot; step = the index
                            of the output token sampled next (a resumed sequence continues from the tokens
                            it had delivered, so seeded sampling draws what it would have drawn); the
                            sampling controls of a slot (penalties, logit_bias, min_tokens) are written at
                            its set-up from the prompt and the delivered output (pixtral_rt/sampling_controls.py)
A step = (1) slot set-up for admitted / released sequences, (2) one decode step over slots 0..Bp-1 (Bp: the
smallest captured batch size covering the highest decoding slot) as two CUDA graphs: the forward (one per
Bp), then the sampling (one per (Bp, greedy-only, controlled: some row has sampling controls; without, the
graph runs none of their work)), which writes each row's next token into `tokens` and
advances `positions`. Between the two launches the engine may run `before_sample` (structured output: wait
for the previous step's tokens, advance the grammars, upload the token masks) while the GPU runs the
forward, so constrained sequences keep the overlap of host and device work. Then (3) the prompt chunks of this step,
packed into one varlen forward, whose last chunks sample their sequence's next token into `tokens` (the
first output token; for a sequence resumed after preemption, the prefill covers prompt + delivered output and
samples the token after them).
Decode runs before prefill, so a sequence activated by (3) is first decoded in the next step. Sampled tokens
(and logprobs when asked) are copied into a pinned host ring buffer; the engine reads them one step later,
while the next step runs.
"""
from __future__ import annotations

import bisect
import dataclasses
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .. import compile_events
from ..sampling import SamplingState, sample
from ..sampling_controls import count_tokens_, plan_controls, write_controls_
from .api import MAX_TOP_LOGPROBS
from .scheduler import PrefillChunk, StepPlan
from .sequence import Sequence

GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _rows(st: SamplingState, idx: torch.Tensor | slice) -> SamplingState:
    """A SamplingState over some slots: a view for a slice (in-place updates land in `st`), a copy for an
    index tensor (the per-slot tables of the controls are shared: SamplingState.rows)."""
    return st.rows(idx)


def _mark(device: torch.device):
    """A point in the device's work, timed once the step is done (`_elapsed_ms`): a CUDA event on a GPU
    (recorded on the stream, no host sync), the host clock on CPU (where every op has finished on return)."""
    if device.type == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def _elapsed_ms(a, b) -> float:
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3


@dataclass
class StepOutput:
    """What one step produced, on its way to the host. `reports`: (sequence, slot) whose token it holds.
    `stages`: (sequence, "vision" | "prefill", start mark, end mark) of the prompt work in this step."""
    reports: list[tuple[Sequence, int]]
    tokens: torch.Tensor                    # (n,) int64, host (pinned on CUDA)
    logprobs: torch.Tensor | None           # (n,) fp32
    top_ids: torch.Tensor | None            # (n, 20) int64
    top_logprobs: torch.Tensor | None       # (n, 20) fp32
    event: torch.cuda.Event | None
    stages: list = dataclasses.field(default_factory=list)

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def stage_ms(self) -> list[tuple[Sequence, str, float]]:
        """(sequence, stage, ms) of this step's prompt work; call after wait()."""
        return [(seq, kind, _elapsed_ms(a, b)) for seq, kind, a, b in self.stages]


class _FeatureCache:
    """Image features by pixel digest, least recently used evicted past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0

    def get(self, d: bytes) -> torch.Tensor | None:
        t = self.items.get(d)
        if t is not None:
            self.items.move_to_end(d)
        return t

    def put(self, d: bytes, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if n > self.max_bytes or d in self.items:
            return
        while self.bytes + n > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.items[d] = t
        self.bytes += n


class ModelRunner:
    def __init__(self, model, args, device, max_batch: int, n_pages: int, page_size: int, max_context: int,
                 use_graphs: bool = True, feature_cache_bytes: int = 1 << 30, progress: bool = True,
                 eos_id: int = 2):
        self.model, self.args, self.device = model, args, torch.device(device)
        self.max_batch, self.page_size = max_batch, page_size
        self.max_pages = -(-(max_context + 1) // page_size)
        self.max_context = max_context
        self.eos_id = eos_id                  # banned with a request's stop_token_ids until its min_tokens
        self.use_graphs = use_graphs and self.device.type == "cuda"
        model.alloc(n_pages, page_size)
        dev, S = self.device, max_batch
        self.tokens = torch.zeros(S, dtype=torch.long, device=dev)
        self.positions = torch.zeros(S, dtype=torch.int32, device=dev)
        self.active = torch.zeros(S, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(S, self.max_pages, dtype=torch.int32, device=dev)
        self._table_len = np.zeros(S, dtype=np.int64)      # host: entries of each row written so far
        self.sampling = SamplingState(S, dev, args.text.vocab_size)
        self.out_tokens = torch.zeros(S, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(S, dtype=torch.float32, device=dev)
        self.out_top_ids = torch.zeros(S, MAX_TOP_LOGPROBS, dtype=torch.long, device=dev)
        self.out_top_lp = torch.zeros(S, MAX_TOP_LOGPROBS, dtype=torch.float32, device=dev)
        pin = self.device.type == "cuda"
        self._ring = [tuple(torch.zeros(t.shape, dtype=t.dtype, pin_memory=pin) for t in
                            (self.out_tokens, self.out_lp, self.out_top_ids, self.out_top_lp)) for _ in range(3)]
        self._ring_i = 0
        W = self.sampling.bitmask.shape[1]
        # structured output: host-filled token masks, uploaded before the step that samples with them.
        # Pinned, three deep: a buffer is rewritten two steps later, after the engine waited for its step
        self._mask_ring = [(torch.zeros(S, W, dtype=torch.int32, pin_memory=pin),
                            torch.zeros(S, dtype=torch.int32, pin_memory=pin)) for _ in range(3)]
        self._mask_i = 0
        self._any_masked = False
        self.features = _FeatureCache(feature_cache_bytes)
        self.batch_sizes = sorted({b for b in GRAPH_BATCHES if b < max_batch} | {max_batch})
        self._fwd_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}   # B -> (graph, logits)
        self._sample_graphs: dict[tuple[int, bool, bool], torch.cuda.CUDAGraph] = {}  # (B, greedy-only, controls)
        self._before_replay = getattr(model, "before_replay", None)
        self.warmup_info: dict = {}
        if self.device.type == "cuda":
            self._warmup(progress)

    # ------------------------------------------------------------------ set-up
    def _warmup(self, progress: bool) -> None:
        """Compile every kernel (prefill shapes, decode batch sizes) and capture the decode graphs. Rows are
        idle (lens 0) and tables point at the trash page: nothing real is written."""
        import time

        from tqdm import tqdm
        t0, mem0 = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        events0 = compile_events.snapshot()
        # prefill lengths: 1, odd, and a ladder up to the largest chunk a step takes: cuBLAS picks other GEMM
        # kernels for other row counts and loads each on its first use (lazy module loading), which cost the
        # first request of a new prompt size 3-6 ms before this ladder (benchmarks/first_request.py)
        lens = sorted({min(T, self.max_context) for T in (1, 97, 384, 1024, 1536, 2048, 3072, 4096, 6144, 8192)})
        # ... and one step of two chunks of 97 tokens (several sequences' chunks take other attention tiles
        # than a lone prompt: kernels/paged_prefill_attention.py _paged_default_config)
        lens += [(97, 97)] if self.max_context >= 97 and self.max_batch >= 2 else []
        steps = [("prefill", T) for T in lens] + [("graph", (B, g, c)) for B in self.batch_sizes
                                                            for g in (True, False) for c in (False, True)]
        steps += [("vision", step) for step in self.model.vision_prepare_steps(self.max_context)]
        pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        with tqdm(steps, desc="warm-up + graph capture", disable=not progress, file=sys.stderr, leave=False) as bar:
            for kind, what in bar:
                bar.set_postfix_str(what[0] if kind == "vision" else f"{kind} {what}")
                if kind == "vision":
                    what[1]()
                elif kind == "prefill":
                    chunks = what if isinstance(what, tuple) else (what,)
                    T, S = sum(chunks), len(chunks)
                    z = torch.zeros(T, dtype=torch.int32, device=self.device)
                    pos = torch.cat([torch.arange(n, dtype=torch.int32, device=self.device) for n in chunks])
                    cu = torch.tensor(np.cumsum((0,) + chunks), dtype=torch.int32, device=self.device)
                    self.model.prefill(torch.randn(T, self.args.text.dim, device=self.device, dtype=self.model.dtype),
                                       pos, z, pos % self.page_size, self.block_table[:S], cu, z[:S], max(chunks),
                                       cu[1:].long() - 1)
                elif self.use_graphs:
                    self._capture(*what, pool)
                else:
                    self._decode_body(*what)
        self.sampling.step.zero_()
        torch.cuda.synchronize(self.device)
        ev = compile_events.snapshot()
        # what the load prepared so that requests compile / capture nothing (issue 12), for the load message
        self.warmup_info = {
            "warmup_s": round(time.perf_counter() - t0, 2),
            "decode_graphs": len(self._fwd_graphs) + len(self._sample_graphs),
            "vision_buckets": (ev["graph_capture"] - events0["graph_capture"] - len(self._fwd_graphs)
                               - len(self._sample_graphs)),
            "triton_compiles": ev["triton_compile"] - events0["triton_compile"],
            "autotunes": ev["autotune"] - events0["autotune"],
            "warmup_extra_GB": round((torch.cuda.memory_reserved(self.device) - mem0) / 1e9, 2)}

    def _capture(self, B: int, greedy: bool, controls: bool, pool) -> None:
        """The forward graph of batch B (once) and the sampling graph of (B, greedy, controls)."""
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            self._decode_body(B, greedy, controls)   # compile / autotune / cuBLAS handles outside the capture
        torch.cuda.current_stream(self.device).wait_stream(s)
        if B not in self._fwd_graphs:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                logits = self._decode_forward(B)
            compile_events.captured()
            self._fwd_graphs[B] = (g, logits)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            self._decode_sample(B, greedy, self._fwd_graphs[B][1], controls)
        compile_events.captured()
        self._sample_graphs[(B, greedy, controls)] = g

    def _decode_forward(self, B: int) -> torch.Tensor:
        """Slots 0..B-1: logits (B, V) fp32 of the token each feeds at its position (idle rows: trash)."""
        pos, act = self.positions[:B], self.active[:B]
        return self.model.decode(self.tokens[:B], pos, self.block_table, (pos + 1) * act)

    def _decode_sample(self, B: int, greedy: bool, logits: torch.Tensor, controls: bool = False) -> None:
        """Next token of each slot (token masks applied first, then the sampling controls of the rows that
        have them, when `controls`) into out_tokens and, active rows, tokens; positions advance."""
        act = self.active[:B]
        st = _rows(self.sampling, slice(0, B))
        nxt = sample(logits, st, greedy_only=greedy, controls=controls)
        if controls:
            count_tokens_(st, nxt, act)            # the penalties of the next step see this token
        self.out_tokens[:B].copy_(nxt)
        self.tokens[:B].copy_(torch.where(act > 0, nxt, self.tokens[:B]))
        self.positions[:B] += act

    def _decode_body(self, B: int, greedy: bool, controls: bool = False) -> torch.Tensor:
        logits = self._decode_forward(B)
        self._decode_sample(B, greedy, logits, controls)
        return logits

    def _set_slot(self, seq: Sequence) -> None:
        s, p = seq.slot, seq.params
        # the slot's block-table row is all trash page (zeroed by _clear_slot, or never used) and its active /
        # positions entries 0: _append_pages writes the sequence's pages with the step's other appends
        self._table_len[s] = 0
        self.sampling.set(s, p)
        if p.has_controls:          # from the prompt and the delivered output (a resume: what it had generated)
            rows = plan_controls(p, seq.req.tokens, seq.output, self.eos_id, self.sampling.counts.shape[1])
            write_controls_(self.sampling, s, rows, self._upload_arrays)

    def _clear_slot(self, slot: int) -> None:
        self.active[slot].fill_(0)         # fill_, not `t[slot] = 0`: that is a blocking host-to-device copy
        self.sampling.ctl[slot].fill_(0)
        self.positions[slot].fill_(0)
        self.block_table[slot].zero_()
        self._table_len[slot] = 0

    def _page_appends(self, seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray] | None:
        """(flat block-table index, page id) of the pages appended since each row was last written, all rows
        together (host); None when there are none."""
        idx, val = [], []
        for seq in seqs:
            n0, n1 = int(self._table_len[seq.slot]), len(seq.pages)
            if n1 > n0:
                idx.append(seq.slot * self.max_pages + np.arange(n0, n1))
                val.append(np.asarray(seq.pages[n0:n1], dtype=np.int64))
                self._table_len[seq.slot] = n1
        return (np.concatenate(idx), np.concatenate(val)) if idx else None

    def _write_pages(self, appends, uploaded: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Scatter the appended entries into the block table in place (stream-ordered before what follows);
        `uploaded`: their (int64 index, int32 page id) device views when another upload carried them."""
        if appends is None:
            return
        if uploaded is None:
            val_d, idx_d = self._upload([appends[1]], [appends[0]])       # page ids int32, indices int64
        else:
            idx_d, val_d = uploaded
        self.block_table.view(-1).index_copy_(0, idx_d, val_d)

    def mask_buffer(self, n: int) -> np.ndarray:
        """(n, W) int32 host rows (pinned on CUDA) for the masks of the next step's n constrained
        sequences: fill them (pixtral_rt/structured fill_bitmasks), then set_token_masks(slots)."""
        return self._mask_ring[self._mask_i][0][:n].numpy()

    def set_token_masks(self, slots: list[int]) -> None:
        """The next step samples slots[i] with row i of mask_buffer(len(slots)); every other slot is free.
        One non-blocking upload; nothing when no slot was masked before or now."""
        if not slots and not self._any_masked:
            return
        rows, flags = self._mask_ring[self._mask_i]
        self._mask_i = (self._mask_i + 1) % len(self._mask_ring)
        flags.zero_()
        n = len(slots)
        nb = self.device.type == "cuda"
        if n:
            flags[slots] = 1
            idx = torch.as_tensor(slots, dtype=torch.long).to(self.device, non_blocking=nb)
            self.sampling.bitmask.index_copy_(0, idx, rows[:n].to(self.device, non_blocking=nb))
        self.sampling.masked.copy_(flags, non_blocking=nb)
        self._any_masked = n > 0

    # ------------------------------------------------------------------ a step
    @torch.inference_mode()
    def run(self, plan: StepPlan, before_sample=None) -> StepOutput:
        """Launch the step. before_sample(): called once the decode forward is launched (or, with no
        decode, before the prefill), before anything samples: the engine's last chance to set token masks."""
        for seq in plan.released + plan.preempted:
            if seq.slot >= 0:
                self._clear_slot(seq.slot)
        for seq in plan.admitted:
            self._set_slot(seq)
        # block-table entries of the pages appended since the rows were last written: uploaded now when a
        # decode forward reads them first, else with the prefill's own upload (one copy for the step)
        appends = self._page_appends(plan.decode + [c.seq for c in plan.prefill])
        if plan.decode or not plan.prefill:
            self._write_pages(appends)
            appends = None
        reports: list[tuple[Sequence, int]] = []
        want_lp = False
        if plan.decode:
            B = max(s.slot for s in plan.decode) + 1
            B = self.batch_sizes[bisect.bisect_left(self.batch_sizes, B)]
            greedy = all(s.params.greedy for s in plan.decode)
            controls = any(s.params.has_controls for s in plan.decode)
            if self.use_graphs:
                g, logits = self._fwd_graphs[B]
                if self._before_replay is not None:      # tensor parallel: followers replay their graph too
                    self._before_replay(B)
                g.replay()
            else:
                logits = self._decode_forward(B)
            if before_sample is not None:                # host work while the GPU runs the forward
                before_sample()
                before_sample = None
            if self.use_graphs:
                self._sample_graphs[(B, greedy, controls)].replay()
            else:
                self._decode_sample(B, greedy, logits, controls)
            reports += [(s, s.slot) for s in plan.decode]
            if any(s.logprobs is not None for s in plan.decode):
                want_lp = True
                self._logprobs(logits, self.out_tokens[:B], torch.arange(B, device=self.device))
        if before_sample is not None:
            before_sample()
        stages: list = []
        if plan.prefill:
            done = self._prefill(plan.prefill, stages, appends)
            reports += [(s, s.slot) for s in done]
            want_lp = want_lp or any(s.logprobs is not None for s in done)
        out = self._to_host(reports, want_lp)
        out.stages = stages
        return out

    def _logprobs(self, logits, chosen, slots) -> None:
        """Raw-distribution logprobs of the chosen tokens and the top 20, into the per-slot out buffers."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        self.out_lp[slots] = lp.gather(1, chosen[:, None])[:, 0]
        top = lp.topk(MAX_TOP_LOGPROBS, dim=-1)
        self.out_top_lp[slots] = top.values
        self.out_top_ids[slots] = top.indices

    def _to_host(self, reports, want_lp: bool) -> StepOutput:
        n = max((slot for _, slot in reports), default=-1) + 1
        ring = self._ring[self._ring_i]
        self._ring_i = (self._ring_i + 1) % len(self._ring)
        nb = self.device.type == "cuda"
        toks = ring[0][:n]
        toks.copy_(self.out_tokens[:n], non_blocking=nb)
        lp = top_ids = top_lp = None
        if want_lp:
            lp, top_ids, top_lp = ring[1][:n], ring[2][:n], ring[3][:n]
            lp.copy_(self.out_lp[:n], non_blocking=nb)
            top_ids.copy_(self.out_top_ids[:n], non_blocking=nb)
            top_lp.copy_(self.out_top_lp[:n], non_blocking=nb)
        ev = None
        if nb:
            ev = torch.cuda.Event()
            ev.record()
        return StepOutput(reports, toks, lp, top_ids, top_lp, ev)

    # ------------------------------------------------------------------ prefill
    def _upload(self, arrays32: list, arrays64: list = ()) -> list[torch.Tensor]:
        """Small integer host arrays (every value within int32) -> device views in ONE pinned, non-blocking copy
        (no stream sync): arrays32 as int32 views, then arrays64 as int64 views (one conversion kernel over
        their span: the index arguments of index_select / index_copy_ want int64). Returns the views in that
        order. The uploads of a step are few and launch-bound at the head of a prefill: one copy and one kernel
        instead of a copy per group and a conversion per array."""
        # every view starts 16-byte aligned (each part padded to 4 elements): Triton specialises a kernel on its
        # pointers' alignment, so views at odd offsets are another compiled variant than the warm-up's
        # tensors (the first GPU run of this compiled rope_store_kv and the paged attention at request time)
        parts = [np.asarray(x, dtype=np.int64).ravel() for x in (*arrays32, *arrays64)]
        padded = [np.pad(p, (0, -len(p) % 4)) for p in parts]
        flat = np.concatenate(padded) if parts else np.zeros(0, dtype=np.int64)
        if flat.size and (flat.max() > 2**31 - 1 or flat.min() < -2**31):
            raise OverflowError("an upload value does not fit int32")      # a bug: ids and positions always do
        host = torch.from_numpy(flat.astype(np.int32))
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        n32 = sum(len(p) for p in padded[:len(arrays32)])
        dev64 = dev[n32:].long() if len(arrays64) else None
        out, o = [], 0
        for i, (x, xp) in enumerate(zip(parts, padded)):
            src, base = (dev, 0) if i < len(arrays32) else (dev64, n32)
            out.append(src[o - base:o - base + len(x)])
            o += len(xp)
        return out

    def _upload_arrays(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Host arrays of any dtype -> device tensors, each one pinned non-blocking copy (no stream sync)."""
        out = []
        for a in arrays:
            host = torch.from_numpy(np.ascontiguousarray(a))
            if self.device.type == "cuda":
                host = host.pin_memory()
            out.append(host.to(self.device, non_blocking=True))
        return out

    def _prefill(self, chunks: list[PrefillChunk], stages: list, appends=None) -> list[Sequence]:
        """All prompt chunks of the step in one varlen forward; samples the first token of every sequence
        whose prompt ends here. Returns those sequences. Host planning in NumPy, one upload, no host sync.
        Appends to `stages` the marks around each vision encoder call and around the forward + sampling
        (every chunk's sequence waits for the whole forward, so each is charged all of it). appends: the
        step's block-table appends (_page_appends) when no decode forward wrote them first: in this upload."""
        P = self.page_size
        toks, pos, cu, start, img_rows, feats = [], [], [0], [], [], []
        for c in chunks:
            toks.append(np.asarray(c.seq.prefill_tokens(c.start, c.end), dtype=np.int64))
            pos.append(np.arange(c.start, c.end, dtype=np.int64))
            # [IMG] rows of this chunk and the matching feature rows (features computed on first need; all
            # [IMG] positions are in the prompt, before any resumed output)
            img_pos = c.seq.req.image_token_positions
            i0, i1 = bisect.bisect_left(img_pos, c.start), bisect.bisect_left(img_pos, c.end)
            if i1 > i0:
                img_rows.append(np.asarray(img_pos[i0:i1], dtype=np.int64) - c.start + cu[-1])
                encode = c.seq.features is None          # else computed in an earlier chunk's step
                v0 = _mark(self.device) if encode else None
                feats.append(self._features(c.seq)[i0:i1])
                if encode:
                    stages.append((c.seq, "vision", v0, _mark(self.device)))
            cu.append(cu[-1] + c.end - c.start)
            start.append(c.start)
        pos_np = np.concatenate(pos)
        pages_np = np.concatenate([np.asarray(c.seq.pages, dtype=np.int64)[p // P] for c, p in zip(chunks, pos)])
        done = [c for c in chunks if c.last]
        rows_np = [cu[i + 1] - 1 for i, c in enumerate(chunks) if c.last]
        img_np = np.concatenate(img_rows) if img_rows else np.zeros(0, dtype=np.int64)
        # a done sequence's next token sits at position prefill_len; it is output token prefill_len -
        # prompt_len (0, or the tokens delivered before a preemption): its sampling step
        app = appends if appends is not None else (np.zeros(0, dtype=np.int64),) * 2
        (tokens_d, pos_d, pages_d, offs_d, cu_d, start_d, done_pos_d, app_val_d,
         rows_d, slots_d, img_d, done_d, done_step_d, app_idx_d) = self._upload(
            [np.concatenate(toks), pos_np, pages_np, pos_np % P, cu, start, [c.seq.prefill_len for c in done], app[1]],
            [rows_np, [c.seq.slot for c in chunks], img_np, [c.seq.slot for c in done],
             [c.seq.prefill_len - c.seq.prompt_len for c in done], app[0]])
        self._write_pages(appends, (app_idx_d, app_val_d))
        p0 = _mark(self.device)
        h = self.model.embed(tokens_d)
        if feats:
            h.index_copy_(0, img_d, torch.cat(feats).to(h.dtype))
        logits = self.model.prefill(h, pos_d, pages_d, offs_d, self.block_table.index_select(0, slots_d), cu_d,
                                    start_d, max(c.end - c.start for c in chunks), rows_d)
        if not done:
            p1 = _mark(self.device)
            stages += [(c.seq, "prefill", p0, p1) for c in chunks]
            return []
        # next tokens: sample with each sequence's own settings at its step (set here: decode steps of other
        # slots advance every row's counter, this one's included while it was prefilling), then decode
        st = _rows(self.sampling, done_d)
        st.step = done_step_d
        controls = any(c.seq.params.has_controls for c in done)
        first = sample(logits, st, greedy_only=all(c.seq.params.greedy for c in done), controls=controls)
        if controls:
            count_tokens_(st, first)
        self.sampling.step[done_d] = st.step            # advanced by sample(): done_step + 1
        self.tokens[done_d] = first
        self.out_tokens[done_d] = first
        self.positions[done_d] = done_pos_d
        self.active.index_fill_(0, done_d, 1)      # (`t[idx] = 1` would copy a host scalar: a stream sync)
        if any(c.seq.logprobs is not None for c in done):
            self._logprobs(logits, first, done_d)
        for c in done:
            c.seq.features = None                  # the prompt is in the cache: features no longer needed
        p1 = _mark(self.device)
        stages += [(c.seq, "prefill", p0, p1) for c in chunks]
        return [c.seq for c in done]

    def _features(self, seq: Sequence) -> torch.Tensor:
        """(n_img_tokens, dim) features of all the sequence's images: from the cache where the same pixels
        were encoded before, the others in one encoder call. Kept on the sequence until its prompt is done."""
        if seq.features is not None:
            return seq.features
        req, merge = seq.req, self.args.vision.spatial_merge_size
        counts = [(r // merge) * (c // merge) for r, c in req.patch_grids]
        parts: list[torch.Tensor | None] = [self.features.get(d) for d in seq.digests]
        todo = [i for i, p in enumerate(parts) if p is None]
        if todo:
            sub = _subset(req, todo)
            out = self.model.image_features(sub)
            o = 0
            for i in todo:
                parts[i] = out[o:o + counts[i]].clone()     # the encoder output may be a graph buffer
                o += counts[i]
                self.features.put(seq.digests[i], parts[i])
        seq.features = torch.cat(parts) if len(parts) > 1 else parts[0]
        return seq.features


def _subset(req, idx: list[int]):
    """The request restricted to images idx (for the encoder only: tokens untouched)."""
    if idx == list(range(req.n_images)):
        return req
    cu = [0]
    for i in idx:
        cu.append(cu[-1] + req.cu_seqlens[i + 1] - req.cu_seqlens[i])
    return dataclasses.replace(req, images=[req.images[i] for i in idx],
                               patch_grids=[req.patch_grids[i] for i in idx], cu_seqlens=cu,
                               image_out_hw=[req.image_out_hw[i] for i in idx] if req.image_out_hw else [])
