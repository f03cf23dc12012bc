"""Data pipeline throughput: validate + tokenize + mask + pack + collate, in one process.

Writes synthetic JSONL data (multi-turn chats, some with system prompts and tool calls; or
texts), then times, on the same rows:
  mistral-common   json.loads + ChatCompletionRequest + encode_chat_completion (the reference alone)
  mft pipeline     mft.data.store.build_store (read, decode, validate, encode ids + mask) +
                   packing plan + collating every batch, no cache, no workers
  mft cached       the same from the on-disk cache (a second run)
and prints tokens/s for each. Not a test: numbers depend on the machine.

    python tools/bench_data.py                      # chats, tokenizer v3
    python tools/bench_data.py --kind text --rows 4000 --tokenizer v7
"""

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import mistral_common
import numpy as np
import torch

from mft.data.dataset import PackedDataset, Part
from mft.data.store import EncodeSettings, build_store
from mft.data.tokenizer import _to_mistral, load_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches and "
         "every sailor knows the sea can be calm or rough depending on wind tide and luck").split()
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def chat_row(rng: random.Random, i: int) -> dict:
    messages = [{"role": "system", "content": sentence(rng, 12)}] if rng.random() < 0.3 else []
    for turn in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": sentence(rng, rng.randint(10, 60))})
        messages.append({"role": "assistant", "content": sentence(rng, rng.randint(20, 120))})
    row = {"messages": messages}
    if rng.random() < 0.2:  # a tool round trip before the final answer
        call_id = f"{i:09d}"
        final = messages.pop()
        messages += [
            {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function",
                                                  "function": {"name": "lookup", "arguments": json.dumps({"word": rng.choice(WORDS)})}}]},
            {"role": "tool", "content": json.dumps({"meaning": sentence(rng, 8)}), "tool_call_id": call_id},
            final,
        ]
        row["tools"] = [TOOL]
    return row


def text_row(rng: random.Random, i: int) -> dict:
    return {"text": " ".join(sentence(rng, rng.randint(8, 30)) for _ in range(rng.randint(5, 40)))}


def reference(path: Path, tokenizer) -> tuple[int, float]:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Tool

    start, tokens = time.perf_counter(), 0
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "text" in row:
                tokens += len(tokenizer.encode_text(row["text"]))
                continue
            request = ChatCompletionRequest(messages=[_to_mistral(m) for m in row["messages"]],
                                            tools=[Tool.model_validate(t) for t in row.get("tools", [])] or None)
            tokens += len(tokenizer.mistral.encode_chat_completion(request).tokens)
    return tokens, time.perf_counter() - start


def pipeline(path: Path, tokenizer, seq_len: int, batch_size: int, cache_dir) -> tuple[int, float]:
    start = time.perf_counter()
    store = build_store(path, tokenizer, EncodeSettings(), cache_dir=cache_dir, workers=0)
    ds = PackedDataset([Part(store, np.arange(len(store)))], seq_len, tokenizer.eos_id, "truncate", 0, True, "bench")
    for batch in ds.batches(batch_size):
        assert int(batch.loss_mask.sum()) > 0
    return store.num_tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["chat", "text"], default="chat")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--tokenizer", default="v3")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="best of N")
    args = parser.parse_args()

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.tokenizer)
    rng = random.Random(0)
    make = chat_row if args.kind == "chat" else text_row
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"bench_{args.kind}.jsonl"
        path.write_text("".join(json.dumps(make(rng, i)) + "\n" for i in range(args.rows)))
        print(f"{args.rows} {args.kind} rows, tokenizer {args.tokenizer}, seq_len {args.seq_len}, "
              f"python {platform.python_version()}, torch {torch.__version__}, mistral-common {mistral_common.__version__}")
        results = {}
        for name, run in (
            ("mistral-common encode only", lambda: reference(path, tokenizer)),
            ("mft validate+tokenize+mask+pack", lambda: pipeline(path, tokenizer, args.seq_len, args.batch_size, None)),
            ("mft from the tokenized cache", lambda: pipeline(path, tokenizer, args.seq_len, args.batch_size, Path(tmp) / "cache")),
        ):
            best = min((run() for _ in range(args.repeats)), key=lambda r: r[1])
            results[name] = best[0] / best[1]
            print(f"  {name:34s} {best[0]:>10,d} tokens in {best[1]:6.2f} s: {results[name]:>12,.0f} tokens/s")
        ratio = results["mft validate+tokenize+mask+pack"] / results["mistral-common encode only"]
        print(f"  pipeline / mistral-common: {ratio:.2f}")


if __name__ == "__main__":
    main()
