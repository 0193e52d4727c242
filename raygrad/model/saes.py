"""Sparse autoencoders on a hook site: load one per layer, encode, decode.

Three sources, each run with its own library's inference semantics:

* a sae-lens directory (cfg.json + sae_weights.safetensors), loaded and run by sae-lens itself;
* a sae-lens registry release (``SAE.from_pretrained``), likewise;
* a dictionary_learning directory (ae.pt + config.json, saprmarks/dictionary_learning). That library
  is not a dependency, so each dict_class's ``encode``/``decode`` is restated below, one small
  function per class. (sae-lens's converter, dictionary_learning_sae_huggingface_loader_1, maps the
  math faithfully but reads only from the Hub and records every SAE as trained on hook_resid_post.)

``LoadedSAE.decode`` returns model units. sae-lens inference SAEs apply no runtime scaling for
``expected_average_only_in`` or ``covariance_whitening``: the library folds the factor into the
weights (the trainer before its final save, ``from_pretrained`` from the registry). A directory
that still declares one is a training checkpoint; its ``activation_scaler.json`` is folded in the
same way here. Per-token normalizations have no fixed way back from features alone and are refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import RaygradError, first_line

log = logging.getLogger(__name__)

# Files the source libraries write (sae_lens.constants; dictionary_learning.training.trainSAE).
SAE_LENS_CFG = "cfg.json"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
SAE_LENS_SCALER = "activation_scaler.json"  # in training checkpoints: the factor not yet folded in
DL_WEIGHTS = "ae.pt"
DL_CONFIG = "config.json"

# sae-lens architectures that encode each token on its own and decode back to the same site
# (transcoders decode to another site; temporal SAEs read earlier positions).
SAE_LENS_ARCHITECTURES = ("standard", "gated", "topk", "abstopk", "jumprelu", "matching_pursuit")
FOLDABLE_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}

# Trained-on site names -> raygrad hook sites: TransformerLens hook names (sae-lens), dictionary_learning
# submodule names (its demo writes f"{site}_layer_{n}"), Hugging Face module paths.
_SITE_PATTERNS = (
    (re.compile(r"blocks\.\d+\.hook_(mlp_out|resid_post|attn_out)"), None),  # None: the captured group
    (re.compile(r"(mlp_out|resid_post|attn_out)_layer_\d+"), None),
    (re.compile(r"(?:model\.)?layers\.\d+\.mlp"), "mlp"),
    (re.compile(r"(?:model\.)?layers\.\d+"), "resid_post"),
)


def site_of_hook(hook_name: str | None) -> str | None:
    """raygrad's name for the site an SAE was trained on, or None when the name is not recognized."""
    for pattern, site in _SITE_PATTERNS:
        match = pattern.fullmatch(hook_name or "")
        if match:
            return site or match.group(1)
    return None


class LoadedSAE(nn.Module):
    """One frozen SAE. encode: [..., d_in] -> [..., d_sae] features; decode: features -> [..., d_in] in
    model units, differentiable w.r.t. the features. Inputs are cast to the SAE's dtype, as sae-lens does."""

    def __init__(self, *, d_in: int, d_sae: int, hook_name: str | None, neuronpedia_id: str | None,
                 source: str):
        super().__init__()
        self.d_in = int(d_in)
        self.d_sae = int(d_sae)
        self.hook_name = hook_name
        self.trained_site = site_of_hook(hook_name)
        self.neuronpedia_id = neuronpedia_id
        self.source = source

    def encode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, z: Tensor) -> Tensor:
        return self.decode(self.encode(z))

    @property
    def affine_decoder_weight(self) -> Tensor | None:
        """W (d_sae, d_in) when decode(f) == f @ W + b exactly, so dLoss/df = dLoss/dz @ W^T needs
        neither the encoder nor autograd; None when decode is anything else."""
        return None

    def extra_repr(self) -> str:
        return f"{self.source}, d_in={self.d_in}, d_sae={self.d_sae}, hook_name={self.hook_name!r}"


