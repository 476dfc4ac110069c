"""The code model's corpus and measures (training/code_data.py, training/evaluate.py): pieces cut
between lines, both FIM orders, the held-out split shared with the docs corpus, and the
function-body measure that can fail."""

import ast
import textwrap

import numpy as np
import pytest

from pgpt_jax.config import EOS_ID, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from pgpt_jax.tokenizer import get_tokenizer
from training import code_data, data, evaluate

TOK = get_tokenizer(fim=True, spaces=True)
SOURCE = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(200))


def test_pieces_are_cut_between_lines_and_preferably_before_top_level_statements():
    pieces = code_data.cut_lines(SOURCE, limit=300)
    assert "".join(pieces) == SOURCE  # nothing lost, nothing repeated
    assert all(len(p) <= 300 for p in pieces) and len(pieces) > 10
    assert all(p.startswith("def ") for p in pieces)  # whole functions: cut after the blank lines
    assert code_data.cut_lines("x" * 700, limit=300) == ["x" * 300, "x" * 300, "x" * 100]  # one long line


def test_module_names_and_the_split_follow_the_docs_corpus():
    from pathlib import PurePath

    assert code_data.module_name(PurePath("json/decoder.py")) == "json.decoder"
    assert code_data.module_name(PurePath("json/__init__.py")) == "json"
    files = code_data.source_files()
    names = {n for n, _ in files}
    assert {"json.decoder", "collections", "asyncio.streams"} <= names
    assert not any(n.startswith("test.") or ".tests" in n or "idle_test" in n for n in names)
    assert "encodings.cp1252" not in names and "encodings.utf_8" in names  # charmap tables left out, codecs kept
    held = {n for n in names if data.is_validation(f"module:{n}")}
    assert "asyncio.streams" in held and "json.decoder" not in held  # the modules the docs corpus holds out


def test_more_text_keeps_new_paragraphs_of_other_versions_and_nothing_held_out(tmp_path):
    """code_data.more_pieces on a made-up standard library: a held-out module (`dataclasses`) and
    the test of one are skipped in every version, a paragraph already seen is dropped, Python 2
    code is skipped, and what is new comes back as pieces."""
    root = tmp_path / "lib" / "python3.99"

    def write(rel, text):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)

    old = "def shared(x):\n    return x * 2\n\n"
    new = ("def added_in_this_version(items):\n    \"\"\"Sorted, once each.\"\"\"\n"
           "    return sorted(set(items), key=str)\n\n")
    write("os.py", "")
    write("shlex.py", old + new)
    write("dataclasses.py", "def held_out_function(x):\n    return x - 12345\n\n")
    write("test/test_dataclasses.py", "def test_held_out_module_case(self):\n    self.assertEqual(99999, 99999)\n\n")
    write("test/test_shlex.py",
          "def test_split_a_quoted_word(self):\n    self.assertEqual(shlex.split('a b'), ['a', 'b'])\n\n")
    write("colorsys.py", "print 'python two'\n\nx = 1\n")
    assert code_data.tested_modules("test.test_asyncio.test_streams") == [
        "test.test_asyncio.test_streams", "asyncio", "asyncio.streams"]
    assert data.is_validation("module:dataclasses") and not data.is_validation("module:shlex")

    pieces = code_data.more_pieces([root], seen_texts=[old])
    text = "".join(pieces)
    assert "added_in_this_version" in text and "test_split_a_quoted_word" in text
    assert "def shared" not in text  # seen before: dropped
    assert "held_out_function" not in text and "test_held_out_module_case" not in text
    assert "python two" not in text  # does not parse under this Python
    assert code_data.more_pieces([root], tests=False, seen_texts=[old]) == [new]
    assert code_data.more_pieces([root, root], tests=False, seen_texts=[]) == [old + new]  # once


