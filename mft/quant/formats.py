"""4-bit weight formats in plain torch: NF4 (QLoRA) and asymmetric group-wise int4.

Pure functions over a 2-D weight (out_features, in_features) plus one container type. These
are the reference definitions: the Triton kernel (mft/kernels/dequant.py) must reproduce
`dequantize` bit for bit, and every other path (loading, the linear layer, merging) goes
through them.

Layout shared by both formats (row-major, so that a slice of rows is a slice of every tensor):
- `q` uint8 (out, in // 2): two 4-bit codes per byte, the even element (column 2j) in the high
  nibble and the odd one (column 2j + 1) in the low nibble;
- one set of block constants per `block_size` consecutive elements of a row, shaped
  (out, in // block_size). in_features must be a multiple of block_size.

NF4 (Dettmers et al. 2023, "QLoRA", section 3): each block of 64 is scaled by its absolute
maximum (fp32) into [-1, 1] and each value is replaced by the index of the nearest of the 16
NormalFloat levels (ties go to the lower level). Double quantisation compresses the absmax:
their mean is subtracted (a per-tensor fp32 `absmax_offset`) and the centred values are
quantised to 8 bits in blocks of 256 with one fp32 scale each. The paper stores those 8 bits
as a dynamic 8-bit float; we use symmetric linear int8, same size (8 bits + 32 bits per 256
absmax = 0.127 bits per weight), whose worst-case error is smaller on these tightly clustered
values and whose decoding is one multiply and one add (test_quant measures both errors).

int4: per group of 128, scale = (max - min) / 15 and zero = -min / scale, both stored in bf16;
codes q = clamp(round(x / scale + zero), 0, 15) computed with the stored (rounded) scale and
zero, so codes are optimal for the constants that dequantisation uses: w = (q - zero) * scale.

Dequantisation computes in fp32 and rounds once (to nearest even) into the compute dtype.

A mixture of experts' stacked (G, out, in) weight is a QuantizedStack: G weights quantised one by
one, each part stacked with a leading G (so every expert has its own constants).
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from mft.utils.errors import MftError

FORMATS = ("nf4", "int4")

# The 16 NF4 levels as published with QLoRA (the paper's appendix; bitsandbytes' table):
# quantiles of N(0, 1) at evenly spaced probabilities, separately for the 8 negative and the
# 9 non-negative levels (so that 0 is exact), normalised to [-1, 1]. test_quant re-derives
# them from that construction.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# Elements quantised per step: bounds the fp32/int64 temporaries (a few tens of MB) whatever
# the weight's size, so loading a 7B model peaks near "quantised model + one bf16 tensor".
CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class QuantSpec:
    """What a quantised weight looks like; identical specs give identical tensors."""

    format: str  # "nf4" | "int4"
    block_size: int  # nf4: elements per absmax (64); int4: group size (128)
    double_quant: bool = False  # nf4 only: 8-bit absmax
    dq_block_size: int = 256  # absmax per second-level scale

    def __post_init__(self):
        if self.format not in FORMATS:
            raise MftError(f"quant.format={self.format!r}; expected one of {list(FORMATS)} (or none).")
        if self.block_size <= 0 or self.block_size % 2:
            raise MftError(f"quant.block_size must be a positive even number, got {self.block_size}.")
        if self.double_quant and self.format != "nf4":
            raise MftError("quant.double_quant applies to nf4 only; set it to false for int4.")
        if self.dq_block_size <= 0:
            raise MftError(f"quant.double_quant_block_size must be positive, got {self.dq_block_size}.")
        if not self.double_quant:  # irrelevant then: normalised so that equal formats compare equal
            object.__setattr__(self, "dq_block_size", 256)

    def part_shapes(self, out_features: int, in_features: int, groups: Optional[int] = None
                    ) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """Name, shape and dtype of every stored tensor of an (out, in) weight; with `groups`, of
        G such weights stacked (QuantizedStack): each shape gains a leading G."""
        if groups is not None:
            return {name: ((groups, *shape), dtype)
                    for name, (shape, dtype) in self.part_shapes(out_features, in_features).items()}
        if in_features % self.block_size:
            raise MftError(
                f"{self.format} needs in_features divisible by block_size {self.block_size}; "
                f"a ({out_features}, {in_features}) weight is not."
            )
        blocks = (out_features, in_features // self.block_size)
        parts = {"q": ((out_features, in_features // 2), torch.uint8)}
        if self.format == "int4":
            parts["scale"] = (blocks, torch.bfloat16)
            parts["zero"] = (blocks, torch.bfloat16)
        elif self.double_quant:
            n_scales = -(-(blocks[0] * blocks[1]) // self.dq_block_size)
            parts["absmax_q"] = (blocks, torch.int8)
            parts["absmax_scale"] = ((n_scales,), torch.float32)
            parts["absmax_offset"] = ((1,), torch.float32)
        else:
            parts["absmax"] = (blocks, torch.float32)
        return parts

    def describe(self) -> str:
        extra = f", double_quant (8-bit absmax in blocks of {self.dq_block_size})" if self.double_quant else ""
        return f"{self.format} (blocks of {self.block_size}{extra})"


@dataclass
class QuantizedTensor:
    """A quantised 2-D weight: its spec, its dense shape and its stored tensors (see QuantSpec)."""

    spec: QuantSpec
    shape: Tuple[int, int]
    parts: Dict[str, torch.Tensor] = field(repr=False)

    @property
    def device(self) -> torch.device:
        return self.parts["q"].device

    def check(self) -> None:
        """Fail clearly when a stored tensor has the wrong shape or dtype (e.g. after model.to(bf16))."""
        _check_parts(self.parts, self.spec, self.spec.part_shapes(*self.shape))

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The dense weight in `dtype`, computed by the torch reference."""
        return dequantize(self, dtype)