# ---------------------------------------------------------------- sae-lens


class SaeLensSAE(LoadedSAE):
    """A sae-lens SAE run by sae-lens's own encode/decode."""

    def __init__(self, sae, *, source: str, neuronpedia_id: str | None):
        super().__init__(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, hook_name=sae.cfg.metadata.hook_name,
                         neuronpedia_id=neuronpedia_id, source=source)
        self.sae = sae

    def encode(self, z: Tensor) -> Tensor:
        return self.sae.encode(z)

    def decode(self, f: Tensor) -> Tensor:
        return self.sae.decode(f)

    @property
    def affine_decoder_weight(self) -> Tensor | None:
        # Every supported architecture decodes f @ W_dec (+ b_dec), then identity hooks; a TopK SAE that
        # rescales features by decoder norms, or any run-time output normalization, is left to autograd.
        cfg = self.sae.cfg
        if cfg.normalize_activations != "none" or getattr(cfg, "rescale_acts_by_decoder_norm", False):
            return None
        return self.sae.W_dec

    def _apply(self, fn, recurse=True):
        # sae-lens casts every input to `sae.dtype` and reads `sae.device`; only its own .to() updates
        # them, so a .to() on this wrapper must too.
        super()._apply(fn, recurse)
        weight = self.sae.W_dec
        self.sae.dtype, self.sae.device = weight.dtype, weight.device
        self.sae.cfg.dtype, self.sae.cfg.device = _DTYPE_NAMES.get(weight.dtype, str(weight.dtype)), str(weight.device)
        return self


def _check_sae_lens(sae, shown: str) -> None:
    """Refuse what LoadedSAE cannot represent faithfully (raises RaygradError)."""
    _check_sae_lens_cfg(sae.cfg.architecture(), sae.cfg.reshape_activations, sae.cfg.normalize_activations, shown)


def _check_sae_lens_cfg(architecture: str, reshape: str, norm: str, shown: str) -> None:
    if architecture not in SAE_LENS_ARCHITECTURES:
        raise RaygradError(f"{shown}: sae-lens architecture {architecture!r} does not reconstruct its own input "
                           f"token by token; supported: {', '.join(SAE_LENS_ARCHITECTURES)}")
    if reshape != "none":
        raise RaygradError(f"{shown}: reshape_activations {reshape!r} (per-head attention "
                           "inputs) is not a raygrad hook site; supported: none")
    if norm not in FOLDABLE_NORMALIZATIONS:
        raise RaygradError(f"{shown}: normalize_activations {norm!r} rescales each token by its own statistics, "
                           "so features alone do not decode to model units; supported: "
                           + ", ".join(FOLDABLE_NORMALIZATIONS))


def _checkpoint_scaler_file(directory: Path, norm: str, shown: str) -> Path:
    """activation_scaler.json of a training checkpoint whose cfg.json declares `norm`; refused when missing."""
    scaler_file = directory / SAE_LENS_SCALER
    if not scaler_file.is_file():
        raise RaygradError(f"{shown}: {SAE_LENS_CFG} declares normalize_activations {norm!r} but {SAE_LENS_SCALER} "
                           "(the factor, written with training checkpoints) is missing, so model units are unknown")
    return scaler_file


def _fold_checkpoint_scaler(sae, directory: Path, shown: str) -> None:
    """Fold a training checkpoint's activation scaler into the weights, as sae-lens's trainer does
    before its final save, so encode takes and decode returns model units."""
    norm = sae.cfg.normalize_activations
    if norm == "none":
        return
    scaler_file = _checkpoint_scaler_file(directory, norm, shown)
    from sae_lens.training.activation_scaler import ActivationScaler

    scaler = ActivationScaler()
    try:
        scaler.load(scaler_file)
    except (OSError, ValueError, KeyError) as err:
        raise RaygradError(f"{shown}: unreadable {SAE_LENS_SCALER}: {first_line(err)}") from None
    if norm == "expected_average_only_in" and scaler.scaling_factor is not None:
        log.info("%s: folding the activation scaling factor %.6g into the weights", shown, scaler.scaling_factor)
        sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
    elif norm == "covariance_whitening" and scaler.whitening is not None:
        log.info("%s: folding the activation whitening into the weights", shown)
        white = scaler.whitening
        sae.fold_activation_whitening(mean=white.mean, whitening_matrix=white.matrix,
                                      unwhitening_matrix=white.inverse_matrix)
    else:
        raise RaygradError(f"{shown}: {SAE_LENS_SCALER} holds no {norm} statistics, so model units are unknown")


