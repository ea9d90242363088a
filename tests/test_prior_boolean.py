"""Boolean-function prior by sampling random networks: exact tiny case, encoding, merging, EP.

Tiny case (derived by hand): widths (2, 1) is one threshold unit f(x) = 1[w.x + b > 0] with
w_j ~ N(0, sigma_w^2 / 2), b ~ N(0, sigma_b^2). On the inputs 0:(0,0), 1:(0,1), 2:(1,0), 3:(1,1)
its outputs are o = (b, w2 + b, w1 + b, w1 + w2 + b), a rank-3 Gaussian with o0 + o3 = o1 + o2.
If three of the signs force the fourth (e.g. o1 > 0, o2 > 0, o0 < 0 => o3 = o1 + o2 - o0 > 0),
the probability of the pattern is a trivariate orthant probability
1/8 + (asin r12 + asin r13 + asin r23) / (4 pi) (Sheppard/Plackett); otherwise
P(s) = P(s0, s1, s2) - P(s with s3 flipped), and the flipped pattern is forced. XOR and XNOR
have probability 0. These 16 probabilities are compared with the sampler by a chi-square test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from flatprior.errors import FlatpriorError
from flatprior.prior import (
    BooleanPrior,
    arccos_kernel,
    boolean_inputs,
    function_bits,
    function_hex,
    log_prior_ep,
    mc_log_orthant_prob,
    sample_boolean_prior,
)

# o_k expressed through the other three outputs (coefficients on o0..o3)
_IDENTITY = {0: (0, 1, 1, -1), 1: (1, 0, -1, 1), 2: (1, -1, 0, 1), 3: (-1, 1, 1, 0)}


def _p3(C, idx, signs):
    sub = C[np.ix_(idx, idx)]
    sd = np.sqrt(np.diag(sub))
    r = (np.outer(signs, signs) * sub) / np.outer(sd, sd)
    return 1 / 8 + (math.asin(r[0, 1]) + math.asin(r[0, 2]) + math.asin(r[1, 2])) / (4 * math.pi)


def _pattern_prob(C, s, depth=0):
    for k, coef in _IDENTITY.items():
        others = [j for j in range(4) if j != k]
        implied = {int(np.sign(coef[j] * s[j])) for j in others}
        if len(implied) == 1:
            t = implied.pop()
            return _p3(C, others, [s[j] for j in others]) if s[k] == t else 0.0
    assert depth == 0
    flipped = list(s)
    flipped[3] = -flipped[3]
    return _p3(C, [0, 1, 2], s[:3]) - _pattern_prob(C, flipped, depth + 1)


def _threshold_unit_probs(sigma_w, sigma_b):
    A = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=float)  # (w1, w2, b)
    C = A @ np.diag([sigma_w**2 / 2, sigma_w**2 / 2, sigma_b**2]) @ A.T
    probs = {}
    for bits in itertools.product((0, 1), repeat=4):
        s = [1 if b else -1 for b in bits]
        probs[function_hex(bits)] = _pattern_prob(C, s)
    return probs


def test_threshold_unit_exact_probabilities_vs_sampler():
    probs = _threshold_unit_probs(1.0, 1.0)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
    assert probs["6"] == 0.0 and probs["9"] == 0.0  # XOR 0110, XNOR 1001
    n = 60_000
    prior = sample_boolean_prior(n, widths=(2, 1), sigma_w2=1.0, sigma_b2=1.0, seed=11)
    table = prior.table()
    seen = dict(zip(table.function, table["count"], strict=True))
    assert seen.get("6", 0) == 0 and seen.get("9", 0) == 0
    keys = [k for k, p in probs.items() if p > 0]
    observed = np.array([seen.get(k, 0) for k in keys])
    expected = np.array([probs[k] * n for k in keys])
    assert observed.sum() == n
    assert chisquare(observed, expected).pvalue > 1e-3
    # every Wilson 95 % interval of log P is within ~4 sigma of the truth
    for k in keys:
        row = table[table.function == k].iloc[0]
        se = math.sqrt((1 - probs[k]) / (probs[k] * n))
        assert row.log_p_ci_low - 2 * se <= math.log(probs[k]) <= row.log_p_ci_high + 2 * se


def test_bit_order_and_encoding():
    np.testing.assert_array_equal(boolean_inputs(2), [[0, 0], [0, 1], [1, 0], [1, 1]])
    assert boolean_inputs(7)[5].tolist() == [0, 0, 0, 0, 1, 0, 1]
    assert function_hex([1, 0, 0, 0]) == "8"
    assert function_hex(np.ones(128)) == "f" * 32
    bits = np.random.default_rng(0).integers(0, 2, 128)
    np.testing.assert_array_equal(function_bits(function_hex(bits), 7), bits)
    # one input bit, no bias: output(x=0) = 0 (bit 0), output(x=1) = w > 0 half the time
    prior = sample_boolean_prior(2000, widths=(1, 1), sigma_b2=0.0, seed=1)
    assert set(prior.table().function) == {"0", "4"}  # bits 00 and 01 (MSB = input 0)
    assert prior.count_of([0, 1]) + prior.count_of([0, 0]) == 2000


def test_merge_save_load(tmp_path):
    a = sample_boolean_prior(3000, widths=(3, 8, 1), seed=1, batch_size=512)
    b = sample_boolean_prior(2000, widths=(3, 8, 1), seed=2)
    m = a.merge(b)
    assert m.n_samples == 5000 and int(m.counts.sum()) == 5000
    assert m.count_of(np.zeros(8)) == a.count_of(np.zeros(8)) + b.count_of(np.zeros(8))
    path = tmp_path / "prior.npz"
    m.save(path)
    back = BooleanPrior.load(path)
    assert back.table().equals(m.table()) and back.seeds == (1, 2)
    with pytest.raises(FlatpriorError, match="same seed"):
        a.merge(a)
    with pytest.raises(FlatpriorError, match="different networks"):
        a.merge(sample_boolean_prior(10, widths=(3, 4, 1), seed=3))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FlatpriorError, match="cannot read"):
        BooleanPrior.load(tmp_path / "junk.npz")


def test_sampler_bad_input():
    with pytest.raises(FlatpriorError, match="1..7"):
        sample_boolean_prior(10, widths=(8, 1))
    with pytest.raises(FlatpriorError, match="widths"):
        sample_boolean_prior(10, widths=(7, 40, 2))
    with pytest.raises(FlatpriorError, match="n_samples"):
        sample_boolean_prior(0)


def test_ep_and_gp_monte_carlo_vs_sampler_on_constant_functions():
    # FCN 7-40-40-1, sigma_w = sigma_b = 1; NNGP kernel with the same variances
    prior = sample_boolean_prior(30_000, seed=5)
    top = prior.table(2)
    assert set(top.function) == {"0" * 32, "f" * 32}  # the constant functions dominate
    K = arccos_kernel(boolean_inputs(7), depth=2, sigma_w2=1.0, sigma_b2=1.0).numpy()
    for _, row in top.iterrows():
        y = function_bits(row.function, 7)
        ep = log_prior_ep(K, y)
        mc = mc_log_orthant_prob(K, y, 20_000, seed=2)
        # measured: sampler -0.99 / -1.03 (CI +-0.015), GP Monte-Carlo -1.030 (+-0.019),
        # EP -1.438 (GPy's sequential EP: -1.4371). EP is ~0.43 nats too low here.
        assert -1.06 < row.log_p < -0.97
        assert abs(mc.log_prob - row.log_p) < 0.07  # width 40 vs infinite width + MC noise
        assert ep.log_prob == pytest.approx(-1.437, abs=0.005)
        assert 0.36 < row.log_p - ep.log_prob < 0.50


def _reference_outputs(z: np.ndarray, widths, sigma_w: float, sigma_b: float, b: int):
    """Float64 forward pass of the ``b`` networks whose standard normal parameters are ``z``,
    decoded from the documented layout with explicit scales (no folding, no input split)."""
    n_in, h = widths[0], widths[1]
    n_lo = (n_in + 1) // 2
    n_hi = n_in - n_lo
    o = 0
    z_hi = z[o : o + b * h * (n_hi + 1)].reshape(b, h, n_hi + 1)
    o += b * h * (n_hi + 1)
    z_lo = z[o : o + b * h * n_lo].reshape(b, h, n_lo)
    o += b * h * n_lo
    w1 = np.concatenate([z_hi[:, :, :n_hi], z_lo], axis=2) * sigma_w / math.sqrt(n_in)
    x = boolean_inputs(n_in).astype(np.float64).T  # [n_in, N]
    act = w1 @ x + sigma_b * z_hi[:, :, n_hi:]
    for fan_in, fan_out in zip(widths[1:-1], widths[2:], strict=True):
        act = np.maximum(act, 0.0)
        w = z[o : o + b * fan_out * fan_in].reshape(b, fan_out, fan_in)
        o += b * fan_out * fan_in
        bias = z[o : o + b * fan_out].reshape(b, fan_out, 1)
        o += b * fan_out
        act = (sigma_w / math.sqrt(fan_in)) * (w @ act) + sigma_b * bias
    assert o == z.size
    return act[:, 0, :]


@pytest.mark.parametrize(
    ("widths", "sigma_w", "sigma_b"),
    [((7, 40, 40, 1), 1.0, 1.0), ((7, 40, 40, 1), 1.4142, 0.3), ((5, 6, 7, 8, 1), 2.0, 1.0),
     ((3, 1), 1.0, 1.0), ((1, 1), 1.0, 0.0), ((2, 5, 1), 1e-9, 1.0), ((4, 3, 1), 0.0, 1.0),
     ((6, 9, 1), 1.0, 0.0)],
)
def test_fast_forward_matches_float64_reference(widths, sigma_w, sigma_b):
    # the sampler folds the weight scales into the biases (ReLU is positively homogeneous),
    # splits the inputs into high/low bits and runs in float32: its signs must be those of an
    # explicit float64 forward pass of the same parameters wherever the output is not ~0
    from flatprior.prior.boolean import _BatchForward

    b = 300
    fwd = _BatchForward(widths, sigma_w, sigma_b, batch_size=b)
    got = fwd.draw(torch.Generator().manual_seed(3), b).numpy()
    # the same draws: normal_ into a buffer of the same size from the same seed
    z = torch.empty(b * fwd.per_net).normal_(generator=torch.Generator().manual_seed(3))
    ref = _reference_outputs(z.double().numpy(), widths, sigma_w, sigma_b, b)
    assert got.shape == (b, 2 ** widths[0])
    clear = np.abs(ref) > 1e-5 * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_array_equal(got[clear], ref[clear] > 0)
    assert clear.mean() > 0.99 or sigma_b == 0.0  # (sigma_b = 0: x = 0 gives output exactly 0)
    if sigma_b == 0.0:
        assert not got[:, 0].any()  # output 0 at the all-zero input is not "> 0"


def test_sampler_independent_of_worker_count_and_reports_progress():
    seen, threads = [], torch.get_num_threads()
    one = sample_boolean_prior(70_000, (7, 8, 1), seed=4, n_workers=1, progress=seen.append)
    two = sample_boolean_prior(70_000, (7, 8, 1), seed=4, n_workers=2)
    assert sum(seen) == 70_000 and len(seen) == 2  # chunks of 65 536 networks
    np.testing.assert_array_equal(one.keys, two.keys)
    np.testing.assert_array_equal(one.counts, two.counts)
    other = sample_boolean_prior(70_000, (7, 8, 1), seed=5, n_workers=2)
    assert not np.array_equal(one.counts, other.counts)
    assert torch.get_num_threads() == threads  # restored after sampling


def test_antithetic_pairs_count_every_function_and_its_complement_equally():
    prior = sample_boolean_prior(20_000, (3, 6, 1), seed=7)
    assert prior.antithetic and prior.n_samples == 20_000
    bits = np.stack([function_bits(f, 3) for f in prior.table().function])
    np.testing.assert_array_equal(prior.counts_of(bits), prior.counts_of(1 - bits))
    indep = sample_boolean_prior(20_000, (3, 6, 1), seed=7, antithetic=False)
    assert not indep.antithetic
    assert not np.array_equal(indep.counts_of(bits), indep.counts_of(1 - bits))
    with pytest.raises(FlatpriorError, match="odd.*even"):
        sample_boolean_prior(20_001, (3, 6, 1))
    with pytest.raises(FlatpriorError, match="antithetic"):
        prior.merge(sample_boolean_prior(100, (3, 6, 1), seed=8, antithetic=False))


def test_antithetic_estimates_are_unbiased_no_noisier_and_their_intervals_cover():
    # 400 replicates of 2000 networks of the threshold unit, paired and independent: each
    # frequency's mean is the exact P; the paired variance is P(1-2P)/n, below the independent
    # P(1-P)/n; the 95 % intervals (Wilson of 2P on n/2 pairs, halved) cover P ~95 % of the time
    probs = _threshold_unit_probs(1.0, 1.0)
    keys = [k for k, p in probs.items() if p > 0]
    p = np.array([probs[k] for k in keys])
    bits = np.stack([function_bits(k, 2) for k in keys])
    n, reps = 2000, 400
    freq = {True: [], False: []}
    covered = []
    for r in range(reps):
        for paired in (True, False):
            prior = sample_boolean_prior(n, (2, 1), seed=1000 + r, antithetic=paired)
            c = prior.counts_of(bits)
            freq[paired].append(c / n)
            if paired:
                lo, hi = prior.probability_interval(c)
                covered.append((lo <= p) & (p <= hi))
    for paired in (True, False):
        f = np.array(freq[paired])
        se = np.sqrt(p * (1 - (2 if paired else 1) * p) / n / reps)
        assert np.all(np.abs(f.mean(0) - p) <= 4.5 * se)
    var_paired, var_indep = np.var(freq[True], axis=0), np.var(freq[False], axis=0)
    np.testing.assert_allclose(var_paired, p * (1 - 2 * p) / n, rtol=0.3)
    np.testing.assert_allclose(var_indep, p * (1 - p) / n, rtol=0.3)
    big = p > 0.1  # elsewhere the factor (1 - 2P) / (1 - P) ~ 1 is below the noise
    assert big.any() and np.all(var_paired[big] < var_indep[big])
    coverage = np.mean(covered, axis=0)
    assert np.all((coverage > 0.91) & (coverage < 0.99)), coverage


def test_antithetic_posterior_is_binomial_and_the_flag_survives_save(tmp_path):
    prior = sample_boolean_prior(4000, (2, 3, 1), seed=3)
    post = prior.posterior([1], [1])  # one network of a pair fits at most
    assert not post.antithetic and post.n_samples == int(prior.counts[prior.consistent(
        [1], [1])].sum())
    assert prior.posterior([], []).antithetic  # every network fits an empty S
    path = tmp_path / "p.npz"
    prior.save(path)
    back = BooleanPrior.load(path)
    assert back.antithetic and back.table().equals(prior.table())
