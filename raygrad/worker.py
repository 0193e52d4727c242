"""ShardRunner: loads the model once, then turns shards of texts into Partials.

It knows nothing about Ray; engine.py wraps it in a Ray actor unchanged,
and `--workers 0` calls it in-process."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from .grads import Aggregation, DeviceAccumulator, Partial, accumulate_batch
from .models import load_model_and_tokenizer, pick_device
from .plan import Plan, sae_load_kwargs


@dataclass
class ShardResult:
    shard: int
    partial: Partial
    seconds: float  # wall time of the shard on its worker
    worker_load_seconds: float  # how long this worker took to load its model


class ShardRunner:
    def __init__(self, plan: Plan, seed: int = 0):
        started = time.perf_counter()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.plan = plan
        self.device = pick_device(plan.device)
        self.model, self.tokenizer = load_model_and_tokenizer(plan.model, self.device, getattr(torch, plan.dtype))
        self.modules = [self.model.get_submodule(path) for path in plan.module_paths]
        self.saes = self._load_saes(plan) if plan.target == "sae" else None
        self.aggregation = Aggregation(
            kinds=tuple(plan.aggregate_by),
            exclude_bos_id=self.tokenizer.bos_token_id if plan.exclude_bos else None,
            position_stride=plan.position_stride,
            sae_mode=plan.sae_mode or "clean",
        )
        self.load_seconds = time.perf_counter() - started

    def run(self, shard: int, texts: list[str]) -> ShardResult:
        started = time.perf_counter()
        acc = DeviceAccumulator(len(self.modules), self.plan.prefixes, self.device)
        size = self.plan.batch_size
        for start in range(0, len(texts), size):
            # Pad to the longest text in the batch, not to max_length.
            batch = self.tokenizer(
                texts[start:start + size], padding="longest", truncation=True,
                max_length=self.plan.max_length, return_tensors="pt",
            ).to(self.device)
            accumulate_batch(self.model, self.modules, batch["input_ids"], batch["attention_mask"], acc,
                             self.aggregation, self.saes)
        partial = acc.to_partial()
        return ShardResult(shard, partial, time.perf_counter() - started, self.load_seconds)

    def _load_saes(self, plan: Plan) -> list[torch.nn.Module]:
        from .saes import load_sae

        # SAEs run in float32 under a bf16/fp16 model (z is upcast), in float64 under float64.
        dtype = torch.float64 if plan.dtype == "float64" else torch.float32
        # load_sae returns them frozen: dLoss/df is taken w.r.t. f, never the SAE's weights.
        return [load_sae(layer, **sae_load_kwargs(plan.sae_source), device=self.device, dtype=dtype)
                for layer in plan.layers]
