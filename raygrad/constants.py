"""Every on-disk name raygrad writes: arrays, attributes, files.

Readers (export, load_results, later sessions) import these instead of
repeating string literals, so a rename happens in exactly one place.
"""

STORE_NAME = "results.zarr"
PENDING_CHECKPOINT = "pending_checkpoint.npz"  # redo log inside the store

# Arrays in the store (DESIGN §5).
LAYERS = "layers"
TOKENS = "tokens"
# Each aggregated quantity ("kind") has three running sums named
# {prefix}_sum, {prefix}_abs_sum, {prefix}_sq_sum, and two derived means.
KIND_PREFIX = {"gradients": "grad", "values": "value", "attribution": "attr", "hessian": "hess"}
SITE_PREFIX = "site_grad"  # target sae: the hook site's own d-dim gradient (= the SAE error node's)
SITE_VALUE_PREFIX = "site_value"  # target sae: the hook site's activations x (the SAE's input, for its FVU)
STATS = ("sum", "abs_sum", "sq_sum")
MEAN_ARRAYS = {  # prefix -> (signed mean, mean of |x|)
    "grad": ("mean", "mean_abs"),
    "value": ("value_mean", "value_mean_abs"),
    "attr": ("attr_mean", "attr_mean_abs"),
    "hess": ("hess_mean", "hess_mean_abs"),
    SITE_PREFIX: ("site_mean", "site_mean_abs"),
    SITE_VALUE_PREFIX: ("site_value_mean", "site_value_mean_abs"),
}
SUM_ARRAYS = tuple(f"grad_{stat}" for stat in STATS)  # the gradient kind's sums
GRAD_SUM, GRAD_ABS_SUM, _ = SUM_ARRAYS
SHARDS_DONE = "shards_done"
LOSS_SUM = "loss_sum"  # scalar run total, nats (sum of CE over every target)
LOSS_TOKENS = "loss_tokens"  # scalar run total, targets that entered the loss
# Target sae, one float64 value per layer (dimension `layer`), summed like every other partial:
SAE_SQ_ERROR_SUM = "sae_sq_error_sum"  # sum over aggregated tokens of ||x - x_hat||^2 (model units^2)
SAE_L0_SUM = "sae_l0_sum"  # nonzero features, summed over aggregated tokens
SPLICED_LOSS_SUM = "spliced_loss_sum"  # splice modes: nats, CE over every target with this layer's SAE spliced in
LAYER_SUMS = (SAE_SQ_ERROR_SUM, SAE_L0_SUM, SPLICED_LOSS_SUM)

# Root attributes.
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
TIMING_JSON = "timing_stats.json"
TIMING_TXT = "timing_summary.txt"
PLOTS_DIR = "plots"
MLP_RUN_PREFIX = "layer_activations"


SAE_RUN_PREFIX = "sae_features"


def sum_names(prefix: str) -> tuple[str, str, str]:
    return tuple(f"{prefix}_{stat}" for stat in STATS)


def mean_name(prefix: str, mode: str) -> str:
    signed, absolute = MEAN_ARRAYS[prefix]
    return absolute if mode == "mean_abs" else signed


def export_key(kind: str, mode: str) -> str:
    """'mean_abs' for gradients (the original's name), 'mean_abs_values' etc. for other kinds."""
    return mode if kind == "gradients" else f"{mode}_{kind}"


def layer_npy_name(layer: int, mode: str, kind: str = "gradients") -> str:
    return f"layer_{layer}_{mode}_{kind}.npy"


def npz_key(layer: int, mode: str, kind: str = "gradients") -> str:
    return f"layer_{layer}_{export_key(kind, mode)}"
