"""KV cache for decoding: a static key/value buffer per layer, rolling for sliding-window models.

The model's forward takes a `CachePlan` (mft.model.transformer: `model(tokens, positions,
cache=plan)`); each attention layer then calls `plan.attend` instead of the packed backend.

Every layer's buffer has S slots, S = min(W, max length) for a window of W keys (so memory grows
with W, never with the conversation) and S = max length without a window. The token at position
p of a row lives in slot p % S; `slot_positions` says which position each slot holds (-1: empty)
and is shared by all layers, which write the same slots. Attention masks come from positions,
not from slot order: key j is visible to query q when 0 <= slot_positions[j] <= q and, with a
window, q - slot_positions[j] < W (the query itself and the W - 1 tokens before it).

A forward over the cache is planned once (`plan_prefill`, `plan_decode`) and the plan is passed
to the model's forward, which shares it between every layer:
- decode (one token per row): write the new key first, then attend over the S slots. Writing
  slot p % S evicts position p - S, which a window of W <= S no longer needs: static shapes,
  so the step can be compiled and captured in a CUDA graph.
- prefill (a chunk of C tokens per row, rows padded on the right): attend over the S slots
  concatenated with the chunk's own keys, then write the chunk's last S valid tokens. This is
  right for any C, also chunks longer than the window, whose later tokens would otherwise evict
  keys the chunk's earlier queries still need.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from mft.model.args import ModelArgs


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer (B, n_kv_heads, S, head_dim)
    values: list[torch.Tensor]
    slot_positions: torch.Tensor  # (B, S) int64: the position each slot holds, -1 when empty
    window: Optional[int]  # keys a query sees (itself included); None: all earlier ones

    @classmethod
    def allocate(
        cls,
        args: ModelArgs,
        batch: int,
        length: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        rolling: bool = True,
    ) -> "KVCache":
        """A cache for `batch` rows of up to `length` tokens (prompt + generated) each.

        rolling=False keeps every position even with a sliding window (S = length): the
        reference the rolling buffer is tested against.
        """
        window = args.sliding_window
        size = min(length, window) if rolling and window else length
        shape = (batch, args.n_kv_heads, size, args.head_dim)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        slots = torch.full((batch, size), -1, device=device, dtype=torch.long)
        return cls(keys, values, slots, window)

    @property
    def batch(self) -> int:
        return self.slot_positions.shape[0]

    @property
    def size(self) -> int:
        return self.slot_positions.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def holds(self, length: int) -> bool:
        """Whether rows of `length` tokens fit: all of them, or the last W of them when rolling."""
        return self.size >= length or (self.window is not None and self.size >= self.window)

    def reset(self) -> None:
        """Forget every row (the buffers stay allocated at the same addresses, for CUDA graphs)."""
        self.slot_positions.fill_(-1)

    def mark_static(self) -> None:
        """Tell torch.compile the buffers keep their addresses, so CUDA graphs may mutate them."""
        for t in (*self.keys, *self.values, self.slot_positions):
            torch._dynamo.mark_static_address(t)


@dataclass
class CachePlan:
    """What one forward does with the cache; built once and shared by every layer."""

    cache: KVCache
    mask: torch.Tensor  # (B, C, K) bool: query c of row b may attend key k
    write_first: bool  # decode: write, then attend over the slots; prefill: attend over slots + chunk, then write
    rows: torch.Tensor  # (N,) row of each token to store
    cols: torch.Tensor  # (N,) its index in the chunk
    slots: torch.Tensor  # (N,) the slot it goes to

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention of the step's T = B * C tokens, row-major, over the cache plus themselves.

        q (T, n_heads, hd), k and v (T, n_kv_heads, hd) -> (T, n_heads, hd); stores k and v.
        """
        B, C = self.mask.shape[:2]
        q, k, v = (t.view(B, C, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        out = attend_cached(q, k, v, self.cache, layer, self)  # (B, n_heads, C, hd)
        return out.transpose(1, 2).reshape(B * C, out.shape[1], out.shape[3])


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """True where a query at query_pos may see a key at key_pos (-1 = empty slot); broadcasts."""
    allowed = (key_pos >= 0) & (key_pos <= query_pos)
    if window is not None:
        allowed &= query_pos - key_pos < window
    return allowed


def plan_decode(cache: KVCache, positions: torch.Tensor) -> CachePlan:
    """One new token per row at `positions` (B,); records them in slot_positions.

    Needs every row's previous W - 1 positions to survive the write: true when S >= W, and
    when S covers every position (no slot is ever reused).
    """
    rows = torch.arange(cache.batch, device=positions.device)
    slots = positions % cache.size
    cache.slot_positions[rows, slots] = positions
    mask = visible(positions[:, None, None], cache.slot_positions[:, None, :], cache.window)
    return CachePlan(cache, mask, True, rows, torch.zeros_like(rows), slots)


def plan_prefill(cache: KVCache, positions: torch.Tensor, valid: torch.Tensor) -> CachePlan:
    """A chunk of tokens at `positions` (B, C); `valid` (B, C) is False on right padding.

    Keys are the S slots followed by the chunk. Padding keeps its (increasing) positions, so
    only padding after it can see it, and it is never stored. Per row only the last S valid
    tokens are stored (earlier ones would be evicted by later ones in the same chunk).
    """
    key_pos = torch.cat([cache.slot_positions, positions], dim=1)  # a copy: taken before the write
    mask = visible(positions[:, :, None], key_pos[:, None, :], cache.window)
    last = torch.where(valid, positions, -1).amax(dim=1, keepdim=True)
    keep = valid & (positions > last - cache.size)
    rows, cols = keep.nonzero(as_tuple=True)
    slots = positions[rows, cols] % cache.size
    cache.slot_positions[rows, slots] = positions[rows, cols]
    return CachePlan(cache, mask, False, rows, cols, slots)


def attend_cached(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int, plan: CachePlan
) -> torch.Tensor:
    """Attention of q (B, n_heads, C, hd) over the cache plus k, v (B, n_kv, C, hd); stores k, v.

    Grouped-query heads are folded into the query length: the n_heads / n_kv_heads query heads
    sharing a KV head become rows of one (B, n_kv, rep * C, hd) query, so SDPA sees plain
    multi-head attention with one mask for all heads, on every backend, without repeating K/V.
    """
    B, n_heads, C, hd = q.shape
    n_kv = k.shape[1]
    rep = n_heads // n_kv
    key_cache, value_cache = cache.keys[layer], cache.values[layer]

    def store() -> None:
        key_cache[plan.rows, :, plan.slots] = k[plan.rows, :, plan.cols]
        value_cache[plan.rows, :, plan.slots] = v[plan.rows, :, plan.cols]

    if plan.write_first:
        store()
        keys, values = key_cache, value_cache
    else:
        keys, values = torch.cat([key_cache, k], dim=2), torch.cat([value_cache, v], dim=2)
        store()
    # Query head h uses KV head h // rep (the repeat_interleave convention of transformers).
    q = q.reshape(B, n_kv, rep * C, hd)
    mask = plan.mask[:, None].expand(B, rep, C, plan.mask.shape[-1]).reshape(B, 1, rep * C, -1)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return out.reshape(B, n_heads, C, hd)
