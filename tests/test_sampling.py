"""The sampling step on hand-made logits: exact semantics, distributions, batch invariance,
no recompiles.

Every jitted call uses one shape, [S, V] = [256, 300] (several 128-token blocks, and not a
multiple of one), so the file compiles one program per way to the nucleus and no more.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpt_jax import programs, sampling
from pgpt_jax.sampling import init_rows, logprobs_of, processed_logits, row_key

S, V = 256, 300
STATIC = ("top_k", "nucleus_k", "rejection_tries")
sample = jax.jit(sampling.sample, static_argnames=STATIC)

# Static widths that force each exact way to the nucleus: the top_k prefilter (the default;
# it also falls through to the others when rows need them), rejection (prefilter too
# narrow), and the bisection (prefilter too narrow, a single rejection try).
PATHS = {
    "default": {},
    "rejection": dict(nucleus_k=1, rejection_tries=8),
    "bisection": dict(nucleus_k=1, rejection_tries=1),
}

_keys = jax.jit(jax.vmap(
    lambda seed: jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 0))))


def make_rows(seeds=None, **fields):
    """SamplingRows for [S, V]: defaults, overrides (scalars and rows broadcast), a seed per row."""
    rows = init_rows(S, V)
    seeds = np.arange(S) if seeds is None else np.asarray(seeds)
    values = {"key": _keys(jnp.asarray(seeds, jnp.int32))}
    for name, value in fields.items():
        template = getattr(rows, name)
        values[name] = jnp.broadcast_to(jnp.asarray(value, template.dtype), template.shape)
    return dataclasses.replace(rows, **values)


def draw(logits, rows, steps, **static):
    """Tokens [steps, S] at positions 0..steps-1, with the rows (and so the counts) fixed."""
    logits = jnp.asarray(logits, jnp.float32)
    return np.stack([np.asarray(sample(logits, rows, jnp.full((S,), t, jnp.int32), **static)[0])
                     for t in range(steps)])


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def nucleus_probs(z, top_p, size=None):
    """Reference: softmax(z) restricted to the minimal nucleus (stable order: ties by lower id),
    or to the `size` most likely tokens when given."""
    p = softmax(z)
    if top_p >= 1 and size is None:
        return p
    order = np.argsort(-np.asarray(z), kind="stable")
    m = size or int(np.argmax(np.cumsum(p[order]) >= top_p)) + 1
    q = np.zeros_like(p)
    q[order[:m]] = p[order[:m]]
    return q / q.sum()


def chi2(counts, probs):
    """Pearson statistic over categories expected >= 5 (the rest merged into one bin), and its
    critical value at a 1e-7 tail (Wilson-Hilferty). A token drawn where probs is 0 fails."""
    if counts[probs == 0].sum():
        return np.inf, 0.0
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    df = len(exp) - 1
    a = 2.0 / (9.0 * df)
    return float(((obs - exp) ** 2 / exp).sum()), df * (1 - a + 5.2 * np.sqrt(a)) ** 3


def test_row_key_and_defaults():
    key = jax.random.fold_in(jax.random.key(1234), 3)
    np.testing.assert_array_equal(row_key(1234, 3), jax.random.key_data(key))
    # The host's threefry is JAX's fold_in for every 64-bit seed and choice index.
    for seed in (0, 5, 2**32 + 5, 2**63 - 1, -1, -(2**63), 987654321987):
        for index in (0, 1, 255, 2**31 + 7):
            u = seed % 2**64
            want = jax.random.fold_in(jax.random.wrap_key_data(np.array([u >> 32, u & 0xFFFFFFFF], np.uint32)),
                                      index)
            np.testing.assert_array_equal(row_key(seed, index), jax.random.key_data(want))
    assert not np.array_equal(row_key(1234, 3), row_key(1234, 4))
    np.testing.assert_array_equal(make_rows(seeds=[77] * S).key[0], row_key(77, 0))
    rows = init_rows(3, 10)
    assert rows.bias.shape == rows.counts.shape == (3, 10) and rows.counts.dtype == jnp.int32
    np.testing.assert_array_equal(rows.temperature, 1.0)
    np.testing.assert_array_equal(rows.top_p, 1.0)
    np.testing.assert_array_equal(rows.presence, 0.0)
    np.testing.assert_array_equal(rows.num_logprobs, 0)
    assert rows.key.shape == (3, 2) and rows.key.dtype == jnp.uint32
    np.testing.assert_array_equal(rows.processed, False)  # raw logprobs unless a row asks
    assert rows.mask.shape == (3, 1) and rows.mask.dtype == jnp.uint32  # ceil(10 / 32) words
    np.testing.assert_array_equal(rows.constrained, False)  # no structured output unless a row asks
    assert len(jax.tree_util.tree_leaves(rows)) == 11  # a pytree of arrays, as jit needs


def test_penalties_and_bias_follow_openai_formula_exactly():
    rows = init_rows(3, 8)
    logits = jnp.asarray(np.linspace(-2, 2, 24).reshape(3, 8), jnp.float32)
    counts = np.zeros((3, 8), np.int32)
    counts[0, [1, 2]] = [1, 3]
    counts[1, 5] = 2
    counts[2, 7] = 4
    bias = np.zeros((3, 8), np.float32)
    bias[1, 5] = 10.0
    rows = dataclasses.replace(
        rows, counts=jnp.asarray(counts), bias=jnp.asarray(bias),
        frequency=jnp.asarray([0.5, -1.0, 0.0]), presence=jnp.asarray([0.25, 0.0, 1.5]))
    got = np.asarray(processed_logits(logits, rows))
    want = np.asarray(logits).copy()
    want[0, 1] -= 1 * 0.5 + 0.25
    want[0, 2] -= 3 * 0.5 + 0.25
    want[1, 5] += 10.0 + 2 * 1.0  # a negative frequency penalty raises a repeated token
    want[2, 7] -= 1.5  # presence does not scale with the count
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_bias_forces_and_bans_tokens():
    logits = np.random.default_rng(0).normal(size=(S, V)).astype(np.float32)
    half = S // 2
    bias = np.zeros((S, V), np.float32)
    bias[:half, 7] = 100.0  # forced
    favourite = logits.argmax(-1)
    bias[np.arange(half, S), favourite[half:]] = -100.0  # banned: each row's most likely token
    rows = make_rows(bias=bias, temperature=np.tile([1.0, 0.0, 1.7, 0.5], S // 4),
                     top_p=np.tile([1.0, 1.0, 0.5, 0.9], S // 4))
    tokens = draw(logits, rows, 4)
    assert (tokens[:, :half] == 7).all()
    assert (tokens[:, half:] != favourite[half:]).all()


def test_temperature_zero_is_argmax_of_processed_logits():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(S, V)), jnp.float32)
    rows = make_rows(temperature=0.0, top_p=np.tile([0.3, 1.0], S // 2),
                     counts=rng.integers(0, 3, size=(S, V)), bias=rng.normal(size=(S, V)),
                     frequency=0.7, presence=0.4)
    tokens, logprob, *_ = sample(logits, rows, jnp.zeros((S,), jnp.int32))
    want = np.argmax(np.asarray(processed_logits(logits, rows)), axis=-1)
    assert (want != np.argmax(np.asarray(logits), axis=-1)).mean() > 0.5  # processing matters
    np.testing.assert_array_equal(tokens, want)
    assert np.isfinite(np.asarray(logprob)).all()


def test_logprobs_are_raw_and_counts_are_updated():
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(S, V)).astype(np.float32)
    raw[:, 290:] = -np.inf  # padded vocabulary
    bias = np.zeros((S, V), np.float32)
    bias[:, 3] = 100.0
    counts = np.zeros((S, V), np.int32)
    counts[:, [4, 295]] = 2  # penalties on a -inf logit must not make NaN
    rows = make_rows(bias=bias, counts=counts, frequency=0.5, presence=0.5,
                     temperature=np.tile([0.0, 0.5, 1.0, 2.0], S // 4),
                     top_p=np.tile([1.0, 0.5, 0.9, 1.0], S // 4),
                     num_logprobs=np.tile([0, 5, 2, 0], S // 4))
    tokens, logprob, top_ids, top_lp, new_rows = sample(jnp.asarray(raw), rows, jnp.arange(S))
    np.testing.assert_array_equal(tokens, 3)  # the bias forces it; logprobs ignore the bias
    log_softmax = raw - np.log(np.exp(raw[:, :290]).sum(-1, keepdims=True))
    np.testing.assert_allclose(logprob, log_softmax[:, 3], rtol=1e-5)
    order = np.argsort(-raw, axis=-1, kind="stable")[:, :5]
    np.testing.assert_array_equal(top_ids, order)
    np.testing.assert_allclose(top_lp, np.take_along_axis(log_softmax, order, -1), rtol=1e-5)
    want_counts = counts.copy()
    want_counts[:, 3] += 1
    np.testing.assert_array_equal(new_rows.counts, want_counts)
    assert not np.isnan(np.asarray(logprob)).any() and not np.isnan(np.asarray(top_lp)).any()


def test_logprobs_of_any_leading_shape_and_k_zero():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 16)).astype(np.float32)
    logits[..., 12:] = -np.inf
    ids = rng.integers(0, 12, size=(2, 5))
    lp, top_ids, top_lp = logprobs_of(jnp.asarray(logits), jnp.asarray(ids), 3)
    log_softmax = logits - np.log(np.exp(logits[..., :12]).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp, np.take_along_axis(log_softmax, ids[..., None], -1)[..., 0],
                               rtol=1e-5)
    assert top_ids.shape == top_lp.shape == (2, 5, 3)
    np.testing.assert_array_equal(top_ids, np.argsort(-logits, axis=-1, kind="stable")[..., :3])
    np.testing.assert_allclose(top_lp, -np.sort(-log_softmax, axis=-1)[..., :3], rtol=1e-5)
    lp0, ids0, top0 = logprobs_of(jnp.asarray(logits), jnp.asarray(ids), 0)
    assert ids0.shape == top0.shape == (2, 5, 0)
    np.testing.assert_allclose(lp0, lp)


# Logits whose nucleus boundaries are known by hand: values 2, 1, 1, 1, 0 at scattered ids,
# so id order and value order differ, with a three-way tie at value 1; the rest is -inf.
#   probabilities 0.4466, 0.1643 x 3, 0.0604; cumulative 0.4466 0.6109 0.7752 0.9395 1
NUCLEUS_IDS = [209, 12, 3, 150, 0]  # the 2, then the tied 1s (ids 3 < 12 < 150), then the 0
NUCLEUS_CASES = [  # (top_p, support)
    (1e-9, {209}),  # top_p ~ 0: only the most likely token
    (0.44, {209}),
    (0.5, {209, 3}),  # the boundary falls inside the tie: the lowest tied id comes first
    (0.7, {209, 3, 12}),
    (0.9, {209, 3, 12, 150}),
    (0.95, {209, 3, 12, 150, 0}),
    (1.0, {209, 3, 12, 150, 0}),  # top_p = 1: every finite token, never a -inf one
]


@pytest.mark.parametrize("path", PATHS)
def test_nucleus_support_is_exactly_the_minimal_nucleus(path):
    raw = np.full(V, -np.inf, np.float32)
    raw[NUCLEUS_IDS] = [2, 1, 1, 1, 0]
    case = np.arange(S) % len(NUCLEUS_CASES)
    rows = make_rows(top_p=np.array([p for p, _ in NUCLEUS_CASES])[case])
    tokens = draw(np.broadcast_to(raw, (S, V)), rows, 8, **PATHS[path])  # ~290 draws a case
    for i, (p, support) in enumerate(NUCLEUS_CASES):
        assert set(tokens[:, case == i].ravel().tolist()) == support, (path, p)


# One batch, a different (logit scale, temperature, top_p) per group of rows. With the
# default widths the first group never needs the nucleus, the peaked ones are settled by the
# prefilter, and the flat ones by rejection and, often enough, the bisection.
DIST_GROUPS = [
    (2.0, 1.0, 1.0), (2.0, 0.6, 1.0), (4.0, 1.5, 0.9), (3.0, 1.0, 0.8), (1.5, 1.0, 0.95),
    (1.0, 2.0, 0.6),
]


@pytest.mark.parametrize("path", ["default", "bisection"])  # rejection: in default's flat groups
def test_empirical_distribution_matches_processed_softmax(path):
    steps = 250  # 42 rows a group: 10500 draws per (temperature, top_p)
    group = np.arange(S) % len(DIST_GROUPS)
    rng = np.random.default_rng(4)
    base = rng.normal(size=V).astype(np.float32)
    base[-20:] = -np.inf  # padded vocabulary
    scale, temperature, top_p = (np.array(c)[group] for c in zip(*DIST_GROUPS))
    logits = (base[None, :] * scale[:, None]).astype(np.float32)
    bias = np.zeros(V, np.float32)
    bias[[5, 6]] = [3.0, -2.0]
    counts = np.zeros(V, np.int32)
    counts[[7, 8, 9]] = [1, 2, 5]
    rows = make_rows(temperature=temperature, top_p=top_p, bias=bias, counts=counts,
                     frequency=0.3, presence=0.6)
    tokens = draw(logits, rows, steps, **PATHS[path])
    processed = np.asarray(processed_logits(jnp.asarray(logits), rows), np.float64)
    for g, (s, t, p) in enumerate(DIST_GROUPS):
        hist = np.bincount(tokens[:, group == g].ravel(), minlength=V)
        z = processed[g] / t
        stat, critical = chi2(hist, nucleus_probs(z, p))
        assert stat < critical, (path, s, t, p, stat, critical)
        # The same draws reject a temperature 10% off either way ...
        for wrong_t in (t * 1.1, t / 1.1):
            assert chi2(hist, nucleus_probs(processed[g] / wrong_t, p))[0] > critical, (t, p)
        if p < 1:  # ... and a nucleus one token short or one token long.
            order = np.argsort(-z, kind="stable")
            m = int((nucleus_probs(z, p) > 0).sum())
            assert hist[order[m - 1]] > 0, (path, t, p)  # one short would never draw it
            longer = nucleus_probs(z, p, m + 1)[order[m]] * hist.sum()
            assert longer > 10 and hist[order[m]] == 0, (path, t, p)  # one long: P < e^-10


# Rows of one call, each (temperature, top_p): greedy (whose top_p does not apply), untruncated,
# and nuclei that end inside the top-64 prefilter (peaked rows) or past it (flat rows).
PROCESSED_GROUPS = [(0.0, 1.0), (0.0, 0.5), (1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.5), (2.0, 0.9),
                    (0.7, 0.3)]


def processed_reference(z, temperature, top_p):
    """log-probabilities (f64[V], -inf outside the nucleus) of the distribution sampled from."""
    with np.errstate(divide="ignore"):  # log(0) = -inf: a -inf logit, or past the nucleus
        if temperature == 0:
            return np.log(softmax(z))
        return np.log(nucleus_probs(z / temperature, top_p))


@pytest.mark.parametrize("path", ["default", "bisection"])  # bisection: the nucleus never ends in the prefilter
def test_processed_logprobs_are_those_of_the_distribution_sampled_from(path):
    rng = np.random.default_rng(8)
    group = np.arange(S) % len(PROCESSED_GROUPS)
    temperature, top_p = (np.array(c)[group] for c in zip(*PROCESSED_GROUPS))
    scale = np.where(np.arange(S) % 16 < 8, 0.5, 4.0)  # flat and peaked rows in every group
    logits = (rng.normal(size=(S, V)) * scale[:, None]).astype(np.float32)
    logits[:, -20:] = -np.inf  # padded vocabulary
    bias = np.zeros((S, V), np.float32)
    bias[:, [5, 6]] = [2.0, -3.0]
    bias[:, 7] = -np.inf  # a banned token: never among the alternatives
    counts = rng.integers(0, 3, size=(S, V)).astype(np.int32)
    rows = make_rows(temperature=temperature, top_p=top_p, bias=bias, counts=counts, frequency=0.4,
                     presence=0.3, num_logprobs=5, processed=True)
    tokens, logprob, top_ids, top_lp, _ = sample(jnp.asarray(logits), rows, jnp.arange(S), **PATHS[path])
    raw = sample(jnp.asarray(logits), dataclasses.replace(rows, processed=jnp.zeros(S, bool)),
                 jnp.arange(S), **PATHS[path])
    np.testing.assert_array_equal(raw[0], tokens)  # the mode changes what is reported, not what is drawn
    z_all = np.asarray(processed_logits(jnp.asarray(logits), rows), np.float64)
    checked_cut = 0
    for s in range(S):
        want = processed_reference(z_all[s], temperature[s], top_p[s])
        assert np.isfinite(want[tokens[s]])
        np.testing.assert_allclose(logprob[s], want[tokens[s]], rtol=1e-4, atol=1e-4)
        order = np.argsort(-z_all[s], kind="stable")[:5]
        np.testing.assert_array_equal(top_ids[s], order)
        finite = np.isfinite(want[order])
        np.testing.assert_array_equal(np.isfinite(np.asarray(top_lp[s])), finite)  # -inf past the nucleus
        np.testing.assert_allclose(np.asarray(top_lp[s])[finite], want[order][finite], rtol=1e-4, atol=1e-4)
        checked_cut += int((~finite).any())
        assert 7 not in top_ids[s].tolist()
    assert checked_cut > 10  # some nuclei are shorter than 5 tokens
    assert not np.allclose(logprob, raw[1])  # and the raw numbers differ


def test_processed_logprob_with_a_dominant_bias_is_zero_and_raw_is_not():
    logits = jnp.asarray(np.random.default_rng(9).normal(size=(S, V)), jnp.float32)
    bias = np.zeros((S, V), np.float32)
    bias[:, 42] = 100.0
    rows = make_rows(bias=bias, num_logprobs=2, processed=np.arange(S) % 2 == 0,
                     temperature=np.tile([0.0, 1.0, 2.0, 0.5], S // 4))
    tokens, logprob, top_ids, top_lp, _ = sample(logits, rows, jnp.zeros((S,), jnp.int32))
    np.testing.assert_array_equal(tokens, 42)
    processed = np.arange(S) % 2 == 0
    np.testing.assert_allclose(np.asarray(logprob)[processed], 0.0, atol=1e-5)
    assert (np.asarray(logprob)[~processed] < -3).all()  # raw: the model's own, about log(1/V)
    np.testing.assert_array_equal(np.asarray(top_ids)[processed, 0], 42)


def test_row_is_independent_of_its_slot_and_of_other_rows():
    steps = 12
    rng = np.random.default_rng(5)
    mine = (rng.normal(size=V) * 0.5).astype(np.float32)  # flat: the nucleus needs rejection
    my_params = dict(temperature=0.9, top_p=0.8, frequency=0.2, presence=0.1)

    def run(slot, seed, others):
        logits = rng.normal(size=(S, V)).astype(np.float32) * others["scale"]
        logits[slot] = mine
        fields = {k: np.array(others[k], np.float32) for k in ("temperature", "top_p")}
        for k, v in my_params.items():
            fields.setdefault(k, np.zeros(S, np.float32))[slot] = v
        seeds = 1000 + rng.permutation(S)
        seeds[slot] = seed
        rows = make_rows(seeds=seeds, **fields)
        out = []
        for position in range(10, 10 + steps):  # counts carry over, as in decoding
            tokens, logprob, _, _, rows = sample(jnp.asarray(logits), rows,
                                                 jnp.full((S,), position, jnp.int32))
            out.append((int(tokens[slot]), float(logprob[slot])))
        return out

    quiet = dict(scale=1.0, temperature=np.ones(S), top_p=np.ones(S))
    busy = dict(scale=8.0, temperature=rng.choice([0.0, 0.3, 1.0, 2.0], S),
                top_p=rng.choice([0.01, 0.5, 0.99, 1.0], S))
    a = run(0, 42, quiet)
    assert run(200, 42, busy) == a
    assert [t for t, _ in run(0, 7, quiet)] != [t for t, _ in a]  # the seed drives the draws


def test_a_whole_distribution_row_ignores_the_nucleus_its_neighbours_need():
    """A top_p=1 row whose few tokens hold all its mass (as under a grammar's mask) samples the
    same whether or not another row of the batch needs a nucleus: its draw is always the
    whole distribution's, never the nucleus prefilter's (another token of the same uniform)."""
    logits = np.full((S, V), -1e4, np.float32)
    logits[:, [3, 150, 299]] = [0.0, 0.4, -0.3]  # [0, 128) / [128, 256) / [256, 300): three blocks
    rows = dict(seeds=np.arange(S), temperature=np.ones(S))
    alone = draw(logits, make_rows(**rows, top_p=np.ones(S)), 4)
    beside = draw(logits, make_rows(**rows, top_p=np.where(np.arange(S) % 2, 0.5, 1.0)), 4)
    whole = np.arange(S) % 2 == 0
    np.testing.assert_array_equal(beside[:, whole], alone[:, whole])
    assert set(np.unique(alone)) == {3, 150, 299}


def test_new_parameter_values_do_not_recompile():
    logits = jnp.asarray(np.random.default_rng(6).normal(size=(S, V)), jnp.float32)
    first = sample(logits, make_rows(), jnp.zeros((S,), jnp.int32))
    compiled = sample._cache_size()
    bias = np.zeros((S, V), np.float32)
    bias[:, 11] = 100.0
    changed = make_rows(seeds=np.arange(S) + 9, temperature=np.linspace(0, 2, S),
                        top_p=np.linspace(0.01, 1, S), presence=0.5, frequency=0.5, bias=bias,
                        num_logprobs=np.arange(S) % 6, counts=np.ones((S, V), np.int32),
                        processed=np.arange(S) % 2 == 0)
    second = sample(logits, changed, jnp.full((S,), 17, jnp.int32))
    assert sample._cache_size() == compiled
    np.testing.assert_array_equal(second[0], 11)
    assert not np.array_equal(first[0], second[0])


@pytest.mark.parametrize("never", [(), (5, 2500, 17)])
def test_head_logprobs_equal_logprobs_of_the_written_out_logits(monkeypatch, never):
    # Blocks of 250 columns over a 3000-wide head (the last 10 padding): a tie for the max
    # across two blocks (the lower id wins), a row of all-equal logits, banned tokens.
    monkeypatch.setattr(programs, "HEAD_BLOCK", 256)
    rng = np.random.default_rng(10)
    D, V, real = 16, 3000, 2990
    hidden = rng.normal(size=(3, 7, D)).astype(np.float32)
    head = rng.normal(size=(D, V)).astype(np.float32)
    head[:, 100] = head[:, 2500] = 2 * hidden[1, 0]  # the max of row (1, 0), twice
    hidden[0, 1] = 0.0
    ids = rng.integers(0, real, (3, 7)).astype(np.int32)
    logits = hidden @ head
    logits[..., real:] = -np.inf
    want = sampling.logprobs_of(jnp.asarray(logits), jnp.asarray(ids), 3, never, wanted=1)
    got = jax.jit(lambda h, w, i: programs.head_logprobs(h, w, i, 3, real, never))(hidden, head, ids)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[1])[..., 0], np.asarray(want[1])[..., 0])
    np.testing.assert_allclose(np.asarray(got[2])[..., 0], np.asarray(want[2])[..., 0], atol=1e-5)
    assert np.asarray(got[1])[0, 1, 0] == 0  # all equal: the first id
    assert not np.isin(np.asarray(got[1])[..., 0], never).any()
    assert np.asarray(got[1])[1, 0, 0] == 100  # the tie across blocks: the lower id (2500 is banned or later)


def test_top_logprobs_cap_is_static_and_bounded():
    rows = init_rows(2, 64)
    logits = jnp.asarray(np.random.default_rng(7).normal(size=(2, 64)), jnp.float32)
    _, top_ids, top_lp = logprobs_of(logits, jnp.zeros((2,), jnp.int32), sampling.MAX_LOGPROBS)
    assert top_ids.shape == top_lp.shape == (2, 20)
    with pytest.raises(ValueError, match="top_k=21"):
        sampling.sample(logits, rows, jnp.zeros((2,), jnp.int32), top_k=21)
