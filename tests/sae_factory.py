"""Tiny SAE directories written offline, in the files each library itself writes.

Random weights are seeded and sized so features fire on inputs of norm ~ sqrt(d_in): unit decoder rows, an
encoder near their transpose. Biases are small (~1e-3, still far above test tolerances) so that features also
fire, input-dependently, on the near-zero activations of randomly initialized tiny models (norm ~ 5e-3).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# sae-lens training checkpoints with normalize_activations "expected_average_only_in" carry this factor in
# activation_scaler.json: sqrt(d_in) / mean activation norm, here for activations of norm ~ 4 sqrt(d_in).
SCALING_FACTOR = 0.25
CHECKPOINT_NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening")  # kept out of the weights

# dictionary_learning: dict_class -> the trainer class that saves it (trainer.config["trainer_class"])
DL_TRAINERS = {"AutoEncoder": "StandardTrainer", "AutoEncoderTopK": "TopKTrainer",
               "BatchTopKSAE": "BatchTopKTrainer", "JumpReluAutoEncoder": "JumpReluTrainer"}
DL_THRESHOLDS = {"AutoEncoderTopK": 0.7, "BatchTopKSAE": 0.5}  # the scalar `threshold` buffer each one saves


def random_weights(d_in: int, d_sae: int, seed: int) -> dict[str, torch.Tensor]:
    """sae-lens layout: W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in), threshold (d_sae)."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    return {
        "W_enc": W_dec.T + 0.05 * torch.randn(d_in, d_sae, generator=gen),
        "b_enc": 1e-3 * torch.randn(d_sae, generator=gen),
        "W_dec": W_dec,
        "b_dec": 1e-3 * torch.randn(d_in, generator=gen),
        "threshold": 0.3 + 0.6 * torch.rand(d_sae, generator=gen),  # JumpReLU: for pre-activations ~ N(0, 1)
    }


def write_sae_lens_dir(path: Path, d_in: int, d_sae: int, *, architecture: str = "standard",
                       hook_name: str = "blocks.0.hook_mlp_out", normalize_activations: str = "none",
                       k: int | None = None, weights: dict[str, torch.Tensor] | None = None, seed: int = 0,
                       neuronpedia_id: str | None = None) -> Path:
    """A directory as sae-lens's save_model writes it. With a CHECKPOINT_NORMALIZATIONS value it is a
    training checkpoint: the training SAE's cfg.json plus activation_scaler.json (SCALING_FACTOR, or a
    seeded whitening for activations ~ 4 N(0, I)). sae-lens folds those into the weights before the
    final save, so only checkpoints keep them separate."""
    from sae_lens import SAE, TrainingSAE

    path = Path(path)
    checkpoint = normalize_activations in CHECKPOINT_NORMALIZATIONS
    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": normalize_activations,
           "metadata": {"hook_name": hook_name, "model_name": "tiny", "neuronpedia_id": neuronpedia_id}}
    if architecture in ("topk", "abstopk"):
        cfg["k"] = k if k is not None else 4
    sae = (TrainingSAE if checkpoint else SAE).from_dict(cfg)
    params = dict(sae.named_parameters())
    unknown = set(weights or {}) - set(params)
    if unknown:
        raise ValueError(f"weights {sorted(unknown)}: a {architecture} SAE has {sorted(params)}")
    tensors = {**random_weights(d_in, d_sae, seed), **(weights or {})}
    with torch.no_grad():
        for name, param in params.items():
            if name in tensors:  # others (gated's r_mag, b_gate, b_mag) keep sae-lens's initialization
                param.copy_(tensors[name])
    sae.save_model(path)
    if checkpoint:
        _scaler(normalize_activations, d_in, seed).save(str(path / "activation_scaler.json"))
    return path


def _scaler(normalize_activations: str, d_in: int, seed: int):
    from sae_lens.training.activation_scaler import ActivationScaler, ActivationWhitening

    if normalize_activations == "expected_average_only_in":
        return ActivationScaler(scaling_factor=SCALING_FACTOR)
    gen = torch.Generator().manual_seed(seed + 2)
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))
    spread = 4 * (0.5 + torch.rand(d_in, generator=gen, dtype=torch.float64))  # per-direction std
    mean = 0.5 * torch.randn(d_in, generator=gen, dtype=torch.float64)
    # as ActivationScaler.estimate_whitening stores them: float64, z = (x - mean) @ matrix
    return ActivationScaler(whitening=ActivationWhitening(
        mean=mean, matrix=(basis / spread).contiguous(), inverse_matrix=(spread[:, None] * basis.T).contiguous()))


def write_dictionary_learning_dir(path: Path, d_in: int, d_sae: int, *, dict_class: str = "AutoEncoder", k: int = 4,
                                  submodule_name: str = "mlp_out_layer_0", seed: int = 0) -> Path:
    """A trainer directory as dictionary_learning's trainSAE writes it: ae.pt (the dictionary's state
    dict) and config.json ({"trainer": trainer.config, "buffer": ...})."""
    if dict_class not in DL_TRAINERS:
        raise ValueError(f"dict_class {dict_class!r}: the factory writes {', '.join(DL_TRAINERS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    w = random_weights(d_in, d_sae, seed)
    linear = {"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"],
              "decoder.weight": w["W_dec"].T.contiguous()}  # nn.Linear weights are (out, in)
    if dict_class == "AutoEncoder":
        state = {"bias": w["b_dec"], **linear}
    elif dict_class == "JumpReluAutoEncoder":
        # decoder rows of unequal norm: an early version divided features by them, the current one does not
        gen = torch.Generator().manual_seed(seed + 1)
        norms = 0.5 + 1.5 * torch.rand(d_sae, 1, generator=gen)
        state = {"W_enc": w["W_enc"], "b_enc": w["b_enc"], "W_dec": w["W_dec"] * norms, "b_dec": w["b_dec"],
                 "threshold": w["threshold"]}
    else:  # AutoEncoderTopK, BatchTopKSAE: k and threshold are registered buffers
        state = {"b_dec": w["b_dec"], "k": torch.tensor(k, dtype=torch.int),
                 "threshold": torch.tensor(DL_THRESHOLDS[dict_class], dtype=torch.float32), **linear}
    torch.save({name: value.contiguous() for name, value in state.items()}, path / "ae.pt")
    layer = re.search(r"(\d+)$", submodule_name)
    trainer = {"trainer_class": DL_TRAINERS[dict_class], "dict_class": dict_class, "lr": 1e-4, "steps": 1000,
               "seed": seed, "activation_dim": d_in, "dict_size": d_sae, "device": "cpu",
               "layer": int(layer.group(1)) if layer else 0, "lm_name": "tiny", "wandb_name": dict_class,
               "submodule_name": submodule_name}
    if dict_class in DL_THRESHOLDS:
        trainer["k"] = k
    buffer = {"d_submodule": d_in, "io": "out", "n_ctxs": 3000, "ctx_len": 128, "refresh_batch_size": 32,
              "out_batch_size": 2048, "device": "cpu"}
    (path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": buffer}, indent=4))
    return path
