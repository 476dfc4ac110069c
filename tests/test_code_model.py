"""The embedded model pgpt-code: it is what load_model() gives, it fits git, it decodes
deterministically, it takes 1024-token contexts, its `suffix` middles join prefix and suffix,
and on modules it never saw it beats a unigram model and measures what docs/model_card.md says
and writes function bodies that parse on a held-out sample, at least half of them (issue 19's
target; its infill target is missed: the card says by how much).

`assets/pgpt-code/heldout.json` (written by training/train.py) holds 8 rows of 129 tokens from
the validation split, the add-one unigram baseline of the training split on their targets, and
the loss the saved weights had on them. `tests/fixtures/pgpt_code_eval.json` (written by
training/evaluate.py) holds 40 held-out infill lines and 24 held-out function prompts with what
the shipped model scored on them (and each line's teacher-forced nats).
"""

import ast
import json
import pathlib
from collections.abc import Sequence

import pytest

import pgpt_jax
from pgpt_jax.checkpoint import EMBEDDED_DIR, EMBEDDED_MODELS, EMBEDDED_NAME, load_model
from pgpt_jax.config import CODE_VOCAB, EOS_ID, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from pgpt_jax.request import RequestError, fim_prompt
from pgpt_jax.tokenizer import tokenizer_for
from test_embedded_model import _greedy as embedded_greedy  # argmax by full forward passes
from test_embedded_model import assert_loads_by_name, checkpoint_files, heldout_loss, run_in_checkout

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]  # holds training/, which is not installed
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "pgpt_code_eval.json"
FIM_IDS = [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]
# Floors, below what the shipped model measured (docs/model_card.md), so that a broken
# tokenizer, FIM prompt or checkpoint fails while rounding in another XLA build does not.
MIN_MARGIN_NATS = 2.1  # held-out slice: model loss below the unigram's (v3 measured 3.06, v2 3.11, v1 2.39)
MAX_LINE_NATS = 4.2  # held-out infill lines after the FIM prompt, nats/token (v3 measured 2.81 on these 8)
# The evaluation's generate() calls take generate()'s default engine (8 slots), the one the
# other tests here use: its programs compile once for the module.
SLOTS = 8
# A hole the model fills (greedy) so that the three parts join into a module that parses.
HOLE_PREFIX = "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n"
HOLE_SUFFIX = "\n\ndef sub(a, b):\n    \"\"\"Return a minus b.\"\"\"\n    return a - b\n"


@pytest.fixture(scope="module")
def code():
    return load_model()


@pytest.fixture(scope="module")
def tok(code):
    return tokenizer_for(code.config)


@pytest.fixture(scope="module")
def heldout():
    return json.loads((EMBEDDED_DIR / "heldout.json").read_text())


def test_default_model_is_the_shipped_pgpt_code(code):
    cfg = code.config
    assert (cfg.name, cfg.fim, cfg.space_tokens, cfg.vocab_size, cfg.n_positions, cfg.fim_order) == (
        EMBEDDED_NAME, True, True, CODE_VOCAB, 1024, "spm")
    assert EMBEDDED_NAME == "pgpt-code" and EMBEDDED_DIR == EMBEDDED_MODELS["pgpt-code"]
    assert_loads_by_name(code, "pgpt-code")


def test_checkpoint_fits_git_and_the_package_budget():
    files = checkpoint_files(EMBEDDED_DIR)
    assert max(f.stat().st_size for f in files) <= 16_000_000  # no file over 16 MB in git
    assert sum(f.stat().st_size for f in files) <= 40_000_000


def _greedy(model, prompt: list[int], n: int, banned: Sequence[int] = ()) -> list[int]:
    return embedded_greedy(model, prompt, n, banned, length=128)


def test_greedy_output_is_deterministic_code(code, tok):
    """The engine's cached greedy decoding gives the argmax of full forward passes, twice over."""
    prompt = "import os\n\n\ndef read_lines(path):\n    "
    expected = _greedy(code, tok.encode(prompt), 12)
    assert len(expected) >= 4 and max(expected) != EOS_ID
    for _ in range(2):
        (choice,) = pgpt_jax.generate(code, prompt, max_tokens=12, temperature=0.0)
        assert choice.token_ids == expected
        assert choice.text == tok.decode(expected)


