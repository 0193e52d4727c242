"""RunConfig: the user's request, validated. Resolved values live in Plan.

Its fields fall in three frozen parts, each field naming its own in its metadata: what is measured
(`measured()`: what the store's numbers are), how it executes (`execution()`: any of it may change on
--resume) and what is exported (`export()`). Resume, compare and the CLI read the parts from those tags."""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Union, get_args

from .constants import EXAMPLE_KINDS, MAX_TOP_EXAMPLES, NORMALIZE_MODES, STATISTICS
from .errors import RaygradError

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B"
AGGREGATE_KINDS = ("gradients", "values", "attribution", "hessian")
DEFAULT_BATCH_SIZE = 4  # texts, the original scripts' default (used on a CPU)
GPU_SHARD_TOKENS = 1 << 20  # estimated target tokens per shard on a GPU worker (~1M)
CPU_SHARD_TOKENS = 1 << 16  # on a CPU (64k): a shard of minutes, not hours
# Auto budgets, in padded tokens per batch (texts x longest text). On an H200
# (benchmarks/results/gpu_h200_run*.json), 4096-token batches were within a few
# percent of the fastest measured for Qwen2.5-0.5B, Llama-3.1-8B and Gemma-2-2B
# shapes, and larger ones were slower (a bare loop: 52k tokens/s at 4096, 46k at
# 16384, 18k at 65536, with no allocator retries), so a GPU gets 4096 unless its
# memory says less.
AUTO_GPU_TOKENS = 4096
AUTO_CPU_TOKENS = 2048  # a CPU computes at the same rate from a few hundred tokens up
SHARDS_PER_WORKER = 4  # at least, for a run small for its workers: work spreads, a lost worker costs little
ALL = "all"  # --num-samples all: every usable text of the dataset


# The three parts of a RunConfig (DESIGN.md section 2); each field names its own in its metadata.
MEASURED = "measured"  # what the store's numbers are: a resume keeps it, `compare` checks it
EXECUTION = "execution"  # where and how it runs: any of it may change on --resume
EXPORT = "export"  # what is written from the store at the end (`raygrad export` derives other sets)
PARTS = (MEASURED, EXECUTION, EXPORT)


def _opt(default, help: str, part: str, **extra):
    return field(default=default, metadata={"help": help, "part": part, **extra})


def _measured(default, help: str, **extra):
    return _opt(default, help, MEASURED, **extra)


def _sample(default, help: str, **extra):
    """Measured, and says which sample the statistics estimate over: which texts, how much of each, which
    Hessian probe draws. Two runs over different samples of one measurement can be compared."""
    return _opt(default, help, MEASURED, sample=True, **extra)


def _kept(default, help: str, **extra):
    """Measured (a resume keeps it: the store was made for it), but not part of the statistics: two runs that
    differ in it have the same sums, so `compare` does not check it (--top-examples)."""
    return _opt(default, help, MEASURED, statistics=False, **extra)


def _execution(default, help: str, **extra):
    return _opt(default, help, EXECUTION, **extra)


def _planned(default, help: str, **extra):
    """Execution, but fixed once the shards are planned: a resume keeps the saved shards, so it says so."""
    return _opt(default, help, EXECUTION, planned=True, **extra)


def _export(default, help: str, **extra):
    return _opt(default, help, EXPORT, **extra)


