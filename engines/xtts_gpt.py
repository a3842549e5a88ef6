"""XTTS's GPT, one decoding step for many requests at once, on coqui-tts's own weights.

coqui-tts runs XTTS's GPT-2 through transformers' `generate` (`GPT2InferenceModel`
plus its own `sample_stream` loop): one request, one KV cache, and a prefix
embedding kept in shared model state. This module does the same arithmetic with
the same modules (the checkpoint's `GPT2Block`s, `ln_f`, `final_norm`,
`mel_head`, the audio embeddings and their learned positions), but for a batch:

- **prefill** runs requests' prefixes (conditioning latents, text tokens, the
  start-of-audio token) with causal attention and writes their keys and values
  into their slots of the `KvPool`;
- **decode** advances every row of a batch by one audio token: each row has its
  own slot, its own cache length and its own audio position. The linear layers
  (attention projections, MLP, head) run once for the whole batch, which is
  where batching pays: at batch 1 they are bound by reading the weights (by far
  on a GPU; only in part on a CPU, see bench/RESULTS.md).
- the next token is chosen exactly as coqui chooses it: the repetition penalty
  (over the request's own ids: the fake prefix ids, the start token and what it
  generated; kept as a seen-token mask per slot so that a step builds no id
  lists), then transformers' temperature, top-k and top-p warpers, then
  sampling; with greedy decoding (`top_k=1`) the one surviving token is taken by
  argmax.

**Exact mode** (greedy decoding): a request's tokens and latents are bit for bit
the same whatever else is in the batch. Three things make that hold on the CPU:
prefill runs per request; attention runs per row, over that row's own cache
length (a padded batched attention sums over a different length and rounds
differently); and the batch's row count is padded to a multiple of
`EXACT_ROW_QUANTUM`, because MKL's sgemm computes a row identically, wherever it
sits, only for such row counts (measured with torch 2.11: rows of a 1-, 2-, 3-,
5-, 6-, 7-, 9-, 10- or 11-row product differ in the last bits from the same rows
in a larger one; 4, 8 and 12 and more agree). The test suite checks the whole
property end to end (tests/unit/test_xtts_batching.py). On a GPU it is not
claimed: cuBLAS also picks kernels by shape, and no test runs there.

**Fast mode** (sampling, the default in production): prefixes starting in the
same step are prefilled as one right-padded batch, decode steps have no padding
rows, and attention is one batched call per layer over the rows' slots (gathered
from the pool, masked past each row's length). Results equal exact mode up to
rounding (tests/unit/test_xtts_batching.py compares them at 1e-5).

Why not a library: transformers 4.57's `generate` batches only requests that
start together (left padding, one shared cache length) and its continuous
batching manager (`generate_batch`, paged attention) takes token-id prompts and
returns token ids, where XTTS needs a prefix of embeddings (the voice's
conditioning latents) and the last hidden state of every step (the vocoder's
input). vLLM can (Auralis registers XTTS's GPT as a vLLM model, passes the
conditioning as multimodal embeddings and captures the hidden states), but it is
not installable here (no CUDA) and would pin the service to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# Rows of a decode batch are padded to a multiple of this in exact mode (see the docstring).
EXACT_ROW_QUANTUM = 4
# The id coqui fills its fake prefix input ids with: it takes part in the repetition penalty.
FAKE_PREFIX_ID = 1


@dataclass(frozen=True)
class Sampling:
    """coqui-tts's `inference_stream` defaults; `top_k=1` is greedy decoding."""

    temperature: float = 0.75
    top_k: int = 50
    top_p: float = 0.85
    repetition_penalty: float = 10.0

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    def penalize(self, scores: Any, seen: Any) -> Any:
        """transformers' `RepetitionPenaltyLogitsProcessor`, the same arithmetic, over a mask of seen ids."""
        penalty = self.repetition_penalty
        return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)

    def warpers(self) -> LogitsProcessorList:
        # After the repetition penalty, the list and order transformers' generate builds for
        # coqui's arguments (checked against `_get_logits_processor` with transformers 4.57).
        return LogitsProcessorList(
            [
                TemperatureLogitsWarper(self.temperature),
                TopKLogitsWarper(top_k=self.top_k),
                TopPLogitsWarper(top_p=self.top_p),
            ]
        )