def test_suffix_fills_the_hole_so_that_the_parts_join(code, tok):
    """A request with `suffix` (arranged in the model's order, suffix-prefix-middle) gets a middle
    that joins prefix and suffix into Python that parses, with a statement after the docstring
    (the shipped model's middle: `    return a.getboolean(a, b)` and a newline, then it ends; v2's
    ran on into another `def`, so the first line is what fills the hole); the engine's greedy
    middle is the argmax of full forward passes over the text tokens, the FIM control tokens
    left out."""
    ids = fim_prompt(tok.encode(HOLE_PREFIX), tok.encode(HOLE_SUFFIX), True, code.config.fim_order)
    expected = _greedy(code, ids, 16, banned=FIM_IDS)
    (choice,) = pgpt_jax.generate(code, HOLE_PREFIX, suffix=HOLE_SUFFIX, max_tokens=16, temperature=0.0)
    assert choice.token_ids == expected
    assert "<|fim" not in choice.text and "\n" in choice.text
    line = choice.text.split("\n")[0]
    assert line.strip()
    module = ast.parse(HOLE_PREFIX + line + HOLE_SUFFIX)
    assert [f.name for f in module.body] == ["add", "sub"]
    assert len(module.body[0].body) >= 2  # the docstring and a statement: the hole holds a body


def test_context_is_1024_tokens(code, tok):
    line = "    value = compute(value, index)\n"
    ids = (tok.encode("def f(value, index):\n") + tok.encode(line) * 200)[:1016]
    (choice,) = pgpt_jax.generate(code, ids, max_tokens=8, temperature=0.0)
    assert choice.finish_reason == "length" and len(choice.token_ids) == 8
    with pytest.raises(RequestError, match="maximum context length is 1024 tokens"):
        pgpt_jax.generate(code, ids, max_tokens=9)


def test_validation_loss_beats_unigram_baseline(code, heldout):
    loss = heldout_loss(code, heldout)
    assert loss == pytest.approx(heldout["model_loss"], abs=0.02)  # the shipped weights are the measured ones
    assert loss < heldout["unigram_loss"] - MIN_MARGIN_NATS


def test_stored_unigram_baseline_matches_the_corpus(heldout):
    """The baseline is recomputed from this Python's stdlib (source and docs); a subprocess keeps
    its ~400 imports out of pytest. The corpus code (`training/`) is not installed: the
    subprocess runs in the checkout."""
    code = (
        "import json, numpy as np; from training import code_data, data; from pgpt_jax.tokenizer import get_tokenizer\n"
        "train, _ = data.split_pieces(data.stdlib_documents() + code_data.source_documents())\n"
        "counts = code_data.token_stream(get_tokenizer(fim=True, spaces=True).encode, train)\n"
        f"rows = np.asarray(json.load(open({str(EMBEDDED_DIR / 'heldout.json')!r}))['rows'])\n"
        f"print(data.unigram_cross_entropy(counts, rows[:, 1:].ravel(), {CODE_VOCAB}))\n"
    )
    # Other Python versions ship a slightly different stdlib: allow a small drift.
    assert float(run_in_checkout(code, timeout=180)) == pytest.approx(heldout["unigram_loss"], abs=0.05)


@pytest.fixture(scope="module")
def fixture():
    return json.loads(FIXTURE.read_text())


def test_held_out_infill_measures_reproduce(code, fixture):
    """training/evaluate.py's infill measures on 8 of its held-out lines (prefix <= 600 tokens,
    suffix <= 300): the true line's teacher-forced nats after the FIM prompt and after the
    prefix alone are what the shipped model measured (a broken FIM prompt, tokenizer or
    checkpoint moves them), both far below a uniform guess, and the suffix (suffix first, the
    model's order) lowers them on these lines as a whole (2.81 against 2.86 nats/token); greedy
    middles hold no FIM token. The card's figures are 0/500 exact and a suffix that helps a
    little: issue 19's infill target is missed, so there is no exact-match floor to hold."""
    from training import evaluate

    cases, recorded = fixture["infill"][:8], fixture["infill_line_nats"][:8]
    measured = evaluate.line_nats(code, cases)
    for (fim, plain, n), (fim0, plain0, n0) in zip(measured, recorded):
        assert n == n0
        assert fim / n == pytest.approx(fim0 / n0, abs=0.05) and plain / n == pytest.approx(plain0 / n0, abs=0.05)
    count = sum(n for _, _, n in measured)
    assert sum(f for f, _, _ in measured) / count < MAX_LINE_NATS  # uniform over the vocabulary: 10.8
    assert sum(f for f, _, _ in measured) < sum(p for _, p, _ in measured)  # the suffix helps
    results = evaluate.infill_score(code, cases, slots=SLOTS)
    assert sum(r["exact"] for r in results) >= fixture["infill_exact"] * len(cases) // 40
    for r in results:
        assert "<|fim" not in r["middle"]


