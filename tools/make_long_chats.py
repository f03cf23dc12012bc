"""Write a synthetic long-chat JSONL set: multi-turn conversations of roughly 2,000 to 4,000 tokens.

The data of issue 14's end-to-end measurement (`mft-train` at seq_len 4096): chats that long leave
gaps a greedy packer pads, and some run past 4096 tokens (with a system prompt and a long last
turn), which `data.too_long=split` continues in the next sequence. Deterministic (seeded, stdlib
only); the words are plain English, about 1.3 SentencePiece tokens each.

    python tools/make_long_chats.py /tmp/long_chats.jsonl --rows 2000
"""

import argparse
import json
import random
from pathlib import Path

WORDS = ("the model reads every token of a long conversation and learns to answer each question with "
         "care while the window slides over earlier turns so that memory stays small and training "
         "stays fast on one graphics card or many").split()
TOKENS_PER_WORD = 1.3


def paragraph(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of sentences of 8 to 24 words."""
    words, sentences = max(1, round(tokens / TOKENS_PER_WORD)), []
    while words > 0:
        n = min(words, rng.randint(8, 24))
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        words -= n
    return " ".join(sentences)


def long_chat(rng: random.Random) -> dict:
    """One conversation of 2,000-4,000 tokens over 2 to 6 exchanges, a system prompt in a third."""
    budget = rng.randint(2000, 4000)
    turns = rng.randint(2, 6)
    messages = [{"role": "system", "content": paragraph(rng, rng.randint(30, 120))}] if rng.random() < 0.33 else []
    for _ in range(turns):
        share = budget / turns
        messages.append({"role": "user", "content": paragraph(rng, share * rng.uniform(0.2, 0.4))})
        messages.append({"role": "assistant", "content": paragraph(rng, share * rng.uniform(0.6, 0.8))})
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    with open(opts.out, "w") as f:
        for _ in range(opts.rows):
            f.write(json.dumps(long_chat(rng)) + "\n")
    print(f"wrote {opts.rows} chats to {opts.out}")


if __name__ == "__main__":
    main()
