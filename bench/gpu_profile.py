"""Where a fusedtune training step spends its time on a GPU: torch.profiler over the end-to-end job.

    python3 -P bench/gpu_profile.py --out bench/results        (bench/gpu.sh stage "profile")

The job is bench/gpu_e2e.py's (Llama-3-8B shapes with ``--layers`` blocks, random bf16 weights, micro-batch
``--batch`` x ``--seq``, LoRA r=16 on every block Linear, 8-bit AdamW), run by the trainer's own pieces
(``e2e.fusedtune_setup`` + ``loop.optimizer_step``) once per ``--kernels`` setting: ``--warmup`` steps
(compiles, autotuning), then ``--steps`` profiled steps.

First, one LoRA layer (K = N = 4096, r = 16, bf16, forward + backward at M = 512 and 8192) on the fused
and the cuBLAS path: wall and kernel time and where they go (``profile_layer-<card>.{json,md}``).

Written to ``profile_steps-<card>.{json,md}`` per setting: the wall time of the profiled steps, the sum of
the CUDA kernel time inside them, the GPU-idle share (wall minus kernel time) and the time in Python's
garbage collector; and to
``profile-<card>.{json,md}``: the top kernels by total CUDA time (calls, total, mean) and the top host-side
ops by self CPU time, Triton launches labelled ``triton::<class>::<kernel>``. A step whose wall time is far
above its kernel time is bound by the host (launches, syncs, Python) rather than by its kernels; a kernel
at the top that bench/gpu_lora.py or gpu_qmatmul.py measured as fast points at the shapes or strides the
training step gives it.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

TOP_KERNELS = 25
TOP_CPU = 20
KERNEL_COLUMNS = ["kernels", "method", "kind", "name", "calls", "total_ms", "mean_us", "share"]


def _kernel_rows(prof, steps: int) -> tuple[list[dict], float]:
    """Kernel events grouped by name (per step), and the kernel time per step in ms."""
    by_name: dict[str, list[float]] = {}
    for evt in prof.events():
        # record_function ranges (our triton:: labels, Optimizer.step#...) also appear on the device
        # timeline as user annotations: counting them would count their kernels twice
        if evt.device_type != torch.autograd.DeviceType.CUDA or getattr(evt, "is_user_annotation", False):
            continue
        by_name.setdefault(evt.name, []).append(evt.time_range.elapsed_us())
    total_us = sum(sum(v) for v in by_name.values())
    rows = [
        {
            "name": name[:110],
            "calls": len(us) / steps,
            "total_ms": sum(us) / steps / 1e3,
            "mean_us": sum(us) / len(us),
            "share": sum(us) / total_us if total_us else 0.0,
        }
        for name, us in by_name.items()
    ]
    rows.sort(key=lambda r: -r["total_ms"])
    return rows, total_us / steps / 1e3


def _cpu_rows(prof, steps: int) -> list[dict]:
    rows = [
        {
            "name": evt.key[:110],
            "calls": evt.count / steps,
            "total_ms": evt.self_cpu_time_total / steps / 1e3,
            "mean_us": evt.self_cpu_time_total / max(evt.count, 1),
        }
        for evt in prof.key_averages()
    ]
    rows.sort(key=lambda r: -r["total_ms"])
    return rows


class _GcTimer:
    """Time spent in Python's garbage collector while active (``gc.callbacks``), and collections by generation."""

    def __init__(self) -> None:
        self.seconds, self.collections, self._t0 = 0.0, [0, 0, 0], 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.collections[info["generation"]] += 1

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)


