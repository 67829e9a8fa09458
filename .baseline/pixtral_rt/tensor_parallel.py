"""Tensor parallelism over torch.distributed: NCCL between GPUs, gloo on the CPU (the same code path).

Processes. Rank 0 is the user's process (CLI, server, Engine): tokeniser, images, vision encoder, scheduler
and sampling all live there. Ranks 1..N-1 are followers: each holds a shard of the text decoder and runs
what rank 0 sends it (`follow`). Rank 0 starts the followers itself (`launch`: spawned processes, rendezvous
on a free TCP port of 127.0.0.1), or they already exist under torchrun (RANK / WORLD_SIZE in the env: ranks
!= 0 call `follow_from_env` from the entry point and never return to the CLI).

Sharding (pixtral_rt/sharding.py, Megatron style): wq / wk / wv / w1 / w3 split by output rows (whole heads,
whole KV heads), wo / w2 by input columns; each rank's wo / w2 output is a partial sum, summed across ranks
by one all-reduce (`install_all_reduce` on the reference model; FastDecoder(tp_group=...) on the GPU).
Embeddings, norms and the vision encoder are replicated (the vision encoder and the logits only matter on
rank 0); the lm_head is split by vocabulary rows with its logits all-gathered, or replicated with
PIXTRAL_RT_TP_LM_HEAD=replicated (sharding.lm_head_mode says why vocab-parallel is the default).

Protocol. The serving engine talks to its model through a narrow interface (serving/paged_model.py).
`LeaderModel` wraps rank 0's shard and, for every call that runs the sharded decoder (alloc, prefill,
decode), first broadcasts a fixed int64 header (the call and its sizes) over a gloo group, then the call's
tensors over the data group (NCCL / gloo); the followers make the same call on their shard, and the
all-reduces inside keep every rank in step. Vision, prompt embedding and sampling stay on rank 0 (prefill
sends the embeddings it computed). On GPUs a decode step is a CUDA graph on every rank: the input
broadcasts are inside the graphs, so per step rank 0 sends one header ('replay', batch) and no tensor
crosses the host. The CPU path (gloo, no graphs) runs the same headers and broadcasts, and is what CI tests;
the GPU path (NCCL, graphs) has run on ONE GPU with a process group of one (PIXTRAL_RT_TP_ONE_RANK: the
plain engine's tokens exactly, tests/test_tp_gpu.py) but NOT YET across GPUs (no 2-GPU machine lent so far).
PIXTRAL_RT_TP_SAME_GPU puts 2+ ranks on one GPU over gloo, without graphs (`same_gpu_forced`): the sharded
GPU decoders with real traffic between ranks, checked against TP=1 on a one-GPU machine.

Failures. Every follower runs a watchdog thread that exits when rank 0 is gone (no orphans). A follower that
fails (at load or mid-request) puts its error on a queue and exits; rank 0's watchdog prints one line naming
the rank and the error, stops the other followers and ends the process (exit code 1): a collective that
lost a peer cannot be interrupted from Python, so exiting is the only clean way out. Ctrl-C reaches every
process of the terminal's process group.

Fault injection for tests: PIXTRAL_RT_TP_FAULT="RANK:load" or "RANK:decode:N" makes that follower raise at
load or at its N-th decode step.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist


def backend_for(device: torch.device) -> str:
    """The data group's backend: NCCL between GPUs, gloo on the CPU and in the same-GPU test mode."""
    return "nccl" if device.type == "cuda" and not same_gpu_forced() else "gloo"


def same_gpu_forced() -> bool:
    """PIXTRAL_RT_TP_SAME_GPU=1, a test mode for a machine with ONE GPU: every rank runs on that GPU and the
    data group is gloo (NCCL refuses two ranks on one GPU; gloo stages CUDA tensors through host memory), so
    decode runs without CUDA graphs (gloo collectives cannot be captured). It checks what a process group of
    one cannot: sharded full-size decoders (half the heads and KV heads per rank) whose partial sums really
    cross between processes, against TP=1 (tests/test_tp_gpu.py). Slow, and not for production: NCCL, and
    the collectives inside the decode graphs, need one GPU per rank."""
    return os.environ.get("PIXTRAL_RT_TP_SAME_GPU", "0") == "1"


ALLREDUCE_IMPLS = ("nccl", "symm")


