"""Grouped matrix products over plain tensors: rows sorted by group, each group times its own
weight (a mixture of experts' projections: mft/model/moe.py, and their 4-bit form:
mft/quant/grouped.py). torch's grouped GEMM where it runs, a loop over the groups elsewhere."""

from typing import Optional

import torch
import torch.nn.functional as F


def grouped_gemm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the experts run as torch's grouped GEMM on `device` in `dtype`: bf16 on a CUDA GPU of
    compute capability 9 (Hopper) or newer (torch's kernel there), else as the per-expert loop."""
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


def uses_grouped_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs these operands (grouped_gemm_runs), with rows of 16-byte
    multiples (the kernel refuses others: a LoRA rank of 4 in bf16), else the per-expert loop."""
    aligned = all(size * x.element_size() % 16 == 0 for size in (x.shape[-1], weight.shape[-2]))
    return x.dtype == weight.dtype and aligned and grouped_gemm_runs(x.device, x.dtype)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                   grouped: Optional[bool] = None) -> torch.Tensor:
    """x (N, in), rows sorted by group; weight (G, out, in); offsets (G,) int32, the end row of
    each group (cumulative counts). Row n of group g gives weight[g] @ x[n]: (N, out).

    `grouped`: True runs torch's grouped GEMM (any device where torch has it), False the loop over
    groups (a host sync to read the offsets), None as `uses_grouped_gemm` says. Under autocast both
    operands are cast to its dtype first, as F.linear's are (autocast leaves the grouped GEMM alone).
    On the meta device (the memory plan) one product of the same shapes stands in: it keeps what
    the grouped GEMM keeps (x and the weight), and neither the loop (which reads the offsets) nor
    torch's meta grouped GEMM (bf16 only) runs there."""
    if x.is_meta:
        return F.linear(x, weight[0])
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if grouped is None:
        grouped = uses_grouped_gemm(x, weight)
    if grouped:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    parts = [F.linear(x[start:end], weight[g]) for g, (start, end) in enumerate(zip(starts, ends)) if end > start]
    return torch.cat(parts) if parts else x.new_zeros((0, weight.shape[1]))