def _label_triton_launches() -> None:
    """Wrap every Triton launch in ``record_function("triton::<kernel>")`` so that its host time shows."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    for cls in (JITFunction, Autotuner):
        run = cls.run
        if getattr(run, "_labelled", False):
            continue

        def labelled(self, *args, _run=run, _kind=cls.__name__, **kwargs):
            name = getattr(getattr(self, "fn", None), "__name__", None) or getattr(self, "__name__", "?")
            with torch.profiler.record_function(f"triton::{_kind}::{name}"):
                return _run(self, *args, **kwargs)

        labelled._labelled = True
        cls.run = labelled


def profile_one(job: dict, batches: list[dict], warmup: int, steps: int) -> dict:
    """Warm up, then profile ``steps`` optimizer steps of the fusedtune job."""
    import e2e
    from torch.profiler import ProfilerActivity, profile

    from fusedtune.trainer.loop import optimizer_step

    _label_triton_launches()
    _, model, params, optimizer, backend, device = e2e.fusedtune_setup(job)
    micro = [{k: v.to(device) for k, v in b.items()} for b in batches]
    warm_s = []
    for i in range(warmup):
        e2e._sync(device)
        t0 = time.perf_counter()
        optimizer_step(model, params, [micro[i % len(micro)]], optimizer, 1.0, backend)
        e2e._sync(device)
        warm_s.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    gc_time = _GcTimer()
    with gc_time, profile(activities=activities) as prof:
        e2e._sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            optimizer_step(model, params, [micro[(warmup + i) % len(micro)]], optimizer, 1.0, backend)
        e2e._sync(device)
        wall_ms = (time.perf_counter() - t0) / steps * 1e3
    kernels, kernel_ms = _kernel_rows(prof, steps)
    result = {
        "kernels": job["kernels"],
        "method": job["method"],
        "warmup_step_s": warm_s,
        "profiled_step_ms": wall_ms,  # includes the profiler's own overhead
        "kernel_ms_per_step": kernel_ms,
        "gpu_idle_share": max(0.0, 1.0 - kernel_ms / wall_ms) if kernel_ms else None,
        "gc_ms_per_step": gc_time.seconds / steps * 1e3,  # Python's cyclic collector, inside the steps
        "gc_collections": gc_time.collections,
        "top_kernels": kernels[:TOP_KERNELS],
        "top_cpu_ops": _cpu_rows(prof, steps)[:TOP_CPU],
    }
    del model, params, optimizer, prof
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


LAYER_TOKENS = (512, 8192)


def profile_layer(
    m: int, k: int = 4096, n: int = 4096, r: int = 16, iters: int = 20, device: str = "cuda"
) -> list[dict]:
    """One LoRA layer, forward + backward, bf16: the fused Triton path and the cuBLAS path side by side.

    bench/gpu_lora.py measured the fused path at 1.18 ms against 0.67 ms at M=512 with GPU work of tens
    of microseconds; this says which kernels (or which host ops) the time is in.
    """
    import e2e
    from torch.profiler import ProfilerActivity, profile

    from fusedtune.kernels import lora_linear, lora_linear_torch

    _label_triton_launches()
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter: no bf16 math
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).to(dtype)
    a = (torch.randn(r, k, device=dev, generator=g) / k**0.5).requires_grad_()
    b = torch.randn(n, r, device=dev, generator=g).requires_grad_()
    dy = torch.randn(m, n, device=dev, generator=g).to(dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    rows = []
    for path, fn in (("fused", lora_linear), ("cublas", lora_linear_torch)):
        for _ in range(5):  # compile, autotune
            fn(x, w, a, b, 2.0).backward(dy)
        e2e._sync(dev)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(x, w, a, b, 2.0).backward(dy)
            e2e._sync(dev)
            wall_ms = (time.perf_counter() - t0) / iters * 1e3
        kernels, kernel_ms = _kernel_rows(prof, iters)
        head = {"kernels": path, "method": f"layer M={m}", "kind": "total", "name": "wall / kernels"}
        rows.append({**head, "calls": 1, "total_ms": wall_ms, "mean_us": kernel_ms * 1e3, "share": None})
        for kind, found in (("kernel", kernels[:12]), ("cpu", _cpu_rows(prof, iters)[:12])):
            rows += [{**head, "kind": kind, **r} for r in found]
        print(
            f"layer M={m} {path}: {wall_ms:.3f} ms wall, {kernel_ms:.3f} ms in kernels per fwd+bwd",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    from report import gpu_bench_parser, require_cuda, write_results

    parser = gpu_bench_parser(
        __doc__, budget_default=90.0, budget_help="start no setting after this many seconds"
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--method", default="lora", choices=["lora", "qlora"])
    parser.add_argument(
        "--kernels",
        nargs="+",
        # with --method lora (no dropout): auto against torch isolates the Triton loss and SwiGLU kernels
        # (both run the LoRA layers on cuBLAS), auto against triton the fused LoRA kernels (with qlora,
        # auto keeps the QLoRA layers on Triton); triton last, as it autotunes
        default=["auto", "torch", "triton"],
        choices=["auto", "triton", "torch"],
    )
    args = parser.parse_args(argv)
    if not require_cuda("error: bench/gpu_profile.py needs a CUDA device"):
        return 2

    import tempfile

    import e2e
    import gpu_e2e
    from transformers import AutoConfig

    start = time.monotonic()
    layer_rows = []
    for m in LAYER_TOKENS:  # a few seconds: first, so that a cut-short end-to-end part keeps it
        layer_rows += profile_layer(m)
        write_results("profile_layer", layer_rows, KERNEL_COLUMNS, args.out)
    model_dir, _ = gpu_e2e.build_model(args.layers, Path(tempfile.mkdtemp(prefix="llama3-8b-shape-")))
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    batches = e2e.make_batches(vocab, args.warmup + args.steps, args.batch, args.seq)
    results, rows = [], []
    for kernels in args.kernels:
        if time.monotonic() - start > args.budget_s:
            print(f"kernels {kernels}: skipped (out of time)", flush=True)
            continue
        job = {
            "model_path": str(model_dir),
            "method": args.method,
            "kernels": kernels,
            "seq": args.seq,
            "batch": args.batch,
            "grad_accum": 1,
            "device": "cuda",
            "dtype": "bf16",
        }
        res = profile_one(job, batches, args.warmup, args.steps)
        results.append(res)
        print(
            f"kernels {kernels} {args.method}: {res['profiled_step_ms']:.1f} ms/step profiled, "
            f"kernels {res['kernel_ms_per_step']:.1f} ms, GPU idle {res['gpu_idle_share'] or 0:.0%}, "
            f"gc {res['gc_ms_per_step']:.1f} ms; "
            f"warm-up steps {[round(s, 3) for s in res['warmup_step_s']]} s",
            flush=True,
        )
        for kind, key in (("kernel", "top_kernels"), ("cpu", "top_cpu_ops")):
            for r in res[key]:
                rows.append({"kernels": kernels, "method": args.method, "kind": kind, **r})
        for r in res["top_kernels"][:8]:
            print(f"  {r['total_ms']:8.2f} ms {r['calls']:6.0f} calls  {r['name']}", flush=True)
        # after every setting: a later one cut short by gpu.sh's timeout keeps this one's results
        summary = [{k: v for k, v in r.items() if not k.startswith("top_")} for r in results]
        write_results("profile_steps", summary, list(summary[0]), args.out)
        write_results("profile", rows, KERNEL_COLUMNS, args.out)
    if not results:
        print("error: nothing profiled", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