def allreduce_impl() -> str:
    """The decode step's all-reduces on GPUs: "nccl" (dist.all_reduce) or "symm" (torch symmetric memory's
    one-shot all-reduce for decode-sized sums, NCCL for prefill; FastDecoder(tp_allreduce=)).
    PIXTRAL_RT_TP_ALLREDUCE, read in every rank; the faster one by measurement becomes the default."""
    impl = os.environ.get("PIXTRAL_RT_TP_ALLREDUCE", "nccl")
    if impl not in ALLREDUCE_IMPLS:
        raise ValueError(f"PIXTRAL_RT_TP_ALLREDUCE={impl!r}: choose one of {', '.join(ALLREDUCE_IMPLS)}")
    return impl


def check_gpus(world: int, device: torch.device) -> None:
    """Before any process starts: one GPU per rank (ValueError naming the count and CUDA_VISIBLE_DEVICES)."""
    if device.type != "cuda" or same_gpu_forced():
        return
    n = torch.cuda.device_count()
    if world > n:
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(f"--tensor-parallel {world} needs {world} GPUs (one per rank) but {n} "
                         f"{'is' if n == 1 else 'are'} visible" + (f" (CUDA_VISIBLE_DEVICES={vis})" if vis else ""))


def follower_device(rank: int, device: torch.device) -> torch.device:
    """A spawned follower's device: GPU `rank` (one GPU per rank), or the leader's in the same-GPU test mode."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", device.index or 0) if same_gpu_forced() else torch.device("cuda", rank)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fault(rank: int, where: str, count: int = 0) -> None:
    spec = os.environ.get("PIXTRAL_RT_TP_FAULT", "")
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) == rank and parts[1] == where and (len(parts) < 3 or int(parts[2]) == count):
        raise RuntimeError(f"injected fault on rank {rank} at {where} (PIXTRAL_RT_TP_FAULT={spec})")


# ------------------------------------------------------------------------------------------ model side
def install_all_reduce(model: torch.nn.Module, group=None, vocab_parallel: bool = False) -> int:
    """Sum the partial outputs of every row-parallel linear (layers.*.attention.wo, layers.*.feed_forward.w2)
    across ranks, by a forward hook on each; vocab_parallel: all-gather the lm_head's (`output`) logit
    slices into the full vocabulary. Returns how many hooks were installed."""
    import re
    n = 0
    for name, mod in model.named_modules():
        # text decoder only: the vision encoder (replicated, rank 0 only) has modules of the same names
        if re.fullmatch(r"layers\.\d+\.(attention\.wo|feed_forward\.w2)", name):
            mod.register_forward_hook(lambda _m, _inp, out: _all_reduce(out, group))
            n += 1
    if vocab_parallel:
        model.output.register_forward_hook(lambda _m, _inp, out: gather_vocab(out, group))
        n += 1
    return n


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor    # renamed in torch 2.13


def gather_vocab(part: torch.Tensor, group) -> torch.Tensor:
    """Vocab-parallel lm_head: this rank's (..., vocab / world) logits -> (..., vocab) on every rank, by one
    all-gather (rank r's block is vocab columns [r V / w, (r + 1) V / w)). Capturable in a CUDA graph (NCCL);
    FastDecoder and the reference model's hook both use it."""
    world = dist.get_world_size(group)
    lead, Vp = part.shape[:-1], part.shape[-1]
    flat = part.reshape(-1, Vp).contiguous()
    buf = torch.empty(world * flat.shape[0], Vp, device=part.device, dtype=part.dtype)
    _gather_into(buf, flat, group=group)
    return buf.view(world, flat.shape[0], Vp).transpose(0, 1).reshape(*lead, world * Vp)


# The control channel: a fixed header of int64 broadcast from rank 0 over a gloo group (CPU tensors, so it
# also works while rank 0 captures a CUDA graph); the call's tensors follow over the data group (NCCL on
# GPUs, gloo on the CPU). Header: [op, a, b, c, d, e, f, g].
OPS = {"stop": 0, "alloc": 1, "prefill": 2, "decode": 3, "capture": 4, "replay": 5}
_HEADER = 8
_control_group = None


def make_control_group(backend: str) -> None:
    """Every rank, right after init_process_group: the gloo group the headers travel on."""
    global _control_group
    _control_group = dist.new_group(backend="gloo") if backend != "gloo" else None


def _send_header(op: str, *vals: int) -> None:
    h = torch.zeros(_HEADER, dtype=torch.int64)
    h[0] = OPS[op]
    h[1:1 + len(vals)] = torch.tensor(vals, dtype=torch.int64)
    dist.broadcast(h, 0, group=_control_group)


def _recv_header() -> list[int]:
    h = torch.empty(_HEADER, dtype=torch.int64)
    dist.broadcast(h, 0, group=_control_group)
    return h.tolist()


def _bcast(t: torch.Tensor) -> torch.Tensor:
    dist.broadcast(t, 0)
    return t


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class LeaderModel:
    """Rank 0's paged model (serving/paged_model.py interface). The calls that run the sharded decoder (alloc,
    prefill, decode) send a header and their tensors to the followers first; vision and prompt embedding run
    here only. Decode graphs: a decode inside rank 0's capture sends 'capture' (each follower captures its own
    graph: the input broadcasts + its shard's decode); the model runner calls before_replay(B) before replaying,
    which sends 'replay' (one small host message per step; the inputs travel inside the graphs)."""

    def __init__(self, local, world: int, processes: "Followers | None" = None):
        self.local, self.world, self.processes = local, world, processes
        self.raw_pixels, self.device, self.dtype = local.raw_pixels, local.device, local.dtype
        self._stopped = False

    @property
    def page_size(self) -> int:
        return self.local.page_size

    def alloc(self, n_pages: int, page_size: int) -> None:
        _send_header("alloc", n_pages, page_size)
        self.local.alloc(n_pages, page_size)

    def embed(self, tokens):
        return self.local.embed(tokens)

    def image_features(self, req):
        return self.local.image_features(req)

    def vision_prepare_steps(self, max_context: int) -> list:
        return self.local.vision_prepare_steps(max_context)     # the vision encoder runs on rank 0 only

    def prefill(self, h, positions, pages, offsets, block_table, cu_q, start_pos, max_q_len, rows):
        T, S, R = h.shape[0], start_pos.shape[0], rows.shape[0]
        _send_header("prefill", T, S, block_table.shape[1], R, int(max_q_len), h.shape[1])
        h = h.to(self.dtype).contiguous()
        for t in (h, positions, pages, offsets, block_table[:S].contiguous(), cu_q, start_pos, rows):
            _bcast(t)
        return self.local.prefill(h, positions, pages, offsets, block_table, cu_q, start_pos, max_q_len, rows)

    def decode(self, tokens, positions, block_table, lens):
        B = tokens.shape[0]
        _send_header("capture" if _capturing(self.device) else "decode", B, block_table.shape[1])
        for t in (tokens, positions, block_table[:B], lens):
            _bcast(t)
        return self.local.decode(tokens, positions, block_table, lens)

    def before_replay(self, batch: int) -> None:
        _send_header("replay", batch)

    def shutdown(self) -> None:
        """Tell the followers to exit and wait for them (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self.processes is not None:
            self.processes.stopping = True
        try:
            _send_header("stop")
        except RuntimeError as exc:       # a follower is already gone (e.g. SIGTERM to the process group)
            print(f"pixtral_rt: tensor-parallel workers already stopped ({type(exc).__name__})", file=sys.stderr)
        finally:
            if self.processes is not None:
                self.processes.join()
            if dist.is_initialized():
                dist.destroy_process_group()


def follow(model, rank: int) -> None:
    """A follower's loop: make every call rank 0 announces on this rank's shard, until 'stop'."""
    dev, dtype = model.device, model.dtype
    n_decode = 0
    static: dict[tuple[int, int], list[torch.Tensor]] = {}      # decode inputs per (B, table width)
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None

    def decode_inputs(B, cols):
        if (B, cols) not in static:
            static[(B, cols)] = [torch.zeros(B, dtype=torch.long, device=dev),
                                 torch.zeros(B, dtype=torch.int32, device=dev),
                                 torch.zeros(B, cols, dtype=torch.int32, device=dev),
                                 torch.zeros(B, dtype=torch.int32, device=dev)]
        return static[(B, cols)]

    with torch.inference_mode():
        while True:
            op, a, b, c, d, e, f, _ = _recv_header()
            if op == OPS["stop"]:
                return
            if op == OPS["alloc"]:
                model.alloc(a, b)
            elif op == OPS["prefill"]:
                T, S, cols, R, max_q_len, dim = a, b, c, d, e, f
                i32 = dict(dtype=torch.int32, device=dev)
                h = _bcast(torch.empty(T, dim, dtype=dtype, device=dev))
                positions, pages, offsets = (_bcast(torch.empty(T, **i32)) for _ in range(3))
                table = _bcast(torch.empty(S, cols, **i32))
                cu_q, start_pos = _bcast(torch.empty(S + 1, **i32)), _bcast(torch.empty(S, **i32))
                rows = _bcast(torch.empty(R, dtype=torch.long, device=dev))
                model.prefill(h, positions, pages, offsets, table, cu_q, start_pos, max_q_len, rows)
            elif op == OPS["decode"]:
                n_decode += 1
                _fault(rank, "decode", n_decode)
                ins = decode_inputs(a, b)
                for t in ins:
                    _bcast(t)
                model.decode(*ins)
            elif op == OPS["capture"]:
                ins = decode_inputs(a, b)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    for t in ins:
                        _bcast(t)
                    model.decode(*ins)
                graphs[a] = g
            elif op == OPS["replay"]:
                n_decode += 1
                _fault(rank, "decode", n_decode)
                graphs[a].replay()
            else:
                raise RuntimeError(f"tensor parallel: unknown op {op} from rank 0")


# ------------------------------------------------------------------------------------------ processes
class Followers:
    """The spawned follower processes of rank 0 and its watchdog."""

    def __init__(self, procs, errors):
        self.procs, self.errors = procs, errors
        self.stopping = False
        self._watch = threading.Thread(target=self._watchdog, name="pixtral-rt-tp-watchdog", daemon=True)
        self._watch.start()

    def _watchdog(self) -> None:
        while True:
            time.sleep(0.2)
            msg, code = None, 1
            if not self.errors.empty():
                rank, text = self.errors.get()
                msg = f"tensor-parallel worker rank {rank} failed: {text}"
            else:
                for r, p in enumerate(self.procs, start=1):
                    if p.exitcode not in (None, 0) and not self.stopping:
                        if p.exitcode < 0:          # killed by a signal (e.g. SIGTERM to the process group)
                            import signal
                            code = 128 - p.exitcode
                            msg = f"tensor-parallel worker rank {r} was stopped by {signal.Signals(-p.exitcode).name}"
                        else:
                            msg = f"tensor-parallel worker rank {r} exited with code {p.exitcode}"
                        break
            if msg is None:
                if self.stopping and all(p.exitcode is not None for p in self.procs):
                    return
                continue
            print(f"pixtral_rt: error: {msg}; stopping all ranks", file=sys.stderr, flush=True)
            self.kill()
            os._exit(code)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()

    def join(self, timeout: float = 30.0) -> None:
        t0 = time.time()
        for p in self.procs:
            p.join(max(0.1, timeout - (time.time() - t0)))
        self.kill()


def _parent_watch(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)         # rank 0 is gone: never outlive it


def _follower_main(rank: int, world: int, port: int, load_kw: dict, errors, parent_pid: int) -> None:
    threading.Thread(target=_parent_watch, args=(parent_pid,), daemon=True).start()
    try:
        device = torch.device(load_kw.get("device") or "cpu")
        _run_follower(rank, world, follower_device(rank, device), load_kw, f"tcp://127.0.0.1:{port}")
    except KeyboardInterrupt:
        os._exit(130)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0 as one line, then exit
        last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f" ({os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
        errors.put((rank, f"{type(exc).__name__}: {exc}{where}"))
        time.sleep(0.5)          # let the queue's feeder thread deliver it
        os._exit(1)


def _join(rank: int, world: int, device: torch.device, init_method: str | None = None) -> None:
    """Join the process group (init_method None: env://, as torchrun sets it) and make the control group."""
    # NVLink multicast stays off (the GPU machines require it; NCCL / symmetric memory would enable it)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world)
    make_control_group(backend_for(device))


def _run_follower(rank: int, world: int, device: torch.device, load_kw: dict, init_method: str | None) -> None:
    """A follower's life: join, load its shard, follow rank 0 until 'stop'."""
    _join(rank, world, device, init_method)
    _fault(rank, "load")
    follow(build_follower_model(load_kw, rank, world, device), rank)
    dist.destroy_process_group()


def launch(world: int, load_kw: dict, device: torch.device) -> tuple[Followers, int]:
    """Spawn ranks 1..world-1 and join the process group as rank 0. Returns (followers, rank)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_follower_main, args=(r, world, port, load_kw, errors, os.getpid()),
                         name=f"pixtral-rt-tp-rank{r}", daemon=True) for r in range(1, world)]
    for p in procs:
        p.start()
    followers = Followers(procs, errors)
    _join(0, world, device, f"tcp://127.0.0.1:{port}")
    return followers, 0


def one_rank_forced() -> bool:
    """PIXTRAL_RT_TP_ONE_RANK=1: run --tensor-parallel 1 through the tensor-parallel path anyway (a process
    group of one, the leader's headers and broadcasts, the decode graphs with their all-reduces), so that a
    one-GPU machine checks that path against the plain engine (tests/test_tp_gpu.py). Not for production."""
    return os.environ.get("PIXTRAL_RT_TP_ONE_RANK", "0") == "1"


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world) when launched by torchrun (or any env:// launcher), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def follow_from_env(load_kw: dict) -> None:
    """A torchrun rank != 0: join the group, load the shard, follow rank 0 until it stops."""
    rank, world = torchrun_env()
    device = torch.device(load_kw.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    _run_follower(rank, world, device, load_kw, None)


def join_as_rank0(device: torch.device) -> None:
    """torchrun rank 0: join the env:// group."""
    _join(*torchrun_env(), device)


# ------------------------------------------------------------------------------------------ shards
def reference_shard(src, rank: int, world: int, text_only: bool, progress: bool = False):
    """The plain PyTorch model holding this rank's shard: PixtralModel (rank 0: + vision) or the text
    Transformer (followers), with the all-reduce hooks installed."""
    import dataclasses

    from .reference.fp8_linear import install_fp8_linears
    from .reference.model import PixtralModel
    from .reference.transformer import Transformer
    from .sharding import lm_head_mode, sharded_args
    sd = src.load_weights(progress, shard=(rank, world), text_only=text_only)
    args = dataclasses.replace(src.args, text=sharded_args(src.args.text, world))
    vocab_parallel = lm_head_mode() == "vocab"
    with torch.device("meta"):
        m = Transformer(args.text) if text_only else PixtralModel(args)
        if vocab_parallel:          # this rank's rows of the lm_head (the embedding table stays whole)
            m.output = torch.nn.Linear(args.text.dim, args.text.vocab_size // world, bias=False)
    install_fp8_linears(m, sd)
    m.load_state_dict(sd, assign=True, strict=True)
    install_all_reduce(m, vocab_parallel=vocab_parallel)
    return m.eval(), args


def build_follower_model(load_kw: dict, rank: int, world: int, device: torch.device):
    """A follower's paged model over its shard (no tokenizer, no vision)."""
    from .engine import resolve_source
    src = resolve_source(load_kw.get("model"), str(device), load_kw.get("dtype"), load_kw.get("fmt"),
                         load_kw.get("quantization"), load_kw.get("random_weights"))
    if device.type == "cuda":
        return fast_shard(src, rank, world, text_only=True, max_batch=load_kw["max_batch"],
                          max_seq=load_kw["max_seq"], max_images=load_kw["max_images"],
                          use_graphs=not same_gpu_forced())
    from .serving.paged_model import ReferencePagedModel
    m, args = reference_shard(src, rank, world, text_only=True)
    return ReferencePagedModel(m, args, device, src.dtype)


def fast_shard(src, rank: int, world: int, text_only: bool, max_batch: int, max_seq: int, max_images: int,
               use_graphs: bool, progress: bool = False):
    """The GPU paged model over this rank's shard: FastDecoder with the all-reduces (NCCL; gloo in the
    same-GPU test mode), plus the vision encoder on rank 0 (text_only=False). Run on one GPU with a group of
    one and with 2 ranks on one GPU over gloo; not yet across GPUs."""
    import dataclasses

    from .decoder import FastDecoder
    from .fast_backend import _TEXT_PREFIXES
    from .serving.paged_model import FastPagedModel
    from .sharding import lm_head_mode, sharded_args
    from .vision import FastVisionEncoder
    sd = src.load_weights(progress, shard=(rank, world), text_only=text_only)
    vision = None
    if not text_only:
        vision_sd = {k: sd.pop(k) for k in list(sd) if not k.startswith(_TEXT_PREFIXES)}
        vision = FastVisionEncoder.from_state_dict(vision_sd, src.args, src.dtype, src.device)
        del vision_sd
    torch.cuda.empty_cache()
    args = dataclasses.replace(src.args, text=sharded_args(src.args.text, world))
    dec = FastDecoder(args.text, sd, max_batch=max_batch, max_seq=max_seq, device=src.device, dtype=src.dtype,
                      consume=True, static_cache=False, tp_group="world",
                      vocab_parallel=lm_head_mode() == "vocab", tp_allreduce=allreduce_impl())
    sd.clear()
    torch.cuda.empty_cache()
    return FastPagedModel(dec, vision, args, src.device, max_images, use_graphs)
