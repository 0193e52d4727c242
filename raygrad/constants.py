"""Every on-disk name raygrad writes (arrays, attributes, files), and the names a user gives for what is
bundled with it.

Readers (export, load_results, later sessions) import these instead of
repeating string literals, so a rename happens in exactly one place.
"""

BUNDLED_CORPUS = "stdlib-docs"  # --dataset: paragraphs of the running Python's standard-library docstrings

STORE_NAME = "results.zarr"
PENDING_CHECKPOINT = "pending_checkpoint.npz"  # redo log inside the store
CHECKPOINT_STATE = "checkpoint_state.json"  # digests of what the last checkpoint wrote, inside the store
LOCK_FILE = ".raygrad.lock"  # in a run directory while a driver writes it: {pid, host, command, since, heartbeat}

# Arrays in the store (DESIGN §5).
LAYERS = "layers"  # (L,) layer index of each row (kept for readers of earlier stores)
LAYER_COORD = "layer"  # the same indices as the `layer` dimension's coordinate, for xarray
TOKENS = "tokens"
# Dimension names: a site's own dimensions, or an SAE's features (they differ in width).
DIM_SITE = "dim"
DIM_FEATURE = "feature"
# Each aggregated quantity ("kind") has three running sums named
# {prefix}_sum, {prefix}_abs_sum, {prefix}_sq_sum; every statistic is derived from them.
KIND_PREFIX = {"gradients": "grad", "values": "value", "attribution": "attr", "hessian": "hess"}
SITE_PREFIX = "site_grad"  # target sae: the hook site's own d-dim gradient (= the SAE error node's)
SITE_KIND = "site_gradients"
SITE_VALUE_PREFIX = "site_value"  # target sae: the hook site's activations x (the SAE's input, for its FVU)
SITE_VALUE_KIND = "site_values"
STATS = ("sum", "abs_sum", "sq_sum")
# Statistics per dimension, derived from the sums (docs/outputs.md, "Names"): store arrays {prefix}_{statistic}.
STATISTICS = ("mean_abs", "mean", "mean_sq", "std", "sem")
MEAN_ARRAYS = {  # prefix -> (signed mean, mean of |x|) as written at finalize
    prefix: (f"{prefix}_mean", f"{prefix}_mean_abs")
    for prefix in (*KIND_PREFIX.values(), SITE_PREFIX, SITE_VALUE_PREFIX)
}
# Stores written before the naming table (raygrad 0.1 sessions) named the means differently; readers
# derive every statistic from the sums, so these are only accepted as spellings of `top --by`.
LEGACY_MEAN_NAMES = {"mean": "grad_mean", "mean_abs": "grad_mean_abs", "site_mean": "site_grad_mean",
                     "site_mean_abs": "site_grad_mean_abs"}
NORMALIZE_MODES = ("sum_abs", "sum", "none")
# --top-examples (raygrad.store.topk): the kinds whose tokens are ranked, and the most examples kept
EXAMPLE_KINDS = ("gradients", "attribution", "values")
MAX_TOP_EXAMPLES = 64
EXAMPLE_DIM = "k"  # the examples' dimension: (layer, dim|feature, k), best first
SUM_ARRAYS = tuple(f"grad_{stat}" for stat in STATS)  # the gradient kind's sums
GRAD_SUM, GRAD_ABS_SUM, _ = SUM_ARRAYS
SHARDS_DONE = "shards_done"
LOSS_SUM = "loss_sum"  # scalar run total, nats (sum of CE over every target)
LOSS_TOKENS = "loss_tokens"  # scalar run total, targets that entered the loss
# Target sae, one float64 value per layer (dimension `layer`), summed like every other partial:
SAE_SQ_ERROR_SUM = "sae_sq_error_sum"  # sum over aggregated tokens of ||x - x_hat||^2 (model units^2)
SAE_L0_SUM = "sae_l0_sum"  # nonzero features, summed over aggregated tokens
SPLICED_LOSS_SUM = "spliced_loss_sum"  # splice modes: nats, CE over every target with this layer's SAE spliced in
# raygrad ablate (raygrad.compute.ablation), one float64 value per variant row (joint, then each entry alone),
# over texts i with n_i > 0 target tokens; d_i = ablated minus clean summed loss of text i, nats:
ABLATED_LOSS_SUM = "ablated_loss_sum"  # sum of the ablated summed loss A_i
ABLATED_DELTA_SUM = "ablated_delta_sum"  # sum of d_i
ABLATED_DELTA_SQ_SUM = "ablated_delta_sq_sum"  # sum of d_i^2
ABLATED_DELTA_TOKENS_SUM = "ablated_delta_tokens_sum"  # sum of d_i * n_i
ABLATED_PREDICTED_SUM = "ablated_predicted_sum"  # sum of the first-order prediction g * (a' - a) over targets
ABLATED_TEXTS = "ablated_texts"  # texts with at least one target
ABLATED_TOKENS_SQ_SUM = "ablated_tokens_sq_sum"  # sum of n_i^2
ABLATION_SUMS = (ABLATED_LOSS_SUM, ABLATED_DELTA_SUM, ABLATED_DELTA_SQ_SUM, ABLATED_DELTA_TOKENS_SUM,
                 ABLATED_PREDICTED_SUM, ABLATED_TEXTS, ABLATED_TOKENS_SQ_SUM)
