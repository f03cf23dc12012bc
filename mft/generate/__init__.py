"""Generation: KV cache with a rolling buffer (cache.py), cached forward (forward.py), sampling,
batched decoding (decode.py), Mistral chat and tool calls (chat.py), loading (load.py), the
mft-generate app (cli.py).

The decoding modules need only torch and mft.model; chat, load and cli add mistral-common and
Hydra. Nothing is imported here, so `import mft.generate.decode` stays light (the GPU benchmark
imports it on machines without Hydra or mistral-common).
"""