def test_function_pieces_are_whole_functions_of_training_modules_at_their_indentation(tmp_path):
    """code_data.function_pieces: each function and method of a training-split module, from its
    `def` (not its decorator) to its last line, at its own indentation; nothing of a held-out
    module. Its `def` and docstring are a body request's prompt, and the rest of the piece is
    a body the evaluation accepts."""
    (tmp_path / "shlex.py").write_text(textwrap.dedent('''\
        import os


        class Lexer:
            """A lexer."""

            @property
            def words(self):
                """The words."""
                def split(s):
                    return s.split()
                return split(self.text)


        async def fetch(url):
            return url
        '''))
    (tmp_path / "dataclasses.py").write_text("def held_out_function(x):\n    return x - 12345\n")
    assert data.is_validation("module:dataclasses") and not data.is_validation("module:shlex")
    pieces = code_data.function_pieces(tmp_path)
    assert pieces == [
        "async def fetch(url):\n    return url\n",
        '    def words(self):\n        """The words."""\n        def split(s):\n'
        "            return s.split()\n        return split(self.text)\n",
        "        def split(s):\n            return s.split()\n",
    ]
    prompt, body = pieces[1].split('"""\n', 1)[0] + '"""\n', pieces[1].split('"""\n', 1)[1]
    assert evaluate.cut_body(prompt, body) == (body, False)  # nothing dedents: <|endoftext|> ends it
    assert evaluate.body_parses(prompt, body)


def test_fim_examples_come_in_both_orders_and_keep_every_token():
    rng = np.random.default_rng(0)
    text = SOURCE[:400]
    seen = set()
    for _ in range(60):
        ids, n_middle = code_data.fim_example(TOK.encode, text, rng)
        assert ids[0] == FIM_PREFIX and ids.count(FIM_SUFFIX) == ids.count(FIM_MIDDLE) == 1
        s, m = ids.index(FIM_SUFFIX), ids.index(FIM_MIDDLE)
        if s == 1:  # suffix-prefix-middle: the prefix and middle run on after <|fim_middle|>
            seen.add("SPM")
            suffix, rest = TOK.decode(ids[2:m]), TOK.decode(ids[m + 1:])
            assert rest + suffix == text
        else:  # prefix-suffix-middle
            seen.add("PSM")
            prefix, suffix, middle = TOK.decode(ids[1:s]), TOK.decode(ids[s + 1:m]), TOK.decode(ids[m + 1:])
            assert prefix + middle + suffix == text
            assert n_middle == len(ids) - m - 1
    assert seen == {"PSM", "SPM"}
    # The default draws the order as the shipped runs did: prefix-suffix-middle below 0.5.
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(20):
        ids, _ = code_data.fim_example(TOK.encode, text, a)
        code_data.fim_cuts(text, b)
        assert (ids[1] != FIM_SUFFIX) == (b.random() < 0.5)
    stream = code_data.token_stream(TOK.encode, [text, text])
    assert list(stream).count(EOS_ID) == 2


def test_middle_weight_falls_on_each_middle_and_its_end():
    """`--middle-weight`: the targets of a FIM middle and its <|endoftext|> weigh more; with
    `spm=1` every example is suffix-prefix-middle."""
    text = "def f(x):\n    y = x + 1\n    return y\n\n\nz = f(2)\n"
    ids, weights = code_data.fim_stream(TOK.encode, [text] * 20, fim_rate=1.0, rng=np.random.default_rng(0),
                                        one_line=1.0, line_cuts=1.0, spm=1.0, middle_weight=3.0)
    assert len(weights) == len(ids) and set(weights.tolist()) == {1.0, 3.0}
    ends = np.flatnonzero(ids == EOS_ID)
    for start, end in zip([-1, *ends[:-1]], ends):
        example, w = ids[start + 1:end + 1], weights[start + 1:end + 1]
        assert example[1] == FIM_SUFFIX  # suffix-prefix-middle
        heavy = example[w == 3.0]
        assert heavy[-1] == EOS_ID and w[-1] == 3.0 and (w[:-len(heavy)] == 1.0).all()  # one run at the end
        middle = TOK.decode(heavy[:-1].tolist())
        assert middle in text.splitlines(keepends=True) and middle.strip()  # the one-line hole
    plain_ids, plain_w = code_data.fim_stream(TOK.encode, [text], middle_weight=3.0)  # no FIM: nothing weighs more
    assert (plain_w == 1.0).all() and len(plain_w) == len(plain_ids)


