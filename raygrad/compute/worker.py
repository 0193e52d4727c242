"""ShardRunner: loads the model once, then turns shards into Partials: it reads
each shard's rows itself (`prepare`: read, filter, check, tokenize), then computes.

It knows nothing about Ray; engine.py wraps it in a Ray actor unchanged,
and `--workers 0` calls it in-process. `ShardComputer` is the loop itself,
over a model that is already loaded (the GPU benchmark builds its own)."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .. import constants as names
from ..dataset.shards import Shard, check_fingerprint, read_rows
from ..dataset.text import completion_filter, token_ids, tokenize_truncated
from ..errors import RaygradError
from ..model.loading import device_placement, execution_device, input_device, load_model_and_tokenizer, pick_device
from ..model.memory import sae_layer_groups
from ..model.pins import check_unchanged, model_commit, sae_commit
from ..plan import Plan, sae_load_kwargs
from ..store import topk
from ..store.partial import Partial, ShardResult
from .ablation import AblationSpec, ablate_batch
from .accumulator import DeviceAccumulator
from .batch import Aggregation, make_batch
from .batching import BatchSizer, MemoryProbe, collate
from .grads import accumulate_batch

SAE_HEADROOM = 0.1  # of the GPU's memory kept free when deciding how many SAEs fit (allocator slack)


@dataclass
class PreparedShard:
    """A shard read and tokenized, waiting for the model."""
    shard: int
    token_ids: list[list[int]]
    rows: list[int]  # each text's dataset row
    read_seconds: float
    prompt_lengths: list[int] | None = None  # --completion-column: each text's prompt tokens (context only)


def batch_sizer(plan: Plan, device: torch.device) -> BatchSizer:
    """The plan's batching on this worker's device (auto reads CUDA's memory to shrink its budget)."""
    if plan.batching == "auto":
        return BatchSizer("auto", probe=MemoryProbe.cuda(device) if device.type == "cuda" else None)
    if plan.batching == "tokens":
        return BatchSizer("tokens", tokens=plan.tokens_per_batch)
    return BatchSizer("texts", batch_size=plan.batch_size)


class ShardComputer:
    """Texts -> batches -> one forward+backward each -> one Partial per shard."""

    def __init__(self, model, tokenizer, modules, prefixes: dict[str, int], aggregation: Aggregation,
                 sizer: BatchSizer, max_length: int, device: torch.device, saes=None,
                 sae_groups: list[list[int]] | None = None, sae_devices: list[torch.device] | None = None,
                 layer_sums: tuple[str, ...] = (), layers: list[int] | None = None, top_k: int = 0,
                 score_dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer, self.modules, self.saes = model, tokenizer, modules, saes
        # The model layer of each module: with a text's dataset row, it keys the Hessian's probes.
        self.layers = list(range(len(modules))) if layers is None else list(layers)
        self.prefixes, self.aggregation, self.sizer = prefixes, aggregation, sizer
        self.max_length, self.device, self.layer_sums = max_length, device, layer_sums
        self.top_k, self.score_dtype = top_k, score_dtype  # --top-examples
        # Layers per forward+backward: all at once, unless their SAEs do not fit beside the
        # model; then each group's SAEs come to their devices for the group's pass over the shard.
        self.groups = sae_groups or [list(range(len(modules)))]
        self.sae_devices = sae_devices

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's first max_length token ids, tokenized from a prefix of it (data.tokenize_truncated)."""
        return tokenize_truncated(self.tokenizer, texts, self.max_length)

    def tokenize_texts(self, texts: list) -> tuple[list[list[int]], list[int] | None]:
        """(ids, prompt lengths) of plain texts (None: every target counts) or Pairs (text.token_ids)."""
        return token_ids(self.tokenizer, texts, self.max_length)

    def compute(self, texts: list, rows: list[int] | None = None) -> Partial:
        """`rows`: each text's dataset row (default 0, 1, ...); with the layer and the run's seed it
        keys the Hessian's probes, so a text draws the same ones in any shard, batch or retry.
        `texts`: plain texts, or Pairs (the loss over each completion's tokens only)."""
        ids, prompt_lengths = self.tokenize_texts(texts)
        return self.compute_tokens(ids, rows, prompt_lengths)

    def compute_tokens(self, token_ids: list[list[int]], rows: list[int] | None = None,
                       prompt_lengths: list[int] | None = None) -> Partial:
        """`prompt_lengths` (--completion-column): each text's leading tokens that are context only."""
        rows = list(range(len(token_ids))) if rows is None else list(rows)
        if len(self.groups) == 1:
            return self._compute_rows(token_ids, rows, self.groups[0], prompt_lengths).to_partial()
        acc = self._accumulator(len(self.modules))
        for index, group in enumerate(self.groups):
            self._move_saes(group, lambda row: self.sae_devices[row])
            try:
                acc.merge_rows(self._compute_rows(token_ids, rows, group, prompt_lengths), group,
                               with_loss=index == 0)
            finally:
                self._move_saes(group, lambda row: torch.device("cpu"))
        return acc.to_partial()

    def _accumulator(self, num_layers: int) -> DeviceAccumulator:
        return DeviceAccumulator(num_layers, self.prefixes, self.device, self.layer_sums, self.top_k,
                                 self.score_dtype)

    def _move_saes(self, rows: list[int], device_of) -> None:
        for row in rows:
            self.saes[row].to(device_of(row))

    def _compute_rows(self, token_ids: list[list[int]], text_rows: list[int], group: list[int],
                      prompt_lengths: list[int] | None = None) -> DeviceAccumulator:
        """One pass over the shard for the layers of `group` (rows of the plan's layer list). The
        other layers are hooked too when the Hessian's double backward must mix every layer.
        `prompt_lengths`: each text's context-only tokens (None: every target counts)."""
        modules = [self.modules[row] for row in group]
        saes = [self.saes[row] for row in group] if self.saes is not None else None
        layers = [self.layers[row] for row in group]
        context = [(self.modules[row], self.layers[row]) for row in range(len(self.modules)) if row not in group]
        acc = self.accumulator_for(group)
        queue = deque(self.sizer.batches([len(ids) for ids in token_ids]))
        while queue:
            indices = queue.popleft()
            input_ids, mask = collate([token_ids[i] for i in indices], self.tokenizer.pad_token_id)
            batch = make_batch(input_ids, mask, self.aggregation, rows=[text_rows[i] for i in indices],
                               context=None if prompt_lengths is None else [prompt_lengths[i] for i in indices])
            if self._try_batch(batch, acc, modules, saes, layers, context):
                continue
            # Out of memory: nothing of this batch was added. It and every batch still
            # waiting are packed again under the smaller budget.
            waiting = indices + [i for batch in queue for i in batch]
            repacked = self.sizer.batches([len(token_ids[i]) for i in waiting])
            queue = deque([waiting[j] for j in part] for part in repacked)
        return acc

    def accumulator_for(self, group: list[int]) -> DeviceAccumulator:
        """Empty running sums for a pass over the layer rows `group`: one row per layer."""
        return self._accumulator(len(group))

    def add_batch(self, batch, acc: DeviceAccumulator, modules, saes, layers, context) -> None:
        """The per-batch function: one forward + backward's sums into `acc` (`batch` on the device)."""
        accumulate_batch(self.model, modules, batch, acc, self.aggregation, saes, layers, context)

    def _try_batch(self, batch, acc: DeviceAccumulator, modules, saes, layers, context) -> bool:
        """Add one batch to `acc`, or return False after an out-of-memory error the sizer can
        recover from (the batch's sums were kept apart, so nothing was counted)."""
        staged = acc.empty_like()
        self.sizer.before_batch()
        try:
            self.add_batch(batch.to(self.device), staged, modules, saes, layers, context)
        except torch.cuda.OutOfMemoryError as err:
            if batch.input_ids.shape[0] == 1 or not self.sizer.after_out_of_memory(batch.padded_tokens):
                raise RaygradError(_out_of_memory_line(batch, self.device, err)) from None
            recovered = True
        else:
            recovered = False
        if recovered:  # outside the except block, so the failed batch's tensors are freed
            del staged
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return False
        acc.merge(staged)
        self.sizer.after_batch(batch.padded_tokens)
        return True


class AblationComputer(ShardComputer):
    """raygrad ablate's shard loop: ShardComputer's batching and out-of-memory retry around ablate_batch,
    one accumulator row per variant (joint, then each entry alone), every SAE in one pass."""

    def __init__(self, model, tokenizer, modules, spec: AblationSpec, sizer: BatchSizer, max_length: int,
                 device: torch.device, saes=None):
        super().__init__(model, tokenizer, modules, {}, Aggregation(), sizer, max_length, device, saes,
                         layer_sums=names.ABLATION_SUMS)
        self.spec = spec

    def accumulator_for(self, group: list[int]) -> DeviceAccumulator:
        return DeviceAccumulator(self.spec.num_variants, {}, self.device, names.ABLATION_SUMS)

    def add_batch(self, batch, acc: DeviceAccumulator, modules, saes, layers, context) -> None:
        ablate_batch(self.model, modules, batch, acc, self.spec, saes)


def _out_of_memory_line(batch, device: torch.device, err: BaseException) -> str:
    """One line for a batch that does not fit even after the sizer shrank what it could."""
    texts, tokens = batch.input_ids.shape[0], batch.padded_tokens
    cause = str(err).split(".")[0]  # "CUDA out of memory"; the rest is the allocator's report
    return (f"{cause} on {device} in a batch of {texts} text(s), {tokens} padded tokens: use a smaller "
            "--batch-size or --tokens-per-batch (--batch-size auto shrinks by itself), a shorter --max-length, "
            "--dtype bfloat16, --sae-dtype bfloat16 or --sae-layers-per-pass for SAEs, or more --gpus-per-worker")


def _check_gpu_fits(plan: Plan, device: torch.device) -> None:
    """Refuse, before loading, a plan whose estimate exceeds this worker's GPU (the driver of a
    cluster cannot see its workers' GPUs)."""
    problem = plan.fit_problem(torch.cuda.get_device_properties(device).total_memory) if plan.weight_bytes else None
    if problem:
        raise RaygradError(problem)


class ShardRunner:
    def __init__(self, plan: Plan, seed: int = 0):
        started = time.perf_counter()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.plan = plan
        device = pick_device(plan.device_request)  # resolved here, where the shards run
        placement = device_placement(device, plan.allow_offload)
        if device.type == "cuda" and not placement:
            _check_gpu_fits(plan, device)
        check_unchanged(plan)  # this node's copy of a local model or SAE is the one the run pinned
        self.model, self.tokenizer = load_model_and_tokenizer(plan.model_source(), device, getattr(torch, plan.dtype),
                                                              placement, revision=model_commit(plan))
        # Split across GPUs: ids and running sums live where the model starts.
        self.device = input_device(self.model, device) if placement else device
        self.modules = [self.model.get_submodule(path) for path in plan.module_paths]
        self.layer_devices = [execution_device(self.model, path, self.device) for path in plan.module_paths]
        self.sae_groups = self._sae_groups(plan, placement) if plan.target == "sae" else None
        self.saes = self._load_saes(plan, waiting_on_cpu=len(self.sae_groups or []) > 1) \
            if plan.target == "sae" else None
        aggregation = Aggregation(
            kinds=tuple(plan.aggregate_by),
            exclude_bos_id=self.tokenizer.bos_token_id if plan.exclude_bos else None,
            position_stride=plan.position_stride,
            sae_mode=plan.sae_mode or "clean",
            hessian_probes=plan.hessian_probes,
            probe_seed=seed,
        )
        self.seed = seed
        if plan.ablation:  # raygrad ablate: the same loop around its own per-batch function
            self.computer = AblationComputer(self.model, self.tokenizer, self.modules, AblationSpec.from_dict(
                plan.ablation), batch_sizer(plan, self.device), plan.max_length, self.device, self.saes)
        else:
            self.computer = ShardComputer(self.model, self.tokenizer, self.modules, plan.prefixes, aggregation,
                                          batch_sizer(plan, self.device), plan.max_length, self.device, self.saes,
                                          self.sae_groups, self.layer_devices, plan.layer_sums, plan.layers,
                                          plan.top_examples, getattr(torch, str(topk.score_dtype(plan.dtype))))
        self._tokenizing = threading.Lock()  # a fast tokenizer refuses two threads at once ("Already borrowed")
        self.load_seconds = time.perf_counter() - started

    def run(self, shard: int, source: dict, ref: Shard) -> ShardResult:
        """Shard number `shard`: the rows `ref` of `source`, read here."""
        return self.compute(self.prepare(shard, source, ref))

    def prepare(self, shard: int, source: dict, ref: Shard) -> PreparedShard:
        """Read, filter and tokenize the shard's rows; a dataset that no longer holds the rows the run
        was planned on stops the run here, before anything of the shard is computed. Safe beside a
        `compute` in another thread (the tokenizer is used by one thread at a time)."""
        started = time.perf_counter()
        texts, rows, fingerprint = read_rows(source, ref, keeps=self._pair_filter(source))
        check_fingerprint(shard, ref, fingerprint)
        with self._tokenizing:
            ids, prompt_lengths = self.computer.tokenize_texts(texts)
        return PreparedShard(shard, ids, rows, time.perf_counter() - started, prompt_lengths)

    def _pair_filter(self, source: dict):
        """A prompt/completion source's row filter (as the plan's, text.completion_filter), taking the
        tokenizer's lock; None for plain texts."""
        if source.get("completion_column") is None:
            return None
        keeps = completion_filter(self.tokenizer, self.plan.max_length)

        def locked(pairs):
            with self._tokenizing:
                return keeps(pairs)
        return locked

    def compute(self, prepared: PreparedShard) -> ShardResult:
        """Rows key the Hessian's probes, so a text draws the same ones in any shard or batch."""
        started = time.perf_counter()
        partial = self.computer.compute_tokens(prepared.token_ids, prepared.rows, prepared.prompt_lengths)
        sizer = self.computer.sizer
        return ShardResult(prepared.shard, partial, time.perf_counter() - started, self.load_seconds,
                           sizer.tokens if sizer.mode != "texts" else 0, prepared.read_seconds)

    def _sae_groups(self, plan: Plan, placement: dict | None) -> list[list[int]]:
        """The layers of each forward+backward: as asked, or as many SAEs as this worker's GPU
        holds beside the model and one batch's activations (a model split across GPUs, or a
        CPU, takes every layer in one pass unless asked otherwise)."""
        free = None
        if self.device.type == "cuda" and not placement and not plan.sae_layers_per_pass:
            free_now, total = torch.cuda.mem_get_info(self.device)
            free = max(0, free_now - plan.activation_bytes() - int(SAE_HEADROOM * total))
        return sae_layer_groups(len(plan.layers), plan.sae_bytes_per_layer, free, plan.sae_layers_per_pass)

    def _load_saes(self, plan: Plan, waiting_on_cpu: bool) -> list[torch.nn.Module]:
        from ..model.saes import load_sae

        # SAEs run in --sae-dtype (z is cast to it); float64 under a float64 model.
        dtype = torch.float64 if plan.dtype == "float64" else getattr(torch, plan.sae_dtype)
        # load_sae returns them frozen: dLoss/df is taken w.r.t. f, never the SAE's weights.
        # Each SAE sits with its layer (a model split across GPUs has layers on several);
        # in several passes, in CPU memory until its pass.
        return [load_sae(layer, **sae_load_kwargs(plan.sae_source), revision=sae_commit(plan, index),
                         device=torch.device("cpu") if waiting_on_cpu else layer_device, dtype=dtype)
                for index, (layer, layer_device) in enumerate(zip(plan.layers, self.layer_devices))]