def _load_sae_lens_dir(directory: Path, shown: str, device: str, dtype: torch.dtype) -> LoadedSAE:
    from sae_lens import SAE

    try:
        sae = SAE.load_from_disk(directory, device=device, dtype=_dtype_name(dtype))
    except KeyError as err:  # sae-lens looks the architecture up in its registry of inference classes
        raise RaygradError(f"{shown}: sae-lens could not load it (no {err.args[0]!r}: an architecture without an "
                           "inference class, such as a batchtopk training checkpoint, or a missing cfg.json field; "
                           f"supported: {', '.join(SAE_LENS_ARCHITECTURES)})") from None
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise RaygradError(f"{shown}: sae-lens could not load it ({type(err).__name__}: {first_line(err)})") from None
    _check_sae_lens(sae, shown)
    _fold_checkpoint_scaler(sae, directory, shown)
    return SaeLensSAE(sae, source=f"sae-lens {sae.cfg.architecture()} directory {directory}",
                      neuronpedia_id=sae.cfg.metadata.neuronpedia_id)


def _load_release(release: str, sae_id: str, shown: str, device: str, dtype: torch.dtype) -> LoadedSAE:
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=_dtype_name(dtype))
    except Exception as err:  # hub, network, unknown release or id: sae-lens raises many types; all reported
        raise RaygradError(f"{shown}: sae-lens could not load it ({type(err).__name__}: {first_line(err)})") from None
    _check_sae_lens(sae, shown)
    if sae.cfg.normalize_activations != "none":  # from_pretrained folds the registry's factor when it has one
        raise RaygradError(f"{shown}: normalize_activations {sae.cfg.normalize_activations!r} and sae-lens's "
                           "registry has no factor to fold for it, so model units are unknown")
    neuronpedia_id = sae.cfg.metadata.neuronpedia_id or _registry_neuronpedia_id(release, sae_id)
    return SaeLensSAE(sae, source=f"sae-lens release {release} / {sae_id}", neuronpedia_id=neuronpedia_id)


def _registry_neuronpedia_id(release: str, sae_id: str) -> str | None:
    # from_pretrained passes the registry's id as a top-level config override, which a sae-lens >= 6
    # config drops (only `metadata` is kept); the packaged registry still has it.
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    info = get_pretrained_saes_directory().get(release)
    return (info.neuronpedia_id or {}).get(sae_id) if info is not None else None


# ---------------------------------------------------------------- dictionary_learning


@dataclass(frozen=True)
class DictClass:
    """How one dictionary_learning class is saved and encodes at inference (its default encode())."""

    # (ae.pt state dict, config.json "trainer") -> W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec,
    # and the class's extras: "k" (int), "threshold"
    read: Callable[[dict[str, Tensor], dict], dict]
    activation: Callable[[Tensor, "DictionaryLearningSAE"], Tensor]  # encoder pre-activations -> features
    centre_input: bool  # subtract b_dec from the input before the encoder


DICT_CLASSES: dict[str, DictClass] = {}


def register_dict_class(name: str, spec: DictClass) -> None:
    if name in DICT_CLASSES:
        raise ValueError(f"dict_class {name!r} is already registered")
    DICT_CLASSES[name] = spec


