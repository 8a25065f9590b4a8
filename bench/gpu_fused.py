"""The LM head + loss, the SwiGLU gate, RMSNorm and RoPE on a GPU: fusedtune's fused versions against the alternatives.

    python3 bench/gpu_fused.py --out bench/results        (bench/gpu.sh runs it with --out "$OUT")

LM head + cross-entropy, forward + backward, bf16 hidden states [N, 4096], Llama-3 vocabulary 128256,
frozen head (as in LoRA/QLoRA):
    ours      fusedtune.kernels.cross_entropy.linear_cross_entropy (chunked, Triton softmax-gradient)
    ours_chunkNNN   the same with NNN MiB of logits a chunk instead of the default 32 MiB: every chunk
              reads the whole head (1 GiB here) twice, so small chunks trade speed for memory
    torch     F.linear -> .float() -> F.cross_entropy, by autograd (what HF's loss does)
    liger     liger_kernel's LigerFusedLinearCrossEntropyLoss (skipped when not installed)
SwiGLU gate silu(G) * U, forward + backward, bf16 [N, 14336]:
    ours      fusedtune.kernels.swiglu.silu_mul (Triton)
    torch     F.silu(G) * U by autograd
    liger     liger_kernel's LigerSiLUMulFunction (skipped when not installed)
RMSNorm, forward + backward, bf16 [N, 4096], frozen weight (as in LoRA/QLoRA):
    ours      fusedtune.kernels.rmsnorm.rms_norm (Triton; saves x in bf16 and one fp32 rsqrt per row)
    torch     transformers' LlamaRMSNorm by autograd (saves the fp32 upcast of x)
    liger     liger_kernel's LigerRMSNorm (skipped when not installed)
RoPE of q [1, 32, N, 128] and k [1, 8, N, 128] (transposed views of the projections, as in HF), forward
+ backward, bf16, Llama-3 tables [1, N, 128]:
    ours      fusedtune.kernels.rope.apply_rope (Triton: one pass each way for q and k)
    torch     transformers' Llama apply_rotary_pos_emb by autograd
    liger     liger_kernel's liger_rotary_pos_emb (skipped when not installed)

Per row: ``triton.testing.do_bench`` median and 20/80 quantiles in ms, and the peak memory the pass
allocates above its inputs (``max_memory_allocated`` after a reset).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

HIDDEN, VOCAB, INTERMEDIATE = 4096, 128256, 14336
TOKENS = [2048, 8192, 16384]
COLUMNS = ["op", "provider", "N", "ms", "ms_p20", "ms_p80", "peak_extra_mib"]


def _ce_call(provider: str, n: int):
    import torch.nn.functional as F

    h = (torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
    w = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    t = torch.randint(0, VOCAB, (n,), device="cuda")
    if provider.startswith("ours"):
        from fusedtune.kernels.cross_entropy import DEFAULT_CHUNK_BYTES, linear_cross_entropy

        chunk = int(provider.removeprefix("ours_chunk")) << 20 if "chunk" in provider else DEFAULT_CHUNK_BYTES
        fn = lambda: linear_cross_entropy(h, w, t, backend="triton", chunk_bytes=chunk)
    elif provider == "torch":
        fn = lambda: F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def fn():
            out = loss_fn(w, h, t)
            return out[0] if isinstance(out, tuple) else out

    def call():
        fn().backward()

    return call, [h]


def _swiglu_call(provider: str, n: int):
    import torch.nn.functional as F

    g = torch.randn(n, INTERMEDIATE, device="cuda", dtype=torch.bfloat16).requires_grad_()
    u = torch.randn(n, INTERMEDIATE, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(n, INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
    if provider == "ours":
        from fusedtune.kernels.swiglu import silu_mul

        fn = lambda: silu_mul(g, u, backend="triton")
    elif provider == "torch":
        fn = lambda: F.silu(g) * u
    else:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        fn = lambda: LigerSiLUMulFunction.apply(g, u)

    def call():
        fn().backward(dy)

    return call, [g, u]


def _rmsnorm_call(provider: str, n: int):
    x = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16)
    if provider == "ours":
        from fusedtune.kernels.rmsnorm import rms_norm

        w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        fn = lambda: rms_norm(x, w, 1e-5, backend="triton")
    elif provider == "torch":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm = LlamaRMSNorm(HIDDEN, eps=1e-5).to("cuda", torch.bfloat16).requires_grad_(False)
        fn = lambda: norm(x)
    else:
        from liger_kernel.transformers import LigerRMSNorm

        norm = LigerRMSNorm(HIDDEN, eps=1e-5).to("cuda", torch.bfloat16).requires_grad_(False)
        fn = lambda: norm(x)

    def call():
        fn().backward(dy)

    return call, [x]


def _rope_call(provider: str, n: int):
    heads, kv_heads, d = 32, 8, 128
    q = torch.randn(1, n, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, n, kv_heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    inv = 1.0 / 500000 ** (torch.arange(0, d, 2, device="cuda").float() / d)
    ang = torch.arange(n, device="cuda").float()[:, None] * inv
    ang = torch.cat([ang, ang], dim=-1)[None]
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    if provider == "ours":
        from fusedtune.kernels.rope import apply_rope

        fn = lambda: apply_rope(q, k, cos, sin, backend="triton")
    elif provider == "torch":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        fn = lambda: apply_rotary_pos_emb(q, k, cos, sin)
    else:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        fn = lambda: liger_rotary_pos_emb(q, k, cos, sin)

    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def call():
        torch.autograd.backward(fn(), (dq, dk))

    return call, [q, k]


def run(providers: list[str], tokens: list[int], deadline: float | None) -> list[dict]:
    from report import time_and_peak

    rows = []
    for n in tokens:
        for op, make in (
            ("lm_head_ce", _ce_call),
            ("swiglu", _swiglu_call),
            ("rmsnorm", _rmsnorm_call),
            ("rope", _rope_call),
        ):
            if deadline is not None and time.time() > deadline:
                print(f"time budget spent: stopping before {op} N={n}", flush=True)
                return rows
            for provider in providers:
                if op != "lm_head_ce" and provider.startswith("ours_chunk"):
                    continue
                try:
                    call, grads = make(provider, n)
                    ms, p20, p80, peak = time_and_peak(call, grads, warmup=5, rep=25)
                except Exception as e:
                    print(f"{provider} {op} failed at N={n}: {type(e).__name__}: {e}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                row = {"op": op, "provider": provider, "N": n, "ms": ms, "ms_p20": p20, "ms_p80": p80}
                row["peak_extra_mib"] = peak
                rows.append(row)
                print(
                    f"{op:>10} {provider:>6} N={n:<6} {ms:8.3f} ms [{p20:.3f}, {p80:.3f}] "
                    f"peak +{row['peak_extra_mib']:.0f} MiB",
                    flush=True,
                )
                del call, grads
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    import importlib.util

    from report import gpu_bench_parser, require_cuda, write_results

    args = gpu_bench_parser(__doc__).parse_args(argv)
    if not require_cuda("gpu_fused.py needs a CUDA device (triton.testing.do_bench); none found."):
        return 2
    providers = ["ours", "torch"] + (["liger"] if importlib.util.find_spec("liger_kernel") else [])
    providers += ["ours_chunk128", "ours_chunk512"]
    start = time.time()
    torch.manual_seed(0)
    rows = run(providers, TOKENS, start + args.budget_s if args.budget_s else None)
    path = write_results("fused_ops", rows, COLUMNS, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