LAYER_SUMS = (SAE_SQ_ERROR_SUM, SAE_L0_SUM, SPLICED_LOSS_SUM, *ABLATION_SUMS)
ABLATIONS_DIR = "ablations"  # RUN_DIR/ablations/: one JSON per `raygrad ablate`, and its store while it runs
ATTR_ABLATION = "ablation"  # an ablation store's root attribute: the run, the entries, the mode, the dataset

# Root attributes.
VERSION = "0.1.0"  # raygrad.__version__, recorded in every store and export (pyproject.toml says the same)
ATTR_VERSION = "raygrad_version"
ATTR_CONFIG = "config"
ATTR_PLAN = "plan"
ATTR_STATUS = "status"
ATTR_TIMING = "timing"
STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"

# Export files (names follow the original scripts).
METADATA_JSON = "metadata.json"
CONSOLIDATED_NPZ = "consolidated_results.npz"
NPZ_METADATA_KEY = "metadata"
EXPORT_FILES_KEY = "export_files"  # in metadata.json: file name -> digest of each export beside it
TIMING_JSON = "timing_stats.json"
TIMING_TXT = "timing_summary.txt"
PLOTS_DIR = "plots"
MLP_RUN_PREFIX = "layer_activations"


SAE_RUN_PREFIX = "sae_features"
EXPORT_SETS_DIR = "exports"  # RUN_DIR/exports/<name>/: later export sets (`raygrad export --power ...`)
COMPARE_PREFIX = "compare"
# A compare store (`raygrad compare`): per kind prefix, arrays {prefix}_{compare statistic}.
COMPARE_STATISTICS = ("mean_diff", "mean_abs_diff", "mean_abs_ratio", "welch_t", "welch_t_abs",
                      "welch_df", "welch_df_abs", "mean_abs_a", "mean_abs_b")
TOKENS_A, TOKENS_B = "tokens_a", "tokens_b"
ATTR_COMPARE = "compare"


def sum_names(prefix: str) -> tuple[str, str, str]:
    return tuple(f"{prefix}_{stat}" for stat in STATS)


def store_name(prefix: str, statistic: str) -> str:
    """'grad', 'mean_abs' -> 'grad_mean_abs' (the store's and xarray's name)."""
    return f"{prefix}_{statistic}"


def mean_name(prefix: str, mode: str) -> str:
    return store_name(prefix, mode)


def kind_of(prefix: str) -> str:
    kinds = {**{p: k for k, p in KIND_PREFIX.items()}, SITE_PREFIX: SITE_KIND, SITE_VALUE_PREFIX: SITE_VALUE_KIND}
    return kinds[prefix]


def prefix_of(kind: str) -> str:
    return {**KIND_PREFIX, SITE_KIND: SITE_PREFIX, SITE_VALUE_KIND: SITE_VALUE_PREFIX}[kind]


def norm_suffix(norm: str | None) -> str:
    """'' for a single normalize mode (the original's names); '_norm_{mode}' under --normalize-mode all."""
    return f"_norm_{norm}" if norm else ""


def export_key(kind: str, mode: str, norm: str | None = None) -> str:
    """'mean_abs' for gradients (the original's name), 'mean_abs_values' etc. for other kinds."""
    return (mode if kind == "gradients" else f"{mode}_{kind}") + norm_suffix(norm)


def layer_npy_name(layer: int, mode: str, kind: str = "gradients", norm: str | None = None) -> str:
    return f"layer_{layer}_{mode}_{kind}{norm_suffix(norm)}.npy"


def npz_key(layer: int, mode: str, kind: str = "gradients", norm: str | None = None) -> str:
    return f"layer_{layer}_{export_key(kind, mode, norm)}"
