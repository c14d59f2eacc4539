"""``cratelm bench-kernels``: attention, ISTA and LM-head-loss kernels side by side.

Prints markdown tables of time (ms), TFLOP/s and peak memory. FLOP conventions (model
FLOPs of the minimal algorithm, 2 per multiply-add, backward = 2 x forward for matmuls):

- attention (B, H, T, p): forward 4 B H T^2 p (x 0.5 when causal), forward+backward 3.5 x
  forward (FlashAttention's convention: the backward recomputes S);
- complete ISTA (N, d): forward 4 N d^2 (two matmuls; the authors' three-matmul form is
  counted the same, so its TFLOP/s shows the waste), forward+backward 3 x forward;
- overcomplete ISTA (N, d, m, steps s): forward 2 N d m (2s - 1), forward+backward 3 x;
- LM head + loss (N, d, V): forward 2 N d V, forward+backward 3 x forward.

Bytes moved (the loss table): the tensor traffic of one forward + backward, counted by
a TorchDispatchMode on the meta device (so at full size on any machine, on the CUDA code
path): every aten op (or cratelm custom op) reads its tensor inputs once and writes its
outputs and mutated inputs once; views move nothing. A lower bound of DRAM traffic that
is exact for fusion decisions: it shows how many passes over the logits and dW there are.

Timing: CUDA events on a GPU, time.perf_counter on CPU, after warm-up (which also runs
Triton autotuning and torch.compile). Peak memory: torch.cuda.max_memory_allocated above
what was allocated before the call; on Linux CPUs the growth of the peak resident set
(VmHWM, reset through /proc/self/clear_refs), a rough figure.

Example::

    cratelm bench-kernels --what attention --dtype bf16 --seq-lens 512,1024,2048,4096
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cratelm.utils import sync

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cratelm bench-kernels``; device-dependent defaults are resolved in run()."""
    parser.add_argument("--what", choices=["attention", "ista", "loss", "all"], default="all")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--seq-lens", default=None,
                        help="comma-separated T for attention "
                             "(default 512,1024,2048,4096 on cuda; 256,512,1024 on cpu)")
    parser.add_argument("--head-dim", type=int, default=64, help="p, the head width")
    parser.add_argument("--heads", type=int, default=12, help="H; the ISTA width defaults to heads * head-dim")
    parser.add_argument("--batch", type=int, default=None, help="B for attention (default 8 on cuda, 1 on cpu)")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="bench full attention")
    parser.add_argument("--backends", default="triton,sdpa,flash,reference",
                        help="attention backends; sdpa:flash, sdpa:efficient, sdpa:cudnn, sdpa:math pin one "
                             "SDPA kernel; "
                             "triton-bwd5 is triton with the 5-product backward")
    parser.add_argument("--layout", choices=["bhtp", "bthp"], default="bhtp",
                        help="bthp: heads as the model makes them, a (B, T, H, p) tensor viewed as (B, H, T, p)")
    parser.add_argument("--ista-impls", default="torch,authors,fused,triton,compile")
    parser.add_argument("--ista-tokens", type=int, default=None, help="N = B*T for ISTA (default 16384 cuda, 2048 cpu)")
    parser.add_argument("--overcomplete", type=int, default=4, help="m / d for the overcomplete ISTA rows")
    parser.add_argument("--ista-steps", type=int, default=2)
    parser.add_argument("--loss-impls", default="plain,chunked,liger")
    parser.add_argument("--loss-chunk-rows", default=None,
                        help="comma list of chunk heights: extra 'chunked' rows (a chunk-size sweep)")
    parser.add_argument("--loss-tokens", type=int, default=None,
                        help="N = B*T for the loss (default 16384 cuda, 1024 cpu)")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--width", type=int, default=None, help="d for ISTA and the loss (default heads * head-dim)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 3 cuda, 1 cpu)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls, median reported (default 20 cuda, 5 cpu)")


# --------------------------------------------------------------------------- measuring
def _time_ms(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory of one fn() call above what was in use before it, in MiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:  # Linux: "5" resets the peak resident set size to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    return None if base is None or peak is None else max(0, peak - base) / 1024


def _measure(name: str, fwd: Callable[[], torch.Tensor], inputs: list[torch.Tensor], flops_fwd: float,
             bwd_factor: float, device: str, warmup: int, reps: int) -> list[str]:
    """One table row: fwd ms, fwd TFLOP/s, fwd+bwd ms, fwd+bwd TFLOP/s, fwd+bwd peak MiB."""
    def step():
        for x in inputs:
            x.grad = None
        out = fwd()
        out.backward(torch.ones_like(out) if out.dim() == 0 else grad_out)

    try:
        with torch.no_grad():
            probe = fwd()
        grad_out = torch.randn_like(probe) if probe.dim() else None
        del probe

        def fwd_only():
            with torch.no_grad():
                return fwd()

        t_f = _time_ms(fwd_only, device, warmup, reps)
        t_fb = _time_ms(step, device, warmup, reps)
        peak = _peak_mib(step, device)
    except torch.OutOfMemoryError:
        return [name, "OOM", "", "", "", ""]
    except Exception as e:  # a backend that cannot run here: say why, keep the table
        return [name, f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:60]}", "", "", "", ""]
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    tf = lambda f, ms: f"{f / (ms * 1e-3) / 1e12:.3g}"  # noqa: E731
    return [name, f"{t_f:.3f}", tf(flops_fwd, t_f), f"{t_fb:.3f}", tf(flops_fwd * bwd_factor, t_fb),
            "n/a" if peak is None else f"{peak:.0f}"]


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


