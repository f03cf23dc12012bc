"""Mixtral's sparse feed-forward: a router picks k of E SwiGLU experts per token.

The router is a linear layer (`gate`, E x dim); its softmax over the experts (in fp32) is cut to
the top k and renormalised over them, as transformers' Mixtral and mistral-inference compute it
(mistral-inference takes the softmax of the top-k logits, the same numbers). The experts' weights
are stacked, one (E, out, in) tensor per projection (`w1`, `w2`, `w3`, `GroupedLinear`), and run
as grouped matrix products over the token copies sorted by expert: expert e multiplies rows
offsets[e-1]:offsets[e]. On CUDA in bf16 that is torch's grouped GEMM (one kernel for all
experts; measured on an H200, an expert without rows costs nothing, so decoding reads only the
chosen experts' weights); elsewhere a loop over the experts. Decoding (no gradient, at most as
many token copies as experts) on any other path multiplies each copy by its own expert's weight,
gathered (`forward_rows`, 4-bit stacks dequantise only those experts), without the loop's host
sync, so a compiled decode step stays one graph.

Checkpoints store one tensor per expert (`layers.{i}.feed_forward.experts.{j}.w1.weight`,
mistral-inference's names); mft's model holds them stacked (`layers.{i}.feed_forward.w1.weight`),
so LoRA, quantisation and FSDP see one layer per projection (mft/checkpoint/ splits and stacks).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mft.kernels.grouped import grouped_linear, uses_grouped_gemm
from mft.model.args import ModelArgs


def project_grouped(x: torch.Tensor, offsets: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """The grouped products of `layers` that all read `x` (w1 and w3), in order: computed together
    when every layer is of one type that defines `project_grouped_together(x, offsets, layers)`
    (GroupedLoRALinear shares one grouped product for their A factors), else each on its own.
    The grouped counterpart of mft.model.transformer.project."""
    kind = type(layers[0])
    together = getattr(kind, "project_grouped_together", None)
    if together is not None and all(type(layer) is kind for layer in layers):
        return together(x, offsets, layers)
    return [layer(x, offsets) for layer in layers]


class GroupedLinear(nn.Module):
    """G bias-free linear layers of one shape, stacked: `weight` (G, out, in). forward(x, offsets)
    multiplies each group's rows by its own weight (grouped_linear)."""

    def __init__(self, groups: int, in_features: int, out_features: int):
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, self.weight, offsets)

    def forward_rows(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Row n of x (N, in) times weight[group[n]]: (N, out). Reads the N named groups' weights only
        (gathered, no host sync): for a few rows, as in decoding."""
        return torch.bmm(self.weight[group], x[:, :, None])[:, :, 0]

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in={self.in_features}, out={self.out_features}"


@dataclass
class Routing:
    """Which experts each token goes to, as the grouped products need it: the T * k token copies
    sorted by expert (stable: token order within an expert)."""

    token: torch.Tensor  # (T * k,) the token each sorted copy comes from
    expert: torch.Tensor  # (T * k,) the expert each sorted copy goes to
    weight: torch.Tensor  # (T * k,) fp32, its renormalised router probability
    offsets: torch.Tensor  # (E,) int32, end of each expert's rows among the sorted copies
    counts: torch.Tensor  # (E,) int64, copies per expert (tokens routed to it)
    aux_loss: torch.Tensor  # fp32 scalar, the load-balancing loss of this routing (see route)


def route(logits: torch.Tensor, k: int) -> Routing:
    """The top-k routing of router `logits` (T, E).

    aux_loss is Switch / Mixtral's load-balancing loss E * sum_e f_e P_e: f_e the fraction of the
    T * k assignments that went to expert e, P_e the mean router probability of e over the tokens
    (transformers' `load_balancing_loss_func` for one layer). It is 1 when routing is uniform."""
    n_experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    top_weight, top_expert = torch.topk(probs, k, dim=-1)
    top_weight = top_weight / top_weight.sum(dim=-1, keepdim=True)
    expert = top_expert.reshape(-1)
    order = torch.argsort(expert, stable=True)
    counts = expert.new_zeros(n_experts).scatter_add_(0, expert, torch.ones_like(expert))  # static shape, unlike bincount
    fraction = counts.float() / max(expert.numel(), 1)
    aux_loss = n_experts * (fraction * probs.mean(dim=0)).sum()
    return Routing(token=order // k, expert=expert[order], weight=top_weight.reshape(-1)[order], counts=counts,
                   offsets=torch.cumsum(counts, 0).to(torch.int32), aux_loss=aux_loss)


class _AddAuxGradient(torch.autograd.Function):
    """Identity on `out` whose backward also sends `scale` into `aux_loss`: the load-balancing
    loss joins the training loss's gradient without leaving the block (Megatron-LM's way), so
    activation checkpointing and compiled blocks need no side output."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux_loss.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_full(ctx.aux_shape, ctx.scale, dtype=torch.float32), None


class MoEFeedForward(nn.Module):
    """A sparse SwiGLU feed-forward: out = sum over the chosen experts e of p_e w2_e(silu(w1_e x) * w3_e x).

    `aux_loss_scale` (set by the training loop; 0: off) is the weight of this layer's
    load-balancing loss in the training loss. `routing_stats` holds, after each forward, the
    detached (tokens per expert, aux loss) of that forward, for the metrics (a checkpoint's
    recompute writes the same values again)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.moe is not None
        self.n_experts, self.top_k = args.moe.num_experts, args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, self.n_experts, bias=False)
        self.w1 = GroupedLinear(self.n_experts, args.dim, args.hidden_dim)
        self.w2 = GroupedLinear(self.n_experts, args.hidden_dim, args.dim)
        self.w3 = GroupedLinear(self.n_experts, args.dim, args.hidden_dim)
        self.aux_loss_scale = 0.0
        self.routing_stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.record_routing = True  # False where a compiled checkpoint forbids the side effect (parallelize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = route(self.gate(x), self.top_k)
        if self.record_routing:
            self.routing_stats = (routing.counts.detach(), routing.aux_loss.detach())
        xs = x[routing.token]
        if self._by_row(xs):
            gate, up = self.w1.forward_rows(xs, routing.expert), self.w3.forward_rows(xs, routing.expert)
        else:
            gate, up = project_grouped(xs, routing.offsets, self.w1, self.w3)
        hidden = F.silu(gate) * up
        expert_out = (self.w2.forward_rows(hidden, routing.expert) if self._by_row(hidden)
                      else self.w2(hidden, routing.offsets))
        # Weighted in fp32 and cast back, as transformers does before summing the k experts.
        ys = (expert_out * routing.weight[:, None]).to(x.dtype)
        out = x.new_zeros(x.shape).index_add_(0, routing.token, ys)
        if self.aux_loss_scale and torch.is_grad_enabled():
            out = _AddAuxGradient.apply(out, routing.aux_loss, self.aux_loss_scale)
        return out

    def _by_row(self, copies: torch.Tensor) -> bool:
        """Whether the experts run per token copy (forward_rows) rather than as grouped products:
        when decoding (no gradient: training keeps one path) with at most as many copies as
        experts, so the gathered weights are never more than the whole stack, only when every
        expert layer has forward_rows, and not for dense experts (adapted or not) on torch's
        grouped GEMM, which already skips the empty experts."""
        layers = (self.w1, self.w2, self.w3)
        if torch.is_grad_enabled() or copies.shape[0] > self.n_experts:
            return False
        dense = all(isinstance(getattr(layer, "weight", None), torch.Tensor) for layer in layers)  # LoRA'd too
        if dense and uses_grouped_gemm(copies, self.w1.weight):
            return False
        return all(hasattr(layer, "forward_rows") for layer in layers)