@dataclass(frozen=True)
class RunConfig:
    # Validation is split into rules (_normalize_counts, _check_*), each declared after the fields it reads;
    # __post_init__, after the last field, runs them in the order that decides which problem is reported first.
    model: str = _measured(DEFAULT_MODEL, "Hub id, local directory, or the bundled 'smollm2-135m'.")
    target: Literal["mlp", "sae"] = _measured(
        "mlp", "Target space: 'mlp' = the hook site's dimensions; 'sae' = the features of an SAE on that site.")
    num_samples: Union[int, Literal["all"]] = _sample(
        500, "Number of texts to aggregate over: the first N usable texts of the dataset, or 'all'.")
    batch_size: Optional[str] = _execution(
        None, "Texts per forward/backward pass, or 'auto': texts sorted by length and packed to a token budget "
        "learned from the device's free memory. Default: auto on a GPU, 4 on a CPU.")

    def _normalize_counts(self) -> None:
        """--batch-size (unset, 'auto' or a count) and --num-samples ('all' or a count), normalised in place:
        '8' becomes 8, ' AUTO ' becomes 'auto'."""
        self._normalize_count("batch_size", "auto", unset_allowed=True)
        self._normalize_count("num_samples", ALL)

    tokens_per_batch: Optional[int] = _execution(
        None, "Pack texts sorted by length up to this many (padded) tokens per batch; overrides --batch-size.")
    max_length: int = _sample(128, "Tokens per text after truncation (>= 2).")

    def _check_batching(self) -> None:
        """--max-length, and --tokens-per-batch against it and against --batch-size."""
        if not is_integer(self.max_length) or self.max_length < 2:
            raise RaygradError(f"--max-length {self.max_length}: must be >= 2 (one input and one target token)")
        if self.tokens_per_batch is not None and (not is_integer(self.tokens_per_batch)
                                                  or self.tokens_per_batch < self.max_length):
            raise RaygradError(f"--tokens-per-batch {self.tokens_per_batch}: must be an integer >= --max-length "
                               f"({self.max_length}), so the longest text fits in a batch")
        if self.tokens_per_batch is not None and self.batch_size is not None:
            raise RaygradError(f"--tokens-per-batch {self.tokens_per_batch}: give it or --batch-size "
                               f"{self.batch_size}, not both")

    layers: Optional[str] = _measured(None, "Layers: a range '0-23', a list '0,5,10' or both; default every layer.")

    def _check_layer_spec(self) -> None:
        if self.layers is not None:
            parse_layer_spec(self.layers)  # format only; range is checked against the model in the plan

    hook_site: Literal["mlp_out", "mlp", "resid_post", "attn_out"] = _measured(
        "mlp_out", "mlp_out: MLP block's contribution to the residual stream; mlp: the MLP module's output; "
        "resid_post: decoder layer output; attn_out: attention block's contribution.")
    exclude_bos: bool = _measured(False, "Leave the BOS position out of the aggregation (it stays in the loss).")
    sae_release: Optional[str] = _measured(None, "sae-lens registry release (with --sae-id), for --target sae.")
    sae_id: Optional[str] = _measured(None, "SAE id inside --sae-release; '{layer}' is replaced by each layer index.")
    sae_path: Optional[str] = _measured(
        None, "Local SAE directory (sae-lens or dictionary_learning format); '{layer}' is replaced per layer.")
    sae_mode: Literal["clean", "splice", "splice-all"] = _measured(
        "clean", "clean: unmodified model, SAE error held constant, one pass for all layers; "
        "splice: the reconstruction replaces the output at the aggregated positions only, one pass per layer "
        "(the original script); splice-all: replaced at every position.")
    sae_layers_per_pass: Optional[int] = _execution(
        None, "SAE layers per forward+backward. Default: every layer when their SAEs fit beside the model on the "
        "worker's GPU, else as many as fit (the others wait in CPU memory and come over for their pass).")

    def _check_sae_layers_per_pass(self) -> None:
        self._check_unset_or_at_least("sae_layers_per_pass", 1)

    def _check_sae_source(self) -> None:
        """--target sae needs one SAE source; --target mlp takes none of the SAE options."""
        has_release = self.sae_release is not None or self.sae_id is not None
        if self.target == "mlp":
            for name in ("sae_release", "sae_id", "sae_path", "sae_layers_per_pass"):
                if getattr(self, name) is not None:
                    raise RaygradError(f"--{dashed(name)} {getattr(self, name)}: only used with --target sae")
            if self.sae_mode != "clean":
                raise RaygradError(f"--sae-mode {self.sae_mode}: only used with --target sae")
            return
        if has_release and self.sae_path is not None:
            raise RaygradError(
                f"--sae-path {self.sae_path}: give either --sae-path or --sae-release/--sae-id, not both"
            )
        if has_release and (self.sae_release is None or self.sae_id is None):
            raise RaygradError("--sae-release/--sae-id: give both (the id may contain '{layer}')")
        if not has_release and self.sae_path is None:
            raise RaygradError("--target sae: needs --sae-path TEMPLATE or --sae-release R --sae-id TEMPLATE")

    position_stride: int = _measured(1, "Aggregate every K-th position only (the original SAE script used 4).")
    aggregate_by: tuple[str, ...] = _measured(
        ("gradients",), "What to aggregate (repeatable): gradients, values (activations), attribution (grad x value), "
        "hessian (Hutchinson estimate of the Hessian diagonal d2Loss/dz2).", multiple=True)

    def _check_aggregate_by(self) -> None:
        """Normalised to a tuple; each kind known, each once, at least one."""
        object.__setattr__(self, "aggregate_by", tuple(self.aggregate_by))  # lists from JSON or the CLI
        for kind in self.aggregate_by:
            if kind not in AGGREGATE_KINDS:
                raise RaygradError(f"--aggregate-by {kind!r}: choose from {', '.join(AGGREGATE_KINDS)}")
        if not self.aggregate_by or len(set(self.aggregate_by)) != len(self.aggregate_by):
            raise RaygradError(f"--aggregate-by {','.join(self.aggregate_by)}: give each kind once, at least one")

    hessian_probes: int = _measured(
        1, "Rademacher probes per token for --aggregate-by hessian, one extra double backward per batch each; "
        "the per-token estimate is their mean, reproducible for a given --seed.")

    def _check_stride_and_probes(self) -> None:
        self._check_integer("position_stride", 1)
        self._check_integer("hessian_probes", 1)

    def _check_probes_need_hessian(self) -> None:
        if self.hessian_probes != 1 and "hessian" not in self.aggregate_by:
            raise RaygradError(f"--hessian-probes {self.hessian_probes}: only --aggregate-by hessian draws probes; "
                               "add --aggregate-by hessian, or drop --hessian-probes")

    top_examples: int = _kept(
        0, "Keep, for every layer and dimension (every SAE feature), the K tokens with the largest |score| of "
        "each collected kind among gradients, attribution and values: score, dataset row, token position "
        "(read them with raygrad examples / raygrad report). 0 = off; at most 64.")

    def _check_top_examples(self) -> None:
        if not isinstance(self.top_examples, int) or not 0 <= self.top_examples <= MAX_TOP_EXAMPLES:
            raise RaygradError(f"--top-examples {self.top_examples}: must be an integer from 1 to "
                               f"{MAX_TOP_EXAMPLES} (0, the default, keeps none)")
        if self.top_examples and not set(EXAMPLE_KINDS) & set(self.aggregate_by):
            raise RaygradError(f"--top-examples {self.top_examples}: examples rank gradients, attribution or "
                               f"values; --aggregate-by {','.join(self.aggregate_by)} collects none of them")

    device: Literal["auto", "cuda", "cpu"] = _execution("auto", "Device for each worker.")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = _measured(
        "float32", "Model weights and activations; sums are float64 whatever this is.")
    sae_dtype: Literal["float32", "bfloat16", "float16"] = _measured(
        "float32", "SAE weights and the feature projection (float64 under a float64 model); sums stay float64.")
    aggregation_mode: str = _export(
        "mean_abs", "Statistics to export, comma-separated: mean_abs, mean, mean_sq (E[x^2]; for gradients the "
        "diagonal empirical Fisher), std, sem; 'both' = mean_abs,mean; 'all' = every one.")
    power: float = _export(1.0, "After aggregation, raise each value: sign(x)|x|^P (x^P for mean_abs and the others "
                             "that are >= 0); P > 0.")
    normalize_mode: Optional[str] = _export(
        None, "After --power, rescale each layer's vector: sum_abs x*D/sum|x|, sum x*D/sum x (a vector whose sum is 0 "
        "stays as it is), none, or all (every mode, '_norm_{mode}' in file names and keys). Default: none, or "
        "sum_abs with --normalize-gradients.")
    normalize_gradients: bool = _export(False, "Rescale each exported vector so sum(|v|) equals its length "
                                            "(= --normalize-mode sum_abs).")

    def _check_export_options(self) -> None:
        parse_statistics(self.aggregation_mode)
        self._check_number("power", "a number > 0", lambda v: 0 < v < float("inf"))
        modes = (*NORMALIZE_MODES, "all")
        if self.normalize_mode is not None and self.normalize_mode not in modes:
            raise RaygradError(f"--normalize-mode {self.normalize_mode!r}: choose one of {', '.join(modes)}")
        if self.normalize_gradients and self.normalize_mode not in (None, "sum_abs"):
            raise RaygradError(f"--normalize-mode {self.normalize_mode}: --normalize-gradients means "
                               "--normalize-mode sum_abs; give one of them")

    save_outputs: bool = _export(False, "Also write per-layer .npy files and plots.")
    plots: bool = _export(True, "With --save-outputs, also draw the plots (per layer and statistic: histogram and "
                          "scatter; per statistic: all-layer heatmap and summary), ~0.07 s each; --no-plots: the "
                          ".npy files only.")
    save_consolidated: Optional[str] = _export(None, "Also write the consolidated .npz to this path.")
    dataset: str = _sample("wikitext", "Hub dataset, a local .txt/.jsonl/.parquet/.csv file, or 'stdlib-docs'.")
    dataset_config: Optional[str] = _sample(None, "Hub dataset configuration; default wikitext-2-raw-v1 for wikitext.")
    dataset_split: str = _sample("train", "Hub dataset split.")
    text_column: str = _sample("text", "Column (or JSON key) holding the text.")
    prompt_column: Optional[str] = _sample(
        None, "With --completion-column: the column holding each row's prompt, context only (not in the loss).")
    completion_column: Optional[str] = _sample(
        None, "With --prompt-column: the column holding each row's completion; the loss and every statistic "
        "cover only the tokens it predicts (a row without one is skipped and counted).")

    def _check_completion_columns(self) -> None:
        """--prompt-column and --completion-column together, two columns, instead of --text-column."""
        for name, other in (("prompt_column", "completion_column"), ("completion_column", "prompt_column")):
            if getattr(self, name) is not None and getattr(self, other) is None:
                raise RaygradError(f"--{dashed(name)} {getattr(self, name)}: give --{dashed(other)} too (the loss "
                                   "is taken over the completion's tokens, the prompt is their context)")
        if self.completion_column is None:
            return
        if self.prompt_column == self.completion_column:
            raise RaygradError(f"--completion-column {self.completion_column}: the same column as --prompt-column; "
                               "give two columns")
        if self.text_column != "text":
            raise RaygradError(f"--text-column {self.text_column}: give it (one text per row) or --prompt-column/"
                               "--completion-column (a prompt and its completion per row), not both")
    min_chars: int = _sample(50, "Keep only texts longer than this many characters (stripped).")

    def _check_min_chars(self) -> None:
        self._check_integer("min_chars", 0)  # 0 keeps every non-empty text

    output_dir: str = _export("raygrad_results", "Parent directory; each run gets its own directory inside.")

    def _check_local_outputs(self) -> None:
        for name in ("output_dir", "save_consolidated"):
            refuse_url(f"--{dashed(name)}", getattr(self, name))
    workers: Optional[int] = _execution(
        None, "Ray worker actors; 0 = in-process without Ray; default one per GPU, else 1.")
    address: Optional[str] = _execution(None, "Ray cluster address; default starts a local Ray on 127.0.0.1.")

    def _check_workers(self) -> None:
        if self.workers == 0 and self.address:
            raise RaygradError(f"--workers 0: runs in this process without Ray, so --address {self.address} "
                               "would be ignored; give --workers N to use that cluster, or drop --address")
        if self.workers is not None and (not is_integer(self.workers) or self.workers < 0):
            raise RaygradError(f"--workers {self.workers}: must be >= 0 (0 = in-process, no Ray)")

    gpus_per_worker: Optional[int] = _execution(
        None, "GPUs each worker actor reserves; default 1 when the cluster has GPUs or --device cuda, else 0. "
        "On an autoscaling cluster give it: workers are then asked for whatever is up.")

    def _check_gpus_per_worker(self) -> None:
        self._check_unset_or_at_least("gpus_per_worker", 0)
        if self.gpus_per_worker == 0 and self.device == "cuda":
            raise RaygradError("--gpus-per-worker 0: workers would see no GPU, but --device cuda asks for one")
        if self.workers == 0 and self.gpus_per_worker:
            raise RaygradError(f"--gpus-per-worker {self.gpus_per_worker}: --workers 0 runs in this process "
                               "without Ray workers, so it would have no effect; give --workers N to run Ray "
                               "workers, or drop --gpus-per-worker")

    allow_offload: bool = _execution(
        False, "Let accelerate put what does not fit on a worker's GPUs in CPU memory or on disk (slow).")
    worker_timeout: float = _execution(900.0, "Seconds to wait with no worker placed on a node before stopping (a "
                                 "worker loading its model or computing counts as placed); the run stays resumable.")
    connect_timeout: float = _execution(60.0, "Seconds to keep trying to reach the --address cluster before stopping.")
    checkpoint_seconds: float = _execution(
        30.0, "Seconds between checkpoints (the last shard always checkpoints); a kill loses at most this much "
        "finished work, plus the shards in flight.")

    def _check_timeouts(self) -> None:
        self._check_number("worker_timeout", "a number of seconds > 0", lambda v: v > 0)
        for name in ("connect_timeout", "checkpoint_seconds"):
            self._check_number(name, "a number of seconds >= 0", lambda v: v >= 0)

    shard_size: Optional[int] = _planned(
        None, "Texts per shard (unit of work, retry and checkpoint); default a budget of estimated target tokens: "
        "about 1M on a GPU, 64k on a CPU, and at least 4 shards per Ray worker.")

    def _check_shard_size(self) -> None:
        self._check_unset_or_at_least("shard_size", 1)

    seed: int = _sample(42, "Seed for torch, numpy and random.")

    def _check_choices(self) -> None:
        """Every Literal field (--target, --hook-site, --sae-mode, --device, --dtype, --sae-dtype)."""
        for f in dataclasses.fields(self):
            choices = field_choices(f)
            if choices and getattr(self, f.name) not in choices:
                raise RaygradError(
                    f"--{dashed(f.name)} {getattr(self, f.name)!r}: choose one of {', '.join(choices)}"
                )

    def __post_init__(self) -> None:
        """Run the rules, each declared after the fields it reads. The first problem found is the one reported,
        so this order, not the fields', says which of several problems a user sees."""
        self._normalize_counts()
        self._check_min_chars()
        self._check_completion_columns()
        self._check_stride_and_probes()
        self._check_top_examples()
        self._check_probes_need_hessian()
        self._check_batching()
        self._check_sae_layers_per_pass()
        self._check_shard_size()
        self._check_gpus_per_worker()
        self._check_timeouts()
        self._check_workers()
        self._check_choices()
        self._check_layer_spec()
        self._check_aggregate_by()
        self._check_sae_source()
        self._check_export_options()
        self._check_local_outputs()

    # --- what the rules share

    def _check_integer(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if not is_integer(value) or value < low:
            raise RaygradError(f"--{dashed(name)} {value}: must be an integer >= {low}")

    def _check_unset_or_at_least(self, name: str, low: int) -> None:
        """None (unset), or an integer not below `low` (from Python or a saved config, 1.5 or '2' too)."""
        if getattr(self, name) is not None:
            self._check_integer(name, low)

    def _check_number(self, name: str, allowed: str, ok) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise RaygradError(f"--{dashed(name)} {value}: must be {allowed}")

    def _normalize_count(self, name: str, word: str, unset_allowed: bool = False) -> None:
        """A field that takes an integer >= 1 or `word` ('all', 'auto'): '8' (from the command line) becomes 8,
        ' All ' becomes 'all'; None stays where `unset_allowed`; anything else ('²', Arabic-Indic digits, '1_0')
        is refused."""
        value = getattr(self, name)
        if value is None and unset_allowed:
            return
        if isinstance(value, str) and value.strip().lower() == word:
            object.__setattr__(self, name, word)
            return
        if isinstance(value, str) and is_ascii_count(value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RaygradError(f"--{dashed(name)} {getattr(self, name)}: must be an integer >= 1 or '{word}', "
                               "in ASCII digits 0-9")
        object.__setattr__(self, name, value)

    @property
    def sample_limit(self) -> int | None:
        """--num-samples as a count; None for all."""
        return None if self.num_samples == ALL else self.num_samples

    @property
    def export_modes(self) -> tuple[str, ...]:
        """The statistics to export, in the order given."""
        return parse_statistics(self.aggregation_mode)

    @property
    def normalize_modes(self) -> tuple[str | None, ...]:
        """Each normalize mode to export; None stands for the one mode of a run without 'all' (its
        files keep the original's names), a mode name for 'all' (names get '_norm_{mode}')."""
        if self.normalize_mode == "all":
            return NORMALIZE_MODES
        return (None,)

    @property
    def normalization(self) -> str:
        """The single normalize mode (not 'all'): none, sum_abs or sum."""
        return self.normalize_mode or ("sum_abs" if self.normalize_gradients else "none")

    def batching(self, device: str) -> str:
        """'texts' (a fixed count), 'tokens' (a budget by hand) or 'auto', on `device`."""
        if self.tokens_per_batch is not None:
            return "tokens"
        if self.batch_size == "auto" or (self.batch_size is None and device.startswith("cuda")):
            return "auto"
        return "texts"

    def texts_per_batch(self) -> int:
        return self.batch_size if isinstance(self.batch_size, int) else DEFAULT_BATCH_SIZE

    def shard_tokens(self, device: str) -> int:
        """The default shard's budget of estimated target tokens on `device` (--shard-size overrides it)."""
        return GPU_SHARD_TOKENS if device.startswith("cuda") else CPU_SHARD_TOKENS

    @property
    def consolidated_path(self) -> str | None:
        """--save-consolidated as numpy writes it: '.npz' is appended to a name without it."""
        path = self.save_consolidated
        return path if path is None or path.endswith(".npz") else path + ".npz"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # --- the three parts

    def measured(self) -> "Measured":
        """What the store's numbers are: model, layers, site, target, SAEs, sample, statistics, dtypes."""
        return self._part(Measured)

    def execution(self) -> "Execution":
        """Where and how it runs: cluster, workers, device, batching, timeouts, checkpoints, shards."""
        return self._part(Execution)

    def export(self) -> "Export":
        """What is written from the store when the run completes."""
        return self._part(Export)

    def _part(self, part: type):
        return part(**{f.name: getattr(self, f.name) for f in dataclasses.fields(part)})

    @classmethod
    def from_parts(cls, measured: "Measured", execution: "Execution", export: "Export") -> "RunConfig":
        """The whole, validated (checks that span parts, such as --tokens-per-batch >= --max-length, run here)."""
        return cls(**measured.to_dict(), **execution.to_dict(), **export.to_dict())


def fields_of(part: str, sample: bool | None = None, statistics: bool | None = None) -> tuple[str, ...]:
    """RunConfig's fields in `part`, in declaration order; `sample` True/False: only those that do/do not
    say which sample is measured (dataset selection, --max-length, --seed); `statistics` True/False: only
    those that do/do not change the statistics (not: --top-examples)."""
    return tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata["part"] == part
                 and (sample is None or f.metadata.get("sample", False) == sample)
                 and (statistics is None or f.metadata.get("statistics", True) == statistics))


def part_of(name: str) -> str:
    """'measured', 'execution' or 'export' for a RunConfig field."""
    for f in dataclasses.fields(RunConfig):
        if f.name == name:
            return f.metadata["part"]
    raise RaygradError(f"--{dashed(name)}: not an option of raygrad run")


def planned_fields() -> tuple[str, ...]:
    """Execution options that take effect only when the shards are planned (a resume keeps its shards)."""
    return tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("planned"))


