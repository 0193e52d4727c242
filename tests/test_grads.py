"""The engine against the independent float64 reference, and its invariances."""

import numpy as np
import pytest
import torch
from helpers import assert_same_totals, run_tiny
from reference import max_relative_error, reference_sums
from tiny import SAMPLE_TEXTS

from raygrad import constants as names
from raygrad.compute.batch import IGNORE_INDEX, next_token_labels

KEPT_TEXTS = [t for t in SAMPLE_TEXTS if len(t.strip()) > 50][:6]


@pytest.mark.parametrize("family_fixture", ["tiny_llama", "tiny_qwen2"])
def test_engine_matches_per_layer_per_sample_reference(family_fixture, request, texts_file, tmp_path):
    model_dir = request.getfixturevalue(family_fixture)
    _, totals = run_tiny(model_dir, texts_file, tmp_path, layers="0-2")
    expected = reference_sums(model_dir, KEPT_TEXTS, [0, 1, 2], max_length=24)
    for name in names.SUM_ARRAYS:
        assert max_relative_error(totals.sums[name], expected[name]) < 1e-6, name
    np.testing.assert_array_equal(totals.tokens, expected["tokens"])
    assert totals.loss_sum == pytest.approx(expected["loss_sum"], rel=1e-9)
    assert np.abs(totals.sums[names.GRAD_ABS_SUM]).min() > 0  # every dimension received gradient


def test_truncation_and_layer_subset_match_reference(tiny_llama, texts_file, tmp_path):
    _, totals = run_tiny(tiny_llama, texts_file, tmp_path, layers="0,2", max_length=7, batch_size=4)
    expected = reference_sums(tiny_llama, KEPT_TEXTS, [0, 2], max_length=7)
    assert max_relative_error(totals.sums[names.GRAD_ABS_SUM], expected["grad_abs_sum"]) < 1e-6
    np.testing.assert_array_equal(totals.tokens, [6 * 6, 6 * 6])  # 7 tokens -> 6 targets each


def test_batch_size_does_not_change_results(tiny_llama, texts_file, tmp_path):
    _, one = run_tiny(tiny_llama, texts_file, tmp_path / "a", batch_size=1)
    _, three = run_tiny(tiny_llama, texts_file, tmp_path / "b", batch_size=3, shard_size=2)
    assert_same_totals(one, three)


def test_float32_run_is_close_to_float64(tiny_llama, texts_file, tmp_path):
    _, f64 = run_tiny(tiny_llama, texts_file, tmp_path / "a")
    _, f32 = run_tiny(tiny_llama, texts_file, tmp_path / "b", dtype="float32")
    assert max_relative_error(f32.sums[names.GRAD_ABS_SUM], f64.sums[names.GRAD_ABS_SUM]) < 1e-4


def test_labels_mask_padding_and_last_position():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = next_token_labels(ids, mask)
    assert labels.tolist() == [[6, 7, 8], [6, IGNORE_INDEX, IGNORE_INDEX]]
