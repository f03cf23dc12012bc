"""`Choice`: the base of every string option in the configs (precision=bf16, optim.schedule=cosine, ...).

OmegaConf types a config field by an Enum: Hydra rejects any other value at compose time and
lists the allowed ones. The members are also strings (str mixin, name == value), so code that
compares, hashes, formats or JSON-dumps them as strings works unchanged.
"""

from enum import Enum


class Choice(str, Enum):
    def __str__(self) -> str:  # "bf16", not "Precision.bf16", in logs and f-strings
        return self.value

    def __repr__(self) -> str:  # messages written with {x!r} keep reading precision='bf16'
        return repr(self.value)


class Precision(Choice):
    """Compute dtype, for mft-train and mft-generate alike."""

    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"