def _part_class(part: str) -> type:
    """A frozen dataclass of RunConfig's fields in `part` (same names, types, defaults and metadata). Plain
    data: the checks, several of which span parts, are RunConfig's (from_parts)."""
    hints = typing.get_type_hints(RunConfig)
    fields = [(f.name, hints[f.name], field(default=f.default, metadata=f.metadata))
              for f in dataclasses.fields(RunConfig) if f.metadata["part"] == part]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        # JSON gives lists: the one sequence field (aggregate_by) is a tuple
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})

    cls = dataclasses.make_dataclass(part.capitalize(), fields, frozen=True,
                                     namespace={"to_dict": to_dict, "from_dict": from_dict,
                                                "__doc__": f"The {part} part of a RunConfig."})
    cls.__module__ = __name__  # pickles (Ray) by its name here
    return cls


Measured = _part_class(MEASURED)
Execution = _part_class(EXECUTION)
Export = _part_class(EXPORT)


def parse_statistics(spec: str) -> tuple[str, ...]:
    """'mean_abs,std' -> ('mean_abs', 'std'); 'both' -> ('mean_abs', 'mean'); 'all' -> every statistic."""
    aliases = {"both": ("mean_abs", "mean"), "all": STATISTICS}
    parts = [part.strip() for part in str(spec).split(",")]
    chosen = [s for part in parts for s in aliases.get(part, (part,))]
    unknown = [s for s in chosen if s not in STATISTICS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        problem = f"{unknown[0]!r} is not a statistic" if unknown else "each statistic once"
        raise RaygradError(f"--aggregation-mode {spec}: {problem}; choose from {', '.join(STATISTICS)} "
                           "(comma-separated), both or all")
    return tuple(chosen)


URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # s3://, gs://, file://, https://: not a local path


def refuse_url(option: str, value: str | None) -> None:
    """Results are written to local paths only: a URL given for one is one line, never a local ./s3:/...
    directory (pathlib collapses the //)."""
    if value is not None and URL_SCHEME.match(str(value)):
        raise RaygradError(f"{option} {value}: raygrad writes its results to local paths, not URLs; give a local "
                           "path (on a cluster, the driver's disk) and copy the results to object storage after")


def is_integer(value) -> bool:
    """An int, not a bool (True is an int to Python, not a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_ascii_count(text: str) -> bool:
    """Whether `text` is ASCII digits only: str.isdigit() also accepts '²' (which int() refuses) and
    Arabic-Indic or full-width digits (which int() reads), and int() accepts '1_000' and '+1'."""
    return text.isascii() and text.isdigit()


def dashed(name: str) -> str:
    """A field's name as its command-line option is spelled: sae_path -> sae-path."""
    return name.replace("_", "-")


def field_type(name: str):
    """The resolved annotation of a RunConfig field (annotations are strings here)."""
    return _resolved_annotations()[name]


@functools.cache
def _resolved_annotations() -> dict:
    """typing.get_type_hints(RunConfig), resolved once: it evaluates every annotation string (a
    few ms), and each RunConfig checks each field's choices."""
    return typing.get_type_hints(RunConfig)


def field_choices(f: dataclasses.Field) -> tuple[str, ...]:
    hint = field_type(f.name)
    return get_args(hint) if typing.get_origin(hint) is Literal else ()


_SPEC_PART = re.compile(r"^\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?$")  # ASCII digits: int() takes others too


def parse_layer_spec(spec: str, num_layers: Optional[int] = None) -> list[int]:
    """'0-23' -> [0..23], '0,5,10' -> [0, 5, 10], '0-3,10' -> [0, 1, 2, 3, 10].

    With num_layers, every index must lie in [0, num_layers)."""
    layers: list[int] = []
    for part in spec.split(","):
        match = _SPEC_PART.match(part)
        if not match:
            raise RaygradError(
                f"--layers {spec!r}: use a range like '0-23', a list like '0,5,10', or both ('0-3,10')"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise RaygradError(f"--layers {spec!r}: range {first}-{last} runs backwards")
        layers.extend(range(first, last + 1))
    if len(set(layers)) != len(layers):
        raise RaygradError(f"--layers {spec!r}: a layer is listed twice")
    if num_layers is not None:
        bad = [layer for layer in layers if layer >= num_layers]
        if bad:
            raise RaygradError(
                f"--layers {spec!r}: layer {bad[0]} is out of range; this model has layers 0-{num_layers - 1}"
            )
    return sorted(layers)