class KvPool:
    """Keys and values of every layer, `[slots, heads, capacity, head_dim]`; a request holds a slot.

    With them, per slot, the ids its request has seen (`[slots, vocab]`), for the repetition penalty.

    Grows (slots and capacity) by reallocating, which is rare: the pool keeps its
    size once the service has seen its busiest minute.
    """

    def __init__(
        self, *, layers: int, heads: int, head_dim: int, vocab: int, dtype: Any, device: Any
    ) -> None:
        self.layers, self.heads, self.head_dim, self.vocab = layers, heads, head_dim, vocab
        self.dtype, self.device = dtype, device
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.seen: Any = None
        self.slots = 0
        self.capacity = 0
        self._free: list[int] = []  # allocated on first use, on the model's thread

    def _allocate(self, *, slots: int, capacity: int) -> None:
        shape = (slots, self.heads, capacity, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        for old, new in zip(self.keys + self.values, keys + values, strict=False):  # none at first
            new[: self.slots, :, : self.capacity] = old
        seen = torch.zeros((slots, self.vocab), dtype=torch.bool, device=self.device)
        if self.seen is not None:
            seen[: self.slots] = self.seen
        self._free.extend(range(self.slots, slots))
        self.keys, self.values, self.seen = keys, values, seen
        self.slots, self.capacity = slots, capacity

    def acquire(self, length: int) -> int:
        """A free slot with room for `length` positions."""
        if length > self.capacity or not self._free:
            self._allocate(
                slots=max(4, self.slots * 2) if not self._free else self.slots,
                capacity=max(self.capacity, length + 64),
            )
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)


@dataclass
class Row:
    """One request's place in a decode step."""

    slot: int
    length: int  # positions already in its cache; the new token goes at this one
    token: int  # the token to feed (the last one generated)
    audio_index: int  # its audio position: 1 for the first generated token (0 is the start token)


