"""Generation: batched decoding through the model's own forward over its KV cache (decode.py; the
cache is mft/model/kv_cache.py), fused projections (fuse.py), sampling, Mistral chat and tool calls
(chat.py), loading through the build pipeline (load.py), int4 decoding kernels (int4.py), the
mft-generate app (cli.py).

The decoding modules need only torch and mft.model; chat and cli add mistral-common and
Hydra. Nothing is imported here, so `import mft.generate.decode` stays light (the GPU benchmark
imports it on machines without Hydra or mistral-common).
"""