@dataclass
class QuantizedStack:
    """G quantised (out, in) weights of one spec, stacked: every part of QuantSpec.part_shapes with
    a leading G. Each weight is quantised on its own (nf4 double quantisation's per-tensor
    absmax_offset is one per weight), so `weight(g)` is exactly `quantize` of the g-th dense weight."""

    spec: QuantSpec
    shape: Tuple[int, int]  # of one weight: (out, in)
    parts: Dict[str, torch.Tensor] = field(repr=False)

    @property
    def groups(self) -> int:
        return self.parts["q"].shape[0]

    @property
    def device(self) -> torch.device:
        return self.parts["q"].device

    def weight(self, g: int) -> QuantizedTensor:
        """The g-th weight; its parts are views of the stacked ones."""
        return QuantizedTensor(self.spec, self.shape, {name: t[g] for name, t in self.parts.items()})

    def select(self, groups: torch.Tensor) -> "QuantizedStack":
        """The weights at the indices `groups` (a 1-D integer tensor), stacked in that order."""
        return QuantizedStack(self.spec, self.shape, {name: t.index_select(0, groups) for name, t in self.parts.items()})

    def check(self) -> None:
        """QuantizedTensor.check for the stack: every part (G, *its shape) in its dtype."""
        _check_parts(self.parts, self.spec, self.spec.part_shapes(*self.shape, groups=self.groups))


def _check_parts(parts: Dict[str, torch.Tensor], spec: QuantSpec, expected: dict) -> None:
    if set(expected) != set(parts):
        raise ValueError(f"quantised weight parts {sorted(parts)} do not match {spec}: {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        t = parts[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise MftError(
                f"quantised weight part {name!r} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}; "
                "was the model cast with .to(dtype)? Quantised storage keeps its own dtypes: move models "
                "with .to(device) only."
            )


def nf4_levels(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2n) integer codes in [0, 15] -> (..., n) uint8, even index in the high nibble."""
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n) uint8 codes; the inverse of pack_nibbles."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).flatten(-2)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the level nearest to each x (fp32 distances; ties go to the lower index).

    A bucket search on the midpoints finds the candidate; comparing its fp32 distance with its
    two neighbours' makes the result exactly the first argmin of |x - level|, also for values
    within an ulp of a midpoint, where the midpoint's own rounding could otherwise decide.
    """
    midpoints = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(x, midpoints)
    last = levels.numel() - 1
    lower, upper = (idx - 1).clamp(min=0), (idx + 1).clamp(max=last)
    dist = (x - levels[idx]).abs()
    idx = torch.where((x - levels[upper]).abs() < dist, upper, idx)
    return torch.where((x - levels[lower]).abs() <= (x - levels[idx]).abs(), lower, idx)


def _row_chunks(rows: int, cols: int) -> Tuple[range, int]:
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return range(0, rows, step), step