def _read_linear(state: dict[str, Tensor], bias_key: str) -> dict:
    # nn.Linear stores weight as (out, in): encoder.weight is (d_sae, d_in), decoder.weight (d_in, d_sae)
    return {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
            "W_dec": state["decoder.weight"].T, "b_dec": state[bias_key]}


def _read_autoencoder(state, trainer) -> dict:
    return _read_linear(state, "bias")


def _read_topk(state, trainer) -> dict:
    # `k` is a buffer in current versions; older ones kept it only in the trainer config
    k = state["k"].item() if "k" in state else trainer.get("k")
    if k is None:
        raise KeyError("k")
    return {**_read_linear(state, "b_dec"), "k": int(k), "threshold": state["threshold"]}


def _read_jumprelu(state, trainer) -> dict:
    return {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}


def _relu(pre: Tensor, sae: DictionaryLearningSAE) -> Tensor:
    return torch.relu(pre)


def _top_k(pre: Tensor, sae: DictionaryLearningSAE) -> Tensor:
    """AutoEncoderTopK: the k largest post-ReLU values of each token (its saved threshold is unused
    unless encode(use_threshold=True) is asked for)."""
    post = torch.relu(pre)
    top = post.topk(sae.k, dim=-1, sorted=False)
    return torch.zeros_like(post).scatter(-1, top.indices, top.values)


def _batch_top_k(pre: Tensor, sae: DictionaryLearningSAE) -> Tensor:
    """BatchTopKSAE at inference: post-ReLU values above the learned scalar threshold; the batch-wide
    top-k is training only, so each token is encoded on its own."""
    post = torch.relu(pre)
    return post * (post > sae.threshold)


def _jump_relu(pre: Tensor, sae: DictionaryLearningSAE) -> Tensor:
    """JumpReluAutoEncoder: pre-activations above each feature's threshold, ReLU'd. Current versions
    do not rescale features by decoder norms (an early one did)."""
    return torch.relu(pre * (pre > sae.threshold))


register_dict_class("AutoEncoder", DictClass(_read_autoencoder, _relu, centre_input=True))
register_dict_class("AutoEncoderTopK", DictClass(_read_topk, _top_k, centre_input=True))
register_dict_class("BatchTopKSAE", DictClass(_read_topk, _batch_top_k, centre_input=True))
# apply_b_dec_to_input is False at construction and is not saved in the state dict
register_dict_class("JumpReluAutoEncoder", DictClass(_read_jumprelu, _jump_relu, centre_input=False))


class DictionaryLearningSAE(LoadedSAE):
    """A dictionary_learning dictionary: encode = activation([x - b_dec] @ W_enc + b_enc),
    decode = f @ W_dec + b_dec, with the class's activation and centring."""

    def __init__(self, dict_class: str, tensors: dict, *, hook_name: str | None, source: str):
        d_in, d_sae = tensors["W_enc"].shape
        super().__init__(d_in=d_in, d_sae=d_sae, hook_name=hook_name, neuronpedia_id=None, source=source)
        self.dict_class = dict_class
        self.spec = DICT_CLASSES[dict_class]
        self.k = tensors.get("k")  # AutoEncoderTopK/BatchTopKSAE; features per token for the former only
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            if name in tensors:
                self.register_buffer(name, tensors[name].detach().clone().contiguous())

    def encode(self, z: Tensor) -> Tensor:
        x = z.to(self.W_enc.dtype)
        if self.spec.centre_input:
            x = x - self.b_dec
        return self.spec.activation(x @ self.W_enc + self.b_enc, self)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    @property
    def affine_decoder_weight(self) -> Tensor:
        return self.W_dec


def _dl_trainer(directory: Path, shown: str) -> tuple[dict, str]:
    """config.json's trainer settings and its dict_class, checked."""
    config = _read_json(directory / DL_CONFIG, shown)
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict):
        raise RaygradError(f"{shown}: {DL_CONFIG} has no 'trainer' object (dictionary_learning writes "
                           "{\"trainer\": trainer.config, ...})")
    name = trainer.get("dict_class")
    if name not in DICT_CLASSES:
        raise RaygradError(f"{shown}: dict_class {name!r} in {DL_CONFIG} is not supported; "
                           f"supported: {', '.join(DICT_CLASSES)}")
    return trainer, name