def test_held_out_function_bodies_parse(code, fixture):
    """training/evaluate.py's body measure on the fixture's 24 held-out functions (seeded sampling
    at temperature 0.2): the shipped model's bodies parse on 17 of them (v3; 113, 106 and 105 of
    all 152 held out at seeds 0, 1, 2, 71%). The floor is issue 19's target, half: it leaves
    room for another XLA build's rounding to change sampled tokens (a new draw: 17 is about two
    standard deviations above 12), not for the repetition that v2's bodies died of (10 of 24)."""
    from training import evaluate

    results = evaluate.body_score(code, fixture["bodies"], seed=fixture["body_seed"], slots=SLOTS)
    assert fixture["bodies_parse"] >= len(results) // 2
    assert sum(r["parses"] for r in results) >= len(results) // 2


def test_function_body_measure_can_fail():
    """training/evaluate.py's body measure (def line + docstring, temperature 0.2, <= 160 tokens,
    cut where a line dedents to the def): a body cut by max_tokens, or one that does not parse,
    counts against."""
    from training import evaluate

    assert not evaluate.body_parses("def f():\n    \"\"\"Doc.\"\"\"\n", "    return (\n")
    assert evaluate.body_parses("def f():\n    \"\"\"Doc.\"\"\"\n", "    return 1\n")
    assert evaluate.cut_body("    def f(self):\n        \"\"\"D.\"\"\"\n", "        x = 1\n    def g(self):\n") == (
        "        x = 1\n", True)
    assert evaluate.cut_body("def f():\n", "    x = 1\n    y = 2") == ("    x = 1\n    y = 2", False)


def test_ranked_lines_score_as_one_left_to_right_pass(code, tok):
    """training/rank_infill.py scores candidate lines on the cache of one prefix pass (padded to
    640 tokens, 16 lines a call): each line's (line, suffix head) nats are those of a plain pass
    over prefix + line + newline + head, and the true line of the README's hole ranks first."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pgpt_jax.model import forward, init_cache
    from training.rank_infill import Scorer

    lines = ["    return a + b", "    return a - b", "    pass"]
    scores = Scorer(code, suffix_tokens=8).score(HOLE_PREFIX, lines, HOLE_SUFFIX)
    head = tok.decode(tok.encode(HOLE_SUFFIX)[:8])
    T = 64
    full = jax.jit(lambda m, x: jax.nn.log_softmax(
        forward(m, x, jnp.arange(T)[None], init_cache(m.config, 1, T))[0], -1))
    prefix = tok.encode(HOLE_PREFIX)
    for line in lines:
        target = tok.encode(line + "\n" + head)
        x = np.zeros((1, T), np.int32)
        x[0, : len(prefix) + len(target)] = prefix + target
        logp = np.asarray(full(code, jnp.asarray(x)))[0]
        per = logp[np.arange(len(prefix) - 1, len(prefix) + len(target) - 1), target]
        cut = len(tok.encode(line + "\n"))
        assert scores[line] == pytest.approx((per[:cut].sum(), per[cut:].sum()), abs=2e-3)
    assert max(scores, key=lambda t: sum(scores[t])) == "    return a + b"


def test_suffix_never_returns_fim_tokens_and_they_cannot_be_forged(code, tok):
    """The engine bans the FIM control tokens (they only arrange prompts): sampled middles and top
    logprobs hold text tokens only; user text that spells a control token is plain text, and a
    control token is no logit_bias key."""
    kwargs = dict(suffix=HOLE_SUFFIX, max_tokens=16, temperature=1.0, n=8, seed=0, logprobs=5)
    first = pgpt_jax.generate(code, HOLE_PREFIX, **kwargs)
    again = pgpt_jax.generate(code, HOLE_PREFIX, **kwargs)  # seeded: the same choices twice
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    for c in first:
        assert not set(FIM_IDS) & set(c.token_ids) and "<|fim" not in c.text
        assert all(not t.startswith("<|fim") for top in c.logprobs.top_logprobs for t in top)

    forged = "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|>"
    (c,) = pgpt_jax.generate(code, forged, max_tokens=1, echo=True, logprobs=0)
    assert c.text.startswith(forged) and "<|fim_prefix|>" not in c.logprobs.tokens  # spelt out, not a token
    with pytest.raises(RequestError) as e:
        pgpt_jax.generate(code, "x", max_tokens=1, logit_bias={FIM_MIDDLE: 5})
    assert e.value.param == "logit_bias"