def test_one_line_fim_cuts_take_exactly_one_non_blank_line():
    text = "def f(x):\n\n    y = x + 1\n    return y\n\n\nz = f(2)\n"
    lines = text.splitlines(keepends=True)
    rng = np.random.default_rng(0)
    middles = set()
    for _ in range(200):
        lo, hi = code_data.fim_cuts(text, rng, one_line=1.0)
        if text[lo:hi] in lines:  # a line-boundary cut (the other half are uniform)
            assert text[lo:hi].strip()  # never a blank line
            middles.add(text[lo:hi])
    assert middles == {line for line in lines if line.strip()}
    # The default draws as the shipped run's first phase did: one_line=0 changes nothing.
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [code_data.fim_cuts(text, a) for _ in range(50)] == [code_data.fim_cuts(text, b, 0.0) for _ in range(50)]


def test_line_cuts_sets_the_share_of_cuts_on_line_boundaries():
    text = "def f(x):\n    y = x + 1\n    return y\n\n\nz = f(2)\n"
    starts = {0, len(text)} | {i + 1 for i, c in enumerate(text) if c == "\n"}

    def on_lines(line_cuts, n=400):
        rng = np.random.default_rng(1)
        cuts = [code_data.fim_cuts(text, rng, line_cuts=line_cuts) for _ in range(n)]
        return sum(lo in starts and hi in starts and lo < hi for lo, hi in cuts) / n

    assert on_lines(1.0) == 1.0  # every cut is a whole-line middle
    assert on_lines(0.0) < 0.2  # uniform cuts land on two line starts only by chance
    assert 0.6 < on_lines(0.75) < 0.9
    # The default (0.5) draws as the shipped runs did.
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [code_data.fim_cuts(text, a) for _ in range(50)] == [code_data.fim_cuts(text, b, 0.0, 0.5) for _ in range(50)]


def test_the_training_forward_without_a_cache_is_the_models():
    """training/train_tiny.causal_hidden_states (the continuation's rows at a random first
    position) computes what the served model computes from position 0."""
    import jax.numpy as jnp
    from flax import nnx

    from pgpt_jax.config import CODE_VOCAB, GPTConfig
    from pgpt_jax.model import GPT
    from training import train_tiny

    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=CODE_VOCAB, fim=True,
                    space_tokens=True, name="t", param_dtype="float32")
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 5000, (2, 12)), jnp.int32)
    _, served = train_tiny.hidden_states(graphdef, params, x)
    _, trained = train_tiny.causal_hidden_states(graphdef, params, x, jnp.zeros(2, jnp.int32))
    np.testing.assert_allclose(np.asarray(trained), np.asarray(served), atol=1e-4)
    _, moved = train_tiny.causal_hidden_states(graphdef, params, x, jnp.asarray([0, 5], jnp.int32))
    np.testing.assert_allclose(np.asarray(moved[0]), np.asarray(served[0]), atol=1e-4)
    assert not np.allclose(np.asarray(moved[1]), np.asarray(served[1]), atol=1e-3)  # other position embeddings


def test_the_function_body_measure_can_fail():
    prompt = 'def f(x):\n    """Twice x."""\n'
    assert evaluate.body_parses(prompt, "    return 2 * x\n")
    assert not evaluate.body_parses(prompt, "    return (2 *\n")  # does not parse
    assert not evaluate.body_parses(prompt, "")  # no statement beyond the docstring
    body, ended = evaluate.cut_body(prompt, "    y = 2 * x\n    return y\ndef g():\n    pass\n")
    assert (body, ended) == ("    y = 2 * x\n    return y\n", True)
    assert evaluate.cut_body(prompt, "    y = 2 * x\n    z = (")[1] is False  # cut by max_tokens: counts against
    method = '    def f(self):\n        """D."""\n'
    assert evaluate.cut_body(method, "        x = 1\n    def g(self):\n") == ("        x = 1\n", True)
    assert evaluate.body_parses(method, "        return 1\n")