def _load_dictionary_learning_dir(directory: Path, shown: str, device: str, dtype: torch.dtype) -> LoadedSAE:
    trainer, name = _dl_trainer(directory, shown)
    try:
        state = torch.load(directory / DL_WEIGHTS, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors and plain containers
        raise RaygradError(f"{shown}: {DL_WEIGHTS} is not a plain tensor state dict, the only kind raygrad "
                           f"unpickles ({_unpickler_reason(err)})") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise RaygradError(f"{shown}: unreadable {DL_WEIGHTS} ({first_line(err)})") from None
    if not isinstance(state, dict):
        raise RaygradError(f"{shown}: {DL_WEIGHTS} holds a {type(state).__name__}, not a state dict")
    state = {key.removeprefix("_orig_mod."): value for key, value in state.items()}  # torch.compile'd saves
    try:
        tensors = DICT_CLASSES[name].read(state, trainer)
    except KeyError as err:
        raise RaygradError(f"{shown}: {DL_WEIGHTS} has no {err.args[0]!r}, which {name} needs; "
                           f"it holds {', '.join(sorted(state))}") from None
    d_in, d_sae = tensors["W_enc"].shape
    for key, found in (("activation_dim", d_in), ("dict_size", d_sae)):
        if trainer.get(key) not in (None, found):
            raise RaygradError(f"{shown}: {DL_CONFIG} says {key} {trainer[key]} but {DL_WEIGHTS} has {found}")
    if name == "BatchTopKSAE" and tensors["threshold"].item() < 0:
        log.warning("%s: BatchTopKSAE threshold %s was never learned (training stopped before threshold_start_step); "
                    "dictionary_learning then keeps every positive feature", shown, tensors["threshold"].item())
    sae = DictionaryLearningSAE(name, tensors, hook_name=trainer.get("submodule_name"),
                                source=f"dictionary_learning {name} directory {directory}")
    return sae.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- metadata without weights


@dataclass(frozen=True)
class SaeInfo:
    """What the plan needs of one layer's SAE, read from its configuration alone."""

    d_in: int
    d_sae: int
    hook_name: str | None
    neuronpedia_id: str | None
    source: str

    @property
    def trained_site(self) -> str | None:
        return site_of_hook(self.hook_name)


def read_sae_info(layer: int, *, release: str | None = None, sae_id: str | None = None,
                  path: str | None = None, revision: str | None = None) -> SaeInfo:
    """Width, input width, training site and Neuronpedia id of one layer's SAE without reading its
    weights (the driver of a cluster run stays light): cfg.json or config.json for a directory,
    sae-lens's config loader for a release (at commit `revision`, when given). Configuration problems
    are refused here, with the same lines as at load; weights are checked where they load, on the workers."""
    if path is not None:
        directory = Path(_fill(path, layer)).expanduser()
        shown = _shown("--sae-path", path, layer, str(directory))
        if not directory.exists():
            raise RaygradError(f"{shown}: no such directory")
        if all((directory / name).is_file() for name in SAE_FORMATS["sae-lens"].files):
            return _sae_lens_dir_info(directory, shown)
        if all((directory / name).is_file() for name in SAE_FORMATS["dictionary_learning"].files):
            return _dictionary_learning_info(directory, shown)
        _load_dir(directory, shown, "cpu", torch.float32)  # raises the loader's own line for what is missing
    if release is None or sae_id is None:
        raise RaygradError("--sae-release/--sae-id: give both (the id may contain '{layer}'), or --sae-path")
    shown = f"--sae-release {release} " + _shown("--sae-id", sae_id, layer, _fill(sae_id, layer))
    return release_info(release, _fill(sae_id, layer), shown, revision)


def _sae_lens_cfg_info(cfg: dict, shown: str, source: str, neuronpedia_id: str | None = None) -> SaeInfo:
    metadata = cfg.get("metadata") or {}
    _check_sae_lens_cfg(cfg.get("architecture", "standard"), cfg.get("reshape_activations", "none"),
                        cfg.get("normalize_activations", "none"), shown)
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as err:
        raise RaygradError(f"{shown}: {SAE_LENS_CFG} has no usable d_in/d_sae ({first_line(err)})") from None
    return SaeInfo(d_in=d_in, d_sae=d_sae, hook_name=metadata.get("hook_name") or cfg.get("hook_name"),
                   neuronpedia_id=metadata.get("neuronpedia_id") or cfg.get("neuronpedia_id") or neuronpedia_id,
                   source=source)


def _sae_lens_dir_info(directory: Path, shown: str) -> SaeInfo:
    cfg = _read_json(directory / SAE_LENS_CFG, shown)
    if not isinstance(cfg, dict):
        raise RaygradError(f"{shown}: {SAE_LENS_CFG} is not a JSON object")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None) and norm in FOLDABLE_NORMALIZATIONS:
        _checkpoint_scaler_file(directory, norm, shown)
    return _sae_lens_cfg_info(cfg, shown, f"sae-lens {cfg.get('architecture', 'standard')} directory {directory}")


