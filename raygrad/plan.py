"""Plan: every value resolved from a RunConfig before work starts.

It is printed before the run, saved in the store, and is all a worker
needs to load its model and hook the right modules."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass

from . import constants as names
from .config import AUTO_CPU_TOKENS, AUTO_GPU_TOKENS, RunConfig, parse_layer_spec
from .dataset.shards import Shard
from .model.loading import (
    BUNDLED_MODELS,
    family_of,
    load_model_config,
    resolve_hook_sites,
    resolve_model_path,
    text_config,
)
from .model.memory import weight_sae_token_bytes
from .model.pins import describe_pins, model_commit, pin_dataset, pin_model, pin_saes
from .store import topk


@dataclass(frozen=True)
class Plan:
    model: str  # as the user named it
    model_path: str  # what from_pretrained reads
    family: str  # config.model_type
    num_model_layers: int
    layers: list[int]
    hook_site: str
    module_paths: list[str]  # one per selected layer
    width: int  # dimensions per layer of the target space (SAE features for target sae)
    samples_requested: int | str  # --num-samples: a count or 'all'
    samples: int  # usable texts found (may be fewer than requested)
    shards: list[Shard]  # references: row ranges of `source` (shards.py), never the texts
    workers: int  # 0 = in-process
    device: str
    dtype: str
    exclude_bos: bool
    batch_size: int | None  # texts per batch when batching == "texts"
    max_length: int
    target: str = "mlp"
    site_width: int = 0  # the hook site's width (the model's hidden size)
    aggregate_by: tuple[str, ...] = ("gradients",)
    hessian_probes: int = 1  # Rademacher probes per token for the hessian kind
    top_examples: int = 0  # --top-examples K: best tokens kept per dimension of each ranked kind
    position_stride: int = 1
    sae_mode: str | None = None
    sae_source: dict | None = None  # {"release", "sae_id", "path"}; templates keep '{layer}'
    saes: list[dict] | None = None  # per layer: source, d_in, d_sae, hook_name, trained_site, neuronpedia_id
    warnings: tuple[str, ...] = ()
    batching: str = "texts"  # texts (a fixed count) / tokens (a budget by hand) / auto (learned on the device)
    tokens_per_batch: int | None = None  # the budget, for batching == "tokens"
    sae_dtype: str = "float32"
    sae_layers_per_pass: int | None = None  # None: each worker decides from its GPU's free memory
    device_request: str = "auto"  # --device: each worker resolves it where it runs (`device` is the expectation)
    allow_offload: bool = False
    weight_bytes: int = 0  # estimates before loading (memory.py): the weights, all SAEs,
    sae_bytes: int = 0
    token_bytes: int = 0  # and the activations kept per token of a batch
    source: dict | None = None  # the dataset as dataset/formats.py reads it: kind, path, text column, split, min_chars
    tokens_per_char: float = 0.0  # the tokenizer's, on the first texts: shards' token estimates
    skipped_texts: dict[str, int] = dataclasses.field(default_factory=dict)  # dataset.text.SKIP_* -> rows left out
    # What was computed, pinned when the plan was made (model/pins.py): workers and resumes load exactly these.
    model_revision: dict | None = None  # hub commit, local directory digest, or bundled package version
    sae_revisions: list[dict] | None = None  # per layer: a release's commit and file hashes, or a directory digest
    dataset_revision: dict | None = None  # hub commit, or a local file's digest (shards keep their own fingerprints)
    # raygrad ablate: what its workers set (compute.ablation.AblationSpec.to_dict); None: a run's gradients
    ablation: dict | None = None

    def batch_tokens(self) -> int:
        """Padded tokens in one batch at most (the memory estimate's batch)."""
        if self.batching == "texts":
            return self.batch_size * self.max_length
        if self.batching == "tokens":
            return self.tokens_per_batch
        return AUTO_GPU_TOKENS if self.device.startswith("cuda") else AUTO_CPU_TOKENS

    def memory(self):
        from .model.memory import MemoryEstimate

        # On the device at once: one pass's SAEs.
        on_device = min(self.sae_layers_per_pass or len(self.layers), len(self.layers))
        return MemoryEstimate(self.weight_bytes, self.sae_bytes_per_layer * on_device, self.activation_bytes(),
                              self.batch_tokens())

    @property
    def sae_bytes_per_layer(self) -> int:
        return self.sae_bytes // max(1, len(self.layers))

    def fit_problem(self, device_bytes: int) -> str | None:
        """None when one worker's estimate fits a device of `device_bytes`, else one line saying what
        would. SAEs that do not all fit go in passes, decided by the worker: then one layer's must fit."""
        from .model.memory import check_fits

        memory = self.memory()
        if self.target == "sae" and not self.sae_layers_per_pass:
            memory = dataclasses.replace(memory, saes=self.sae_bytes_per_layer)
        return check_fits(memory, device_bytes, self.model)

    def activation_bytes(self) -> int:
        """What one batch keeps for its backward (and the Hessian's double backward)."""
        from .model.memory import HESSIAN_ACTIVATION_FACTOR

        factor = HESSIAN_ACTIVATION_FACTOR if "hessian" in self.aggregate_by else 1.0
        return int(self.token_bytes * self.batch_tokens() * factor)

    def placed(self, config: RunConfig, workers: int, device: str) -> "Plan":
        """This plan on `workers` workers of `device`: the batching (auto on a
        GPU unless asked otherwise) and the shards that follow from it."""
        batching = config.batching(device)
        return dataclasses.replace(
            self, workers=workers, device=device, device_request=config.device, allow_offload=config.allow_offload,
            batching=batching, sae_layers_per_pass=config.sae_layers_per_pass,
            batch_size=config.texts_per_batch() if batching == "texts" else None,
            tokens_per_batch=config.tokens_per_batch,
        )

    def batch_label(self) -> str:
        """For the run directory's name: '4', 'auto' or '8192tokens'."""
        if self.batching == "texts":
            return str(self.batch_size)
        return "auto" if self.batching == "auto" else f"{self.tokens_per_batch}tokens"

    def _batch_text(self) -> str:
        if self.batching == "texts":
            return f"batch {self.batch_size} texts"
        if self.batching == "tokens":
            return f"batch packed to {self.tokens_per_batch} tokens"
        return ("batch auto: texts sorted by length, packed to 4096 tokens on a GPU (less if its memory says so), "
                "2048 on a CPU")

    def _workers_text(self) -> str:
        if not self.workers:
            return f"in-process (no Ray) on {self.device}"
        where = "GPU workers" if self.device.startswith("cuda") else "CPU workers"
        return f"{self.workers} Ray {where} (each resolves --device {self.device_request} where it runs)"

    def model_source(self) -> str:
        """What a worker loads: a bundled name (each node converts its own copy), else the hub id or
        the local directory made absolute when the run started (workers may start elsewhere)."""
        return self.model if self.model in BUNDLED_MODELS else self.model_path

    @property
    def prefixes(self) -> dict[str, int]:
        """Statistic prefix -> width, for every set of sums this run keeps."""
        widths = {names.KIND_PREFIX[kind]: self.width for kind in self.aggregate_by}
        if self.target == "sae" and self.sae_mode == "clean":
            widths[names.SITE_PREFIX] = self.site_width
        if self.target == "sae":  # sum and sum of squares of x: the FVU's denominator
            widths[names.SITE_VALUE_PREFIX] = self.site_width
        return widths

    @property
    def layer_sums(self) -> tuple[str, ...]:
        """Per-layer scalar totals this run keeps: the SAEs' reconstruction quality."""
        if self.target != "sae":
            return ()
        spliced = (names.SPLICED_LOSS_SUM,) if self.sae_mode != "clean" else ()
        return (names.SAE_SQ_ERROR_SUM, names.SAE_L0_SUM, *spliced)

    @property
    def example_prefixes(self) -> list[str]:
        """The prefixes whose top tokens are kept (--top-examples), none when it is off."""
        return topk.example_prefixes(self.aggregate_by) if self.top_examples else []

    def example_bytes(self) -> int:
        """One shard's --top-examples tables: per ranked kind, layers x width x K entries of a score
        (float32; float64 in a float64 run), a row (int64) and a position (int32)."""
        entry = topk.score_dtype(self.dtype).itemsize + 8 + 4
        return len(self.example_prefixes) * len(self.layers) * self.width * self.top_examples * entry

    def partial_bytes(self) -> int:
        """One shard's partial as the driver receives it (reducer.partial_nbytes): float64 sums, each
        (layers x width), per-layer scalar totals, the per-layer token counts (int64), and the examples."""
        per_layer = sum(len(names.sum_names(prefix)) * width for prefix, width in self.prefixes.items())
        return 8 * len(self.layers) * (per_layer + len(self.layer_sums) + 1) + self.example_bytes()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        data = dict(data)
        data["shards"] = [Shard.from_dict(s) for s in data["shards"]]
        data.pop("shard_fingerprints", None)  # an older raygrad's; shards carry their own now
        data["aggregate_by"] = tuple(data.get("aggregate_by", ("gradients",)))
        data["warnings"] = tuple(data.get("warnings", ()))
        return cls(**data)

    def describe(self) -> str:
        layer_text = f"{layer_span(self.layers)} ({len(self.layers)} of {self.num_model_layers})"
        return "\n".join([
            f"model    {self.model} (family {self.family}, {self.dtype}"
            + (", BOS position excluded)" if self.exclude_bos else ")"),
            f"site     {self.hook_site}: {self.module_paths[0]}{' ...' if len(self.module_paths) > 1 else ''}",
            f"layers   {layer_text}, width {self.site_width}",
            *self._sae_lines(),
            (f"collect  {', '.join(self.aggregate_by)}"
             + (f" ({self.hessian_probes} probe{'s' * (self.hessian_probes > 1)} per token)"
                if "hessian" in self.aggregate_by else "")
             + (f", every {self.position_stride}th position" if self.position_stride > 1 else "")
             if not self.ablation else self._ablation_text()),
            *([f"examples top {self.top_examples} tokens per {'feature' if self.target == 'sae' else 'dimension'} "
               f"by |{'|, |'.join(names.kind_of(p) for p in self.example_prefixes)}| "
               f"({self.example_bytes() / 2**20:.1f} MiB per partial)"] if self.top_examples else []),
            f"samples  {self.samples} (requested {self.samples_requested}), "
            f"{self._batch_text()}, max {self.max_length} tokens",
            *([f"loss     on the completion's tokens only: column {self.source['completion_column']}, after the "
               f"prompt in column {self.source['prompt_column']} (context)"]
              if (self.source or {}).get("completion_column") is not None else []),
            *([f"skipped  {self._skipped_text()}"] if self.skipped_texts else []),
            f"shards   {self._shards_text()}",
            f"workers  {self._workers_text()}",
            *([f"memory   {self.memory().describe()}"] if self.weight_bytes else []),
            *describe_pins(self),
            *(f"warning: {text}" for text in self.warnings),
        ])

    def _ablation_text(self) -> str:
        """raygrad ablate's work per batch (compute.ablation)."""
        entries, each = len(self.ablation["rows"]), self.ablation["each"]
        return (f"ablate   {entries} entries, mode {self.ablation['mode']}: per batch a clean forward + backward "
                f"and {1 + entries if each else 1} ablated forward(s) (jointly{', and each alone' if each else ''})")

    def _shards_text(self) -> str:
        if not self.shards:
            return "planned from the dataset when the run starts"
        tokens = sum(shard.est_tokens for shard in self.shards)
        return (f"{len(self.shards)}, each <= {max(shard.texts for shard in self.shards)} samples and about "
                f"{_count(max(shard.est_tokens for shard in self.shards))} target tokens ({_count(tokens)} in all, "
                f"estimated at {self.tokens_per_char:.3f} tokens per character)")

    def _skipped_text(self) -> str:
        from .dataset.text import (
            REPLACED_BYTES,
            SKIP_COMPLETION_CUT,
            SKIP_NO_COMPLETION,
            SKIP_NOT_TEXT,
            SKIP_SHORT,
            SKIP_UNREADABLE,
        )

        said = {SKIP_SHORT: "rows too short (--min-chars)", SKIP_NOT_TEXT: "rows whose text is null, missing or "
                "not a string", REPLACED_BYTES: "lines kept with bytes that are not UTF-8 (replaced by U+FFFD)",
                SKIP_UNREADABLE: "CSV records the csv module cannot read (a field over its size limit)",
                SKIP_NO_COMPLETION: "rows without a completion (missing, null or empty)",
                SKIP_COMPLETION_CUT: f"rows whose prompt fills --max-length {self.max_length} (no completion token "
                "left)"}
        return "; ".join(f"{count} {said.get(reason, reason)}" for reason, count in self.skipped_texts.items())

    def _sae_lines(self) -> list[str]:
        if self.target != "sae":
            return []
        passes = (f"{self.sae_layers_per_pass} layers' SAEs per forward+backward (the rest wait in CPU memory)"
                  if self.sae_layers_per_pass and self.sae_layers_per_pass < len(self.layers) else
                  "all layers' SAEs per forward+backward, unless a worker's GPU cannot hold them "
                  "(then as many as fit, said when it starts)")
        return [f"sae      {self.saes[0]['source']}{' ...' if len(self.saes) > 1 else ''}",
                f"features {self.width} per layer, {self.sae_mode} mode; {passes}"]


def make_plan(config: RunConfig, num_texts: int, workers: int = 0, device: str = "cpu") -> Plan:
    """Resolve `config` against the model's config (no weights) and the SAEs.
    `workers`, `device` and what depends on them (batching, shards) are filled
    in again by `placed` once the cluster is known."""
    model_revision = pin_model(config.model)  # first, so the config read is the pinned commit's
    model_config = load_model_config(config.model, revision=model_commit(model_revision))
    family = family_of(model_config)
    num_layers = text_config(model_config).num_hidden_layers
    layers = parse_layer_spec(config.layers, num_layers) if config.layers else list(range(num_layers))
    site_width = text_config(model_config).hidden_size
    sae_revisions = pin_saes(sae_source(config), layers) if config.target == "sae" else None
    saes, warnings = _sae_entries(config, layers, site_width, sae_revisions) if config.target == "sae" else (None, [])
    skeleton = _skeleton(model_config)
    weight_bytes, sae_bytes, token_bytes = weight_sae_token_bytes(
        skeleton, text_config(model_config), config.dtype, [e["d_sae"] for e in saes or []], config.sae_dtype)
    return Plan(
        model=config.model,
        model_path=resolve_model_path(config.model),
        family=family,
        num_model_layers=num_layers,
        layers=layers,
        hook_site=config.hook_site,
        module_paths=[site.path for site in resolve_hook_sites(skeleton, layers, config.hook_site)],
        width=saes[0]["d_sae"] if saes else site_width,
        samples_requested=config.num_samples,
        samples=num_texts,
        shards=[],
        workers=workers,
        device=device,
        dtype=config.dtype,
        exclude_bos=config.exclude_bos,
        batch_size=None,
        max_length=config.max_length,
        target=config.target,
        site_width=site_width,
        aggregate_by=config.aggregate_by,
        hessian_probes=config.hessian_probes,
        top_examples=config.top_examples,
        position_stride=config.position_stride,
        sae_mode=config.sae_mode if config.target == "sae" else None,
        sae_source=sae_source(config) if config.target == "sae" else None,
        saes=saes,
        warnings=tuple(warnings),
        sae_dtype=config.sae_dtype,
        weight_bytes=weight_bytes,
        sae_bytes=sae_bytes,
        token_bytes=token_bytes,
        model_revision=model_revision,
        sae_revisions=sae_revisions,
        dataset_revision=pin_dataset(config.dataset),
    ).placed(config, workers, device)


def sae_source(config: RunConfig) -> dict:
    """Where the SAEs come from; a local template made absolute, since workers and a resumed run may start
    in another directory (abspath keeps the '{layer}' in it)."""
    path = os.path.abspath(os.path.expanduser(config.sae_path)) if config.sae_path else None
    return {"release": config.sae_release, "sae_id": config.sae_id, "path": path}


def _sae_entries(config: RunConfig, layers: list[int], site_width: int, pins: list[dict] | None = None
                 ) -> tuple[list[dict], list[str]]:
    """Each layer's SAE, described and checked against the hook site, from its
    configuration alone: the driver never reads SAE weights (workers load them)."""
    from .errors import RaygradError
    from .model.saes import read_sae_info

    option = f"--sae-path {config.sae_path}" if config.sae_path else f"--sae-id {config.sae_id}"
    entries, warnings = [], []
    for index, layer in enumerate(layers):
        commit = pins[index].get("commit") if pins else None  # a release's config at its pinned commit
        info = read_sae_info(layer, **sae_load_kwargs(sae_source(config)), revision=commit)
        entry = {"layer": layer, "source": info.source, "d_in": info.d_in, "d_sae": info.d_sae,
                 "hook_name": info.hook_name, "trained_site": info.trained_site,
                 "neuronpedia_id": info.neuronpedia_id}
        if entry["d_in"] != site_width:
            raise RaygradError(
                f"{option} (layer {layer}): SAE input width {entry['d_in']} differs from the width {site_width} "
                f"of hook site {config.hook_site}"
            )
        if entry["trained_site"] and entry["trained_site"] != config.hook_site:
            warnings.append(f"layer {layer}: the SAE was trained on {entry['hook_name']} ({entry['trained_site']}), "
                            f"applied here to --hook-site {config.hook_site}")
        entries.append(entry)
    widths = {entry["d_sae"] for entry in entries}
    if len(widths) > 1:
        raise RaygradError(f"{option}: SAEs of different widths {sorted(widths)}; run layers of one width together")
    return entries, warnings


def sae_load_kwargs(source: dict) -> dict:
    return {key: value for key, value in source.items() if value is not None}


def _skeleton(model_config):
    """The model's module tree on the meta device: paths without weights, and without initializing
    them (meta tensors still run torch's init functions: 1.3 s in a fresh process for Llama-3-8B)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(), _no_weight_init():
        return AutoModelForCausalLM.from_config(model_config)


def _no_weight_init():
    """transformers' own switch for skipping weight initialization (from_pretrained uses it), where it is."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def run_dir_name(config: RunConfig, plan: Plan, timestamp: str) -> str:
    """The original scripts' pattern, e.g.
    layer_activations_model_Qwen_Qwen2.5-0.5B_num_samples_500_batch_size_4_layers_0-23_20261126_142233"""
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", config.model.strip("/")).strip("_")
    prefix = names.SAE_RUN_PREFIX if plan.target == "sae" else names.MLP_RUN_PREFIX
    return (
        f"{prefix}_model_{model}_num_samples_{plan.samples}_batch_size_{plan.batch_label()}"
        f"_layers_{layer_span(plan.layers).replace(',', '_')}_{timestamp}"
    )


def _count(n: int) -> str:
    """1234 -> '1.2k', 1234567 -> '1.2M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def layer_span(layers: list[int], separator: str = ",") -> str:
    """[0, 1, 2, 3, 10] -> '0-3,10': runs of consecutive layers as ranges."""
    parts, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = cur
    return separator.join(parts)