HEADER = ["", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd peak MiB"]


def _triton_usable(device: str) -> str | None:
    """None when Triton kernels can be timed here, else the reason they cannot."""
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    if device != "cuda":
        return "needs CUDA (the CPU interpreter is far too slow to time)"
    return None


# --------------------------------------------------------------------------- the three tables
def _attention_error(fn, w: torch.Tensor, causal: bool) -> str:
    """Relative L2 error of output and dW against fp32 reference attention (the same inputs)."""
    from cratelm.kernels import reference

    x = w.detach().requires_grad_()
    out = fn(x)
    dy = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, dy)
    x32 = w.detach().float().requires_grad_()
    ref = reference.attention(x32, causal=causal)
    (g32,) = torch.autograd.grad(ref, x32, dy.float())
    rel = lambda a, b: float((a.detach().float() - b.detach()).norm() / b.detach().norm())  # noqa: E731
    return f"{rel(out, ref):.1e} / {rel(gx, g32):.1e}"


def _sdpa_pinned(kernel: str, causal: bool) -> Callable:
    """sdpa on q = k = v restricted to one of torch's SDPA kernels (flash, efficient, cudnn, math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kernel]

    def fn(w):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(w, w, w, is_causal=causal)
    return fn


def bench_attention(args: argparse.Namespace) -> str:
    """One table per T; with ``--layout bthp`` the heads are the model's view, a (B, T, H, p)
    tensor transposed to (B, H, T, p); ``sdpa:KERNEL`` rows pin one SDPA kernel."""
    from cratelm.kernels import get_backend, resolve_attention

    dev, dt = args.device, args.dtype_t
    B, H, p = args.batch, args.heads, args.head_dim
    out = []
    for T in [int(t) for t in args.seq_lens.split(",")]:
        rows = []
        flops = 4 * B * H * T * T * p * (0.5 if args.causal else 1.0)
        for backend in filter(None, args.backends.split(",")):
            why = _triton_usable(dev) if backend.startswith("triton") else None
            if why is None and not backend.startswith(("triton", "sdpa:")):
                try:
                    get_backend(backend)
                except RuntimeError:
                    why = "not installed"
            if why:
                rows.append([backend, f"skipped: {why}", "", "", "", "", ""])
                continue
            if backend.startswith("sdpa:"):
                attend = _sdpa_pinned(backend[5:], args.causal)
            elif backend == "triton-bwd5":   # the selectable 5-product backward (cratelm.kernels.triton_bwd5)
                from cratelm.kernels import triton_bwd5
                attend = lambda x: triton_bwd5.attention(x, args.causal)  # noqa: E731
            else:
                attend = lambda x, f=resolve_attention(backend): f(x, causal=args.causal)  # noqa: E731
            shape = (B, T, H, p) if args.layout == "bthp" else (B, H, T, p)
            w = torch.randn(shape, device=dev, dtype=dt)
            w = (w.transpose(1, 2) if args.layout == "bthp" else w).requires_grad_()
            row = _measure(backend, lambda w=w, attend=attend: attend(w), [w], flops, 3.5, dev, args.warmup, args.reps)
            try:
                row.append(_attention_error(attend, w, args.causal) if len(row[1]) < 20 else "")
            except Exception as e:  # noqa: BLE001 - a kernel that cannot run here already said why
                row.append(f"n/a: {type(e).__name__}")
            rows.append(row)
        out.append(_table(f"attention, {'causal' if args.causal else 'full'}, B={B} H={H} T={T} p={p}, "
                          f"layout {args.layout}, {args.dtype} on {dev}", HEADER + ["rel. err out / dW vs fp32"],
                          rows))
    return "\n".join(out)


def bench_ista(args: argparse.Namespace) -> str:
    from cratelm.kernels import ista

    dev, dt, N, d = args.device, args.dtype_t, args.ista_tokens, args.width
    eta = lmbda = 0.1
    m, s = args.overcomplete * d, args.ista_steps
    z = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
    W = (torch.randn(d, d, device=dev) / math.sqrt(d)).to(dt).requires_grad_()
    W4 = (torch.randn(m, d, device=dev) / math.sqrt(d)).to(dt).requires_grad_()
    complete, over = [], []
    for impl in args.ista_impls.split(","):
        why = _triton_usable(dev) if impl == "triton" else None
        if why:
            complete.append([impl, f"skipped: {why}", "", "", "", ""])
            over.append([impl, f"skipped: {why}", "", "", "", ""])
            continue
        if impl == "authors":
            fn = lambda: ista.ista_complete_authors(z, W, eta, lmbda)  # noqa: E731
        else:
            fn = lambda impl=impl: ista.ista_complete(z, W, eta, lmbda, impl=impl)  # noqa: E731
        warm = max(args.warmup, 3) if impl == "compile" else args.warmup  # inductor may compile lazily
        complete.append(_measure(impl, fn, [z, W], 4 * N * d * d, 3.0, dev, warm, args.reps))
        if impl != "authors":
            over.append(_measure(impl, lambda impl=impl: ista.ista_overcomplete(z, W4, eta, lmbda, s, impl=impl),
                                 [z, W4], 2 * N * d * m * (2 * s - 1), 3.0, dev, warm, args.reps))
    return (_table(f"complete ISTA (crate-gpt), N={N} d={d}, {args.dtype} on {dev}", HEADER, complete)
            + "\n" + _table(f"overcomplete ISTA code (crate-lm), N={N} d={d} m={m} steps={s}, {args.dtype} on {dev}",
                            HEADER, over))


class TrafficCounter(TorchDispatchMode):
    """Sums the bytes of tensor inputs, outputs and mutated inputs of every non-view op."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view:
            nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
            schema_args = func._schema.arguments
            flat = list(args) + [kwargs.get(a.name) for a in schema_args[len(args):]]
            for a, v in zip(schema_args, flat):
                if isinstance(v, torch.Tensor):
                    written = a.alias_info is not None and a.alias_info.is_write
                    self.bytes += nbytes(v) * (2 if written and a.name != "out" else 1)
            if not any(a.name == "out" for a in schema_args):
                outs = out if isinstance(out, (tuple, list)) else (out,)
                self.bytes += sum(nbytes(t) for t in outs if isinstance(t, torch.Tensor))
        return out


