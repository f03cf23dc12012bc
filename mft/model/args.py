"""Architecture hyper-parameters of a Mistral model (every family: 7B, Nemo, Small, Codestral,
Ministral, Ministral 3, Mixtral), named as in Mistral's params.json where it has a name."""

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class YarnArgs:
    """YaRN rope scaling (Ministral 3): frequencies between the two rotation bounds are interpolated
    by `factor`, and cos/sin are multiplied by an attention factor (transformers' formula).
    factor 1 is plain rope (YaRN's formulas then change nothing)."""

    factor: float = 1.0  # context extension factor; 1: no YaRN
    original_max_position_embeddings: int = 4096  # the context the rope was pretrained with
    beta_fast: float = 32.0  # rotations above which frequencies are kept (extrapolated)
    beta_slow: float = 1.0  # rotations below which frequencies are divided by factor (interpolated)
    mscale: float = 0.0  # with mscale_all_dim (both non-zero): the attention factor's numerator's log multiplier
    mscale_all_dim: float = 0.0  # its denominator's; either 0: the attention factor is 0.1 ln(factor) + 1

    def __post_init__(self) -> None:
        # transformers uses the two only as a pair: one of them 0 is the same model as both 0.
        if not (self.mscale and self.mscale_all_dim):
            self.mscale = self.mscale_all_dim = 0.0

    @property
    def active(self) -> bool:
        return self.factor != 1.0


@dataclass
class QueryScalingArgs:
    """Llama 4's position-dependent query scale (Ministral 3): q *= 1 + beta ln(1 + floor(pos / length))."""

    beta: float = 0.0  # strength of the scale; 0: no scale
    original_max_position_embeddings: int = 4096  # positions per scale step

    @property
    def active(self) -> bool:
        return self.beta != 0.0


@dataclass
class MoeArgs:
    """A sparse mixture-of-experts feed-forward (Mixtral): each token goes to `num_experts_per_tok`
    of `num_experts` SwiGLU experts of width hidden_dim. params.json's "moe" entry."""

    num_experts: int = 8  # experts per layer
    num_experts_per_tok: int = 2  # experts each token is routed to (top k)


def layer_windows(sliding_window: Any, n_layers: int) -> list[Optional[int]]:
    """Each layer's window from `sliding_window`: None (full causal everywhere), one int (every
    layer), or a list whose pattern repeats over the layers (mistral-inference's convention: the
    length divides n_layers; a null entry is a full-causal layer). Raises ValueError otherwise."""
    if sliding_window is None:
        return [None] * n_layers
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, (int, list, tuple)):
        raise ValueError(f"sliding_window {sliding_window!r}: expected null, a positive int or a list of them")
    pattern = [sliding_window] if isinstance(sliding_window, int) else list(sliding_window)
    if not pattern or n_layers % len(pattern) or any(
            w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0) for w in pattern):
        raise ValueError(f"sliding_window {sliding_window!r}: expected a positive int, or a list of positive ints "
                         f"and nulls whose length divides n_layers={n_layers}")
    return [pattern[i % len(pattern)] for i in range(n_layers)]


def arg_problems(args: "ModelArgs") -> list[tuple[str, object, str]]:
    """(key, value, what was expected) for each window or rope setting that cannot work (YaRN's
    formulas divide by beta_fast, beta_slow and ln(rope_theta)); empty when all can."""
    problems: list[tuple[str, object, str]] = []
    try:
        args.windows
    except ValueError:
        problems.append(("sliding_window", args.sliding_window, "a positive number of tokens, null for full causal "
                         f"attention, or a per-layer list of those whose length divides n_layers={args.n_layers}"))
    if args.rope_theta <= 0 or args.yarn.active and args.rope_theta == 1:
        problems.append(("rope_theta", args.rope_theta, "a positive number (not 1 with YaRN)"))
    if args.yarn.active:
        y = args.yarn
        checks = [("factor", y.factor > 1, "a number > 1 (1: no YaRN)"),
                  ("original_max_position_embeddings", y.original_max_position_embeddings > 0, "a positive number"),
                  ("beta_fast", y.beta_fast > 0, "a positive number"),
                  ("beta_slow", y.beta_slow > 0, "a positive number")]
        problems += [(f"yarn.{key}", getattr(y, key), expected) for key, ok, expected in checks if not ok]
    if args.moe is not None and not 0 < args.moe.num_experts_per_tok <= args.moe.num_experts:
        problems.append(("moe", args.moe, "num_experts_per_tok between 1 and num_experts"))
    if args.query_scaling.active and args.query_scaling.original_max_position_embeddings <= 0:
        problems.append(("query_scaling.original_max_position_embeddings",
                         args.query_scaling.original_max_position_embeddings, "a positive number"))
    return problems


@dataclass
class ModelArgs:
    """Shape of a Mistral transformer, named as in Mistral's params.json."""

    dim: int = 4096
    n_layers: int = 32
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # A query sees itself and the previous W - 1 tokens of its document. None: full causal; an
    # int: every layer; a list: a per-layer pattern repeated over the layers (null: full causal).
    sliding_window: Any = None
    # YaRN rope scaling (factor 1: plain rope).
    yarn: YarnArgs = field(default_factory=YarnArgs)
    # Llama 4's position-dependent query scale (beta 0: none).
    query_scaling: QueryScalingArgs = field(default_factory=QueryScalingArgs)
    # The output head shares the token embedding's weight.
    tied_embeddings: bool = False
    # A mixture-of-experts feed-forward in every block (Mixtral); None: a dense SwiGLU.
    moe: Optional[MoeArgs] = None

    def __post_init__(self) -> None:
        # From a plain dict (an adapter's saved args): nested settings become dataclasses. An
        # inactive setting is the default one, so two models that compute the same compare equal.
        yarn = YarnArgs(**self.yarn) if isinstance(self.yarn, dict) else self.yarn
        self.yarn = yarn if yarn is not None and yarn.active else YarnArgs()
        scaling = QueryScalingArgs(**self.query_scaling) if isinstance(self.query_scaling, dict) else self.query_scaling
        self.query_scaling = scaling if scaling is not None and scaling.active else QueryScalingArgs()
        if isinstance(self.moe, dict):
            self.moe = MoeArgs(**self.moe)
        if isinstance(self.sliding_window, tuple):
            self.sliding_window = list(self.sliding_window)

    @property
    def windows(self) -> list[Optional[int]]:
        """Each layer's window (None: full causal)."""
        return layer_windows(self.sliding_window, self.n_layers)
