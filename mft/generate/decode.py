"""Batched generation: chunked prefill of prompts of any lengths, then one token per row per step.

Works on token ids only (no tokenizer, no Hydra), so benchmarks and tests can drive it directly.
Rows keep their own positions: prompts are padded on the right during prefill (padding is never
stored in the cache) and decoding continues each row from its own length. Rows that finished
keep stepping with the others (their tokens are dropped), which keeps every step's shapes static.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from mft.generate.fuse import fuse_projections, still_fused
from mft.generate.sampling import SamplingSettings, sample
from mft.model.kv_cache import KVCache, plan_decode, plan_prefill
from mft.model.transformer import FusedProjections, Transformer
from mft.utils.errors import MftError

TokenCallback = Callable[[int, int], None]  # (row, token id), called as each row's token is accepted


@dataclass
class Generation:
    tokens: list[int]  # generated ids; a stop token that ended the row is not included
    finish_reason: str  # "stop_token" | "stop_string" | "length"
    prompt_tokens: int = 0


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop_token_ids: Sequence[int] = ()  # e.g. the tokenizer's EOS
    stop_strings: Sequence[str] = ()  # checked on the decoded text; needs `detokenize`
    seed: Optional[int] = 0  # seeds sampling; None: not seeded


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Generator:
    """Generate with one model; keeps its KV cache (and compiled step) between calls.

    compile=True compiles the one-token decode step with static shapes; on CUDA in
    "reduce-overhead" mode, i.e. replayed as a CUDA graph (gpt-fast's recipe). The cache is
    reused while batch size and length fit, so the graph is recorded once per shape.
    fuse=True runs wq/wk/wv and w1/w3 as one matmul each (mft.generate.fuse: the model's weights
    become views of the fused tensors, no memory added).
    """

    def __init__(self, model: Transformer, *, prefill_chunk: int = 512, rolling: bool = True, compile: bool = False,
                 fuse: bool = True):
        if prefill_chunk <= 0:
            raise MftError(f"prefill_chunk must be positive, got {prefill_chunk}.")
        self.model = model.eval()
        self.fused = fuse_projections(model) if fuse else None
        self.args = model.args
        self.prefill_chunk = prefill_chunk
        self.rolling = rolling
        param = model.tok_embeddings.weight
        self.device, self.dtype = param.device, param.dtype
        self.cache: Optional[KVCache] = None
        self.history: Optional[list[int]] = None  # with one row: the tokens whose keys the cache holds
        self.prefilled = 0  # tokens the last call ran through prefill (all rows)
        self.compile = compile
        # A module-level function, not a bound method: stored on self, a bound method (compiled or
        # not) would make a reference cycle that keeps the fused weights alive after the
        # Generator is dropped, until the garbage collector happens to run.
        self._step = _decode_step
        if compile:
            for block in self.fused or []:
                for tensor in (block.qkv, block.w13):
                    if tensor is not None:  # a weight, not an input: CUDA graphs must not copy it per step
                        torch._dynamo.mark_static_address(tensor)
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            # fullgraph=False: a layer that breaks the graph (a custom kernel, say) costs speed, not an error.
            self._step = torch.compile(_decode_step, mode=mode, fullgraph=False, dynamic=False)

    # -- the two forwards ---------------------------------------------------------------------
    def decode_step(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) in fp32 for one token per row (B,) at positions (B,)."""
        self.history = None  # the cache now holds tokens generate() did not record
        return self._step(self.model, self.fused, cache, tokens, positions)

    def prefill(self, prompts: Sequence[Sequence[int]], cache: KVCache, start: int = 0) -> torch.Tensor:
        """Run the prompts through the model in chunks; logits (B, V) after each prompt's last token.

        `start`: the cache already holds every prompt's first `start` tokens (each prompt is longer).
        """
        self.history = None  # the cache now holds tokens generate() did not record
        lengths = [len(p) for p in prompts]
        B, L = len(prompts), max(lengths)
        tokens = torch.zeros((B, L - start), dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, : len(p) - start] = torch.as_tensor(list(p[start:]), dtype=torch.long)
        tokens = tokens.to(self.device)
        positions = torch.arange(start, L, device=self.device).expand(B, L - start)
        last = torch.tensor(lengths, device=self.device)[:, None] - 1
        valid = positions <= last
        logits = torch.empty((B, self.args.vocab_size), device=self.device, dtype=torch.float32)
        for c0 in range(0, L - start, self.prefill_chunk):
            chunk = slice(c0, c0 + self.prefill_chunk)
            plan = plan_prefill(cache, positions[:, chunk], valid[:, chunk])
            is_last = positions[:, chunk] == last  # (B, C): at most one per row
            out = self.model(tokens[:, chunk], positions[:, chunk], head_mask=is_last, cache=plan, fused=self.fused)
            logits[is_last.any(dim=1)] = out.float()  # the head ran on those rows' last tokens, in row order
        self.prefilled = B * (L - start)
        return logits

    # -- the cache ----------------------------------------------------------------------------
    def cache_for(self, batch: int, length: int) -> KVCache:
        """A reset cache for `batch` rows of `length` tokens: the current one when it fits."""
        self.history = None
        cache = self.cache
        if cache is None or cache.batch != batch or not cache.holds(length):
            # Round up so that a chat's growing turns reuse one buffer (and one CUDA graph).
            size = _round_up(length, 256)  # a windowed layer's buffer holds at most its window
            cache = KVCache.allocate(self.args, batch, size, device=self.device, dtype=self.dtype, rolling=self.rolling)
            if self.compile:
                cache.mark_static()
            self.cache = cache
        cache.reset()
        return cache

    def cached_prefix(self, prompt: Sequence[int], length: int) -> int:
        """How many leading tokens of `prompt` the cache's one row holds from the last call and can
        keep for rows of `length` tokens: 0 when none (another batch size, a cache too small,
        or keys the next token needs already evicted from a rolling buffer). At most
        len(prompt) - 1: the last token is always run, for its logits."""
        cache, history = self.cache, self.history
        if cache is None or history is None or cache.batch != 1 or not cache.holds(length):
            return 0
        n, limit = 0, min(len(history), len(prompt) - 1)
        while n < limit and history[n] == prompt[n]:
            n += 1
        if n == 0:
            return 0
        # The next token (position n) sees keys n - W + 1 .. n - 1 (every earlier one without a window).
        return n if cache.holds_prefix(n) else 0

    # -- the loop -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: GenerationSettings,
        *,
        detokenize: Optional[Callable[[list[int]], str]] = None,
        on_token: Optional[TokenCallback] = None,
        reuse_prefix: bool = False,
    ) -> list[Generation]:
        """One Generation per prompt.

        reuse_prefix=True (one prompt, e.g. the next turn of a chat): the tokens the prompt shares
        with the last call's prompt + output are not run again; their keys and values stay in the
        cache (see cached_prefix). The tokens are those of a fresh call up to rounding (the prefill
        chunks start at other positions).
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise MftError("every prompt needs at least one token (a BOS at least).")
        if settings.max_new_tokens <= 0:
            raise MftError(f"max_new_tokens must be positive, got {settings.max_new_tokens}.")
        if settings.stop_strings and detokenize is None:
            raise ValueError("stop_strings need a detokenize function")
        if self.fused is not None and not still_fused(self.model, self.fused):
            raise MftError("the model's projection layers were replaced after this Generator fused them "
                           "(quantised, converted or moved?): make a new Generator for the model as it is now.")
        real = len(prompts)
        if self.compile and self.cache is not None and real < self.cache.batch:
            # A smaller batch (the last of a file, say) rides in the recorded shape: copies of the
            # first prompt fill it, finished from the start, instead of a new graph being recorded.
            prompts = list(prompts) + [prompts[0]] * (self.cache.batch - real)
        B = len(prompts)
        lengths = [len(p) for p in prompts]
        total = max(lengths) + settings.max_new_tokens
        start = self.cached_prefix(prompts[0], total) if reuse_prefix and B == 1 else 0
        self.history = None  # until this call completes, the cache holds nothing reusable
        if start:
            cache = self.cache
            cache.forget_from(start)  # the old call's tokens past the shared prefix
        else:
            cache = self.cache_for(B, total)
        generator = None
        if not settings.sampling.greedy and settings.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        stop_ids = set(settings.stop_token_ids)
        tail = max((len(s) for s in settings.stop_strings), default=0) + 8

        outputs: list[list[int]] = [[] for _ in prompts]
        reasons: list[Optional[str]] = [None] * real + ["padding"] * (B - real)
        positions = torch.tensor(lengths, device=self.device)
        reader = _TokenReader(B, self.device)
        next_tokens = sample(self.prefill(prompts, cache, start), settings.sampling, generator)
        reader.send(next_tokens, 0)
        fed: list[int] = []  # row 0's tokens that went through a decode step (their keys are cached)
        for i in range(settings.max_new_tokens):
            # Step i + 1 is queued before step i's tokens reach the host, so the GPU never waits
            # for the Python below; a row that stops at step i thus costs one unused step.
            if i + 1 < settings.max_new_tokens:
                if self.compile and self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
                logits = self.decode_step(cache, next_tokens, positions + i)
                next_tokens = sample(logits, settings.sampling, generator)
                reader.send(next_tokens, i + 1)
            received = reader.receive(i)
            if i + 1 < settings.max_new_tokens:
                fed.append(received[0])
            for b, token in enumerate(received):
                if reasons[b] is not None:
                    continue
                if token in stop_ids:
                    reasons[b] = "stop_token"
                    continue
                outputs[b].append(token)
                if on_token is not None:
                    on_token(b, token)
                if settings.stop_strings and any(s in detokenize(outputs[b][-tail:]) for s in settings.stop_strings):
                    reasons[b] = "stop_string"
            if all(r is not None for r in reasons):
                break
        if B == 1:
            self.history = list(prompts[0]) + fed
        return [Generation(out, r or "length", n) for out, r, n in zip(outputs[:real], reasons[:real], lengths[:real])]


def _decode_step(model: Transformer, fused: Optional[list[FusedProjections]], cache: KVCache, tokens: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    plan = plan_decode(cache, positions)
    return model(tokens[:, None], positions[:, None], cache=plan, fused=fused).float()


class _TokenReader:
    """Brings each step's sampled tokens (B,) to the host without waiting for later queued steps.

    On CUDA a plain `.tolist()` would wait for everything queued on the stream, the next step
    included; instead each step's tokens are copied into pinned memory (two buffers, used in
    turn) behind an event, and reading waits for that event only.
    """

    def __init__(self, batch: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffers: list = [None, None]
        if self.cuda:
            self.buffers = [torch.empty(batch, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self.events = [torch.cuda.Event(), torch.cuda.Event()]

    def send(self, tokens: torch.Tensor, step: int) -> None:
        if not self.cuda:
            self.buffers[step % 2] = tokens
            return
        self.buffers[step % 2].copy_(tokens, non_blocking=True)
        self.events[step % 2].record()

    def receive(self, step: int) -> list[int]:
        if self.cuda:
            self.events[step % 2].synchronize()
        return self.buffers[step % 2].tolist()
