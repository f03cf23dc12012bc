"""Samples -> token ids with a per-token supervision mask.

mask[i] says whether ids[i] is trained on when predicted from ids[:i]; the packer turns a
document of L ids into L-1 (input, target, mask) positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from mft.data.samples import ChatSample, Sample, TextSample
from mft.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    mask: list[bool]
    source: str = ""  # "path:line" of the sample, for error messages and debugging
    is_text: bool = False  # text documents continue into the next sequence; chats follow data.too_long

    def __post_init__(self):
        assert len(self.ids) == len(self.mask), (len(self.ids), len(self.mask))

    @property
    def num_supervised(self) -> int:
        """Supervised targets: the first id is never a target."""
        return sum(self.mask[1:])


def encode_sample(sample: Sample, tokenizer: Tokenizer, control: str = "warn") -> Encoded:
    """Text: BOS + text + EOS, all but BOS supervised. Chat: Tokenizer.encode_chat.

    control="map" turns literal control strings in text samples into control tokens; chat
    content is always plain text, as mistral-common encodes it.
    """
    if isinstance(sample, TextSample):
        ids = tokenizer.encode_text(sample.text, bos=True, eos=True, control=control)
        return Encoded(ids, [False] + [True] * (len(ids) - 1), sample.source, is_text=True)
    if isinstance(sample, ChatSample):
        ids, mask = tokenizer.encode_chat(sample.messages, sample.tools, sample.reasoning_effort)
        return Encoded(ids, mask, sample.source, is_text=False)
    raise TypeError(f"not a sample: {type(sample).__name__}")


def control_strings(sample: Sample, tokenizer: Tokenizer) -> list[str]:
    """Literal control strings ("<s>", "[INST]", ...) in a sample's text, which would otherwise be
    tokenized as characters."""
    if isinstance(sample, TextSample):
        return tokenizer.find_control_strings(sample.text)
    found = []
    for m in sample.messages:
        for text in m.texts():
            found += tokenizer.find_control_strings(text)
    return found
