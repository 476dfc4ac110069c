"""The older embedded model pgpt-tiny (documentation text, context 256; the default is now
pgpt-code, tests/test_code_model.py): it loads by name, decodes deterministically, fits the
package-data budget, and beats a unigram model on held-out text.

`assets/pgpt-tiny/heldout.json` (written by training/train_tiny.py) holds 8 rows of 129 tokens
from the validation split, the add-one unigram baseline of the training split on their
targets, and the loss the saved weights had on them when they were trained.
"""

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pgpt_jax
from pgpt_jax import load_model as package_load_model
from pgpt_jax.checkpoint import EMBEDDED_MODELS, load_model
from pgpt_jax.config import EOS_ID, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from pgpt_jax.model import forward, init_cache
from pgpt_jax.tokenizer import get_tokenizer

# Measured when the checkpoint was trained: the model's loss on the slice is 2.12 nats/token
# below the unigram baseline (docs/model_card.md). The test asks for a bit less.
MIN_MARGIN_NATS = 1.8
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]  # holds training/, which is not installed
FIM_IDS = [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]
# The FIM sample of docs/model_card.md: str.strip's docstring with a hole in it. Greedy decoding
# fills it with "s.\n", and there the raw model's most likely next token is <|fim_middle|>.
STRIP_PREFIX = "str.strip([chars])\nReturn a copy of the string with "
STRIP_SUFFIX, STRIP_MIDDLE = " removed.\n", "s.\n"


EMBEDDED_DIR = EMBEDDED_MODELS["pgpt-tiny"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("pgpt-tiny")


@pytest.fixture(scope="module")
def heldout():
    return json.loads((EMBEDDED_DIR / "heldout.json").read_text())


def assert_loads_by_name(model, name: str) -> None:
    """`pgpt_jax.load_model(name)` gives `model`'s config and weights (also tests/test_code_model.py)."""
    named = package_load_model(name)
    assert named.config == model.config
    np.testing.assert_array_equal(np.asarray(named.wte.embedding[...]), np.asarray(model.wte.embedding[...]))


def checkpoint_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """An embedded checkpoint's files, config.json among them."""
    files = [f for f in directory.rglob("*") if f.is_file()]
    assert (directory / "config.json") in files
    return files


def test_pgpt_tiny_loads_by_name(tiny):
    cfg = tiny.config
    assert (cfg.name, cfg.fim, cfg.vocab_size, cfg.n_positions) == ("pgpt-tiny", True, 50260, 256)
    assert_loads_by_name(tiny, "pgpt-tiny")


def test_checkpoint_fits_the_package_data_budget():
    assert sum(f.stat().st_size for f in checkpoint_files(EMBEDDED_DIR)) <= 16_000_000


_forward = nnx.jit(forward)  # the model is an argument: one compile per shape, shared by the tests


def _next_token_probs(model, ids: list[int], length: int = 64) -> np.ndarray:
    """The raw model's next-token probabilities f32[V] after `ids`, from one full forward pass
    over a fixed-length, right-padded row (no cache reuse, no bias, no sampling)."""
    row = jnp.asarray([ids + [EOS_ID] * (length - len(ids))], jnp.int32)
    logits, _ = _forward(model, row, jnp.arange(length)[None], init_cache(model.config, 1, length))
    return np.array(jax.nn.softmax(logits[0, len(ids) - 1]))


def _greedy(model, prompt: list[int], n: int, banned: Sequence[int] = (), length: int = 64) -> list[int]:
    """Argmax decoding by full forward passes over `length`-token rows, never choosing a `banned`
    id; stops at <|endoftext|>. (tests/test_code_model.py uses it too.)"""
    ids = list(prompt)
    for _ in range(n):
        probs = _next_token_probs(model, ids, length)
        probs[list(banned)] = -1.0
        nxt = int(np.argmax(probs))
        if nxt == EOS_ID:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def _fim_ids(tok, prefix: str, suffix: str) -> list[int]:
    return [FIM_PREFIX] + tok.encode(prefix) + [FIM_SUFFIX] + tok.encode(suffix) + [FIM_MIDDLE]


def test_greedy_output_is_deterministic_text(tiny):
    """The engine's cached greedy decoding gives the argmax of full forward passes, twice over."""
    tok = get_tokenizer(fim=True)
    prompt = "The json module"
    expected = _greedy(tiny, tok.encode(prompt), 12)
    assert len(expected) == 12 and max(expected) < EOS_ID  # text, not a special token
    assert any(c.isalpha() for c in tok.decode(expected))
    for _ in range(2):
        (choice,) = pgpt_jax.generate(tiny, prompt, max_tokens=12, temperature=0.0)
        assert choice.token_ids == expected and choice.finish_reason == "length"


def test_fim_prompt_is_answered_with_text(tiny):
    """A prompt with a suffix is answered with text: the engine's greedy middle is the argmax of
    full forward passes over the text tokens, the FIM control tokens left out."""
    tok = get_tokenizer(fim=True)
    expected = _greedy(tiny, _fim_ids(tok, STRIP_PREFIX, STRIP_SUFFIX), 8, banned=FIM_IDS)
    assert len(expected) == 8 and max(expected) < EOS_ID
    assert tok.decode(expected).startswith(STRIP_MIDDLE)  # docs/model_card.md's sample
    (choice,) = pgpt_jax.generate(tiny, STRIP_PREFIX, suffix=STRIP_SUFFIX, max_tokens=8, temperature=0.0)
    assert choice.token_ids == expected and choice.finish_reason == "length"
    assert choice.text == tok.decode(expected) and "<|fim" not in choice.text


def heldout_loss(model, heldout: dict) -> float:
    """Mean next-token nats of `model` on heldout.json's rows (one full forward pass)."""
    rows = np.asarray(heldout["rows"], np.int32)  # [8, 129]
    x, y = rows[:, :-1], rows[:, 1:]
    B, T = x.shape
    logits, _ = forward(model, jnp.asarray(x), jnp.broadcast_to(jnp.arange(T), (B, T)), init_cache(model.config, B, T))
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.asarray(y)[..., None], -1)[..., 0]
    return float(nll.mean())


