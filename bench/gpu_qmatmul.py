"""Matmul over a frozen NF4 weight on a GPU: the fused decode-in-the-K-loop kernels against the alternatives.

    python3 bench/gpu_qmatmul.py --out bench/results        (bench/gpu.sh runs it with --out "$OUT")

Providers, all bf16 activations, NF4 weight with double quant, blocksize 64:
    ours      fusedtune.kernels.qmatmul fused kernels (path="fused": never the dequantize fallback)
    bnb       bitsandbytes.matmul_4bit (skipped when bitsandbytes is absent on the GPU image)
    dequant   fusedtune's Triton dequantize to a bf16 temporary, then cuBLAS (F.linear / matmul)
    bf16      the bf16 GEMM on the unquantized weight: the ceiling
Modes:
    forward   Y = X deq(W)ᵀ                                   (base GEMM only)
    dx        dX = dY deq(W)                                   (base GEMM only)
    full      a QLoRA layer, r = 16, forward + backward (dX, dA, dB; x requires grad)
Shapes: Llama-3-8B projections (K→N) 4096→4096, 4096→14336, 14336→4096 at M = 128…16384 tokens.

Per row: ``triton.testing.do_bench`` median and 20/80 quantiles in ms, TFLOPS (2·M·N·K per base GEMM),
and the bytes the pass moves with the achieved GB/s against the card's bandwidth measured here (a
device-to-device copy). Weight bytes per parameter: 0.5 + scales for ``ours`` and ``bnb``'s fused
inference path, about 0.5 + 2 (write) + 2 (read) for dequantize-then-GEMM, 2 for bf16. The summary
rows check the issue's targets: ours >= 2x dequant+cuBLAS at M <= 2048 (forward, dx), and ours >=
0.9x the bf16 GEMM at M = 16384; ``fused_wins`` gives the crossover M behind ``DEQUANT_MIN_TOKENS`` in
kernels/qmatmul.py (512 on the H200, where the fused kernel lost at every M measured; M = 128 and 256
test the region below it).
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K in, N out) of Llama-3-8B's projections
TOKENS = [128, 256, 512, 2048, 8192, 16384]
MODES = ["forward", "dx", "full"]
RANK = 16
COLUMNS = [
    "provider",
    "mode",
    "M",
    "K",
    "N",
    "ms",
    "ms_p20",
    "ms_p80",
    "tflops",
    "gbytes",
    "gb_per_s",
    "bw_fraction",
]


def measured_bandwidth_gbs(device: str = "cuda") -> float:
    """Device-memory bandwidth in GB/s from a 1 GiB device-to-device copy (read + write)."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    return 2 * 2**30 / ms / 1e6


def weight_bytes(provider: str, n: int, k: int) -> float:
    """Bytes of the weight one pass reads (and writes, for the dequantize temporary)."""
    packed = n * k / 2 + n * k / 64 + 4 * n * k / (64 * 256)  # codes + uint8 absmax + nested scales
    return {"ours": packed, "bnb": packed + 4 * n * k, "dequant": packed + 4 * n * k, "bf16": 2 * n * k}[
        provider
    ]


def pass_bytes(provider: str, mode: str, m: int, k: int, n: int) -> float:
    """Bytes one pass moves: activations in and out (bf16) plus the weight, per base GEMM."""
    per_gemm = weight_bytes(provider, n, k) + 2 * (m * k + m * n)
    return per_gemm * (2 if mode == "full" else 1)


def gemm_flops(m: int, k: int, n: int, mode: str) -> int:
    return 2 * m * n * k * (2 if mode == "full" else 1)