def _dictionary_learning_info(directory: Path, shown: str) -> SaeInfo:
    trainer, name = _dl_trainer(directory, shown)
    if trainer.get("activation_dim") is None or trainer.get("dict_size") is None:
        # An older config without the sizes: only the weights can tell.
        sae = _load_dictionary_learning_dir(directory, shown, "cpu", torch.float32)
        return SaeInfo(sae.d_in, sae.d_sae, sae.hook_name, None, sae.source)
    return SaeInfo(d_in=int(trainer["activation_dim"]), d_sae=int(trainer["dict_size"]),
                   hook_name=trainer.get("submodule_name"), neuronpedia_id=None,
                   source=f"dictionary_learning {name} directory {directory}")


def release_info(release: str, sae_id: str, shown: str, revision: str | None = None) -> SaeInfo:
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    try:
        with _pinned(release, sae_id, revision):
            cfg = load_sae_config_from_huggingface(release, sae_id)
    except Exception as err:  # hub, network, unknown release or id: sae-lens raises many types; all reported
        raise RaygradError(f"{shown}: sae-lens could not read its config ({type(err).__name__}: "
                           f"{first_line(err)})") from None
    return _sae_lens_cfg_info(cfg, shown, f"sae-lens release {release} / {sae_id}",
                              neuronpedia_id=_registry_neuronpedia_id(release, sae_id))


# ---------------------------------------------------------------- formats and the entry point


@dataclass(frozen=True)
class SaeFormat:
    files: tuple[str, ...]  # all present in a directory = this format
    load: Callable[[Path, str, str, torch.dtype], LoadedSAE]  # (directory, shown option, device, dtype)


SAE_FORMATS: dict[str, SaeFormat] = {}


def register_format(name: str, fmt: SaeFormat) -> None:
    if name in SAE_FORMATS:
        raise ValueError(f"SAE format {name!r} is already registered")
    SAE_FORMATS[name] = fmt


register_format("sae-lens", SaeFormat((SAE_LENS_CFG, SAE_LENS_WEIGHTS), _load_sae_lens_dir))
register_format("dictionary_learning", SaeFormat((DL_WEIGHTS, DL_CONFIG), _load_dictionary_learning_dir))


