"""The host sampler: top-k, top-p (nucleus), temperature, per-row settings, inverse-CDF picks."""

import numpy as np
import pytest

from gpt2tf.decode.engine import SamplingParams
from gpt2tf.decode.pick import pick


@pytest.fixture(scope="module")
def run_sampler():
    def run(l, u, temp=None, k=None, p=None):
        l = np.asarray(l, np.float32)
        b = l.shape[0]
        temp = temp if temp is not None else [1.0] * b
        k = k if k is not None else [0] * b
        p = p if p is not None else [0.0] * b
        params = [SamplingParams(temperature=t, top_k=kk, top_p=pp)
                  for t, kk, pp in zip(temp, k, p)]
        return pick(l, params, np.asarray(u, np.float64))

    return run


def test_top_k_1_is_argmax(run_sampler):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=[5, 50])
    for u in (0.0, 0.5, 0.999):
        got = run_sampler(logits, [u] * 5, k=[1] * 5)
        np.testing.assert_array_equal(got, logits.argmax(-1))


def test_inverse_cdf_plain_matches_probabilities(run_sampler):
    # probs [0.1, 0.2, 0.7]: u in [0, .1) -> 0, [.1, .3) -> 1, [.3, 1) -> 2
    logits = np.log([[0.1, 0.2, 0.7]] * 6)
    got = run_sampler(logits, [0.0, 0.05, 0.15, 0.29, 0.31, 0.99])
    np.testing.assert_array_equal(got, [0, 0, 1, 1, 2, 2])


def test_top_k_keeps_only_k_best(run_sampler):
    logits = np.log([[0.05, 0.4, 0.05, 0.3, 0.2]] * 200)
    u = np.linspace(0, 0.999, 200)
    got = run_sampler(logits, u, k=[2] * 200)
    assert set(got) == {1, 3}
    # renormalised: 0.4/0.7 of the mass goes to token 1
    assert abs((got == 1).mean() - 0.4 / 0.7) < 0.02


def test_top_p_smallest_set_reaching_p(run_sampler):
    logits = np.log([[0.5, 0.3, 0.15, 0.05]] * 300)
    u = np.linspace(0, 0.999, 300)
    assert set(run_sampler(logits, u, p=[0.8] * 300)) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(run_sampler(logits, u, p=[0.81] * 300)) == {0, 1, 2}
    assert set(run_sampler(logits, u, p=[0.1] * 300)) == {0}  # always at least one token


def test_top_k_then_top_p(run_sampler):
    logits = np.log([[0.4, 0.3, 0.2, 0.1]] * 300)
    u = np.linspace(0, 0.999, 300)
    # top-k 3 renormalises to [4/9, 3/9, 2/9]; top-p 0.7 then keeps 4/9 + 3/9 = 0.78
    assert set(run_sampler(logits, u, k=[3] * 300, p=[0.7] * 300)) == {0, 1}


def test_per_row_settings(run_sampler):
    logits = np.log([[0.4, 0.3, 0.2, 0.1]] * 3)
    u = [0.99, 0.99, 0.99]
    got = run_sampler(logits, u, k=[1, 0, 2], p=[1.0, 0.5, 1.0])
    np.testing.assert_array_equal(got, [0, 1, 1])


def test_temperature_sharpens(run_sampler):
    logits = np.log([[0.6, 0.4]] * 2)
    # at T=0.1 token 0 has ~98% of the mass; u=0.95 still picks it; at T=1 it picks token 1
    got = run_sampler(logits, [0.95, 0.95], temp=[0.1, 1.0])
    np.testing.assert_array_equal(got, [0, 1])


def test_pick_matches_a_full_cumsum_over_the_vocabulary(run_sampler):
    # Every pick over 50257 tokens equals the inverse CDF of the whole row (targets within
    # rounding of a boundary are skipped).
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=[1, 50257])
    p = np.exp(logits[0] - logits[0].max())
    cum = np.cumsum(p / p.sum())
    u = rng.random(300)
    u = u[np.min(np.abs(cum[None, :] - u[:, None]), axis=1) > 1e-5]
    got = np.concatenate([run_sampler(logits, [x]) for x in u])
    np.testing.assert_array_equal(got, np.searchsorted(cum, u, side="right"))


def test_pick_never_lands_on_a_zero_probability_token(run_sampler):
    logits = np.full([1, 1000], -np.inf)
    logits[0, [3, 700]] = [0.0, -1.0]
    got = {int(run_sampler(logits, [u])[0]) for u in (0.0, 0.5, 0.72, 0.73, 0.999999, 0.9999999)}
    assert got == {3, 700}


def test_ties_go_to_the_lower_id_and_batch_rows_are_independent(run_sampler):
    logits = np.zeros([2, 6], np.float32)
    np.testing.assert_array_equal(run_sampler(logits, [0.0, 0.0], k=[3, 3]), [0, 0])
    np.testing.assert_array_equal(run_sampler(logits, [0.99, 0.5], k=[3, 3]), [2, 1])


def test_a_vanishing_temperature_is_greedy(run_sampler):
    logits = np.array([[0.1, 2.0, 1.9, -3.0]] * 3, np.float32)
    got = run_sampler(logits, [0.999] * 3, temp=[1e-30, 1e-45, 1e-300], k=[0, 2, 0])
    np.testing.assert_array_equal(got, [1, 1, 1])