def make_call(provider: str, mode: str, m: int, k: int, n: int, device: str = "cuda"):
    """A zero-argument callable running one pass of ``provider`` in ``mode``, and tensors to zero grads of."""
    import torch.nn.functional as F

    from fusedtune.kernels import qmatmul, quant, reference

    dtype = torch.bfloat16
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    pw = quant.quantize_4bit(w, 64, "nf4", double_quant=True, backend="triton")
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=(mode == "full"))
    dy = torch.randn(m, n, device=device, dtype=dtype)
    a = (torch.randn(RANK, k, device=device, dtype=dtype) / k**0.5).requires_grad_()
    b = (torch.randn(n, RANK, device=device, dtype=dtype) * 0.02).requires_grad_()
    scale = 2.0
    grads = [x, a, b]
    if provider == "bnb":
        import bitsandbytes as bnb

        w_bnb, qs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    if provider == "bf16":
        w_dense = w
    else:
        del w

    if mode == "forward":
        if provider == "ours":
            return (lambda: qmatmul.qmatmul_forward(x, pw)), grads
        if provider == "dequant":
            return (lambda: F.linear(x, quant.dequantize(pw, dtype))), grads
        if provider == "bf16":
            return (lambda: F.linear(x, w_dense)), grads
        return (lambda: bnb.matmul_4bit(x, w_bnb.t(), quant_state=qs)), grads
    if mode == "dx":
        if provider == "ours":
            return (lambda: qmatmul.qmatmul_backward_dx(dy, pw)), grads
        if provider == "dequant":
            return (lambda: dy @ quant.dequantize(pw, dtype)), grads
        if provider == "bf16":
            return (lambda: dy @ w_dense), grads
        xg = x.detach().requires_grad_()  # bnb's own backward for dX, from a retained graph
        y = bnb.matmul_4bit(xg, w_bnb.t(), quant_state=qs)
        return (lambda: torch.autograd.grad(y, xg, dy, retain_graph=True)), []

    # full QLoRA layer, forward + backward
    if provider == "ours":
        fn = lambda: qmatmul.qlora_linear(x, pw, a, b, scale, path="fused")
    elif provider == "dequant":
        fn = lambda: qmatmul.qlora_linear(x, pw, a, b, scale, path="dequant")
    elif provider == "bf16":
        fn = lambda: reference.lora_linear(x, w_dense, a, b, scale)
    else:  # PEFT + bitsandbytes arithmetic: bnb base matmul plus the torch LoRA branch
        fn = lambda: bnb.matmul_4bit(x, w_bnb.t(), quant_state=qs) + scale * ((x @ a.t()) @ b.t())
    return (lambda: fn().backward(dy)), grads


# The tile sweep run before the main table: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the
# forward kernel (dX swaps BLOCK_N/BLOCK_K) with the select-tree decode, at the token counts where
# use_dequant_gemm keeps the fused kernel (M < 512, and 512 for the crossover). The first H200 run swept
# M = 512, 2048, 8192 and the table decode too (bench/results/qmatmul_nf4_sweep-h200.md): its results set
# _tiles and DECODE_SELECT. Then the 4-bit dequantize's launch shape (BLOCKS_PER_PROG, num_warps).
SWEEP_TILES = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (128, 32, 64, 4, 4),
    (64, 32, 64, 4, 4),
]
SWEEP_CASES = [(4096, 4096, 128), (4096, 4096, 256), (4096, 4096, 512)]  # (K, N, M)
DEQUANT_LAUNCHES = [(32, 4), (8, 4), (64, 4), (128, 4), (32, 8), (128, 8)]  # (BLOCKS_PER_PROG, num_warps)
SWEEP_COLUMNS = ["mode", "M", "K", "N", "decode", "tiles", "ms", "tflops", "gb_per_s"]


def _bnb_dequantize():
    """``bitsandbytes.functional.dequantize_4bit``, or None without bitsandbytes."""
    try:
        from bitsandbytes.functional import dequantize_4bit
    except ImportError:
        return None
    return dequantize_4bit


def _time(call) -> float:
    from triton.testing import do_bench

    call()
    torch.cuda.synchronize()
    return do_bench(call, warmup=5, rep=20)


