"""A linear layer that holds its weight at 16, 8, 4 or 3 bits and runs on torch's own weight-only kernels.

- 16: the float weight.
- 8: int8 per output channel (symmetric), `torch._weight_int8pack_mm` on CPU (bf16 activations); on CUDA, which
  has no weight-only int8 kernel in torch, the int8 weight is widened to the activation dtype at each call.
- 4: group-wise with zero points, packed for torch's int4 kernel of the device the weight lives on
  (`_weight_int4pack_mm_for_cpu`, or `_weight_int4pack_mm` on CUDA; bf16 activations on both). The CUDA kernel
  needs compute capability 8.0; on older GPUs (T4, V100, P100) the values are held two to a byte and dequantized at
  each call, as the 3-bit ones are.
- 3: no kernel exists: held as three bit-planes (`bit_planes`), unpacked and dequantized at each call. Memory stays
  at 3 bits; time pays for the unpacking, which goes a block of output rows at a time (`CPU_BLOCK_BYTES`,
  `GPU_BLOCK_WEIGHTS`).

`state()` / `from_state()` give the compressed-tensors on-disk form (int-quantized for 8 bits, pack-quantized for 4
and 3: weight_packed, weight_scale, weight_zero_point, weight_shape)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from compressed_tensors.compressors import pack_to_int32, unpack_from_int32
from torch import nn

from llmpq_serve import catalog
from llmpq_serve.quant.groupwise import GroupQuant, quantize, quantize_int8

INT4_KERNEL_MIN_SM = catalog.kernel_assumptions()["int4_kernel_min_sm"]  # as the cost model assumes
# Output rows dequantized (or int8 widened) at once on a GPU: whole matrices up to this many weights (a launch per
# op), larger ones in blocks, so that the temporaries the caching allocator keeps stay bounded (a BLOOM-176B MLP
# matrix whole would hold 4.6 GiB of them at 3 bits); the cost model counts them from the same figure.
GPU_BLOCK_WEIGHTS = catalog.kernel_assumptions()["gpu_dequant_block_weights"]
CUDA_INNER_K_TILES = 8  # the int4 CUDA kernel's tiling: in_features must be a multiple of 16 * this
# torch's CPU int8/int4 weight-only kernels are vectorised for bf16 activations; with fp32 ones they were 17-70x
# slower on an AVX2 CPU (micro-batch 1-56, 256x768), so activations cross them in bf16 (0.3% relative error, well
# under the weights' own quantization error) and the output returns to the layer's dtype
CPU_KERNEL_DTYPE = torch.bfloat16
# A 3-bit weight unpacked whole makes weight-sized float temporaries at every call, which glibc hands back to the OS
# when they are freed, so that the next call faults their pages in again (2,000 faults per call of a demo OPT stage
# with two 3-bit layers); blocks of about a core's L2 stay in the allocator and in cache.
CPU_BLOCK_BYTES = 1 << 20


def has_int4_kernel(device: torch.device) -> bool:
    """Whether torch's int4 weight-only kernel runs on `device`: on the CPU, and on GPUs from compute capability 8.0
    (A100, H100, ...)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= divmod(INT4_KERNEL_MIN_SM, 10)


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values [out, in] (0..15, in even) -> uint8 [out, in / 2]: values 2j and 2j + 1 of a row in the high and
    low half of byte j (the order torch's CUDA int4 packing takes)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


@functools.cache
def plane_shifts(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """0..7 as a column [8, 1] on `device`, made once: a copy from the host at every call would wait for a GPU's
    queue."""
    return torch.arange(8, dtype=dtype, device=device)[:, None]


def bit_planes(q: torch.Tensor) -> torch.Tensor:
    """uint8 values [out, in] (0..7, in a multiple of 8) -> uint8 [3, out, in / 8]: in plane k, byte j of a row holds
    bit k of the row's values j, in/8 + j, ..., 7 in/8 + j (bit t of the byte for value t in/8 + j). Unpacking then
    shifts whole rows of bytes, or of 32-bit words of four bytes, by one amount per bit position, and the values
    come out in their order; compressed-tensors' dense int32 words (its on-disk form) need a gather and a masked
    fix-up of the values that straddle two words."""
    out_f, in_f = q.shape
    if in_f % 8:
        raise ValueError(f"a 3-bit weight needs a multiple of 8 input features, not {in_f}")
    plane = torch.arange(3, dtype=torch.uint8, device=q.device)[:, None, None, None]
    bits = (q.reshape(out_f, 8, in_f // 8)[None] >> plane) & 1  # [3, out, t, j]
    return (bits << plane_shifts(q.device, torch.uint8)).sum(2, dtype=torch.uint8)


def from_bit_planes(planes: torch.Tensor) -> torch.Tensor:
    """`bit_planes` undone: uint8 [3, rows, in / 8] -> uint8 values [rows, in]. Four bytes go at once as an int32
    word where a row's bytes fill whole words (in a multiple of 32), which made a 3-bit decode step 1.8-3.5x faster
    on the CPU than byte by byte with the shift amounts innermost (demo and 4096-wide layers)."""
    _, rows, n8 = planes.shape
    words, ones = (planes.view(torch.int32), 0x01010101) if n8 % 4 == 0 else (planes, 1)
    bits = (words[:, :, None] >> plane_shifts(planes.device, words.dtype)) & ones  # [3, rows, t, words]
    return (bits[0] | bits[1] << 1 | bits[2] << 2).view(torch.uint8).reshape(rows, 8 * n8)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.int4_kernel = False  # a 4-bit weight held for torch's int4 kernel (see `_hold`)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    # ---- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128,
                    quantized: GroupQuant | None = None) -> QuantLinear:
        """`quantized`: the group quantization to hold (AWQ's); round-to-nearest of the weight when omitted."""
        w = linear.weight.detach().float()
        if bits in (4, 3) and quantized is None:
            quantized = quantize(w, bits, group_size)
        if bits == 16:
            layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias)
            layer.register_buffer("weight", linear.weight.detach().clone())
            return layer
        if bits == 8:
            return cls.from_int8(*quantize_int8(w), linear.bias)
        return cls.from_group_quant(quantized, linear.bias)

    @classmethod
    def from_int8(cls, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
        layer = cls(qweight.shape[1], qweight.shape[0], 8, 0, bias)
        layer.register_buffer("qweight", qweight)
        layer.register_buffer("scale", scale)
        return layer

    @classmethod
    def from_group_quant(cls, gq: GroupQuant, bias: torch.Tensor | None,
                         float_dtype: torch.dtype = torch.float32) -> QuantLinear:
        """Holds `gq` on the device its tensors are on, scales and zero points in `float_dtype` where no int4
        kernel takes them."""
        layer = cls(gq.q.shape[1], gq.q.shape[0], gq.bits, gq.group_size, bias)
        layer._hold(gq, float_dtype)
        return layer

    def _hold(self, gq: GroupQuant, float_dtype: torch.dtype) -> None:
        self.int4_kernel = gq.bits == 4 and has_int4_kernel(gq.q.device)
        if self.int4_kernel:
            # the kernels compute (q - 8) * scale + bias per group
            bias = (8 - gq.zero.float()) * gq.scale
            scales_and_zeros = torch.stack([gq.scale, bias], -1).transpose(0, 1).contiguous()
            if gq.q.is_cuda:
                packed = torch.ops.aten._convert_weight_to_int4pack(nibbles(gq.q), CUDA_INNER_K_TILES)
                scales_and_zeros = scales_and_zeros.to(torch.bfloat16)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(gq.q.to(torch.int32), 1)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        else:
            self.register_buffer("qweight", nibbles(gq.q) if gq.bits == 4 else bit_planes(gq.q))
            self.register_buffer("scale", gq.scale.to(float_dtype).contiguous())
            # float zero: w = q * scale - zero
            self.register_buffer("zero", (gq.zero.float() * gq.scale.float()).to(float_dtype))

    # ---- compute --------------------------------------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        if self.bits == 16:
            return self.weight.float()
        if self.bits == 8:
            return self.qweight.float() * self.scale[:, None]
        return self.group_quant().dequantize()

    def group_quant(self) -> GroupQuant:
        """The held 4/3-bit weight back as integers (for saving and for tests)."""
        if self.int4_kernel:
            # The int4 pack layout is the kernel's own; running the kernel on the identity with scale 1 and offset 8
            # reads the integers back without depending on it.
            scale = self.scales_and_zeros[..., 0].transpose(0, 1)
            zero = 8 - self.scales_and_zeros[..., 1].transpose(0, 1) / scale
            identity = torch.stack([torch.ones_like(scale), torch.full_like(scale, 8.0)], -1).transpose(0, 1)
            eye = torch.eye(self.in_features, device=scale.device)
            q = self._int4_mm(eye, identity.contiguous().to(self.scales_and_zeros.dtype))
            return GroupQuant(torch.round(q.T.float()).to(torch.uint8), scale.float().contiguous(),
                              torch.round(zero.float()).to(torch.uint8), 4, self.group_size)
        scale = self.scale.float()
        zero = torch.round(self.zero.float() / scale).to(torch.uint8)
        return GroupQuant(self._values(0, self.out_features), scale, zero, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 16:
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if self.bits == 8 and flat.is_cuda:
            widened = self._row_blocks(flat, lambda a, b: self.qweight[a:b].to(flat.dtype), GPU_BLOCK_WEIGHTS)
            y = widened * self.scale.to(flat.dtype)
        elif self.bits == 8:
            y = torch._weight_int8pack_mm(flat.to(CPU_KERNEL_DTYPE), self.qweight, self.scale.to(CPU_KERNEL_DTYPE))
        elif self.int4_kernel:
            y = self._int4_mm(flat, self.scales_and_zeros)
        else:
            y = self._dequantized_mm(flat)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _int4_mm(self, x: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.qweight, self.group_size,
                                                      scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(CPU_KERNEL_DTYPE), self.qweight, self.group_size,
                                                          scales_and_zeros.to(CPU_KERNEL_DTYPE))

    def _dequantized_mm(self, x: torch.Tensor) -> torch.Tensor:
        return self._row_blocks(x, lambda a, b: self._dequantize(a, b).to(x.dtype),
                                GPU_BLOCK_WEIGHTS if x.is_cuda else CPU_BLOCK_BYTES // 4)

    def _row_blocks(self, x: torch.Tensor, rows: Callable[[int, int], torch.Tensor], weights: int) -> torch.Tensor:
        """x @ W.T, W's output rows [a, b) made by `rows(a, b)` in blocks of about `weights` weights."""
        n = max(1, weights // self.in_features)
        parts = [x @ rows(r, min(r + n, self.out_features)).T for r in range(0, self.out_features, n)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _dequantize(self, first: int, end: int) -> torch.Tensor:
        """Output rows [first, end) of the weight (each row's values lie in its own bytes)."""
        q = self._values(first, end).view(end - first, -1, self.group_size)
        w = (q * self.scale[first:end, :, None]).sub_(self.zero[first:end, :, None])  # the product is a new float
        return w.view(end - first, self.in_features)

    def _values(self, first: int, end: int) -> torch.Tensor:
        """The integers of output rows [first, end), uint8 [rows, in], from the bit-planes or the nibbles."""
        if self.bits == 3:
            return from_bit_planes(self.qweight[:, first:end])
        pairs = self.qweight[first:end]
        return torch.stack([pairs >> 4, pairs & 15], -1).view(end - first, self.in_features)

    def weight_nbytes(self) -> int:
        """Bytes of the weight as held (values, scales, zeros), without the bias."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers())

    # ---- on-disk form (compressed-tensors) ------------------------------------------------------------------------
    def state(self, gq: GroupQuant | None = None) -> dict[str, torch.Tensor]:
        """`gq`: the integers this 4/3-bit layer holds, where the caller still has them (reading them back from the
        int4 kernel's layout costs a matmul)."""
        out: dict[str, torch.Tensor] = {} if self.bias is None else {"bias": self.bias.detach()}
        if self.bits == 16:
            return {**out, "weight": self.weight}
        if self.bits == 8:
            return {**out, "weight": self.qweight, "weight_scale": self.scale[:, None]}
        gq = gq or self.group_quant()
        offset = 1 << (self.bits - 1)
        signed = (gq.q.to(torch.int16) - offset).to(torch.int8)
        zero = (gq.zero.to(torch.int16) - offset).to(torch.int8)
        return {**out, "weight_packed": pack_to_int32(signed, self.bits), "weight_scale": gq.scale,
                "weight_zero_point": pack_to_int32(zero, self.bits, packed_dim=0),
                "weight_shape": torch.tensor([self.out_features, self.in_features])}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantLinear:
        bias = state.get("bias")
        if bits == 16:
            w = state["weight"]
            layer = cls(w.shape[1], w.shape[0], 16, group_size, bias)
            layer.register_buffer("weight", w.clone())
            return layer
        if bits == 8:
            return cls.from_int8(state["weight"].clone(), state["weight_scale"][:, 0].clone(), bias)
        out_f, in_f = (int(v) for v in state["weight_shape"])
        offset = 1 << (bits - 1)
        scale = state["weight_scale"]
        q = unpack_from_int32(state["weight_packed"], bits, torch.Size([out_f, in_f])).to(torch.int16) + offset
        zero = unpack_from_int32(state["weight_zero_point"], bits, scale.shape, packed_dim=0).to(torch.int16) + offset
        gq = GroupQuant(q.to(torch.uint8), scale.float(), zero.to(torch.uint8), bits, in_f // scale.shape[1])
        # a stage loads its layers in its runtime type, half on a GPU: its scales stay so (as the cost model counts
        # them), and dequantizing makes a half product, half the workspace of a float one
        return cls.from_group_quant(gq, bias, scale.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"
