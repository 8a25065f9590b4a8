"""Compile every kernel variant the launchers produce for sm_90, offline: no GPU needed.

    PYTHONPATH=/tmp/ftsite python -P tests/kernels/compile_sm90.py [lora] [q] [ce] [swiglu] [rmsnorm] [rope]   (ARCH=90)

(``/tmp/ftsite`` as bench/gpu.sh builds it: ``fusedtune`` mapped onto the source folders.) Not a pytest
module: a tool for before a GPU run. It drives the public launchers with CPU tensors while Triton's
``JITFunction.run`` is forced to compile only (``warmup``) against a stand-in driver that reports a CUDA
target, and every autotune config is compiled. That is Triton's real path to PTX and a cubin (bundled
ptxas), so it catches what the interpreter hides: constructs the compiler rejects, shared memory over the
227 KiB of sm_90 (flagged), and register spills (flagged, from cuobjdump). It relies on Triton internals
(checked with 3.6.0 and 3.7.1). Exit status 1 when a variant fails to compile or does not fit.
"""

import os
import re
import subprocess
import sys
import tempfile
import traceback

os.environ["TRITON_INTERPRET"] = "0"

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

ARCH = int(os.environ.get("ARCH", "90"))
MAX_SHARED = 232448 if ARCH >= 90 else 166912


class FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(FakeDriver())
RESULTS = {}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")


