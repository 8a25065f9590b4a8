"""End to end on a GPU: a Llama-3-8B-shaped model (random weights, a few layers), fusedtune against
HF Trainer + PEFT + bitsandbytes, and Liger / Unsloth where they are installed.

Providers: ``fusedtune`` runs ``kernels: auto`` (what a user gets), ``fusedtune_triton`` ``kernels: triton``
(the fused LoRA kernels forced), ``hf_peft``, ``hf_peft_liger``, ``unsloth``. fusedtune and HF run first
for every method, the others after, so that a run cut short by ``--budget-s`` keeps the comparison.

    python3 -P bench/gpu_e2e.py --out bench/results        (bench/gpu.sh runs it with --out "$OUT")

Shapes are Llama-3-8B's (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256) with
``--layers`` blocks (default 2) so that the run fits the device time; weights are random (seeded), bf16.
The job and the checks are ``bench/e2e.py``'s (same micro-batches, same initial LoRA A, LoRA r=16 on every
block Linear, 8-bit AdamW, grad clip 1.0), with every provider in its own process.

Reported per provider and method: median step time, tokens/s on non-pad tokens, MFU on the 4N basis,
peak ``max_memory_allocated`` and ``max_memory_reserved``, the allocated peak of loading alone
(for qlora: quantizing layer by layer), losses and grad norms (checked as on CPU, with
a bf16 tolerance). MFU = tokens/s · 4N / peak bf16 FLOP/s, with N the parameters of every Linear the
tokens pass through (block Linears + LM head; the frozen base costs forward 2N + input-gradient 2N per
token; attention score FLOPs and the LoRA GEMMs are not counted). Needs CUDA: without it, it exits 2
with one line.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
}
# Dense bf16 tensor-core peak (FLOP/s) by card, from the vendors' data sheets (SXM parts, no sparsity).
PEAK_BF16 = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l40s": 362e12, "l4": 121e12}
GPU_LOSS_RTOL = 2e-2  # bf16 compute with different kernels and summation orders
GPU_GRAD_RTOL = 5e-2  # bf16 gradient norms and 8-bit Adam updates of them: unmeasured, a loose bound
COLUMNS = [
    "method",
    "provider",
    "step_s_median",
    "tokens_per_s",
    "mfu",
    "max_allocated_gib",
    "max_reserved_gib",
    "load_max_allocated_gib",
    "estimate_gib",
    "estimate_error",
    "first_loss",
    "last_loss",
    "step_time_ratio",
]


def build_model(layers: int, path: Path) -> tuple[Path, int]:
    """Save a randomly initialised Llama-3-8B-shaped causal LM (``layers`` blocks, bf16) under ``path``.

    Returns:
        (the directory, N = parameters of the block Linears and the LM head).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **LLAMA3_8B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path, n


def available_providers() -> list[tuple[str, str | None]]:
    """``(provider, why skipped or None)`` for every GPU provider."""
    # fusedtune runs kernels: auto (what a user gets); fusedtune_triton forces the fused LoRA kernels
    out = [("fusedtune", None), ("hf_peft", None), ("fusedtune_triton", None)]
    out.append(
        ("hf_peft_liger", None if importlib.util.find_spec("liger_kernel") else "liger-kernel not installed")
    )
    out.append(("unsloth", None if importlib.util.find_spec("unsloth") else "unsloth not installed"))
    return out


def _write(rows: list[dict], args) -> list[dict]:
    """Write the results so far; returns the measured rows (with their ratios)."""
    import e2e
    from report import write_results

    measured = [r for r in rows if "skipped" not in r]
    e2e.add_ratios(measured)
    write_results("e2e-gpu-llama3-8b-shape", rows, [*COLUMNS, "skipped"], args.out)
    return measured


