"""masked_sum / masked_mean / masked_var / whiten of rlhf.algos.masked against hand numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algos.masked import masked_mean, masked_sum, masked_var, whiten

torch.set_num_threads(1)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])
# masked entries: 1, 2, 4 -> sum 7, mean 7/3
# deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9
# population variance 42/27 = 14/9 ; unbiased 42/18 = 7/3


def test_masked_sum_by_hand():
    assert masked_sum(X, M).item() == 7.0
    assert masked_sum(X, M, dim=1).tolist() == [3.0, 4.0]
    assert masked_sum(X, M, dim=0).tolist() == [5.0, 2.0, 0.0]


def test_masked_mean_by_hand():
    assert masked_mean(X, M).item() == pytest.approx(7 / 3)
    assert masked_mean(X, M, dim=1).tolist() == pytest.approx([1.5, 4.0])
    # an all-masked column gives 0, not NaN
    assert masked_mean(X, M, dim=0).tolist() == pytest.approx([2.5, 2.0, 0.0])


def test_masked_mean_accepts_bool_and_float_masks():
    assert masked_mean(X, M.bool()).item() == pytest.approx(7 / 3)
    assert masked_mean(X, M.float()).item() == pytest.approx(7 / 3)


def test_masked_var_by_hand():
    assert masked_var(X, M).item() == pytest.approx(7 / 3)
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(14 / 9)


def test_masked_var_single_entry_is_zero():
    m = torch.tensor([[0, 0, 1], [0, 0, 0]])
    assert masked_var(X, m).item() == 0.0
    assert masked_var(X, m, unbiased=False).item() == 0.0


def test_whiten_by_hand():
    out = whiten(X, M)
    sd = math.sqrt(7 / 3)
    expected = [[(1 - 7 / 3) / sd, (2 - 7 / 3) / sd, 0.0], [(4 - 7 / 3) / sd, 0.0, 0.0]]
    assert out.tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert out.tolist()[1] == pytest.approx(expected[1], abs=1e-6)


def test_whiten_without_shifting_the_mean():
    out = whiten(X, M, shift_mean=False)
    sd = math.sqrt(7 / 3)
    assert out[0, 0].item() == pytest.approx((1 - 7 / 3) / sd + 7 / 3, abs=1e-6)
    assert out[1, 0].item() == pytest.approx((4 - 7 / 3) / sd + 7 / 3, abs=1e-6)
    assert out[0, 2].item() == 0.0 and out[1, 1].item() == 0.0


def test_whiten_zero_mean_unit_variance_on_random_ragged_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g) * 3.0 + 10.0
    lengths = [7, 1, 4, 0, 5]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    out = whiten(x, mask)
    vals = [out[i, j].item() for i in range(5) for j in range(7) if mask[i, j]]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    assert mean == pytest.approx(0.0, abs=1e-5)
    assert var == pytest.approx(1.0, rel=1e-4)
    # everything outside the mask is exactly zero
    assert all(out[i, j].item() == 0.0 for i in range(5) for j in range(7) if not mask[i, j])


def test_empty_mask_gives_no_nan():
    empty = torch.zeros_like(M)
    assert masked_mean(X, empty).item() == 0.0
    assert not torch.isnan(masked_mean(X, empty, dim=1)).any()
    assert not torch.isnan(masked_var(X, empty)).any()
    w = whiten(X, empty)
    assert not torch.isnan(w).any()
    assert w.abs().sum().item() == 0.0


def test_masked_var_of_two_entries_is_bessel_corrected():
    # entries 1 and 3 (the 5 is masked out): mean 2, population variance 1, unbiased 2
    x = torch.tensor([1.0, 3.0, 5.0])
    m = torch.tensor([1, 1, 0])
    assert masked_var(x, m).item() == pytest.approx(2.0)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(1.0)
