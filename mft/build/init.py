"""Random weights, drawn the way a checkpoint is loaded: tensor by tensor, into whatever holds them.

Each tensor is drawn whole, in checkpoint order, from a generator seeded once per device, then
assigned like a loaded tensor (mft.checkpoint.quantized.assign_weight_): a sharded parameter keeps
its own rows, a quantised layer quantises it. So a model has the same random weights on one
process and on any number of ranks, quantised or not, and no rank ever holds more than one
whole tensor beyond its shards.
"""

import torch

from mft.checkpoint.consolidated import expected_shapes
from mft.checkpoint.quantized import assign_weight_, weight_target


@torch.no_grad()
def init_weights_(model: torch.nn.Module, seed: int, dtype: torch.dtype, std: float = 0.02) -> None:
    """Norms at one, the head at std dim ** -0.5, every other weight at std `std`.

    The head's larger std makes logits start at unit scale: with 0.02 a small model's logits are
    so flat that adapters on the blocks alone cannot sharpen them. Quantised layers are drawn in
    `dtype` (the compute dtype) before quantisation; parameters in their own dtype.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, shape in expected_shapes(model.args).items():
        target = weight_target(model, name)
        is_parameter = isinstance(target, torch.Tensor)
        device = target.device if is_parameter else target.weight_q.device
        tensor = torch.empty(shape, device=device, dtype=target.dtype if is_parameter else dtype)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            if device not in generators:
                generators[device] = torch.Generator(device).manual_seed(seed)
            tensor.normal_(0.0, model.args.dim**-0.5 if name == "output.weight" else std, generator=generators[device])
        assign_weight_(target, tensor)