class XttsStepModel:
    """The GPT's prefill and batched decode step, over coqui's `GPT` module (`model.gpt`)."""

    def __init__(self, gpt: Any, *, sampling: Sampling, exact: bool) -> None:
        self.gpt = gpt
        self.blocks = list(gpt.gpt.h)
        self.ln_f = gpt.gpt.ln_f
        attention = self.blocks[0].attn
        self.heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.width = gpt.model_dim
        self.dtype = gpt.mel_head.weight.dtype
        self.device = gpt.mel_head.weight.device
        self.sampling = sampling
        self.warpers = sampling.warpers()
        self.exact = exact
        self.pool = KvPool(
            layers=len(self.blocks),
            heads=self.heads,
            head_dim=self.head_dim,
            vocab=gpt.mel_head.out_features,
            dtype=self.dtype,
            device=self.device,
        )

    @property
    def start_token(self) -> int:
        return int(self.gpt.start_audio_token)

    @property
    def stop_token(self) -> int:
        return int(self.gpt.stop_audio_token)

    @property
    def max_new_tokens(self) -> int:
        return int(self.gpt.max_gen_mel_tokens)

    def prefix(self, cond_latents: Any, text_tokens: Any) -> Any:
        """coqui's prefix (`GPT.compute_embeddings`) and the start-of-audio token: `[1, P+1, d]`."""
        gpt = self.gpt
        text = F.pad(text_tokens, (0, 1), value=gpt.stop_text_token)
        text = F.pad(text, (1, 0), value=gpt.start_text_token)
        text_emb = gpt.text_embedding(text) + gpt.text_pos_embedding(text)
        start = torch.tensor([[self.start_token]], device=self.device)
        start_emb = gpt.mel_embedding(start) + gpt.mel_pos_embedding(start)
        return torch.cat([cond_latents.to(self.device, self.dtype), text_emb, start_emb], dim=1)

    def prefill(self, items: list[tuple[int, Any]]) -> tuple[Any, Any]:
        """Run requests' prefixes `(slot, [1, P+1, d])` into their slots; per request, the latent
        `[B, d]` and logits `[B, vocab]` of its last position.

        Exact mode runs each alone. Fast mode runs them as one right-padded batch: causal
        attention plus a mask of each row's own length keeps a row's real positions from
        seeing any padding, so only rounding differs.
        """
        slots = torch.tensor([slot for slot, _prefix in items], device=self.device)
        self.pool.seen[slots] = False
        self.pool.seen[slots, FAKE_PREFIX_ID] = True  # coqui's input ids: the fake prefix ids,
        self.pool.seen[slots, self.start_token] = True  # then the start-of-audio token
        if self.exact or len(items) == 1:
            results = [self._prefill_one(slot, prefix) for slot, prefix in items]
            return torch.cat([latent for latent, _ in results]), torch.cat([logits for _, logits in results])
        return self._prefill_padded(slots, [prefix[0] for _slot, prefix in items])

    def _prefill_one(self, slot: int, prefix: Any) -> tuple[Any, Any]:
        hidden = prefix[0]  # [P+1, d]
        positions = hidden.shape[0]
        for layer, block in enumerate(self.blocks):
            query, key, value = self._qkv(block, hidden)  # [heads, P+1, head_dim]
            self.pool.keys[layer][slot, :, :positions] = key
            self.pool.values[layer][slot, :, :positions] = value
            attended = F.scaled_dot_product_attention(query, key, value, is_causal=True)
            hidden = self._finish_block(
                block, hidden, attended.transpose(0, 1).reshape(positions, self.width)
            )
        latent = self.gpt.final_norm(self.ln_f(hidden[-1:]))
        return latent, self.gpt.mel_head(latent)

    def _prefill_padded(self, slots: Any, prefixes: list[Any]) -> tuple[Any, Any]:
        count = len(prefixes)
        lengths = torch.tensor([prefix.shape[0] for prefix in prefixes], device=self.device)
        longest = int(lengths.max())
        hidden = torch.nn.utils.rnn.pad_sequence(prefixes, batch_first=True)  # [B, L, d]
        valid = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]  # [B, L]
        causal = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
        mask = causal[None, None] & valid[:, None, None, :]  # [B, 1, L, L]
        # Where each real position's key and value go: (slot, position) pairs.
        slot_index = slots[:, None].expand(count, longest)[valid]
        position_index = torch.arange(longest, device=self.device).expand(count, longest)[valid]
        for layer, block in enumerate(self.blocks):
            flat = hidden.reshape(count * longest, self.width)
            projected = block.attn.c_attn(block.ln_1(flat))
            query, key, value = (  # each [B, heads, L, head_dim]
                part.reshape(count, longest, self.heads, self.head_dim).transpose(1, 2)
                for part in projected.split(self.width, dim=-1)
            )
            self.pool.keys[layer][slot_index, :, position_index] = key.transpose(1, 2)[valid]
            self.pool.values[layer][slot_index, :, position_index] = value.transpose(1, 2)[valid]
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
            merged = attended.transpose(1, 2).reshape(count * longest, self.width)
            hidden = self._finish_block(block, flat, merged).reshape(count, longest, self.width)
        last = hidden[torch.arange(count, device=self.device), lengths - 1]  # [B, d]
        latents = self.gpt.final_norm(self.ln_f(last))
        return latents, self.gpt.mel_head(latents)

    def decode(self, rows: list[Row]) -> tuple[Any, Any]:
        """One step for every row: the latents `[B, d]` and logits `[B, vocab]` of the fed tokens."""
        count = len(rows)
        tokens = torch.tensor([row.token for row in rows], device=self.device)
        audio_positions = torch.tensor([row.audio_index for row in rows], device=self.device)
        hidden = self.gpt.mel_embedding(tokens) + self.gpt.mel_pos_embedding.emb(audio_positions)
        padded = -count % EXACT_ROW_QUANTUM if self.exact else 0
        if padded:
            hidden = torch.cat([hidden, hidden.new_zeros(padded, self.width)])
        slots = torch.tensor([row.slot for row in rows], device=self.device)
        lengths = torch.tensor([row.length for row in rows], device=self.device)
        for layer, block in enumerate(self.blocks):
            query, key, value = self._qkv(block, hidden)  # [heads, rows, head_dim]
            keys, values = self.pool.keys[layer], self.pool.values[layer]
            keys[slots, :, lengths] = key[:, :count].transpose(0, 1)
            values[slots, :, lengths] = value[:, :count].transpose(0, 1)
            attended = self._attend(query[:, :count].transpose(0, 1), keys, values, rows)  # [B, heads, hd]
            merged = attended.reshape(count, self.width)
            if padded:
                merged = torch.cat([merged, merged.new_zeros(padded, self.width)])
            hidden = self._finish_block(block, hidden, merged)
        latents = self.gpt.final_norm(self.ln_f(hidden))
        return latents[:count], self.gpt.mel_head(latents)[:count]

    def next_tokens(self, rows: list[Row], logits: Any) -> list[int]:
        """Each row's next token from its logits, as coqui's `sample_stream` picks it."""
        slots = torch.tensor([row.slot for row in rows], device=logits.device)
        seen = self.pool.seen.index_select(0, slots)
        scores = self.warpers(seen, self.sampling.penalize(logits.float(), seen))  # ids unused there
        if self.sampling.greedy:
            chosen = scores.argmax(dim=-1)
        else:
            chosen = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        self.pool.seen[slots, chosen] = True
        return [int(token) for token in chosen.tolist()]

    def _qkv(self, block: Any, hidden: Any) -> tuple[Any, Any, Any]:
        """Queries, keys and values of `hidden` `[N, d]`, each `[heads, N, head_dim]`."""
        projected = block.attn.c_attn(block.ln_1(hidden))
        query, key, value = (
            part.reshape(hidden.shape[0], self.heads, self.head_dim).transpose(0, 1)
            for part in projected.split(self.width, dim=-1)
        )
        return query, key, value

    def _finish_block(self, block: Any, hidden: Any, attended: Any) -> Any:
        """The attention output projection, the residuals and the MLP of a GPT-2 block."""
        hidden = hidden + block.attn.c_proj(attended)
        return hidden + block.mlp(block.ln_2(hidden))

    def _attend(self, queries: Any, keys: Any, values: Any, rows: list[Row]) -> Any:
        """Attention of each row's one query `[B, heads, hd]` over its own cache (the new token included)."""
        if self.exact:
            return torch.cat(
                [
                    F.scaled_dot_product_attention(
                        queries[index, :, None],
                        keys[row.slot, :, : row.length + 1],
                        values[row.slot, :, : row.length + 1],
                    ).transpose(0, 1)
                    for index, row in enumerate(rows)
                ]
            )
        longest = max(row.length for row in rows) + 1
        slots = torch.tensor([row.slot for row in rows], device=self.device)
        lengths = torch.tensor([row.length + 1 for row in rows], device=self.device)
        mask = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]  # [B, L]
        attended = F.scaled_dot_product_attention(
            queries[:, :, None],  # [B, heads, 1, hd]
            keys[:, :, :longest].index_select(0, slots),
            values[:, :, :longest].index_select(0, slots),
            attn_mask=mask[:, None, None, :],
        )
        return attended[:, :, 0]