def load_sae(layer: int, *, release: str | None = None, sae_id: str | None = None, path: str | None = None,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             revision: str | None = None) -> LoadedSAE:
    """The SAE for one layer, frozen and in eval mode. `path` and `sae_id` are templates: '{layer}' is
    replaced by the layer index. Give either `path` or both `release` and `sae_id`; a release loads
    at commit `revision` of its repository when given (the run's pin), else at its main."""
    if path is not None and (release is not None or sae_id is not None):
        raise RaygradError(f"--sae-path {path}: give either --sae-path or --sae-release/--sae-id, not both")
    device = str(torch.device(device))
    _dtype_name(dtype)  # refuse a bad dtype before touching any file
    if path is not None:
        directory = Path(_fill(path, layer)).expanduser()
        shown = _shown("--sae-path", path, layer, str(directory))
        sae = _load_dir(directory, shown, device, dtype)
    elif release is not None and sae_id is not None:
        shown = f"--sae-release {release} " + _shown("--sae-id", sae_id, layer, _fill(sae_id, layer))
        with _pinned(release, _fill(sae_id, layer), revision):
            sae = _load_release(release, _fill(sae_id, layer), shown, device, dtype)
    else:
        raise RaygradError("--sae-release/--sae-id: give both (the id may contain '{layer}'), or --sae-path")
    log.info("layer %d: %s (d_in %d, %d features, trained on %s)", layer, sae.source, sae.d_in, sae.d_sae,
             sae.hook_name or "an unrecorded site")
    return sae.requires_grad_(False).eval()


def _load_dir(directory: Path, shown: str, device: str, dtype: torch.dtype) -> LoadedSAE:
    if not directory.exists():
        raise RaygradError(f"{shown}: no such directory")
    if not directory.is_dir():
        raise RaygradError(f"{shown}: not a directory")
    for fmt in SAE_FORMATS.values():
        if all((directory / name).is_file() for name in fmt.files):
            return fmt.load(directory, shown, device, dtype)
    expected = " nor ".join(f"{' + '.join(fmt.files)} ({name})" for name, fmt in SAE_FORMATS.items())
    raise RaygradError(f"{shown}: neither {expected} found")


def _fill(template: str, layer: int) -> str:
    return template.replace("{layer}", str(layer))  # not str.format: other braces stay literal


fill_layer = _fill


@contextlib.contextmanager
def pinned_hub_downloads(repo_id: str | None, commit: str | None):
    """sae-lens's loaders download with no revision (always "main"); inside this block, a download
    from `repo_id` without one takes `commit`."""
    if not commit:
        yield
        return
    from sae_lens.loading import pretrained_sae_loaders as loaders

    real = loaders.hf_hub_download

    def pinned(*args, **kwargs):
        asked = kwargs.get("repo_id", args[0] if args else None)
        if asked == repo_id and kwargs.get("revision") is None:
            kwargs["revision"] = commit
        return real(*args, **kwargs)

    loaders.hf_hub_download = pinned
    try:
        yield
    finally:
        loaders.hf_hub_download = real


def _pinned(release: str, sae_id: str, revision: str | None):
    """A block in which sae-lens downloads the release's files at commit `revision` (when given)."""
    if revision is None:
        return pinned_hub_downloads(None, None)
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    try:
        repo_id, _ = get_repo_id_and_folder_name(release, sae_id)
    except ValueError:  # an unknown id: the loader says so with its own line
        return pinned_hub_downloads(None, None)
    return pinned_hub_downloads(repo_id, revision)


def _shown(option: str, template: str, layer: int, resolved: str) -> str:
    return f"{option} {template}" + (f" (layer {layer} -> {resolved})" if "{layer}" in template else "")


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise RaygradError(f"--dtype {dtype}: SAEs load in one of {', '.join(_DTYPE_NAMES.values())}")
    return _DTYPE_NAMES[dtype]


def _read_json(file: Path, shown: str):
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise RaygradError(f"{shown}: unreadable {file.name} ({first_line(err)})") from None


def _unpickler_reason(err: BaseException) -> str:
    # torch's message is a paragraph of advice (including weights_only=False); keep only its reason
    _, marker, reason = str(err).partition("WeightsUnpickler error:")
    return " ".join(reason.strip().split("\n\n")[0].split()).split(". ")[0] if marker else first_line(err)
