"""Plan: every value resolved from a RunConfig before work starts.

It is printed before the run, saved in the store, and is all a worker
needs to load its model and hook the right modules."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from . import constants as names
from .config import RunConfig, parse_layer_spec
from .models import family_of, load_model_config, resolve_hook_sites, resolve_model_path, text_config


@dataclass(frozen=True)
class Plan:
    model: str  # as the user named it
    model_path: str  # what from_pretrained reads
    family: str  # config.model_type
    num_model_layers: int
    layers: list[int]
    hook_site: str
    module_paths: list[str]  # one per selected layer
    width: int  # dimensions per layer
    samples_requested: int
    samples: int  # texts found (may be fewer than requested)
    shards: list[tuple[int, int]]  # [start, stop) sample ranges
    workers: int  # 0 = in-process
    device: str
    dtype: str
    exclude_bos: bool
    batch_size: int
    max_length: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        data = dict(data)
        data["shards"] = [tuple(s) for s in data["shards"]]
        return cls(**data)

    def describe(self) -> str:
        layer_text = f"{_compact(self.layers)} ({len(self.layers)} of {self.num_model_layers})"
        return "\n".join([
            f"model    {self.model} (family {self.family}, {self.dtype}"
            + (", BOS position excluded)" if self.exclude_bos else ")"),
            f"site     {self.hook_site}: {self.module_paths[0]}{' ...' if len(self.module_paths) > 1 else ''}",
            f"layers   {layer_text}, width {self.width}",
            f"samples  {self.samples} (requested {self.samples_requested}), "
            f"batch {self.batch_size}, max {self.max_length} tokens",
            f"shards   {len(self.shards)} of <= {self.shards[0][1] - self.shards[0][0]} samples",
            f"workers  {self.workers or 'in-process (no Ray)'} on {self.device}",
        ])


def make_plan(config: RunConfig, num_texts: int, workers: int, device: str) -> Plan:
    model_config = load_model_config(config.model)
    family = family_of(model_config)
    num_layers = text_config(model_config).num_hidden_layers
    layers = parse_layer_spec(config.layers, num_layers) if config.layers else list(range(num_layers))
    step = config.samples_per_shard
    return Plan(
        model=config.model,
        model_path=resolve_model_path(config.model),
        family=family,
        num_model_layers=num_layers,
        layers=layers,
        hook_site=config.hook_site,
        module_paths=[site.path for site in resolve_hook_sites(_skeleton(model_config), layers, config.hook_site)],
        width=text_config(model_config).hidden_size,
        samples_requested=config.num_samples,
        samples=num_texts,
        shards=[(start, min(start + step, num_texts)) for start in range(0, num_texts, step)],
        workers=workers,
        device=device,
        dtype=config.dtype,
        exclude_bos=config.exclude_bos,
        batch_size=config.batch_size,
        max_length=config.max_length,
    )


def _skeleton(model_config):
    """The model's module tree on the meta device: paths without weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(model_config)


def run_dir_name(config: RunConfig, plan: Plan, timestamp: str) -> str:
    """The original scripts' pattern, e.g.
    layer_activations_model_Qwen_Qwen2.5-0.5B_num_samples_500_batch_size_4_layers_0-23_20261126_142233"""
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", config.model.strip("/")).strip("_")
    return (
        f"{names.MLP_RUN_PREFIX}_model_{model}_num_samples_{plan.samples}_batch_size_{plan.batch_size}"
        f"_layers_{_compact(plan.layers).replace(',', '_')}_{timestamp}"
    )


def _compact(layers: list[int]) -> str:
    """[0, 1, 2, 3, 10] -> '0-3,10'."""
    parts, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = cur
    return ",".join(parts)