def test_infill_cases_hold_prefix_line_and_suffix_of_held_out_source():
    sources = evaluate.heldout_sources()
    cases = evaluate.infill_cases(sources, TOK, 5, seed=1)
    text = dict(sources)
    for c in cases:
        assert c["line"].strip() and c["line"] in text[c["module"]].splitlines()
        assert c["prefix"] + c["line"] + "\n" + c["suffix"] in text[c["module"]]
        assert len(TOK.encode(c["prefix"])) <= evaluate.PREFIX_TOKENS + 2
    bodies = evaluate.body_cases(sources, 5, seed=1)
    for b in bodies:  # a def line and its docstring: a whole function already, with no statement yet
        (fn,) = ast.parse(textwrap.dedent(b["prompt"])).body
        assert fn.name == b["function"] and len(fn.body) == 1 and ast.get_docstring(fn) is not None


def test_loss_weights_count_each_target_that_many_times():
    """train_tiny.make_step's `weight`: None is all ones, and a target weighted w adds (w - 1)
    times its nats to the step's loss, at the kept-vocabulary positions and the full-vocabulary
    ones alike; weight 0 everywhere is no loss."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from pgpt_jax.config import GPTConfig
    from pgpt_jax.model import GPT
    from training import train_tiny

    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=300, name="t", param_dtype="float32")
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)))
    step = train_tiny.make_step(graphdef, optax.sgd(0.0), full_stride=4)
    rows = np.random.default_rng(0).integers(0, 300, (2, 9)).astype(np.int32)
    x, y = rows[:, :-1], rows[:, 1:]
    kept = jnp.arange(cfg.padded_vocab, dtype=jnp.int32)

    def loss(weight):
        p = jax.tree.map(jnp.copy, params)  # the step donates its params
        return float(step(p, optax.sgd(0.0).init(p), x, y, y, kept, None, weight)[2])

    base = loss(None)
    assert loss(np.ones(x.shape, np.float32)) == pytest.approx(base, rel=1e-6)
    assert loss(np.zeros(x.shape, np.float32)) == 0.0
    for t in (4, 5):  # a full-vocabulary position (t % 4 == 0) and a kept-vocabulary one
        w2, w3 = np.ones(x.shape, np.float32), np.ones(x.shape, np.float32)
        w2[1, t], w3[1, t] = 2.0, 3.0
        extra = loss(w2) - base
        assert extra > 0 and loss(w3) - base == pytest.approx(2 * extra, rel=1e-3)


def test_accelerator_params_round_trip_exactly_and_refuse_another_shape(tmp_path):
    """training/train_accel.py writes params as bfloat16 chunks (the accelerator's files come back
    in pieces of at most 16 MB); read back, they are the same bits in the same tree."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pgpt_jax.model import GPT
    from training import train_accel

    cfg = train_accel.code_config(2, 64, 2, 64, "spm")
    params = nnx.state(GPT(cfg, rngs=nnx.Rngs(3)))
    meta = {"model": {"name": "2x64", "n_layer": 2, "n_embd": 64, "n_head": 2}, "seq_len": 64,
            "fim_order": "spm"}
    old_chunk, train_accel.CHUNK = train_accel.CHUNK, 1_000_000  # several files, a leaf cut across two
    try:
        train_accel.write_params(tmp_path, params, meta)
    finally:
        train_accel.CHUNK = old_chunk
    assert len(list(tmp_path.glob("params.bf16.*"))) == 7  # 6.6 MB of bfloat16
    _, model = train_accel.read_params(tmp_path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(model))):
        assert b.dtype == jnp.bfloat16 and np.array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    meta_file = tmp_path / "meta.json"
    meta_file.write_text(meta_file.read_text().replace('"n_layer": 2', '"n_layer": 3'))
    with pytest.raises(SystemExit, match="not this code's 3-layer GPT"):
        train_accel.read_params(tmp_path)