def sweep(deadline: float | None = None) -> list[dict]:
    """Time the standalone dequantize (bitsandbytes', then ours over DEQUANT_LAUNCHES), then the fused
    kernels over SWEEP_TILES. The dequantize first: it is on the default path from DEQUANT_MIN_TOKENS."""
    from fusedtune.kernels import qmatmul, quant

    rows = []

    def out_of_time() -> bool:
        if deadline is not None and time.time() > deadline:
            print("sweep: time budget spent", flush=True)
            return True
        return False

    try:
        for k, n in ((4096, 4096), (4096, 14336)):
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            pw = quant.quantize_4bit(w, 64, "nf4", double_quant=True, backend="triton")
            moved = n * k * (0.5 + 2)  # packed bytes in, bf16 out (the scales are ~1.6% more)
            # bitsandbytes' own CUDA dequantize first (bit-exact with ours): the one to beat
            launches = ([("bnb", None)] if _bnb_dequantize() else []) + list(DEQUANT_LAUNCHES)
            for per_prog, warps in launches:
                if out_of_time():
                    return rows
                if per_prog == "bnb":
                    data, state = pw.to_bnb()
                    state.dtype = torch.bfloat16
                    ms = _time(partial(_bnb_dequantize(), data, state))
                    label = "bitsandbytes dequantize_4bit"
                else:
                    quant.DEQUANT_LAUNCH_OVERRIDE = {"BLOCKS_PER_PROG": per_prog, "num_warps": warps}
                    ms = _time(partial(quant.dequantize, pw, torch.bfloat16))
                    label = f"blocks/prog {per_prog}, {warps} warps"
                row = {"mode": "dequantize", "M": 0, "K": k, "N": n, "decode": "select"}
                row.update(
                    tiles=label,
                    ms=ms,
                    tflops=0.0,
                    gb_per_s=moved / ms / 1e6,
                )
                rows.append(row)
                print(
                    f"sweep dequantize {row['tiles']:24} {k}x{n} {ms:8.4f} ms {row['gb_per_s']:7.0f} GB/s",
                    flush=True,
                )
            del w, pw
            torch.cuda.empty_cache()
        quant.DEQUANT_LAUNCH_OVERRIDE = None
        for k, n, m in SWEEP_CASES:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            pw = quant.quantize_4bit(w, 64, "nf4", double_quant=True, backend="triton")
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            for t in SWEEP_TILES:
                for mode in ("forward", "dx"):
                    if out_of_time():
                        return rows
                    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
                    qmatmul.TILES_OVERRIDE = dict(zip(names, t, strict=True))
                    call = {
                        "forward": partial(qmatmul.qmatmul_forward, x, pw),
                        "dx": partial(qmatmul.qmatmul_backward_dx, dy, pw),
                    }[mode]
                    try:
                        ms = _time(call)
                    except Exception as e:  # a tile that does not fit: note it, go on
                        print(f"sweep {mode} {t} M={m}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    row = {
                        "mode": mode,
                        "M": m,
                        "K": k,
                        "N": n,
                        "decode": "select",
                        "tiles": str(t),
                        "ms": ms,
                    }
                    row["tflops"] = 2 * m * n * k / ms / 1e9
                    rows.append(row)
                    print(
                        f"sweep {mode:>10} {t!s:24} M={m:<5} {ms:8.4f} ms {row['tflops']:6.1f} TFLOPS",
                        flush=True,
                    )
            del w, pw, x, dy
            torch.cuda.empty_cache()
        qmatmul.TILES_OVERRIDE = None
    finally:
        qmatmul.TILES_OVERRIDE = None
        quant.DEQUANT_LAUNCH_OVERRIDE = None
    return rows


def cases(shapes, tokens) -> list[tuple[int, int, int]]:
    """(K, N, M) in run order: K = N = 4096 at M = 2048 and 16384 first (the targets' two ends)."""
    first = [(4096, 4096, 2048), (4096, 4096, 16384)]
    all_cases = [(k, n, m) for k, n in shapes for m in tokens]
    return [c for c in first if c in all_cases] + [c for c in all_cases if c not in first]