def loss_traffic_bytes(impl: str, N: int, d: int, V: int, dtype: torch.dtype, chunk_rows: int | None = None) -> int:
    """Bytes moved by one forward + backward of lm_head_loss (see the module doc), on meta tensors."""
    from cratelm.kernels.loss import lm_head_loss

    hidden = torch.empty(N, d, device="meta", dtype=dtype, requires_grad=True)
    weight = torch.empty(V, d, device="meta", dtype=dtype, requires_grad=True)
    targets = torch.empty(N, device="meta", dtype=torch.long)
    with TrafficCounter() as counter:
        lm_head_loss(hidden, weight, targets, impl=impl, chunk_rows=chunk_rows).backward()
    return counter.bytes


def bench_loss(args: argparse.Namespace) -> str:
    from cratelm.kernels.loss import default_chunk_rows, lm_head_loss

    dev, dt, N, d, V = args.device, args.dtype_t, args.loss_tokens, args.width, args.vocab
    hidden = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
    weight = (torch.randn(V, d, device=dev) * 0.02).to(dt).requires_grad_()
    targets = torch.randint(0, V, (N,), device=dev)
    cases = [(impl, None) for impl in args.loss_impls.split(",")]
    cases += [("chunked", int(r)) for r in filter(None, (args.loss_chunk_rows or "").split(","))]
    rows = []
    for impl, chunk in cases:
        name = impl if chunk is None else f"chunked, {chunk} rows"
        if impl == "liger" and (dev != "cuda" or importlib.util.find_spec("liger_kernel") is None):
            rows.append([name, "skipped: needs CUDA and liger-kernel", "", "", "", "", ""])
            continue
        moved = "n/a" if impl == "liger" else f"{loss_traffic_bytes(impl, N, d, V, dt, chunk) / 1e9:.2f}"
        row = _measure(name, lambda impl=impl, chunk=chunk: lm_head_loss(hidden, weight, targets, impl=impl,
                                                                         chunk_rows=chunk),
                       [hidden, weight], 2 * N * d * V, 3.0, dev, args.warmup, args.reps)
        rows.append(row + [moved])
    title = (f"LM head + cross-entropy, N={N} d={d} V={V}, {args.dtype} on {dev} "
             f"(chunked default: {default_chunk_rows(N, V, weight.element_size())} rows)")
    return _table(title, HEADER + ["fwd+bwd GB moved"], rows)


def run(args: argparse.Namespace) -> int:
    """Resolve device-dependent defaults, run the chosen benchmarks, print markdown tables."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench-kernels: --device cuda but torch sees no CUDA GPU")
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.dtype_t = DTYPES[args.dtype]
    args.seq_lens = args.seq_lens or ("512,1024,2048,4096" if gpu else "256,512,1024")
    args.batch = args.batch or (8 if gpu else 1)
    args.ista_tokens = args.ista_tokens or (16384 if gpu else 2048)
    args.loss_tokens = args.loss_tokens or (16384 if gpu else 1024)
    args.width = args.width or args.heads * args.head_dim
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.reps = args.reps or (20 if gpu else 5)
    where = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# kernel benchmarks on {where}, torch {torch.__version__}; FLOP conventions in cratelm.bench.kernels")
    for what, fn in (("attention", bench_attention), ("ista", bench_ista), ("loss", bench_loss)):
        if args.what in (what, "all"):
            print(fn(args), flush=True)
    return 0
