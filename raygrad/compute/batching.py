"""How a shard's texts become batches: a fixed number of texts per batch (the
original scripts' --batch-size), or texts sorted by length and packed up to a
token budget, set by hand or (auto) 4096 tokens on a GPU, shrunk when its
free memory says so.

The loss is a sum over tokens, so how texts are grouped never changes a
result; it only changes speed and memory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import AUTO_CPU_TOKENS, AUTO_GPU_TOKENS  # the unmeasured budgets (the plan's estimate too)

log = logging.getLogger(__name__)

AUTO_MEMORY_FRACTION = 0.6  # of the memory free once the model and SAEs are loaded
AUTO_FULL = 0.75  # a batch measures the budget only if it fills this much of it
MIN_TOKENS = 16  # an out-of-memory retry never goes below this (one text always runs alone)


def fixed_batches(count: int, batch_size: int) -> list[list[int]]:
    """Consecutive groups of `batch_size` texts, in order (today's behaviour)."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def pack_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Texts longest first, each batch filled while texts x longest <= budget.

    Every text lands in exactly one batch; one longer than the budget gets a
    batch of its own. Sorting by length keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Longest first, so a batch's first text is its longest.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def collate(token_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and attention mask, T = the longest text."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, :len(ids)] = 1
    return input_ids, mask


@dataclass
class MemoryProbe:
    """What the auto budget reads from the device: bytes it could still
    allocate, and the peak allocated since the last reset. CUDA's allocator
    keeps these on the host, so reading them never waits for the device."""

    available: Callable[[], int]
    reset_peak: Callable[[], None]
    peak: Callable[[], int]
    allocated: Callable[[], int]

    @classmethod
    def cuda(cls, device: torch.device) -> "MemoryProbe":
        def available() -> int:
            free, _ = torch.cuda.mem_get_info(device)
            # Memory torch holds in its cache but no tensor uses is free to us too.
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

        return cls(available=available,
                   reset_peak=lambda: torch.cuda.reset_peak_memory_stats(device),
                   peak=lambda: torch.cuda.max_memory_allocated(device),
                   allocated=lambda: torch.cuda.memory_allocated(device))


class BatchSizer:
    """Turns a shard's token lengths into batches of text indices.

    mode "texts":  `batch_size` texts per batch, in order.
    mode "tokens": packed to `tokens` padded tokens per batch.
    mode "auto":   packed to 4096 tokens on a GPU (2048 on a CPU). The first
                   full batch's peak memory, extrapolated, must fit in 60% of
                   what is free, or the budget shrinks to what does; on
                   out-of-memory the batch is retried at half the budget."""

    def __init__(self, mode: str, batch_size: int | None = None, tokens: int | None = None,
                 probe: MemoryProbe | None = None):
        if mode not in ("texts", "tokens", "auto"):
            raise ValueError(f"batch mode {mode!r}: choose texts, tokens or auto")
        self.mode = mode
        self.batch_size = batch_size
        self.probe = probe
        if mode == "auto":
            tokens = AUTO_GPU_TOKENS if probe is not None else AUTO_CPU_TOKENS
        self.tokens = tokens
        self.measuring = mode == "auto" and probe is not None

    def batches(self, lengths: list[int]) -> list[list[int]]:
        if self.mode == "texts":
            return fixed_batches(len(lengths), self.batch_size)
        return pack_by_tokens(lengths, self.tokens)

    @property
    def retries_out_of_memory(self) -> bool:
        return self.mode == "auto"

    def before_batch(self) -> None:
        if self.measuring:
            self._base = self.probe.allocated()
            self.probe.reset_peak()

    def after_batch(self, padded_tokens: int) -> None:
        """Bytes per token = the batch's peak over what was allocated before it
        (fixed per-batch costs make this err on the safe side)."""
        if not self.measuring or padded_tokens < AUTO_FULL * self.tokens:
            return  # a shard's last, part-filled batch says little about the budget
        self.measuring = False
        per_token = max(self.probe.peak() - self._base, 1) / padded_tokens
        fits = int(self.probe.available() * AUTO_MEMORY_FRACTION / per_token)
        if fits < self.tokens:
            log.warning("batch budget %d -> %d tokens: %.0f KiB per token, %.1f GiB free", self.tokens,
                        max(MIN_TOKENS, fits), per_token / 1024, self.probe.available() / 2**30)
            self.tokens = max(MIN_TOKENS, fits)

    def after_out_of_memory(self, padded_tokens: int) -> bool:
        """Halve the budget below the batch that failed; False when it cannot shrink."""
        if not self.retries_out_of_memory or padded_tokens <= MIN_TOKENS:
            return False
        self.tokens = max(MIN_TOKENS, min(self.tokens, padded_tokens) // 2)
        self.measuring = False  # what failed is the measurement now
        log.warning("out of memory at %d tokens per batch; retrying at %d", padded_tokens, self.tokens)
        return True
