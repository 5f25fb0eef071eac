"""Compact KV caches and the generation plumbing shared by the G2TR models.

Under G2TR the KV cache is shorter than the caller's token ids: the slots of merged image tokens never enter it
(an image block of N placeholders leaves K + 2 entries). Everything in transformers' `generate` that looks at a
cache measures it in the caller's positions: on a call that continues from a cache it feeds
`input_ids[:, cache.get_seq_length():]`, assisted decoding sizes the draft model's cache the same way, and crops are
counted back from those lengths. So the cache must answer in the caller's positions while it stores the compact
entries.

The mechanism chosen here: the first forward that sees a cache turns it, in place, into a *compact cache*: the same
object, same layers and tensors, whose class gains `CompactCacheMixin`. Its `get_seq_length()` reports the caller's
(logical) length, `stored_length()` the number of entries it actually holds, and its `layout` records, entry by
entry and row by row, which entries are real tokens and at which RoPE position they sit. Why in place, and why not
a subclass that generate would create: generate builds the cache itself (dynamic, static, quantized or offloaded,
depending on its arguments) and users pass caches of their own; converting whichever object arrives keeps every
one of those working, and the converted object is the one generate and the user keep (so a cache returned by one
`generate` call continues correctly in the next). The models never use the logical length internally; they build
their masks and positions from the layout.

Crops (assisted decoding, stopping rollbacks) only ever remove generated text from the end of the cache, where
logical and stored positions advance together, so a relative crop is exact. Beam reordering and batch expansion
are applied to the layout as well.

This module travels to the Hub with the model files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import logging

from .compat import CACHE_KWARG, compute_dtype, pop_cache_argument


logger = logging.get_logger(__name__)

__all__ = [
    "CacheLayout",
    "CompactCacheMixin",
    "G2TRGenerationMixin",
    "as_compact_cache",
    "cached_layout",
    "compact_targets",
    "compaction_index",
    "continuation_image_index",
    "ids_from_embeddings",
    "inside_blocks",
    "open_compact_cache",
    "stored_length",
]


@dataclass
class CacheLayout:
    """What a compact KV cache holds, entry by entry, for each row.

    Attributes:
        attention_mask: [B, P] bool, True for entries that are real tokens (False: left padding, including the
            padding that re-aligns rows after their dropped slots were removed).
        position_ids: [B, P] long, the RoPE position of every entry.
        dropped: how many of the caller's positions are not stored (logical length - stored length).
    """

    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    dropped: int = 0

    @classmethod
    def empty(cls, batch_size: int, device: torch.device | str | None = None) -> CacheLayout:
        empty = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return cls(empty.bool(), empty, 0)

    @property
    def next_position(self) -> torch.Tensor:
        """[B] the RoPE position that follows the last real entry of every row (0 for an empty row)."""
        if self.position_ids.shape[1] == 0:
            return torch.zeros(self.position_ids.shape[0], dtype=torch.long, device=self.position_ids.device)
        return self.position_ids.masked_fill(~self.attention_mask, -1).amax(dim=-1) + 1

    def extended(self, attention_mask: torch.Tensor, position_ids: torch.Tensor, dropped: int = 0) -> CacheLayout:
        """The layout after `attention_mask` / `position_ids` [B, L] entries were stored for `L + dropped` caller
        positions."""
        return CacheLayout(
            torch.cat([self.attention_mask, attention_mask.to(self.attention_mask.device)], dim=-1),
            torch.cat([self.position_ids, position_ids.to(self.position_ids.device)], dim=-1),
            self.dropped + dropped,
        )

    def cropped(self, length: int) -> CacheLayout:
        """The first `length` stored entries."""
        return replace(self, attention_mask=self.attention_mask[:, :length], position_ids=self.position_ids[:, :length])

    def select_rows(self, index: torch.Tensor) -> CacheLayout:
        index = index.to(self.attention_mask.device)
        return replace(self, attention_mask=self.attention_mask[index], position_ids=self.position_ids[index])


def stored_length(cache: Cache, layer_idx: int = 0) -> int:
    """Entries a cache physically holds (its own `get_seq_length`, whatever the logical length says)."""
    if isinstance(cache, CompactCacheMixin):
        return int(cache.stored_length(layer_idx))
    return int(cache.get_seq_length(layer_idx))


class CompactCacheMixin:
    """Mixed into a transformers `Cache` by `as_compact_cache`: the cache answers in the caller's positions.

    `layout` is a `CacheLayout` (None until the first forward stores something).
    """

    layout: CacheLayout | None = None

    def stored_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The caller's length: stored entries plus the positions whose tokens were merged away."""
        dropped = self.layout.dropped if self.layout is not None else 0
        return super().get_seq_length(layer_idx) + dropped

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Where new queries sit among the stored entries (transformers >= 5.24 builds masks from it; its default
        reads `get_seq_length`, which here answers in the caller's positions)."""
        parent = getattr(super(), "get_query_offset", None)
        if parent is None:
            return self.stored_length(layer_idx)
        dropped = self.layout.dropped if self.layout is not None else 0
        return parent(layer_idx) - dropped

    def crop(self, tokens_to_remove: int) -> None:
        """Remove entries from the end. A negative value counts entries to remove (transformers >= 5.17); a positive
        one is the legacy absolute length, read in the caller's positions."""
        if tokens_to_remove > 0:
            dropped = self.layout.dropped if self.layout is not None else 0
            target = tokens_to_remove - dropped
            if target < 0:
                raise ValueError(
                    f"Cannot crop this cache to {tokens_to_remove} positions: its first "
                    f"{dropped + self.stored_length()} positions hold reduced image blocks, which cannot be cut "
                    "apart. Crop only generated text."
                )
            tokens_to_remove = min(0, target - int(self.stored_length()))
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.layout is not None:
            self.layout = self.layout.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.layout is not None:
            rows = torch.arange(self.layout.attention_mask.shape[0]).repeat_interleave(repeats)
            self.layout = self.layout.select_rows(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.layout is not None:
            self.layout = self.layout.select_rows(indices)


_COMPACT_CLASSES: dict[type, type] = {}


def _compact_class(cache_class: type) -> type:
    if cache_class not in _COMPACT_CLASSES:
        name = f"Compact{cache_class.__name__}"
        compact = type(name, (CompactCacheMixin, cache_class), {"__module__": __name__, "__qualname__": name})
        # Reachable by name, so that a compact cache pickles like the cache it came from.
        globals()[name] = compact
        _COMPACT_CLASSES[cache_class] = compact
    return _COMPACT_CLASSES[cache_class]


def as_compact_cache(cache: Cache) -> Cache:
    """Turn `cache` (any transformers `Cache`) into a compact cache in place, and return it. A cache that holds
    entries but no layout was filled by something else: its entries are taken for plain tokens."""
    if not isinstance(cache, CompactCacheMixin):
        cache.__class__ = _compact_class(type(cache))
    return cache


def cached_layout(
    cache: Cache | None, batch_size: int, device: torch.device, attention_mask: torch.Tensor | None = None
) -> CacheLayout:
    """The layout of what `cache` already holds, cropped to its stored length (caches can be cropped by generate).

    A cache filled outside these models (no layout) is assumed to hold plain tokens aligned with the first columns
    of `attention_mask`, positions counted over its real tokens.
    """
    if cache is None:
        return CacheLayout.empty(batch_size, device)
    length = stored_length(cache)
    if length == 0:
        return CacheLayout.empty(batch_size, device)
    layout = getattr(cache, "layout", None)
    if layout is None:
        logger.warning_once(
            "The KV cache carries no G2TR layout; assuming its entries are plain text tokens aligned with the first "
            "columns of `attention_mask`."
        )
        if attention_mask is not None and attention_mask.shape[1] >= length:
            mask = attention_mask[:, :length].to(device).bool()
        else:
            mask = torch.ones(batch_size, length, dtype=torch.bool, device=device)
        return CacheLayout(mask, (mask.long().cumsum(-1) - 1).clamp(min=0), 0)
    if layout.attention_mask.shape[1] < length:
        raise ValueError(
            f"The KV cache holds {length} entries but its G2TR layout only {layout.attention_mask.shape[1]}: it was "
            "extended outside this model."
        )
    if layout.attention_mask.shape[0] != batch_size:
        raise ValueError(
            f"The KV cache holds {layout.attention_mask.shape[0]} rows but the inputs have {batch_size}."
        )
    return layout.cropped(length)


def open_compact_cache(
    cache: Cache | None,
    use_cache: bool,
    text_config,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    length: int,
    device: torch.device,
) -> tuple[Cache | None, CacheLayout, torch.Tensor]:
    """The start of every G2TR forward: the cache to write (a new `DynamicCache` when `use_cache` and none is given,
    made compact), the layout of what it already holds, and the mask of the `length` new tokens [B, L] bool (the last
    columns of the caller's 2-D `attention_mask`, all True without one)."""
    if use_cache and cache is None:
        cache = DynamicCache(config=text_config)
    if cache is not None:
        as_compact_cache(cache)
    layout = cached_layout(cache, batch_size, device, attention_mask)
    if attention_mask is None:
        return cache, layout, torch.ones(batch_size, length, dtype=torch.bool, device=device)
    return cache, layout, attention_mask[:, -length:].to(device).bool()


def continuation_image_index(
    images_per_row_total: torch.Tensor, images_per_row_new: torch.Tensor
) -> torch.Tensor:
    """Packed indices of the images that a continuation feeds, when the caller re-passed all of them.

    Images are packed row after row, in order of appearance; the first `total - new` images of every row are already
    in the cache.

    Args:
        images_per_row_total: [B] images of every row of the whole conversation.
        images_per_row_new: [B] images of every row in the part not yet cached.
    Returns:
        LongTensor [sum(new)] of indices into the packed images.
    """
    starts = torch.cumsum(images_per_row_total, 0) - images_per_row_total
    first_new = starts + images_per_row_total - images_per_row_new
    offsets = torch.arange(int(images_per_row_new.sum()), device=images_per_row_new.device)
    row_starts = torch.cumsum(images_per_row_new, 0) - images_per_row_new
    offsets = offsets - row_starts.repeat_interleave(images_per_row_new)
    return first_new.repeat_interleave(images_per_row_new) + offsets


class G2TRGenerationMixin:
    """What both G2TR models add to transformers' `GenerationMixin` (list it first among the bases).

    - The image inputs reach only the prompt's forward; later steps feed generated tokens with `decoding_step=True`
      (placeholders among them are ordinary text, never a request for pixels).
    - A call that continues from a cache may pass every image of the conversation again, as the processor returns
      them for the whole chat: the ones already cached are dropped here (`select_continuation_images`).
    - The forward receives the caller's 2-D attention mask and derives positions itself (they depend on the compact
      layout), so the parent's position ids and its 4-D masks for compilable caches are not passed on.
    - Calls that a compact cache cannot serve fail before anything runs (`generate`).
    """

    #: Model-specific names of the image inputs (dropped after the prompt's forward).
    _image_input_names: tuple[str, ...] = ()

    def select_continuation_images(
        self, model_inputs: dict, full_input_ids: torch.Tensor, fed_input_ids: torch.Tensor
    ) -> dict:
        """Keep only the image inputs of the images in `fed_input_ids` (the rest of `full_input_ids` is cached)."""
        raise NotImplementedError

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        cache: Cache | None = None,
        **kwargs,
    ) -> dict:
        # Both names are in the signature: generate validates its keyword arguments against it (5.24 passes
        # `cache=`, earlier releases `past_key_values=`).
        cache = pop_cache_argument(past_key_values, {"cache": cache})
        kwargs.pop("position_ids", None)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **{CACHE_KWARG: cache},
            **kwargs,
        )
        # The parent derives position ids and, for compilable (static) caches, 4-D masks, both in the caller's
        # positions; the forward maps the caller's 2-D mask onto the compact cache itself.
        model_inputs.pop("position_ids", None)
        model_inputs.pop("attention_mask", None)
        if attention_mask is not None:
            model_inputs["attention_mask"] = attention_mask
        has_cache = cache is not None and cache.get_seq_length() > 0
        if not is_first_iteration and model_inputs.get("use_cache", True) and has_cache:
            for name in self._image_input_names:
                model_inputs.pop(name, None)
            model_inputs["decoding_step"] = True
            return model_inputs
        # A prompt. (A draft model's first call arrives with `is_first_iteration=False`, and the parent then drops
        # `pixel_values`; the prompt still needs them.)
        for name in self._image_input_names:
            if kwargs.get(name) is not None:
                model_inputs[name] = kwargs[name]
        if has_cache and model_inputs.get("input_ids") is not None:
            fed = model_inputs["input_ids"]
            if fed.shape[1] < input_ids.shape[1]:
                model_inputs = self.select_continuation_images(model_inputs, input_ids, fed)
        return model_inputs

    def _logits_and_loss(
        self,
        outputs,
        logits_to_keep: int | torch.Tensor,
        labels: torch.Tensor | None,
        shift_labels: torch.Tensor | None,
        vocab_size: int,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's part of a forward: `lm_head` over the backbone's compact hidden states (all, the last
        `logits_to_keep`, or the given compact indices) and, with targets, the causal-LM loss after moving the caller's
        targets onto the compact sequence (`compact_targets`)."""
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        # `lm_head` is never quantized, and computes in fp32 in a model loaded in fp16 (`_keep_in_fp32_modules`).
        logits = self.lm_head(hidden_states.to(dtype=compute_dtype(self.lm_head)))
        loss = None
        if labels is not None or shift_labels is not None:
            labels, shift_labels = compact_targets(outputs.kept_token_mask, labels, shift_labels)
            loss = self.loss_function(
                logits=logits, labels=labels, shift_labels=shift_labels, vocab_size=vocab_size, **kwargs
            )
        return logits, loss

    def generate(self, *args, **kwargs):
        """transformers' `generate`, after refusing up front what a compact cache cannot do."""
        generation_config = kwargs.get("generation_config") or getattr(self, "generation_config", None)
        if kwargs.get("prefill_chunk_size") or getattr(generation_config, "prefill_chunk_size", None):
            raise ValueError(
                "`prefill_chunk_size` is not supported by G2TR models: an image block is reduced as a whole, and "
                "chunk boundaries are counted in the caller's positions, which a compact cache does not store."
            )
        return super().generate(*args, **kwargs)


def inside_blocks(token_ids: torch.Tensor, start_token_id: int, end_token_id: int) -> torch.Tensor:
    """[B, L] bool: True for the tokens inside a `start ... end` block, both markers included (a start without its
    end opens a block that runs to the end of the row)."""
    is_start, is_end = token_ids == start_token_id, token_ids == end_token_id
    # Depth seen by each token, counting its own start marker but not its own end marker.
    depth = is_start.long().cumsum(-1) - is_end.long().cumsum(-1) + is_end.long()
    return depth > 0


def ids_from_embeddings(
    inputs_embeds: torch.Tensor, embedding: torch.nn.Module, token_ids: list[int] | tuple[int, ...]
) -> torch.Tensor:
    """Recover which of `token_ids` sit where in `inputs_embeds` [B, L, D] by comparing every position with their
    word embeddings (as transformers' VLMs find image placeholders among `inputs_embeds`).

    Returns:
        [B, L] long: the matching token id, or -1 where the embedding is none of them.
    """
    ids = torch.tensor(list(token_ids), device=inputs_embeds.device)
    rows = embedding(ids.to(embedding.weight.device)).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
    matches = (inputs_embeds[:, :, None, :] == rows[None, None]).all(-1)  # [B, L, len(token_ids)]
    found = ids[matches.long().argmax(-1)]
    return torch.where(matches.any(-1), found, torch.full_like(found, -1))


def compaction_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index that removes the dropped slots of every row and left-pads the rows again.

    Args:
        keep: [B, L] bool, False for the slots to remove.
    Returns:
        index [B, L'] long into the old sequence, and filled [B, L'] bool (False for the new left padding), with
        L' = max row length after removal. Rows keep their order of tokens and are right-aligned.
    """
    batch, length = keep.shape
    lengths = keep.sum(-1)
    new_length = int(lengths.max())
    destination = keep.long().cumsum(-1) - 1 + (new_length - lengths)[:, None]
    rows = torch.arange(batch, device=keep.device)[:, None].expand(batch, length)
    source = torch.arange(length, device=keep.device)[None, :].expand(batch, length)
    index = torch.zeros(batch, new_length, dtype=torch.long, device=keep.device)
    filled = torch.zeros(batch, new_length, dtype=torch.bool, device=keep.device)
    index[rows[keep], destination[keep]] = source[keep]
    filled[rows[keep], destination[keep]] = True
    return index, filled


def compact_targets(
    kept_token_mask: torch.Tensor, *targets: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    """Training targets [B, L] aligned with the caller's tokens, moved onto the compact sequence the decoder ran on
    (the slots of merged image tokens removed, rows left-padded again with -100)."""
    if bool(kept_token_mask.all()):
        return targets
    index, filled = compaction_index(kept_token_mask)
    return tuple(
        None if target is None else target.to(index.device).gather(1, index).masked_fill(~filled, -100)
        for target in targets
    )