def run(
    providers: list[str], shapes, tokens, modes, bandwidth: float, deadline: float | None = None
) -> list[dict]:
    """Measure every (shape, mode, provider); stop starting new shapes once ``deadline`` has passed."""
    from triton.testing import do_bench

    rows = []
    for k, n, m in cases(shapes, tokens):
        if deadline is not None and time.time() > deadline:
            print(f"time budget spent: stopping before K={k} N={n} M={m}", flush=True)
            break
        for mode in modes:
            for provider in providers:
                try:  # one provider failing (bnb's native library, a kernel error) must not end the run
                    call, grads = make_call(provider, mode, m, k, n)
                    call()  # compile outside the timing
                    torch.cuda.synchronize()
                    ms, p20, p80 = do_bench(
                        call, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads, warmup=5, rep=25
                    )
                except Exception as e:
                    print(
                        f"{provider} {mode} failed at M={m} K={k} N={n}: {type(e).__name__}: {e}", flush=True
                    )
                    torch.cuda.empty_cache()
                    continue
                gbytes = pass_bytes(provider, mode, m, k, n) / 1e9
                row = {"provider": provider, "mode": mode, "M": m, "K": k, "N": n}
                row.update(ms=ms, ms_p20=p20, ms_p80=p80, tflops=gemm_flops(m, k, n, mode) / ms / 1e9)
                row.update(
                    gbytes=gbytes, gb_per_s=gbytes / ms * 1e3, bw_fraction=gbytes / ms * 1e3 / bandwidth
                )
                rows.append(row)
                print(
                    f"{provider:>8} {mode:>7} M={m:<5} K={k:<5} N={n:<5} {ms:8.3f} ms [{p20:.3f}, {p80:.3f}] "
                    f"{row['tflops']:6.1f} TFLOPS {row['gb_per_s']:7.0f} GB/s",
                    flush=True,
                )
                del call, grads
                torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Targets: ours/dequant speed-up at M <= 2048 (goal >= 2), ours/bf16 at M = 16384 (goal >= 0.9)."""

    def ms_of(provider, mode, m, k, n):
        for r in rows:
            if (r["provider"], r["mode"], r["M"], r["K"], r["N"]) == (provider, mode, m, k, n):
                return r["ms"]
        return None

    out = []
    keys = sorted({(r["mode"], r["M"], r["K"], r["N"]) for r in rows})
    for mode, m, k, n in keys:
        ours, deq, dense = (ms_of(p, mode, m, k, n) for p in ("ours", "dequant", "bf16"))
        out.append(
            {
                "mode": mode,
                "M": m,
                "K": k,
                "N": n,
                "speedup_vs_dequant": deq / ours if ours and deq else None,
                "goal_vs_dequant": 2.0 if m <= 2048 and mode != "full" else None,
                "fraction_of_bf16": dense / ours if ours and dense else None,
                "goal_vs_bf16": 0.9 if m == 16384 else None,
                "fused_wins": (ours < deq) if ours and deq else None,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    from report import gpu_bench_parser, require_cuda, write_results

    parser = gpu_bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="K=N=4096 at M=256, 2048 and 16384 only")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile / decode sweep")
    args = parser.parse_args(argv)
    if not require_cuda(
        "gpu_qmatmul.py needs a CUDA device (triton.testing.do_bench times GPU kernels); none found."
    ):
        return 2

    providers = ["ours", "dequant", "bf16"]
    try:
        import bitsandbytes  # noqa: F401

        providers.insert(1, "bnb")
    except Exception as e:  # absent, or without a native library for this CUDA
        print(f"bnb provider skipped: {type(e).__name__}: {e}", file=sys.stderr)
    shapes, tokens = (SHAPES, TOKENS) if not args.quick else ([(4096, 4096)], [256, 2048, 16384])
    start = time.time()
    torch.manual_seed(0)
    bandwidth = measured_bandwidth_gbs()
    print(f"measured device bandwidth: {bandwidth:.0f} GB/s (1 GiB device-to-device copy)")
    deadline = start + args.budget_s if args.budget_s else None
    if not args.no_sweep:
        sweep_deadline = start + args.budget_s * 0.5 if args.budget_s else None
        write_results("qmatmul_nf4_sweep_small_m", sweep(sweep_deadline), SWEEP_COLUMNS, args.out)
    rows = run(providers, shapes, tokens, MODES, bandwidth, deadline=deadline)
    for row in rows:
        row["bandwidth_gbs"] = bandwidth
    path = write_results("qmatmul_nf4", rows, COLUMNS, args.out)
    summ = summary(rows)
    cols = [
        "mode",
        "M",
        "K",
        "N",
        "speedup_vs_dequant",
        "goal_vs_dequant",
        "fraction_of_bf16",
        "goal_vs_bf16",
        "fused_wins",
    ]
    write_results("qmatmul_nf4_targets", summ, cols, args.out)
    for row in summ:
        print(
            f"target {row['mode']:>7} M={row['M']:<5} K={row['K']:<5} N={row['N']:<5} "
            f"ours vs dequant {row['speedup_vs_dequant']} (goal {row['goal_vs_dequant']}), "
            f"ours vs bf16 {row['fraction_of_bf16']} (goal {row['goal_vs_bf16']})"
        )
    print(f"wrote {path} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
