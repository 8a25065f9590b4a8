"""nn.Modules over the kernels: frozen base weights plus trainable low-rank adapters.

``backend`` picks the path per module: ``"torch"`` runs the same algebra in torch ops (the CPU path:
``lora.lora_linear_torch``, ``qmatmul`` with the reference dequantize), ``"triton"`` runs the fused
kernels. ``reference.py`` stays the plain-autograd oracle both are tested against.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from . import quant
from ._autocast import autocast_dtype

Backend = Literal["torch", "triton"]

# ---------------------------------------------------------------------------------------------------
# LoRALinear
# ---------------------------------------------------------------------------------------------------


def _check_lora_hparams(rank: int, dropout: float) -> None:
    """The checks both LoRA modules share: a positive rank and a dropout probability in [0, 1)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable LoRA update ``s · B A`` (PEFT's parameterisation).

    ``weight`` and ``bias`` are frozen Parameters (``requires_grad=False``) so that state-dict names
    match the ``nn.Linear`` they replace; ``lora_A [r, K]`` and ``lora_B [N, r]`` train.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        backend: Backend = "torch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_lora_hparams(rank, dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = dropout
        self.backend: Backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        if self.weight.device.type != "meta":  # nn.Linear's own init (torch.empty is whatever memory held)
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
                nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=√5), B = 0, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        backend: Backend = "torch",
        lora_dtype: torch.dtype | None = None,
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, sharing (not copying) its weight and bias storage.

        Args:
            linear: the layer to adapt; its weight becomes the frozen base.
            rank, alpha, dropout: LoRA hyper-parameters (``scaling = alpha / rank``).
            backend: ``"torch"`` or ``"triton"``.
            lora_dtype: dtype of A and B (default: the base weight's dtype).

        Returns:
            The new module, on the linear's device.
        """
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha,
            dropout=dropout,
            bias=linear.bias is not None,
            backend=backend,
            device="meta",
        )
        module.weight = nn.Parameter(w.data, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        a_dtype = lora_dtype or w.dtype
        module.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=a_dtype))
        module.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=a_dtype))
        module.reset_lora_parameters()
        return module

    siblings: LoRASiblings | None = None  # set by LoRASiblings: projections that read the same input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if (
            self.siblings is not None
            and p == 0.0
            and self.backend == "torch"
            and self.siblings.serves(self, x)
        ):
            return self.siblings.output(self, x)
        if self.backend == "triton":
            from .lora import lora_linear as fused_lora_linear

            return fused_lora_linear(
                x, self.weight, self.lora_A, self.lora_B, self.scaling, bias=self.bias, dropout_p=p
            )
        from .lora import lora_linear_torch

        return lora_linear_torch(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias, p)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Return a plain ``nn.Linear`` with ``W + s · B A`` folded in (the adapter is not modified)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        linear.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, "
            f"backend={self.backend}"
        )


__all__ = ["Backend", "LoRALinear"]


class LoRASiblings:
    """LoRALinear projections that read one input (q|k|v, gate|up), run as one node on the torch path.

    The first member called with an input computes every member's output through
    ``lora.lora_siblings_torch`` (one GEMM for all the A's, one dX buffer in backward); the others,
    called next with the same tensor, take theirs. Anything else computes afresh: another input, the
    input or any member's weight, bias, A or B changed in place or replaced, its scaling changed, grad
    mode switched, the same member called twice. A write through ``.data`` bypasses the version
    counters this relies on: write under ``torch.no_grad()`` instead (as optimizers do).
    Inference mode, a module that is not a member (a ``DataParallel`` replica), dropout in training and
    the triton backend run the member as a single layer. Not a Module: members keep their own names,
    parameters and state-dict keys.

    A caller that runs backward on one member's output before calling the others must not rely on
    their cached outputs (they share that graph); the models grouped by ``trainer.adapt`` call all
    members before any backward.
    """

    def __init__(self, members: list[LoRALinear]) -> None:
        if len(members) < 2 or len({m.in_features for m in members}) != 1:
            raise ValueError("LoRASiblings: two or more LoRALinear layers of one input width")
        self.members = list(members)
        self._pending: dict[int, torch.Tensor] = {}
        self._input: torch.Tensor | None = None
        self._key: tuple | None = None
        for m in self.members:
            m.siblings = self

    def _state_key(self, x: torch.Tensor) -> tuple:
        tensors = [t for m in self.members for t in (m.weight, m.bias, m.lora_A, m.lora_B) if t is not None]
        versions = tuple((id(t), t._version) for t in tensors)  # a tensor replaced or changed in place
        return (x._version, torch.is_grad_enabled(), versions, tuple(m.scaling for m in self.members))

    def _index(self, member: LoRALinear) -> int | None:
        return next((j for j, m in enumerate(self.members) if m is member), None)

    def serves(self, member: LoRALinear, x: torch.Tensor) -> bool:
        """Whether ``member(x)`` goes through the group: not in inference mode (no version counters to
        key the cache on), and only for a member itself (not a copy sharing the group)."""
        return not (torch.is_inference_mode_enabled() or x.is_inference()) and self._index(member) is not None

    def output(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """``member(x)`` for a member it :meth:`serves`, computed with its siblings' outputs unless a
        sibling already did."""
        from .lora import lora_siblings_torch

        i = self._index(member)
        key = self._state_key(x)
        if x is self._input and key == self._key and i in self._pending:
            y = self._pending.pop(i)
            if not self._pending:
                self._input = self._key = None
            return y
        ms = self.members
        ys = lora_siblings_torch(
            x,
            [m.weight for m in ms],
            [m.lora_A for m in ms],
            [m.lora_B for m in ms],
            [m.scaling for m in ms],
            [m.bias for m in ms],
        )
        self._pending = {j: y for j, y in enumerate(ys) if j != i}
        self._input, self._key = x, key
        return ys[i]

    def __getstate__(self) -> dict:  # pickled without what is in flight
        return {"members": self.members, "_pending": {}, "_input": None, "_key": None}


# ---------------------------------------------------------------------------------------------------
# QuantLoRALinear
# ---------------------------------------------------------------------------------------------------


class PackedBuffers(nn.Module):
    """Packed weights kept as buffers: one (``QuantLoRALinear``) or a stack of same-shape ones along a
    leading axis (``experts.QuantExperts``), with views back to ``PackedWeight`` and casts that leave the
    quantization state alone."""

    _QUANT_STATE = ("absmax", "quant_offset", "nested_absmax", "nested_code", "weight_scale")

    def _register_packed(self, packed: list[quant.PackedWeight], stacked: bool) -> None:
        """Buffers of ``packed`` (all one format and shape): stacked along a new leading axis, or the one."""
        first = packed[0]

        def join(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(tensors) if stacked else tensors[0]

        self.weight_dtype = first.dtype  # dtype of the weight that was quantized
        if isinstance(first, quant.PackedWeightInt8):
            self.quant_type, self.blocksize = "int8", None
            self.register_buffer("qweight", join([p.qweight for p in packed]))
            self.register_buffer("weight_scale", join([p.scale for p in packed]))
            return
        self.quant_type, self.blocksize = first.quant_type, first.blocksize
        self.nested_blocksize = first.nested_blocksize
        self.register_buffer("qweight", join([p.packed.reshape(-1) for p in packed]))
        self.register_buffer("absmax", join([p.absmax for p in packed]))
        if first.nested:
            self.register_buffer("quant_offset", join([p.offset.reshape(1).float() for p in packed]))
            self.register_buffer("nested_absmax", join([p.nested_absmax for p in packed]))
            self.register_buffer("nested_code", first.nested_code)  # one table for all

    def _packed_view(self, shape: tuple[int, int], index: int | None = None) -> quant.PackedWeight:
        """The packed weight (``index``: of the stack) as a view over the buffers (follows ``.to``)."""

        def at(t: torch.Tensor) -> torch.Tensor:
            return t if index is None else t[index]

        if self.quant_type == "int8":
            return quant.PackedWeightInt8(at(self.qweight), at(self.weight_scale), self.weight_dtype)
        pw = quant.PackedWeight4bit(
            packed=at(self.qweight),
            absmax=at(self.absmax),
            shape=shape,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.weight_dtype,
        )
        if self.double_quant:
            pw.offset, pw.nested_absmax, pw.nested_code = (
                at(self.quant_offset),
                at(self.nested_absmax),
                self.nested_code,
            )
            pw.nested_blocksize = self.nested_blocksize
        return pw

    @property
    def double_quant(self) -> bool:
        return getattr(self, "nested_absmax", None) is not None

    @property
    def weight_numel(self) -> int:
        """Parameters the packed weight(s) stand for (``N·K`` each), not elements of their storage."""
        raise NotImplementedError

    _FORMAT_KEY = "quant_format"  # [type, blocksize, weight dtype] in the state dict (not a buffer)
    _TYPES = ("nf4", "fp4", "int8")
    _DTYPES = (torch.float32, torch.float16, torch.bfloat16)

    def _format_code(self) -> torch.Tensor:
        dtype = self._DTYPES.index(self.weight_dtype) if self.weight_dtype in self._DTYPES else -1
        return torch.tensor(
            [self._TYPES.index(self.quant_type), self.blocksize or 0, dtype], dtype=torch.int32
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The buffers, and beside them the format they hold (``<prefix>quant_format``, a small int32 tensor
        rather than extra state, so that safetensors and ``save_pretrained`` take it): NF4 and FP4 codes at
        one blocksize fill identical buffers, and without it one loaded into the other in silence."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + self._FORMAT_KEY] = self._format_code()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Checks the saved format before any buffer is copied (a state dict from before the record has
        none: loaded as before)."""
        saved = state_dict.get(prefix + self._FORMAT_KEY)
        if saved is not None:
            code = [int(v) for v in saved.reshape(-1).tolist()]
            mine = self._format_code().tolist()
            if code[:2] != mine[:2]:
                kind = self._TYPES[code[0]] if 0 <= code[0] < len(self._TYPES) else f"format {code[0]}"
                errors.append(
                    f"{type(self).__name__} {prefix.rstrip('.') or '(root)'}: the state dict holds {kind} "
                    f"weights (blocksize {code[1]}), this module {self.quant_type} (blocksize {self.blocksize})"
                )
                return  # nothing copied: the module keeps its own weight
            if 0 <= code[2] < len(self._DTYPES):
                self.weight_dtype = self._DTYPES[code[2]]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        key = prefix + self._FORMAT_KEY
        if key in unexpected:
            unexpected.remove(key)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.bfloat16()`` cast every floating buffer; the quantization state
        is part of the frozen weight, so it keeps its dtype (as bnb's QuantState) and follows device moves
        only. Otherwise ``model.bfloat16()`` would round the fp32 absmax and change deq(W)."""
        kept = {n: b for n in self._QUANT_STATE if (b := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


class QuantLoRALinear(PackedBuffers):
    """A frozen quantized weight (NF4/FP4 in bnb's layout, or int8 row-wise) plus a trainable LoRA update.

    The packed weight and its quantization state are buffers; ``lora_A [r, K]``, ``lora_B [N, r]`` and
    ``scaling = alpha / rank`` are exactly LoRALinear's (PEFT's names and init), so adapter export is
    the same. ``backend="triton"`` decodes W inside the fused matmul (``qmatmul.py``); ``"torch"``
    dequantizes with the reference into a temporary per GEMM, in forward and again in backward, and
    never saves it.

    Buffers (4-bit): ``qweight`` uint8 ``[(N·K + 1) // 2]``, ``absmax`` (fp32, or uint8 with double
    quant), and with double quant ``quant_offset``, ``nested_absmax``, ``nested_code``.
    Buffers (int8): ``qweight`` int8 ``[N, K]``, ``weight_scale`` fp32 ``[N]``.
    """

    def __init__(
        self,
        packed: quant.PackedWeight,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: torch.Tensor | None = None,
        backend: Backend = "torch",
        compute_dtype: torch.dtype | None = None,
        lora_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_lora_hparams(rank, dropout)
        out_features, in_features = packed.shape
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = dropout
        self.backend: Backend = backend
        self.compute_dtype = compute_dtype
        self._register_packed([packed], stacked=False)
        device = self.qweight.device
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        a_dtype = lora_dtype or compute_dtype or packed.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=a_dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=a_dtype))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=√5), B = 0, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def packed_weight(self) -> quant.PackedWeight:
        """The packed weight as a view over this module's buffers (follows ``.to(device)``)."""
        return self._packed_view((self.out_features, self.in_features))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        quant_type: quant.QuantType = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        backend: Backend = "torch",
        compute_dtype: torch.dtype | None = None,
        lora_dtype: torch.dtype | None = None,
    ) -> QuantLoRALinear:
        """Quantize an ``nn.Linear``'s weight (bit-exact with bitsandbytes) and wrap it.

        Args:
            linear: the layer; its weight is quantized, its bias kept frozen. The caller deletes it after.
            rank, alpha, dropout: LoRA hyper-parameters (``scaling = alpha / rank``).
            quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
            blocksize, double_quant: 4-bit block size and bnb's ``compress_statistics``.
            backend: ``"torch"`` or ``"triton"``.
            compute_dtype: dtype the matmul runs in (default: the input's).
            lora_dtype: dtype of A and B (default: the linear's weight dtype).

        Returns:
            The new module, on the linear's device.
        """
        packed = quant.quantize(linear.weight.detach(), quant_type, blocksize, double_quant)
        a_dtype = lora_dtype or linear.weight.dtype
        return cls(packed, rank, alpha, dropout, linear.bias, backend, compute_dtype, a_dtype)

    @classmethod
    def from_bnb(
        cls,
        layer: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        backend: Backend = "torch",
        lora_dtype: torch.dtype | None = None,
    ) -> QuantLoRALinear:
        """Take over a ``bnb.nn.Linear4bit`` or ``bnb.nn.Linear8bitLt`` as is (no re-quantization).

        ``lora_dtype``: dtype of A and B (default: the layer's compute dtype, else its weight's).

        Raises:
            TypeError: not one of those layers.
            ValueError: the layer's weight has not been quantized yet.
        """
        import bitsandbytes as bnb

        bias = layer.bias.detach() if layer.bias is not None else None
        if isinstance(layer, bnb.nn.Linear4bit):
            weight = layer.weight
            qs = weight.quant_state
            if qs is None:
                raise ValueError("the Linear4bit is not quantized yet: move it to a device first")
            data = weight.data
            if getattr(qs, "packing_format_for_cpu", False):  # bnb repacked it for its CPU GEMV
                data, qs = bnb.functional._convert_weight_packed_for_cpu_inverse(data, qs)
            packed = quant.PackedWeight4bit.from_bnb(data, qs)
            compute = getattr(layer, "compute_dtype", None)
            return cls(
                packed, rank, alpha, dropout, bias, backend, compute, lora_dtype or compute or qs.dtype
            )
        if isinstance(layer, bnb.nn.Linear8bitLt):
            cb, scb = layer.weight.CB, layer.weight.SCB
            if cb is None and scb is None:  # after its first forward bnb keeps them in layer.state
                cb, scb = getattr(layer.state, "CB", None), getattr(layer.state, "SCB", None)
            if cb is None or scb is None:
                raise ValueError("the Linear8bitLt is not quantized yet: move it to a device first")
            packed = quant.PackedWeightInt8(cb, scb, torch.float16)
            return cls(packed, rank, alpha, dropout, bias, backend, None, lora_dtype or torch.float16)
        raise TypeError(f"expected bnb.nn.Linear4bit or bnb.nn.Linear8bitLt, got {type(layer).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .qmatmul import qlora_linear

        p = self.dropout if self.training else 0.0
        autocast = autocast_dtype(x)
        inp_dtype = x.dtype if autocast is None or x.dtype == torch.float64 else autocast  # as nn.Linear's
        if self.compute_dtype is not None and autocast is None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = qlora_linear(
            x, self.packed_weight, self.lora_A, self.lora_B, self.scaling, bias, p, backend=self.backend
        )
        return y.to(inp_dtype)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense base weight ``deq(W)`` (a new tensor; for export and checks, not for training)."""
        return quant.dequantize(self.packed_weight, dtype or self.weight_dtype)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with ``deq(W) + s · B A`` (the adapter is not modified)."""
        dtype = dtype or self.weight_dtype
        device = self.qweight.device
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=device, dtype=dtype
        )
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        linear.weight.copy_((self.dequantized_weight(torch.float32) + delta).to(dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @torch.no_grad()
    def to_bnb(self, merge: bool = False) -> nn.Module:
        """Hand the weight back to bitsandbytes: a ``Linear4bit`` (or ``Linear8bitLt`` for int8).

        Args:
            merge: fold ``s · B A`` in and re-quantize (same format and block size); otherwise the
                packed base weight is handed over as is, sharing storage.

        Returns:
            A bitsandbytes layer computing the base (or merged) weight. The layout is bnb's own, but
            bitsandbytes 0.50's CPU kernel decodes it wrongly when ``in_features`` is not a multiple of
            the block size (it looks the scale up per row; ``_dense`` in qmatmul.py works around it for
            fusedtune's own path): on the CPU, compare against :meth:`dequantized_weight` for such shapes.
        """
        import bitsandbytes as bnb

        if merge:
            packed = quant.quantize(
                self.merge(torch.float32).weight,
                self.quant_type,
                self.blocksize or 64,
                self.double_quant,
            )
            packed.dtype = self.weight_dtype
        else:
            packed = self.packed_weight
        bias = self.bias is not None
        if isinstance(packed, quant.PackedWeightInt8):
            layer = bnb.nn.Linear8bitLt(
                self.in_features, self.out_features, bias=bias, has_fp16_weights=False, device="meta"
            )
            layer.weight = bnb.nn.Int8Params(
                packed.qweight,
                requires_grad=False,
                has_fp16_weights=False,
                CB=packed.qweight,
                SCB=packed.scale,
            )
        else:
            data, qs = packed.to_bnb()
            layer = bnb.nn.Linear4bit(
                self.in_features,
                self.out_features,
                bias=bias,
                compute_dtype=self.compute_dtype,
                compress_statistics=packed.nested,
                quant_type=packed.quant_type,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                data,
                requires_grad=False,
                quant_state=qs,
                blocksize=packed.blocksize,
                compress_statistics=packed.nested,
                quant_type=packed.quant_type,
                module=layer,
                bnb_quantized=True,
            )
            layer.quant_state = qs
        if bias:
            layer.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, dropout={self.dropout}, quant_type={self.quant_type}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, bias={self.bias is not None}, "
            f"backend={self.backend}"
        )


__all__ += ["QuantLoRALinear"]