def run_in_checkout(code: str, timeout: float) -> str:
    """The last line `code` prints, run by this Python in the checkout (training/ is not installed)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=str(REPO_ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_validation_loss_beats_unigram_baseline(tiny, heldout):
    loss = heldout_loss(tiny, heldout)
    assert loss == pytest.approx(heldout["model_loss"], abs=0.02)  # the shipped weights are the measured ones
    assert loss < heldout["unigram_loss"] - MIN_MARGIN_NATS


def test_stored_unigram_baseline_matches_the_corpus(heldout):
    """The baseline is recomputed from this Python's stdlib; a subprocess keeps its ~400 imports out of pytest.

    The corpus code is `training/data.py`, which is not installed: the subprocess runs in the checkout."""
    code = (
        "import json, numpy as np; from training import data; from pgpt_jax.tokenizer import get_tokenizer\n"
        "train, _ = data.split_pieces(data.stdlib_documents())\n"
        "counts = data.token_stream(get_tokenizer(fim=True).encode, train)\n"
        f"rows = np.asarray(json.load(open({str(EMBEDDED_DIR / 'heldout.json')!r}))['rows'])\n"
        "print(data.unigram_cross_entropy(counts, rows[:, 1:].ravel(), 50260))\n"
    )
    # Other Python versions document their stdlib a little differently: allow a small drift.
    assert float(run_in_checkout(code, timeout=120)) == pytest.approx(heldout["unigram_loss"], abs=0.05)


def test_generate_with_suffix_never_returns_fim_tokens(tiny):
    """The engine bans the FIM control tokens, to which the raw model gives real probability.

    After the middle "s.\n" (and after other short lines) the raw model puts ~10% on the three
    FIM ids, <|fim_middle|> first: it ends training suffixes with a newline and <|fim_middle|>.
    Greedy decoding would emit it there, and so would about a third of these samples."""
    tok = get_tokenizer(fim=True)
    prompt_ids = _fim_ids(tok, STRIP_PREFIX, STRIP_SUFFIX)
    probs = _next_token_probs(tiny, prompt_ids + tok.encode(STRIP_MIDDLE))
    assert probs[FIM_IDS].sum() > 0.05  # measured 0.099
    assert int(np.argmax(probs)) == FIM_MIDDLE  # above the best text token, " " (0.087)

    n, max_tokens, temperature = 16, 16, 0.3  # at temperature 1 the tokens are rarer: see below
    kwargs = dict(suffix=STRIP_SUFFIX, max_tokens=max_tokens, temperature=temperature, n=n, seed=0)
    first = pgpt_jax.generate(tiny, STRIP_PREFIX, **kwargs)
    again = pgpt_jax.generate(tiny, STRIP_PREFIX, **kwargs)  # callable twice
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    for c in first:
        assert not set(FIM_IDS) & set(c.token_ids)
        assert "<|fim" not in c.text

    # The samples went where the mass is. Without the ban, the chance that a sampler at this
    # temperature passes every position these 16 choices passed without drawing a FIM token:
    # measured 1e-4 (6.7 draws expected). At temperature 1 it was about 0.1, at 1.5 about 0.5.
    L = len(prompt_ids) + max_tokens
    rows = np.full((n, L), EOS_ID, np.int32)
    for i, c in enumerate(first):
        rows[i, : len(prompt_ids) + len(c.token_ids)] = prompt_ids + c.token_ids
    logits, _ = _forward(tiny, jnp.asarray(rows), jnp.broadcast_to(jnp.arange(L), (n, L)),
                         init_cache(tiny.config, n, L))
    fim_prob = np.asarray(jax.nn.softmax(logits / temperature)[..., jnp.asarray(FIM_IDS)].sum(-1))  # [n, L]
    start = len(prompt_ids) - 1  # the logits that chose the first completion token
    log_miss = sum(np.log1p(-fim_prob[i, start:start + len(c.token_ids)]).sum() for i, c in enumerate(first))
    assert log_miss < np.log(0.01)

    echoed = pgpt_jax.generate(tiny, "Return a copy", suffix=" removed.", max_tokens=3, echo=True, seed=1)
    assert echoed[0].text.startswith("Return a copy") and "<|fim" not in echoed[0].text


def test_control_tokens_never_show_in_logprobs_and_cannot_be_forged(tiny):
    """Where the raw model's most likely token is <|fim_middle|> (after the middle "s.\\n"), the
    top logprobs list text tokens only; the prompt's echo top logprobs too. User text that
    spells a control token is plain text, and a control token is no logit_bias key."""
    from pgpt_jax.request import RequestError

    tok = get_tokenizer(fim=True)
    (c,) = pgpt_jax.generate(tiny, STRIP_PREFIX, suffix=STRIP_SUFFIX, max_tokens=4, temperature=0.0, logprobs=5)
    assert tok.decode(c.token_ids).startswith(STRIP_MIDDLE)
    after_middle = len(tok.encode(STRIP_MIDDLE))  # the position where <|fim_middle|> is the raw argmax
    tops = c.logprobs.top_logprobs
    assert len(tops[after_middle]) >= 5 and all(not t.startswith("<|fim") for top in tops for t in top)
    (scored,) = pgpt_jax.generate(tiny, STRIP_PREFIX + STRIP_MIDDLE, max_tokens=0, echo=True, logprobs=5)
    assert all(not t.startswith("<|fim") for top in scored.logprobs.top_logprobs[1:] for t in top)

    forged = "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|>"
    (c,) = pgpt_jax.generate(tiny, forged, max_tokens=1, echo=True, logprobs=0)
    assert c.text.startswith(forged) and "<|fim_prefix|>" not in c.logprobs.tokens  # spelt out, not a token
    with pytest.raises(RequestError) as e:
        pgpt_jax.generate(tiny, "x", max_tokens=1, logit_bias={FIM_MIDDLE: 5})
    assert e.value.param == "logit_bias"