def main(argv: list[str] | None = None) -> int:
    from report import gpu_bench_parser, require_cuda

    parser = gpu_bench_parser(
        __doc__,
        budget_default=140.0,
        budget_help="start no provider after this many seconds (results so far are kept)",
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    args = parser.parse_args(argv)
    if not require_cuda(
        "error: bench/gpu_e2e.py needs a CUDA device (the CPU end-to-end benchmark is bench/e2e.py)"
    ):
        return 2

    import e2e
    from report import device_slug, environment

    t_start = time.monotonic()
    peak = PEAK_BF16.get(device_slug())
    tmp = Path(tempfile.mkdtemp(prefix="llama3-8b-shape-"))
    model_dir, n_linear = build_model(args.layers, tmp)
    print(
        f"model: Llama-3-8B shapes, {args.layers} layers, N = {n_linear / 1e9:.2f} B Linear parameters",
        flush=True,
    )
    rows, failures = [], []
    providers = available_providers()
    # fusedtune and HF for every method first, then the extra providers: a run cut short keeps the pairs
    order = [(m, p, why) for m in args.methods for p, why in providers if p in ("fusedtune", "hf_peft")]
    order += [(m, p, why) for m in args.methods for p, why in providers if p not in ("fusedtune", "hf_peft")]
    for method, provider, skipped in order:
        job = {
            "model_path": str(model_dir),
            "method": method,
            "seq": args.seq,
            "batch": args.batch,
            "grad_accum": 1,
            "steps": args.steps,
            "device": "cuda",
            "dtype": "bf16",
        }
        if skipped is None and time.monotonic() - t_start > args.budget_s:
            skipped = f"out of time (--budget-s {args.budget_s:g})"
        if skipped:
            rows.append({"method": method, "provider": provider, "skipped": skipped})
            print(f"{method} {provider}: skipped ({skipped})", flush=True)
            continue
        try:
            left = args.budget_s + 30 - (time.monotonic() - t_start)
            res = e2e.run_provider(provider, job, timeout=max(left, 30))
        except (e2e.BenchmarkFailed, OSError, subprocess.TimeoutExpired) as exc:
            failures.append(f"{method} {provider}: {exc}")
            rows.append(
                {"method": method, "provider": provider, "skipped": f"failed: {str(exc).splitlines()[0]}"}
            )
            print(failures[-1], flush=True)
            continue
        row = e2e.summarize("llama3-8b-shape", method, provider, res)
        row["max_allocated_gib"] = res["cuda_max_allocated"] / 2**30
        row["max_reserved_gib"] = res["cuda_max_reserved"] / 2**30
        if res.get("cuda_load_max_allocated") is not None:  # the peak while loading (and quantizing)
            row["load_max_allocated_gib"] = res["cuda_load_max_allocated"] / 2**30
        row["n_linear_params"] = n_linear
        if "estimate_tensor_bytes" in res:  # issue 6: `trainer estimate` within 15% of the measured peak
            row["estimate_gib"] = res["estimate_tensor_bytes"] / 2**30
            row["estimate_error"] = res["estimate_tensor_bytes"] / res["cuda_max_allocated"] - 1
        row["mfu"] = row["tokens_per_s"] * 4 * n_linear / peak if peak else None
        row.update(seq=args.seq, batch=args.batch, layers=args.layers)
        rows.append(row)
        _write(rows, args)  # after every provider: a run cut short keeps what it measured
        print(
            f"{method} {provider}: {row['step_s_median'] * 1e3:.1f} ms/step, {row['tokens_per_s']:.0f} tok/s, "
            f"MFU {row['mfu'] or float('nan'):.1%}, max allocated {row['max_allocated_gib']:.2f} GiB",
            flush=True,
        )
    measured = _write(rows, args)
    out = Path(args.out or BENCH / "results") / f"e2e-gpu-llama3-8b-shape-{device_slug()}.json"
    env = environment()
    if not measured:
        print("error: no provider finished", file=sys.stderr)
        return 1
    e2e.plot(
        measured,
        out.with_suffix(".png"),
        f"Llama-3-8B shapes, {args.layers} layers, {args.batch}x{args.seq}, bf16 — {env['device']}",
    )
    print(f"wrote {out}", flush=True)
    e2e.check(measured, rtol=GPU_LOSS_RTOL, grad_rtol=GPU_GRAD_RTOL)  # raises BenchmarkFailed: loud
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
