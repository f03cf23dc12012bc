"""KV cache for decoding: a static key/value buffer per layer, rolling for sliding-window layers.

The model's forward takes a `CachePlan` (mft.model.transformer: `model(tokens, positions,
cache=plan)`); each attention layer then calls `plan.attend` instead of the packed backend.

Every layer's buffer has S slots, S = min(W, max length) for a window of W keys (so memory grows
with W, never with the conversation) and S = max length without a window. The token at position
p of a row lives in slot p % S; `slot_positions` says which position each slot holds (-1: empty).
Layers with the same window form a `SlotGroup` and share its `slot_positions`, since they write
the same slots; a model that interleaves windowed and full layers (Ministral) has two groups, and
keeps a full-length buffer only for its full layers. Attention masks come from positions,
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
class SlotGroup:
    """The layers that share one window, hence one slot layout."""

    window: Optional[int]  # keys a query sees (itself included); None: all earlier ones
    slot_positions: torch.Tensor  # (B, S) int64: the position each slot holds, -1 when empty

    @property
    def size(self) -> int:
        return self.slot_positions.shape[1]

    def holds(self, length: int) -> bool:
        """Whether rows of `length` tokens fit: all of them, or the last W of them when rolling."""
        return self.size >= length or (self.window is not None and self.size >= self.window)

    def holds_prefix(self, n: int) -> bool:
        """Whether row 0 still has the keys that a query at position n needs."""
        first = max(0, n - self.window + 1) if self.window is not None else 0
        needed = torch.arange(first, n, device=self.slot_positions.device)
        return bool((self.slot_positions[0, needed % self.size] == needed).all())


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer (B, n_kv_heads, S of its group, head_dim)
    values: list[torch.Tensor]
    groups: list[SlotGroup]
    layer_group: list[int]  # per layer: the index of its group

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
        windows = args.windows
        distinct = list(dict.fromkeys(windows))  # in order of first use
        sizes = [min(length, w) if rolling and w else length for w in distinct]
        groups = [SlotGroup(w, torch.full((batch, size), -1, device=device, dtype=torch.long))
                  for w, size in zip(distinct, sizes)]
        layer_group = [distinct.index(w) for w in windows]
        shapes = [(batch, args.n_kv_heads, sizes[g], args.head_dim) for g in layer_group]
        keys = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        values = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        return cls(keys, values, groups, layer_group)

    @property
    def batch(self) -> int:
        return self.groups[0].slot_positions.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def holds(self, length: int) -> bool:
        """Whether rows of `length` tokens fit in every layer."""
        return all(group.holds(length) for group in self.groups)

    def holds_prefix(self, n: int) -> bool:
        """Whether every layer of row 0 still has the keys that a query at position n needs."""
        return all(group.holds_prefix(n) for group in self.groups)

    def forget_from(self, position: int) -> None:
        """Drop every key at `position` or later (the rest of an earlier call past a shared prefix)."""
        for group in self.groups:
            group.slot_positions[group.slot_positions >= position] = -1

    def reset(self) -> None:
        """Forget every row (the buffers stay allocated at the same addresses, for CUDA graphs)."""
        for group in self.groups:
            group.slot_positions.fill_(-1)

    def mark_static(self) -> None:
        """Tell torch.compile the buffers keep their addresses, so CUDA graphs may mutate them."""
        for t in (*self.keys, *self.values, *(g.slot_positions for g in self.groups)):
            torch._dynamo.mark_static_address(t)


@dataclass
class GroupPlan:
    """What one forward does with one slot group."""

    mask: torch.Tensor  # (B, C, K) bool: query c of row b may attend key k
    rows: torch.Tensor  # (N,) row of each token to store
    cols: torch.Tensor  # (N,) its index in the chunk
    slots: torch.Tensor  # (N,) the slot it goes to


@dataclass
class CachePlan:
    """What one forward does with the cache; built once and shared by every layer."""

    cache: KVCache
    groups: list[GroupPlan]  # one per slot group of the cache
    write_first: bool  # decode: write, then attend over the slots; prefill: attend over slots + chunk, then write

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention of the step's T = B * C tokens, row-major, over the cache plus themselves.

        q (T, n_heads, hd), k and v (T, n_kv_heads, hd) -> (T, n_heads, hd); stores k and v.
        """
        plan = self.groups[self.cache.layer_group[layer]]
        B, C = plan.mask.shape[:2]
        q, k, v = (t.view(B, C, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        out = attend_cached(q, k, v, self.cache.keys[layer], self.cache.values[layer], plan, self.write_first)
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
    plans = []
    for group in cache.groups:
        slots = positions % group.size
        group.slot_positions[rows, slots] = positions
        mask = visible(positions[:, None, None], group.slot_positions[:, None, :], group.window)
        plans.append(GroupPlan(mask, rows, torch.zeros_like(rows), slots))
    return CachePlan(cache, plans, True)


def plan_prefill(cache: KVCache, positions: torch.Tensor, valid: torch.Tensor) -> CachePlan:
    """A chunk of tokens at `positions` (B, C); `valid` (B, C) is False on right padding.

    Keys are the S slots followed by the chunk. Padding keeps its (increasing) positions, so
    only padding after it can see it, and it is never stored. Per row only the last S valid
    tokens are stored (earlier ones would be evicted by later ones in the same chunk).
    """
    last = torch.where(valid, positions, -1).amax(dim=1, keepdim=True)
    plans = []
    for group in cache.groups:
        key_pos = torch.cat([group.slot_positions, positions], dim=1)  # a copy: taken before the write
        mask = visible(positions[:, :, None], key_pos[:, None, :], group.window)
        keep = valid & (positions > last - group.size)
        rows, cols = keep.nonzero(as_tuple=True)
        slots = positions[rows, cols] % group.size
        group.slot_positions[rows, slots] = positions[rows, cols]
        plans.append(GroupPlan(mask, rows, cols, slots))
    return CachePlan(cache, plans, False)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, plan: GroupPlan, write_first: bool) -> torch.Tensor:
    """Attention of q (B, n_heads, C, hd) over one layer's cache plus k, v (B, n_kv, C, hd); stores k, v.

    Grouped-query heads are folded into the query length: the n_heads / n_kv_heads query heads
    sharing a KV head become rows of one (B, n_kv, rep * C, hd) query, so SDPA sees plain
    multi-head attention with one mask for all heads, on every backend, without repeating K/V.
    """
    B, n_heads, C, hd = q.shape
    n_kv = k.shape[1]
    rep = n_heads // n_kv

    def store() -> None:
        key_cache[plan.rows, :, plan.slots] = k[plan.rows, :, plan.cols]
        value_cache[plan.rows, :, plan.slots] = v[plan.rows, :, plan.cols]

    if write_first:
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