def res_usage(cubin: bytes) -> str:
    """Registers, stack (spills), shared and local memory, and the tensor-core instructions in the SASS:
    HGMMA is sm_90's warpgroup MMA (wgmma, operands from shared memory), HMMA the older warp-level
    mma.sync. A GEMM that lowers to HMMA on sm_90 leaves about half the tensor-core rate unused."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    mma = {op: len(re.findall(rf"\b{op}\.", sass)) for op in ("HGMMA", "HMMA")}
    mma_s = " ".join(f"{op}:{n}" for op, n in mma.items() if n) or "no-MMA"
    for line in out.splitlines():
        if "REG:" in line:
            keep = ("REG", "STACK", "SHARED", "LOCAL")
            return " ".join(p for p in line.split() if p.split(":")[0] in keep) + " " + mma_s
    return "? " + mma_s


_orig_run = JITFunction.run


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    md = kernel.metadata
    consts = {k: v for k, v in kwargs.items() if k.isupper()}
    key = (
        self.fn.__name__,
        md.num_warps,
        md.num_stages,
        tuple(sorted((k, str(v)) for k, v in consts.items())),
    )
    if key not in RESULTS:
        usage = res_usage(kernel.asm["cubin"])
        RESULTS[key] = (md.shared, usage)
        flag = "  <-- OVER SHARED LIMIT" if md.shared > MAX_SHARED else ""
        spill = "  <-- SPILLS" if "STACK:0" not in usage.replace(" ", "") and "STACK" in usage else ""
        name = self.fn.__name__
        print(
            f"{name:32s} w{md.num_warps} s{md.num_stages} smem={md.shared:6d} {usage} {consts}{flag}{spill}"
        )
    return kernel


JITFunction.run = compile_only


def autotune_all(self, *args, **kwargs):
    kwargs.pop("grid", None)
    kwargs.pop("warmup", None)
    for config in self.configs:
        full = {**kwargs, **config.all_kwargs()}
        try:
            self.fn.run(*args, grid=None, warmup=True, **full)
        except Exception as e:  # an autotuner would prune OutOfResources at launch
            FAILS.append(f"autotune {self.fn.fn.__name__} {config}")
            print(f"  autotune config {config} failed to compile: {type(e).__name__}: {e}"[:400])


Autotuner.run = autotune_all

from fusedtune.kernels import cross_entropy, lora, qmatmul, quant, rmsnorm, rope, swiglu  # noqa: E402


def _check_as_if_interpreted(module, name: str) -> None:
    """The launchers refuse CPU tensors outside the interpreter: tell only their check otherwise (the tile
    and dtype choices must still see the compiled path)."""
    check, real = getattr(module, name), module.interpreter_active

    def wrapped(*a):
        module.interpreter_active = lambda: True
        try:
            return check(*a)
        finally:
            module.interpreter_active = real

    setattr(module, name, wrapped)


_check_as_if_interpreted(lora, "_check_inputs")
_check_as_if_interpreted(qmatmul, "_check")
SPLIT = int(os.environ.get("SPLIT", "3"))
lora._split = lambda tiles, red, dev: max(1, min(SPLIT, red))

FAILS = []


def attempt(name, fn):
    try:
        fn()
    except Exception as e:
        FAILS.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:3000]}", flush=True)
        traceback.print_exc(limit=3)


def lora_case(m, k, n, r, dtype, bias, p, autotune=False):
    def run():
        old = lora._AUTOTUNE_MIN_MACS
        if autotune:
            lora._AUTOTUNE_MIN_MACS = 0
        try:
            x = torch.randn(m, k, dtype=dtype)
            w = torch.randn(n, k, dtype=dtype)
            a = torch.randn(r, k, dtype=dtype)
            b = torch.randn(n, r, dtype=dtype)
            bb = torch.randn(n, dtype=dtype) if bias else None
            cfg = lora.LoRAConfig(scale=2.0, dropout_p=p, seed=7 if p else 0)
            y, s = lora.lora_forward(x, w, a, b, bb, cfg)
            lora.lora_backward(y, x, w, a, b, s, cfg)
            lora.lora_backward(y, None, w, a, b, s, cfg, need_da=False)
            lora.lora_backward(y, x, w, a, b, None, cfg, need_db=False, need_dx=False)
        finally:
            lora._AUTOTUNE_MIN_MACS = old

    attempt(f"lora m{m} k{k} n{n} r{r} {dtype} bias{bias} p{p} at{autotune}", run)


def q_case(m, n, k, r, dtype, fmt, dq, blocksize, bias):
    def run():
        w = torch.randn(n, k) * 0.05
        pw = quant.quantize(w.to(dtype), fmt, blocksize, dq, backend="triton")
        quant.dequantize(pw, dtype, backend="triton")
        x = torch.randn(m, k, dtype=dtype)
        s = torch.randn(m, r, dtype=dtype)
        b = torch.randn(n, r, dtype=dtype)
        bb = torch.randn(n, dtype=dtype) if bias else None
        qmatmul.qmatmul_forward(x, pw, s, b, bb)
        qmatmul.qmatmul_forward(x, pw)
        dy = torch.randn(m, n, dtype=dtype)
        qmatmul.qmatmul_backward_dx(dy, pw, s, torch.randn(r, k, dtype=dtype))
        qmatmul.qmatmul_backward_dx(dy, pw)

    attempt(f"qmatmul m{m} n{n} k{k} r{r} {dtype} {fmt} dq{dq} bs{blocksize}", run)


def ce_case(n, v, dtype):
    def run():
        z = torch.randn(n, v, dtype=dtype)
        t = torch.randint(0, v, (n,))
        t[0] = -100
        cross_entropy.cross_entropy_grad(z, t, backend="triton")

    attempt(f"cross_entropy n{n} v{v} {dtype}", run)


def swiglu_case(n, dtype):
    def run():
        g, u = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
        swiglu._forward(g, u, "triton")
        swiglu._backward(g, g, u, "triton")

    attempt(f"swiglu n{n} {dtype}", run)


def rope_case(b, t, hq, hk, d, dtype):
    def run():
        q = torch.randn(b, t, hq, d, dtype=dtype).transpose(1, 2)
        cos, sin = torch.randn(b, t, d, dtype=dtype), torch.randn(b, t, d, dtype=dtype)
        for backward in (False, True):
            rope._rotate(q, cos, sin, backward, "triton", dtype)

    attempt(f"rope b{b} t{t} hq{hq} hk{hk} d{d} {dtype}", run)


def rmsnorm_case(rows, h, dtype, need_dx, need_dw, gemma=False):
    def run():
        x, w = torch.randn(rows, h, dtype=dtype), torch.randn(h, dtype=dtype)
        _, r = rmsnorm._forward(x, w, 1e-5, "triton", gemma)
        rmsnorm._backward(x, x, w, r, need_dx, need_dw, "triton", gemma)

    attempt(f"rmsnorm rows{rows} h{h} {dtype} dx{need_dx} dw{need_dw} gemma{gemma}", run)


if __name__ == "__main__":
    which = sys.argv[1:] or ["lora", "q", "ce", "swiglu", "rmsnorm", "rope"]
    if "rope" in which:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            rope_case(2, 9, 32, 8, 128, dtype)  # Llama 3 8B
        rope_case(1, 9, 9, 3, 64, torch.bfloat16)  # SmolLM2
        rope_case(1, 5, 128, 8, 128, torch.bfloat16)  # 405B-class: heads over two programs
        rope_case(1, 5, 16, 8, 256, torch.bfloat16)  # Gemma 3's head_dim
    if "rmsnorm" in which:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for h in (576, 4096, 8192, 16384):
                rmsnorm_case(300, h, dtype, True, h in (4096, 16384))
        rmsnorm_case(70, 128, torch.bfloat16, True, True)
        rmsnorm_case(70, 576, torch.bfloat16, False, True)  # a trainable first norm over a frozen embedding
        for h in (2304, 3840):  # Gemma 2 2B, Gemma 3 12B
            rmsnorm_case(300, h, torch.bfloat16, True, True, gemma=True)
        rmsnorm_case(300, 256, torch.bfloat16, True, False, gemma=True)  # Gemma 3's q/k norms (head_dim)
    if "ce" in which:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            ce_case(7, 49152, dtype)
        ce_case(3, 1000, torch.bfloat16)
    if "swiglu" in which:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            swiglu_case(3 * 2100, dtype)
    if "lora" in which:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            lora_case(300, 256, 384, 16, dtype, True, 0.1)
            lora_case(1000, 520, 700, 64, dtype, True, 0.0)
        lora_case(64, 4096, 4096, 256, torch.bfloat16, False, 0.1)
        lora_case(64, 4096, 4096, 128, torch.float32, False, 0.0)
        lora_case(64, 4096, 4096, 256, torch.float32, False, 0.1)
        lora_case(5, 123, 77, 3, torch.float16, False, 0.2)
        lora_case(512, 4096, 4096, 16, torch.bfloat16, False, 0.0, autotune=True)
        lora_case(512, 4096, 4096, 16, torch.float32, True, 0.1, autotune=True)
    if "q" in which:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            q_case(257, 384, 512, 16, dtype, "nf4", True, 64, True)
        q_case(257, 384, 512, 16, torch.bfloat16, "fp4", False, 64, False)
        q_case(257, 384, 512, 16, torch.bfloat16, "int8", False, 64, False)
        q_case(100, 96, 123, 8, torch.float16, "nf4", True, 64, False)
        q_case(100, 96, 320, 256, torch.bfloat16, "nf4", True, 32, False)
        q_case(100, 96, 320, 256, torch.float32, "nf4", False, 128, True)
        q_case(100, 96, 320, 64, torch.bfloat16, "nf4", True, 256, False)
        q_case(40, 96, 320, 64, torch.bfloat16, "int8", False, 64, True)
        q_case(40, 96, 320, 256, torch.float32, "int8", False, 64, True)
        q_case(300, 4096, 4096, 256, torch.bfloat16, "nf4", True, 64, False)
        q_case(2048, 4096, 4096, 256, torch.bfloat16, "nf4", True, 64, True)  # the 256x128 tiles
        q_case(2048, 1024, 4100, 64, torch.float16, "nf4", True, 64, False)  # 256x128, unaligned K
        q_case(2048, 1024, 1024, 16, torch.bfloat16, "int8", False, 64, False)
        q_case(300, 4096, 4096, 256, torch.float16, "fp4", False, 128, True)
        q_case(37, 96, 128, 8, torch.float32, "nf4", True, 64, True)
        q_case(5, 48, 123, 16, torch.float32, "fp4", False, 64, False)
        q_case(64, 80, 192, 64, torch.float32, "int8", False, 64, True)
        q_case(300, 4096, 4100, 256, torch.float32, "nf4", True, 64, True)
        quant.quantize_int8(torch.randn(64, 5000, dtype=torch.bfloat16), backend="triton")
        for bs in (32, 4096):
            quant.quantize_4bit(torch.randn(64, 4096), bs, "nf4", True, backend="triton")
    over = [key for key, (shared, _) in RESULTS.items() if shared > MAX_SHARED]
    print("failed:", FAILS)
    print(f"variants compiled: {len(RESULTS)}, over the shared-memory limit: {len(over)}")
    sys.exit(1 if FAILS or over else 0)
