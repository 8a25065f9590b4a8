"""Process set-up for bench/'s tests when they run without tests/ (``pytest bench/...``).

As in tests/conftest.py: Triton's interpreter without CUDA, switched on before anything imports Triton.
Triton reads the switch when a ``@triton.jit`` function is defined, its own ``tl.zeros`` included, and
torchao (which the torchtune provider's model imports) imports Triton before fusedtune's kernels would set it.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
