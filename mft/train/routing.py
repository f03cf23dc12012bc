"""Training a mixture of experts: the load-balancing loss's weight, the routers' metrics, and the
parameters a token uses.

Each MoEFeedForward (mft/model/moe.py) sends its load-balancing loss's gradient into backward
itself, times its `aux_loss_scale`, and keeps the detached (tokens per expert, aux loss) of its
last forward in `routing_stats`. `set_aux_loss_scale` sets the scales so that an optimizer step's
gradient is that of CE + coef * the mean over layers of their aux losses, averaged over the step's
micro-batches (and over the ranks by FSDP's gradient average). `RoutingWindow` sums the statistics
of the micro-steps between two train records, without a host sync until it writes one.
"""

from typing import Any, Dict

import torch
from torch import nn

from mft.checkpoint.consolidated import expected_shapes, is_stacked
from mft.model.args import ModelArgs
from mft.model.moe import MoEFeedForward
from mft.utils.distributed import all_reduce_sum_


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The model's sparse feed-forwards, in block order (inside checkpoint and compile wrappers too)."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def set_aux_loss_scale(layers: list[MoEFeedForward], coef: float, micro_steps: int) -> None:
    """One micro-step's share of coef * mean over `layers` of their load-balancing losses."""
    for layer in layers:
        layer.aux_loss_scale = coef / (len(layers) * micro_steps)


class RoutingWindow:
    """What the routers did over the micro-steps since the last train record (see `record`)."""

    def __init__(self, layers: list[MoEFeedForward]) -> None:
        self.layers = [layer for layer in layers if layer.record_routing]  # see mft.build.parallelize
        self._reset()

    def _reset(self) -> None:
        self.counts = torch.zeros(0)  # (layers, experts): tokens routed, summed over the micro-steps
        self.aux = torch.zeros(0)  # (layers,): load-balancing losses, summed over the micro-steps
        self.micro_steps = 0

    def add(self) -> None:
        """After a micro-step: each layer's routing of its last forward (a checkpointed block's
        recompute wrote the same values again)."""
        if not self.layers:
            return
        counts = torch.stack([layer.routing_stats[0] for layer in self.layers])
        aux = torch.stack([layer.routing_stats[1] for layer in self.layers])
        self.counts = counts if not self.micro_steps else self.counts + counts
        self.aux = aux if not self.micro_steps else self.aux + aux
        self.micro_steps += 1

    def record(self) -> Dict[str, Any]:
        """The train record's routing fields over every rank; nothing for a dense model. Resets.

        expert_layers: the layers these figures cover (a compiled, checkpointed block records
        none: mft.build.parallelize); expert_tokens: per expert, the tokens routed to it, summed
        over those layers, micro-steps and
        ranks (each token counts once in each of its k experts); expert_load_max: the largest
        share of one expert over the uniform share, in the worst layer (1: balanced, E / k: every
        token to the same k experts); router_aux_loss: the load-balancing loss (1 when balanced),
        the mean over layers, micro-steps and ranks, whether or not it trains."""
        if not self.micro_steps:
            return {}
        layers, experts = self.counts.shape
        # One collective: the counts, the aux losses' sum and the micro-steps, over every rank.
        summed = all_reduce_sum_(torch.cat([self.counts.flatten().double(), self.aux.double().sum()[None],
                                            torch.tensor([float(self.micro_steps)], dtype=torch.float64,
                                                         device=self.aux.device)]))
        counts = summed[:-2].view(layers, experts)
        aux_sum, micro_steps = summed[-2:].tolist()
        load = counts.max(dim=1).values / (counts.sum(dim=1) / experts).clamp(min=1)
        record = {"expert_layers": layers,
                  "expert_tokens": [int(c) for c in counts.sum(dim=0).tolist()],
                  "expert_load_max": float(load.max()),
                  "router_aux_loss": aux_sum / (layers * micro_steps)}
        self._reset()
        return record


def parameter_counts(args: ModelArgs) -> tuple[int, int]:
    """The architecture's weights (LoRA factors not counted) and those one token uses: all but the
    experts it is not routed to (Mixtral 8x7B: 46.7B and 12.9B)."""
    total = active = 0
    for name, shape in expected_shapes(args).items():
        n = torch.Size(shape).numel()
        total += n
        active += n * args.moe.num_experts_per_tok // args.moe.num_experts if is_stacked(name, args) else n
    return total, active
