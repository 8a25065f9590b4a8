"""LoRA linear on a GPU: the fused Triton kernels against torch, PEFT, and the bare frozen-layer GEMMs.

    python3 bench/gpu_lora.py --out bench/results          (bench/gpu.sh runs it with --out "$OUT")

Providers, all bf16, no dropout, x requiring grad (a middle layer: dX is needed):
    ours       fusedtune.kernels.lora_linear (Triton)
    ours_cublas  fusedtune.kernels.lora_linear_torch: cuBLAS for the two big GEMMs, the LoRA terms added in
               place (addmm_) into Y and dX, no [M, N] temporary (the CPU path, timed here on the GPU)
    reference  fusedtune.kernels.reference.lora_linear (pure torch, PEFT's arithmetic without the module)
    peft       a real ``peft.tuners.lora.Linear`` around a bf16 ``nn.Linear`` (skipped if PEFT is absent)
    gemm       the bare bf16 GEMMs a frozen layer needs anyway: Y = X Wᵀ (forward), dX = dY W (backward)
Modes: forward, backward (from a retained graph), full (forward + backward).
Shapes: Llama-3-8B projections (K→N) 4096→4096, 4096→14336, 14336→4096, at M = 512…16384 tokens, r 16, 64.

Reported per row: ``triton.testing.do_bench`` median and 20/80 quantiles in ms, TFLOPS on the LoRA
layer's useful FLOPs (2·M·N·K per base GEMM plus the thin r-GEMMs; the same count for every LoRA
provider, so TFLOPS compare directly), and peak memory of one call above the inputs. The target row
(M=8192, K=N=4096, r=16, full) adds the speed-up over PEFT and the LoRA overhead over the bare GEMMs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K in, N out) of Llama-3-8B's projections
TOKENS = [512, 2048, 8192, 16384]
RANKS = [16, 64]
MODES = ["forward", "backward", "full"]
TARGET = {"M": 8192, "K": 4096, "N": 4096, "r": 16, "mode": "full"}
COLUMNS = ["provider", "mode", "M", "K", "N", "r", "ms", "ms_p20", "ms_p80", "tflops", "peak_mib"]


def lora_flops(m: int, k: int, n: int, r: int, mode: str) -> int:
    """Useful FLOPs of a LoRA layer: forward X Wᵀ, X Aᵀ, S Bᵀ; backward dY W, dS A, dY B, dYᵀ S, dSᵀ X."""
    fwd = 2 * m * n * k + 2 * m * k * r + 2 * m * n * r
    bwd = 2 * m * n * k + 2 * m * k * r + 2 * (2 * m * n * r) + 2 * m * k * r
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def gemm_flops(m: int, k: int, n: int, mode: str) -> int:
    return {"forward": 2 * m * n * k, "backward": 2 * m * n * k, "full": 4 * m * n * k}[mode]


def make_provider(name: str, k: int, n: int, r: int, device: str):
    """(fn: x -> y, trainable tensors) for one provider, bf16 on ``device``."""
    from fusedtune.kernels import lora_linear, lora_linear_torch, reference

    dtype, scale = torch.bfloat16, 2.0
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    a = (torch.randn(r, k, device=device, dtype=dtype) / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device=device, dtype=dtype) * 0.02).requires_grad_()
    if name == "ours":
        return (lambda x: lora_linear(x, w, a, b, scale)), [a, b]
    if name == "ours_cublas":
        return (lambda x: lora_linear_torch(x, w, a, b, scale)), [a, b]
    if name == "reference":
        return (lambda x: reference.lora_linear(x, w, a, b, scale)), [a, b]
    if name == "gemm":
        return (lambda x: torch.nn.functional.linear(x, w)), []
    if name == "peft":
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear

        base = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        base.weight.requires_grad_(False)
        cfg = LoraConfig(r=r, lora_alpha=int(scale * r), lora_dropout=0.0)
        layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=int(scale * r)).to(device, dtype)
        return layer, [p for p in layer.parameters() if p.requires_grad]
    raise ValueError(name)


def measure(fn, params, x, grad_y, mode: str):
    """do_bench (median, p20, p80) in ms and the peak memory of one call above what is already held."""
    from report import time_and_peak

    grads = [x, *params]
    if mode == "forward":  # with autograd on, as in training: each provider saves what its backward needs

        def call():
            fn(x)
    elif mode == "backward":
        y = fn(x)

        def call():
            y.backward(grad_y, retain_graph=True)
    else:

        def call():
            fn(x).backward(grad_y)

    return time_and_peak(call, grads, warmup=10, rep=40)


def cases(shapes, tokens) -> list[tuple[int, int, int]]:
    """(K, N, M) in run order: the target shape first, so that a cut-short run still has it."""
    all_cases = [(k, n, m) for k, n in shapes for m in tokens]
    target = (TARGET["K"], TARGET["N"], TARGET["M"])
    return sorted(all_cases, key=lambda c: c != target)


def run(
    providers: list[str],
    tokens: list[int],
    ranks: list[int],
    shapes,
    modes,
    device="cuda",
    deadline: float | None = None,
) -> list[dict]:
    """Measure every (shape, provider, rank, mode); stop starting new ones once ``deadline`` has passed."""
    rows = []
    for k, n, m in cases(shapes, tokens):
        if deadline is not None and time.time() > deadline:
            print(f"time budget spent: stopping before K={k} N={n} M={m}", flush=True)
            break
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad_y = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        for provider in providers:
            for r in [None] if provider == "gemm" else ranks:
                try:  # one provider failing (a PEFT API change, a kernel error) must not end the run
                    fn, params = make_provider(provider, k, n, r or 16, device)
                except Exception as e:
                    print(f"{provider} skipped at K={k} N={n} r={r}: {type(e).__name__}: {e}", flush=True)
                    continue
                for mode in modes:
                    try:
                        ms, p20, p80, peak = measure(fn, params, x, grad_y, mode)
                    except Exception as e:
                        print(f"{provider} {mode} failed at M={m} K={k} N={n} r={r}: {type(e).__name__}: {e}")
                        continue
                    flops = gemm_flops(m, k, n, mode) if provider == "gemm" else lora_flops(m, k, n, r, mode)
                    row = {"provider": provider, "mode": mode, "M": m, "K": k, "N": n, "r": r}
                    row.update(ms=ms, ms_p20=p20, ms_p80=p80, tflops=flops / ms / 1e9, peak_mib=peak)
                    rows.append(row)
                    print(
                        f"{provider:>9} {mode:>8} M={m:<5} K={k:<5} N={n:<5} r={r!s:<4} "
                        f"{ms:8.3f} ms [{p20:.3f}, {p80:.3f}] {row['tflops']:6.1f} TFLOPS {peak:8.1f} MiB",
                        flush=True,
                    )
                del fn, params
        del x, grad_y
        torch.cuda.empty_cache()
    return rows


def target_summary(rows: list[dict]) -> list[dict]:
    """The issue's target row: speed-up over PEFT (goal >= 1.5x), overhead over bare GEMMs (goal <= 15%)."""

    def ms_of(provider, mode, r):
        for row in rows:
            same = all(row[key] == TARGET[key] for key in ("M", "K", "N"))
            if same and row["provider"] == provider and row["mode"] == mode and row["r"] == r:
                return row["ms"]
        return None

    out = []
    for mode in MODES:
        ours, peft, gemm = (
            ms_of("ours", mode, TARGET["r"]),
            ms_of("peft", mode, TARGET["r"]),
            ms_of("gemm", mode, None),
        )
        out.append(
            {
                "mode": mode,
                "M": TARGET["M"],
                "K": TARGET["K"],
                "N": TARGET["N"],
                "r": TARGET["r"],
                "ours_ms": ours,
                "peft_ms": peft,
                "gemm_ms": gemm,
                "speedup_vs_peft": peft / ours if ours and peft else None,
                "overhead_vs_gemm_pct": 100.0 * (ours / gemm - 1.0) if ours and gemm else None,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    from report import gpu_bench_parser, require_cuda, write_results

    parser = gpu_bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="the target shape only")
    parser.add_argument("--tokens", type=int, nargs="+", help="with --quick: these M at K=N=4096, r=16")
    args = parser.parse_args(argv)
    if not require_cuda(
        "gpu_lora.py needs a CUDA device (triton.testing.do_bench times GPU kernels); none found."
    ):
        return 2

    providers = ["ours", "ours_cublas", "reference", "gemm"]
    try:
        import peft  # noqa: F401

        providers.insert(2, "peft")
    except Exception as e:  # absent, or broken against this torch/transformers
        print(f"peft provider skipped: {type(e).__name__}: {e}", file=sys.stderr)
    if args.quick:
        shapes, tokens, ranks = [(TARGET["K"], TARGET["N"])], args.tokens or [TARGET["M"]], [TARGET["r"]]
    else:
        shapes, tokens, ranks = SHAPES, TOKENS, RANKS
    start = time.time()
    torch.manual_seed(0)
    deadline = start + args.budget_s if args.budget_s else None
    rows = run(providers, tokens, ranks, shapes, MODES, deadline=deadline)
    summary = target_summary(rows)
    path = write_results("lora_linear", rows, COLUMNS, args.out)
    target_cols = [
        "mode",
        "M",
        "K",
        "N",
        "r",
        "ours_ms",
        "peft_ms",
        "gemm_ms",
        "speedup_vs_peft",
        "overhead_vs_gemm_pct",
    ]
    write_results("lora_linear_target", summary, target_cols, args.out)
    for row in summary:
        print(
            f"target {row['mode']:>8}: ours {row['ours_ms']} ms, peft {row['peft_ms']} ms, gemm {row['gemm_ms']} ms; "
            f"speed-up vs PEFT {row['speedup_vs_peft']} (goal >= 1.5), "
            f"overhead vs bare GEMMs {row['overhead_vs_gemm_pct']} % (goal <= 15)"
        )
    print(f"wrote {path} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