def test_accelerator_schedule_warms_up_then_decays_to_the_floor():
    from training.train_accel import lr_at

    assert lr_at(0, 1.0, 10, None, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, None, 0.1) == 1.0 and lr_at(500, 1.0, 10, None, 0.1) == 1.0  # total not yet known
    assert lr_at(10, 1.0, 10, 110, 0.1) == 1.0
    assert lr_at(60, 1.0, 10, 110, 0.1) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)


def test_accelerator_run_keeps_the_params_of_its_lowest_held_out_loss(tmp_path):
    """A tiny run of training/train_accel.py on CPU: two shapes in lockstep, the kept one is the
    shape and step with the lowest held-out loss, and its params load."""
    import json
    import lzma

    from training import train_accel

    pieces = [SOURCE[i:i + 400] for i in range(0, 4000, 400)]
    corpus = tmp_path / "corpus.json.xz"
    corpus.write_bytes(lzma.compress(json.dumps({"train": pieces, "valid": pieces[:3]}).encode()))
    out = tmp_path / "out"
    models = ["1x32:heads=2", "2x32:heads=2:lr=1e-2", "1x32:heads=2:fim=0.9:mw=3"]  # the last: its own rows
    train_accel.main(["--corpus", str(corpus), "--out", str(out), *[a for m in models for a in ("--model", m)],
                      "--seq-len", "64", "--batch", "2", "--epochs", "2", "--steps", "6", "--warmup", "2",
                      "--eval-every", "3", "--eval-rows", "2", "--log-every", "3", "--workers", "1"])
    meta = json.loads((out / "meta.json").read_text())
    evals = {name: [e for e in h if "val_loss" in e] for name, h in meta["history"].items()}
    assert sorted(evals) == sorted(models) and all([e["step"] for e in evals[m]] == [3, 6] for m in models)
    train = {name: [e["train_loss"] for e in h if "train_loss" in e] for name, h in meta["history"].items()}
    assert train[models[0]][0] != train[models[2]][0]  # same shape and seed, other rows (and weights)
    best_val, best_step, best_name = min((e["val_loss"], e["step"], name) for name, h in evals.items() for e in h)
    assert (meta["best_step"], meta["model"]["name"]) == (best_step, best_name)
    assert meta["best_val"] == pytest.approx(best_val, abs=1e-4)
    _, model = train_accel.read_params(out)
    assert (model.config.n_layer, model.config.n_head, model.config.n_positions) == (
        int(meta["model"]["name"][0]), 2, 64)