@torch.no_grad()
def quantize(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantise a 2-D floating weight on its own device, a bounded chunk of rows at a time."""
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"quantize expects a 2-D floating tensor, got {w.dtype}{list(w.shape)}")
    out_features, in_features = w.shape
    shapes = spec.part_shapes(out_features, in_features)
    parts = {name: torch.empty(shape, dtype=dtype, device=w.device) for name, (shape, dtype) in shapes.items()}
    bs = spec.block_size
    starts, step = _row_chunks(out_features, in_features)
    if spec.format == "nf4":
        levels = nf4_levels(w.device)
        absmax = parts["absmax"] if "absmax" in parts else torch.empty(shapes["absmax_q"][0], dtype=torch.float32, device=w.device)
        for r in starts:
            x = w[r : r + step].float().reshape(-1, bs)
            amax = x.abs().amax(dim=1)
            # An all-zero block keeps absmax 0 and normalises by 1: its codes are the 0 level.
            normed = x / torch.where(amax > 0, amax, 1.0)[:, None]
            codes = nearest_level(normed, levels).reshape(-1, in_features)
            parts["q"][r : r + step] = pack_nibbles(codes)
            absmax[r : r + step] = amax.reshape(-1, in_features // bs)
        if spec.double_quant:
            parts["absmax_q"], parts["absmax_scale"], parts["absmax_offset"] = quantize_absmax(absmax, spec.dq_block_size)
    else:
        for r in starts:
            x = w[r : r + step].float().reshape(-1, bs)
            lo, hi = x.amin(dim=1), x.amax(dim=1)
            scale = (hi - lo) / 15
            # A constant group: scale |value| (or 1 for zeros) and zero -sign(value) give q = 0 -> value.
            scale = torch.where(scale > 0, scale, torch.where(lo != 0, lo.abs(), 1.0))
            scale = scale.to(torch.bfloat16).float().clamp(min=torch.finfo(torch.bfloat16).tiny)
            zero = (-lo / scale).to(torch.bfloat16).float()
            codes = torch.round(x / scale[:, None] + zero[:, None]).clamp(0, 15)
            parts["q"][r : r + step] = pack_nibbles(codes.reshape(-1, in_features))
            parts["scale"][r : r + step] = scale.reshape(-1, in_features // bs).to(torch.bfloat16)
            parts["zero"][r : r + step] = zero.reshape(-1, in_features // bs).to(torch.bfloat16)
    return QuantizedTensor(spec, (out_features, in_features), parts)


@torch.no_grad()
def quantize_stack(w: torch.Tensor, spec: QuantSpec) -> QuantizedStack:
    """Quantise a (G, out, in) floating weight on its device, one (out, in) weight at a time."""
    if w.ndim != 3:
        raise ValueError(f"quantize_stack expects a 3-D tensor, got {w.dtype}{list(w.shape)}")
    groups, out_features, in_features = w.shape
    parts = {name: torch.empty(shape, dtype=dtype, device=w.device)
             for name, (shape, dtype) in spec.part_shapes(out_features, in_features, groups).items()}
    for g in range(groups):
        for name, tensor in quantize(w[g], spec).parts.items():
            parts[name][g] = tensor
    return QuantizedStack(spec, (out_features, in_features), parts)


def quantize_absmax(absmax: torch.Tensor, block_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation: (int8 codes shaped like absmax, fp32 scale per block, fp32 offset (1,))."""
    flat = absmax.float().flatten()
    # Summed in fp64, the mean rounds to the same fp32 whatever the device's reduction order,
    # so a checkpoint quantised on the GPU equals one quantised on the CPU.
    offset = flat.double().mean().float().reshape(1)
    centred = flat - offset
    pad = (-centred.numel()) % block_size
    blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, block_size)
    # A multiply by the fp32 reciprocal, not a division: CUDA turns division by a scalar into
    # exactly this, so CPU and GPU quantise to the same bytes.
    scale = blocks.abs().amax(dim=1) * (1.0 / 127)
    scale = torch.where(scale > 0, scale, 1.0)
    codes = torch.round(blocks / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.flatten()[: flat.numel()].reshape(absmax.shape), scale, offset


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 absmax shaped like codes: code * scale + offset, a multiply then an add (no fma)."""
    idx = torch.arange(codes.numel(), device=codes.device) // block_size
    return (codes.flatten().float() * scale[idx] + offset).reshape(codes.shape)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference dequantisation (any device): fp32 arithmetic, one rounding into `dtype`."""
    qt.check()
    spec, (out_features, in_features) = qt.spec, qt.shape
    codes = unpack_nibbles(qt.parts["q"]).long().reshape(-1, spec.block_size)
    if spec.format == "nf4":
        if spec.double_quant:
            p = qt.parts
            absmax = dequantize_absmax(p["absmax_q"], p["absmax_scale"], p["absmax_offset"], spec.dq_block_size)
        else:
            absmax = qt.parts["absmax"]
        values = nf4_levels(codes.device)[codes] * absmax.reshape(-1, 1)
    else:
        scale = qt.parts["scale"].float().reshape(-1, 1)
        zero = qt.parts["zero"].float().reshape(-1, 1)
        values = (codes.float() - zero) * scale
    return values.reshape(out_features, in_features).to(dtype)