def test_average_mixes_two_checkpoints_weight_by_weight_and_refuses_another_shape(tmp_path):
    """training/average.py: (1 - w) x the first + w x the second, in the first's dtype, written as
    a checkpoint that loads; two shapes are refused."""
    import jax
    from flax import nnx

    from pgpt_jax.checkpoint import load_model, save_checkpoint
    from pgpt_jax.model import init_model
    from training import average

    first, second = (init_model("tiny", seed=s, param_dtype="bfloat16") for s in (0, 1))
    save_checkpoint(first, tmp_path / "a")
    save_checkpoint(second, tmp_path / "b")
    mixed = nnx.state(load_model(average.main([str(tmp_path / "a"), str(tmp_path / "b"), "--weight", "0.25",
                                               "--out", str(tmp_path / "c")])))
    for got, x, y in zip(*(jax.tree.leaves(t) for t in (mixed, nnx.state(first), nnx.state(second)))):
        assert got.dtype == x.dtype
        want = (0.75 * np.asarray(x, np.float32) + 0.25 * np.asarray(y, np.float32))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-3)
    assert not np.allclose(np.asarray(jax.tree.leaves(mixed)[-1], np.float32),
                           np.asarray(jax.tree.leaves(nnx.state(first))[-1], np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        average.average(first, init_model(first.config.replace(n_layer=1), seed=0), 0.5)


def test_tune_bodies_marks_repeats_and_its_step_pushes_them_down_and_the_true_text_up():
    """training/tune_bodies.py: the tokens of an n-gram written before are marked (the first
    occurrence is not); a step with unlikelihood weight on a target lowers its probability,
    one with likelihood weight raises it."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from pgpt_jax.model import init_model
    from training import tune_bodies
    from training.train_tiny import causal_hidden_states

    mask = tune_bodies.repeated_ngram_mask([1, 2, 3, 9, 1, 2, 3, 1, 2], 3)
    assert mask.tolist() == [False, False, False, False, True, True, True, False, False]
    assert not tune_bodies.repeated_ngram_mask([1, 2, 3, 4, 5], 2).any()
    # --in-line: only repeats inside one line count (0 breaks the line here)
    in_line = tune_bodies.in_line_repeats([1, 2, 1, 2, 0, 1, 2, 3], lambda t: t == 0, 2)
    assert in_line.tolist() == [False, False, True, True, False, False, False, False]

    model = init_model("tiny", seed=0)
    graphdef, params = nnx.split(model)
    V = model.config.padded_vocab
    kept = jnp.arange(V, dtype=jnp.int32)
    ids = [5, 6, 7, 8, 5, 6, 7, 8]
    one = np.zeros(len(ids), np.float32)
    one[-1] = 1.0  # the weight on ids[-1]: the target after position len - 2

    def p_last(p):
        _, h = causal_hidden_states(graphdef, p, jnp.asarray([ids[:-1]]), jnp.zeros(1, jnp.int32))
        return float(jax.nn.softmax(nnx.merge(graphdef, p).logits(h)[0, -1])[ids[-1]])

    before = p_last(params)
    for mle, ul, sign in ((one, 0 * one, 1), (0 * one, one, -1)):
        tx = optax.sgd(1.0)
        step = tune_bodies.make_step(graphdef, tx, alpha=1.0)
        x, y, w_mle, w_ul = tune_bodies.pack([(ids, mle, ul)], T=len(ids) - 1)
        new, _, l_mle, l_ul = step(params, tx.init(params), x, jnp.asarray(y), kept, w_mle, w_ul)
        assert sign * (p_last(new) - before) > 0
        assert (float(l_mle) > 0) == (sign > 0) and (float(l_ul) > 0) == (sign < 0)


def test_tune_bodies_holes_are_cut_like_the_infill_measure_and_weigh_the_middle():
    """tune_bodies --holes: a hole's example is the FIM prompt, in the served order, of the text
    just before and just after the hole, then the hole's lines and <|endoftext|>; the middle
    and that <|endoftext|> weigh 1, the context --context-weight, the FIM tokens 0; holes pack
    several to a row and never past the row's end."""
    from training import tune_bodies

    lines = "".join(f"def f{k}(x):\n    return x + {k}\n\n" for k in range(40)).splitlines(keepends=True)
    rng = np.random.default_rng(0)
    fim = [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]
    for order in ("spm", "psm"):
        ids, w = tune_bodies.hole_example(TOK, lines, 31, 32, rng, order, context_weight=0.25)
        middle = TOK.encode(lines[31]) + [EOS_ID]  # "    return x + 10\n"
        assert ids[-len(middle):] == middle and (w[-len(middle):] == 1).all()
        context, cw = ids[:-len(middle)], w[:-len(middle)]
        assert (cw == np.where(np.isin(context, fim), 0.0, 0.25)).all()
        pre, suf, mid = (context.index(t) for t in fim)
        prefix, suffix = ((context[mid + 1:], context[suf + 1:mid]) if order == "spm"
                          else (context[pre + 1:suf], context[suf + 1:mid]))
        assert TOK.decode(prefix).endswith("return x + 9\n\ndef f10(x):\n")
        assert TOK.decode(suffix).startswith("\ndef f11(x):\n")
    where = [(0, i) for i, line in enumerate(lines) if line.strip()]
    rows = tune_bodies.hole_rows(TOK, [lines], where, 30, rng, "spm", T=1024, multi_line=0.5, context_weight=0.25)
    assert all(len(ids) <= 1025 for ids, _, _ in rows) and len(rows) < 30  # several holes to a row
    assert sum(ids.count(FIM_MIDDLE) for ids, _, _ in rows) == sum(ids.count(EOS_ID) for ids, _, _ in rows) == 30
