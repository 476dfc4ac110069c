"""Tune a code model against its own function bodies: unlikelihood on what it repeats.

    git archive 303651a pgpt_jax/assets/pgpt-code | tar -x -C training/work/v2   # v2's weights
    python training/tune_bodies.py --init-from training/work/v2/pgpt_jax/assets/pgpt-code \
        --work training/work/tune2 --rounds 12 --lr 1e-4 --dev 256 --dev-every 6 --self-weight 0 --fim-rate 0.5
                                        # v3 from v2 (18 min on 2 cores) -> training/work/tune2/out
    python training/tune_bodies.py --init-from training/work/v2/pgpt_jax/assets/pgpt-code --work W --export --out DIR
                                        # the checkpoint of the state in W (a cut run)
    python training/tune_bodies.py --init-from pgpt_jax/assets/pgpt-code --work W --holes 64 --prompts 16 \
        --context-weight 0.05 --lr 1.5e-4     # also learn infill holes (docs/model_card.md, "Holes": not shipped)

pgpt-code's function bodies fail the same way whatever text it is trained on
(docs/model_card.md, "Run 7"): at temperature 0.2 a body that does not end repeats a line or
a name until its 160 tokens are spent. Maximum likelihood on more text never sees the
model's own loops, so nothing in it pushes them down. This script does, in rounds:

1. It samples bodies from the current weights (bfloat16, as served) for `--prompts`
   functions of the training-split modules (a `def` line and its docstring, as
   `training/evaluate.py` asks on the held-out ones), at the measure's temperature and length.
2. A body that ran to the budget without ending gets the sequence-level unlikelihood loss of
   Welleck et al. (2019, "Neural text generation with unlikelihood training"): each token
   that belongs to an n-gram (`--ngram`) the body already wrote costs -log(1 - p(token)).
3. Maximum likelihood keeps it a language model and shows it where a body ends: on the same
   functions' true text (`def` to the last line, then <|endoftext|>; `--fim-rate` of them as
   FIM examples, so that it stays an infiller), and, with `--self-weight`, on its own sampled
   bodies that ended and parse (cut where they ended, then <|endoftext|>). v3 was tuned
   without the latter: learning its own bodies collapsed them onto a few stock answers
   (docs/model_card.md, "v3").

4. With `--holes N`, each round also learns N fill-in-the-middle holes of training-split
   modules, cut as `training/evaluate.py` cuts its single-line infill cases (a non-blank
   line, or 2 to 3 lines in `--multi-line` of them; up to 600 tokens before, 300 after, here
   of random length), in the served FIM order: the middle and the <|endoftext|> that ends it
   at full weight, the prefix and suffix at `--context-weight`. A FIM example of the base
   run holds one middle in up to 1024 tokens, mostly cut anywhere; these show a middle that
   is one line and ends where the suffix begins. A sixteenth of the training-split modules
   (another hash) give 64 dev holes, watched with the bodies. `--alpha 0` (no unlikelihood)
   samples no bodies.

The loss is the mean likelihood loss over its tokens plus `--alpha` times the mean
unlikelihood loss over the marked tokens. `--dev` functions of the training split are kept
out of the rounds; every `--dev-every` rounds their bodies are sampled (seed 0), and the
held-out loss is measured on 16 rows, so the log shows whether the bodies improve on prompts
the tuning never used and whether the model still models held-out text. Nothing here reads a
held-out module's functions: `training/evaluate.py` measures those afterwards.

The softmax is over the ids the training functions use (and the control tokens), as in
train.py; a sampled id outside them is not pushed down. Reproducible from `--seed` (the
prompts drawn each round and the sampling seeds), up to the order of floating-point sums.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pgpt_jax  # noqa: E402
from pgpt_jax.checkpoint import restore_checkpoint, save_checkpoint  # noqa: E402
from pgpt_jax.config import EOS_ID, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX  # noqa: E402
from pgpt_jax.request import fim_prompt  # noqa: E402
from pgpt_jax.tokenizer import tokenizer_for  # noqa: E402
from training import code_data, data, train  # noqa: E402
from training.evaluate import (BODY_MAX_TOKENS, BODY_TEMPERATURE, PREFIX_TOKENS, SUFFIX_TOKENS, around,  # noqa: E402
                                 body_parses, cut_body, documented_functions, infill_cases, infill_score)
from training.train_tiny import causal_hidden_states, evaluate, kept_vocabulary, make_eval  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init-from", default=str(train.DEFAULT_OUT), help="a saved checkpoint (bfloat16 params)")
    p.add_argument("--work", required=True, help="state.npz, log.jsonl (a run's record)")
    p.add_argument("--out", default=None, help="--export: where the checkpoint goes (default --work/out)")
    p.add_argument("--export", action="store_true", help="train nothing: measure and save the state in --work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=60.0, help="stop after the round that passes this")
    p.add_argument("--rounds", type=int, default=1000, help="or after this many rounds")
    p.add_argument("--prompts", type=int, default=64, help="functions sampled per round")
    p.add_argument("--batch", type=int, default=16, help="rows per step: half likelihood, half samples")
    p.add_argument("--seq-len", type=int, default=384, help="row length (prompt + body)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the unlikelihood loss")
    p.add_argument("--ngram", type=int, default=4)
    p.add_argument("--in-line", action="store_true",
                   help="also push down, in bodies that ended, the n-grams repeated inside one line "
                        "(`name_or_or_or`, `'add', 'add', 'add'`)")
    p.add_argument("--self-weight", type=float, default=0.0,
                   help="likelihood weight of the model's own bodies that ended and parse (0: none)")
    p.add_argument("--fim-rate", type=float, default=0.5,
                   help="share of the true functions taken as FIM examples (suffix first in 3 of 4, 80%% of "
                        "the holes one line), so that the tuning keeps the model's infill")
    p.add_argument("--holes", type=int, default=0,
                   help="FIM holes per round cut from training-split modules as the infill measure cuts them "
                        "(one line, or 2 to 3 in --multi-line of them), learnt in the served order")
    p.add_argument("--multi-line", type=float, default=0.2, help="share of the holes that are 2 or 3 lines")
    p.add_argument("--hole-rows", type=int, default=4, help="rows of the model's context per hole step")
    p.add_argument("--context-weight", type=float, default=0.25,
                   help="likelihood weight of a hole example's prefix and suffix tokens (its middle and the "
                        "<|endoftext|> after it weigh 1)")
    p.add_argument("--dev", type=int, default=256, help="training-split functions kept out, to watch")
    p.add_argument("--dev-every", type=int, default=6)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------
# Data


def training_functions(encode, max_prompt: int) -> list[dict]:
    """evaluate.documented_functions of the training-split modules whose prompt fits."""
    sources = [(n, t) for n, t in code_data.source_files() if not data.is_validation(f"module:{n}")]
    return [c for c in documented_functions(sources) if len(encode(c["prompt"])) <= max_prompt]


def hole_sources(dev: bool) -> list[tuple[str, str]]:
    """Training-split modules: with `dev`, the sixteenth of them (by another hash) whose holes
    are watched, else the rest, whose holes are learnt."""
    return [(n, t) for n, t in code_data.source_files()
            if not data.is_validation(f"module:{n}") and data.is_validation(f"holes:{n}") == dev]


def hole_example(tok, lines: list[str], i: int, j: int, rng: np.random.Generator, order: str,
                 context_weight: float) -> tuple[list[int], np.ndarray]:
    """The hole lines[i:j] as a FIM example in `order`, its prefix and suffix cut as the infill
    measure cuts them but to random lengths (up to the measure's 600 and 300 tokens) -> (ids,
    likelihood weight per id: `context_weight` on the prefix and suffix, 1 on the middle and
    the <|endoftext|> after it, 0 on the FIM tokens)."""
    prefix, suffix = around(lines, i, j, tok, int(rng.integers(16, PREFIX_TOKENS + 1)),
                            int(rng.integers(16, SUFFIX_TOKENS + 1)))
    context = fim_prompt(tok.encode(prefix), tok.encode(suffix), True, order)
    middle = tok.encode("".join(lines[i:j])) + [EOS_ID]
    w = np.where(np.isin(context, [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]), 0.0, context_weight)
    return context + middle, np.concatenate([w, np.ones(len(middle))]).astype(np.float32)


def hole_rows(tok, modules: list[list[str]], where: list[tuple[int, int]], count: int, rng: np.random.Generator,
              order: str, T: int, multi_line: float, context_weight: float):
    """`count` holes at random non-blank lines (`where`: (module, line) pairs of `modules`' lines),
    one line each or, in `multi_line` of them, 2 or 3 -> rows for `pack`, several holes to a row of
    at most T + 1 ids (as the base run packed its pieces)."""
    rows, ids, w = [], [], []
    for k in rng.choice(len(where), count, replace=False):
        m, i = where[k]
        j = min(len(modules[m]), i + (int(rng.integers(2, 4)) if rng.random() < multi_line else 1))
        x, xw = hole_example(tok, modules[m], i, j, rng, order, context_weight)
        if len(x) > T + 1:
            continue
        if len(ids) + len(x) > T + 1:
            rows.append((ids, np.concatenate(w), np.zeros(len(ids), np.float32)))
            ids, w = [], []
        ids, w = ids + x, w + [xw]
    if ids:
        rows.append((ids, np.concatenate(w), np.zeros(len(ids), np.float32)))
    return rows


def repeated_ngram_mask(ids: list[int], n: int) -> np.ndarray:
    """bool[len(ids)]: the tokens of every n-gram that already occurred earlier in `ids`."""
    mask, seen = np.zeros(len(ids), bool), set()
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        if gram in seen:
            mask[i:i + n] = True
        seen.add(gram)
    return mask


def in_line_repeats(ids: list[int], is_break, n: int) -> np.ndarray:
    """bool[len(ids)]: the tokens of every n-gram already written earlier in the same line (a
    token for which `is_break(id)` holds, one that holds a newline, starts a new line)."""
    mask, start = np.zeros(len(ids), bool), 0
    for i in range(len(ids) + 1):
        if i == len(ids) or is_break(ids[i]):
            mask[start:i] = repeated_ngram_mask(ids[start:i], n)
            start = i + 1
    return mask


def pack(rows: list[tuple[list[int], np.ndarray, np.ndarray]], T: int, R: int | None = None):
    """[(ids, likelihood weight per id, unlikelihood weight per id)] -> x, y i32[R, T] and the
    targets' weights f32[R, T] (a weight on ids[k] is on the target at position k - 1); rows past
    len(rows), up to R (one compiled shape), weigh nothing."""
    R = R or len(rows)
    x, y = np.zeros((R, T), np.int32), np.zeros((R, T), np.int32)
    w_mle, w_ul = np.zeros((R, T), np.float32), np.zeros((R, T), np.float32)
    for r, (ids, mle, ul) in enumerate(rows):
        ids, mle, ul = ids[:T + 1], mle[:T + 1], ul[:T + 1]
        n = len(ids) - 1
        x[r, :n], y[r, :n] = ids[:-1], ids[1:]
        w_mle[r, :n], w_ul[r, :n] = mle[1:], ul[1:]
    return x, y, w_mle, w_ul


# ---------------------------------------------------------------------------------------
# Step


def make_step(graphdef, tx, alpha: float):
    def loss_fn(params, x, y_kept, kept, w_mle, w_ul):
        model, h = causal_hidden_states(graphdef, params, x, jnp.zeros(x.shape[0], jnp.int32))
        w = model.wte.embedding[...][kept].astype(h.dtype)
        logp = jax.nn.log_softmax(jnp.einsum("BTD,KD->BTK", h, w), axis=-1)
        lp = jnp.take_along_axis(logp, y_kept[..., None], axis=-1)[..., 0]  # [B, T]
        mle = -(lp * w_mle).sum() / jnp.maximum(w_mle.sum(), 1.0)
        # -log(1 - p), with p kept below 1 so that a certain token costs a finite amount
        ul = -(jnp.log1p(-jnp.minimum(jnp.exp(lp), 1 - 1e-5)) * w_ul).sum() / jnp.maximum(w_ul.sum(), 1.0)
        return mle + alpha * ul, (mle, ul)

    @jax.jit
    def step(params, opt_state, x, y_kept, kept, w_mle, w_ul):
        (loss, (mle, ul)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y_kept, kept, w_mle, w_ul)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mle, ul

    return step


def bodies(model, cases: list[dict], seed: int) -> list[dict]:
    """Samples as training/evaluate.py's body measure does -> per case: token ids, ended, parses, body."""
    out = pgpt_jax.generate(model, [c["prompt"] for c in cases], max_tokens=BODY_MAX_TOKENS,
                            temperature=BODY_TEMPERATURE, seed=seed, slots=32)
    results = []
    for c, (choice,) in zip(cases, out):
        body, dedented = cut_body(c["prompt"], choice.text)
        ended = dedented or choice.finish_reason == "stop"
        results.append({"ids": list(choice.token_ids), "ended": ended, "body": body,
                        "parses": ended and body_parses(c["prompt"], body)})
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = restore_checkpoint(pathlib.Path(args.init_from), dtype=jnp.float32)
    cfg = start.config.replace(dtype="float32", param_dtype="float32")
    tok = tokenizer_for(cfg)
    T = args.seq_len
    graphdef, params = nnx.split(start)
    graphdef16, _ = nnx.split(nnx.eval_shape(lambda: type(start)(cfg.replace(param_dtype="bfloat16"), rngs=nnx.Rngs(0))))
    as_served = lambda p: nnx.merge(graphdef16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), p))  # noqa: E731

    cases = training_functions(tok.encode, max_prompt=T - BODY_MAX_TOKENS - 32)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(cases))
    dev = [cases[i] for i in sorted(order[:args.dev])]
    pool = [cases[i] for i in order[args.dev:]]
    true_ids = lambda c: tok.encode(c["text"]) + [EOS_ID]  # noqa: E731
    breaks = np.asarray([i < cfg.vocab_size and "\n" in tok.decode([i]) for i in range(cfg.padded_vocab)])
    seen = [np.asarray(true_ids(c)) for c in cases]
    if args.holes:  # holes are cut from these modules' lines; the dev holes from the others
        hole_modules = [t.splitlines(keepends=True) for _, t in hole_sources(dev=False)]
        where = [(m, i) for m, lines in enumerate(hole_modules) for i, line in enumerate(lines) if line.strip()]
        dev_holes = infill_cases(hole_sources(dev=True), tok, 64, seed=args.seed)
        seen += [np.asarray(tok.encode("".join(lines))) for lines in hole_modules]
    kept, index_of = kept_vocabulary(np.concatenate(seen), cfg)
    kept_dev = jnp.asarray(kept)
    log(f"{len(cases)} training-split functions with a docstring ({len(pool)} tuned on, {len(dev)} kept out); "
        f"{len(where) if args.holes else 0} lines to cut holes at; kept vocabulary {len(kept)}")

    # held-out loss on 16 rows of the held-out split (train.py's periodic measure)
    valid_pieces = data.split_pieces(data.stdlib_documents() + code_data.source_documents())[1]
    valid_stream = code_data.token_stream(tok.encode, valid_pieces)
    valid_rows = valid_stream[data.row_windows(len(valid_stream), cfg.n_positions)]
    eval_rows = valid_rows[np.linspace(0, len(valid_rows) - 1, 16).astype(int)]
    nll_fn = make_eval(graphdef)

    schedule = optax.warmup_constant_schedule(0.0, args.lr, args.warmup)  # the run is cut by time, not decayed
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask))
    opt_state = tx.init(params)
    first_round = 0
    if (work / "state.npz").exists():
        first_round, params, opt_state = train.load_state(work, params, opt_state)
        log(f"resumed after round {first_round} from {work}")
    if args.export:
        return export(args, as_served(params), work, log)
    step_fn = make_step(graphdef, tx, args.alpha)
    def record(e):
        with (work / "log.jsonl").open("a") as f:
            f.write(json.dumps(e) + "\n")

    def watch(r):
        res = bodies(as_served(params), dev, seed=0)
        val = evaluate(nll_fn, params, eval_rows, 8)
        e = {"round": r, "dev_parse": sum(x["parses"] for x in res), "dev_ended": sum(x["ended"] for x in res),
             "heldout_loss": round(val, 4)}
        if args.holes:
            filled = infill_score(as_served(params), dev_holes)
            e.update(dev_infill_exact=sum(x["exact"] for x in filled), dev_infill_first_line=sum(x["first_line"] for x in filled),
                     dev_infill_ended=sum(x["finish"] == "stop" for x in filled))
        record(e)
        log(f"watch after round {r}: dev bodies parse {e['dev_parse']}/{len(dev)} (ended {e['dev_ended']}); "
            f"held-out loss {val:.3f} on 16 rows" + (f"; dev infill exact {e['dev_infill_exact']}/{len(dev_holes)} "
            f"(first line {e['dev_infill_first_line']}, ended {e['dev_infill_ended']})" if args.holes else ""))
        if r:  # each watched round's weights, to choose among by the dev bodies
            save(as_served(params), work / f"round{r}", args.init_from, log)

    if first_round == 0:
        watch(0)
    half = args.batch // 2
    for r in range(first_round, args.rounds):
        if time.perf_counter() - t0 > args.minutes * 60:
            break
        picks = np.random.default_rng([args.seed, r]).choice(len(pool), args.prompts, replace=False)
        batch = [pool[i] for i in picks]
        sampled = args.alpha > 0 or args.self_weight > 0  # else nothing learns from the samples
        res = bodies(as_served(params), batch, seed=args.seed * 100_000 + r) if sampled else [None] * len(batch)
        true_rows, sample_rows, n_ul, n_self = [], [], 0, 0
        fim_rng = np.random.default_rng([args.seed, r, 1])
        for c, s in zip(batch, res):
            ids = true_ids(c)
            if fim_rng.random() < args.fim_rate:
                ids = code_data.fim_example(tok.encode, c["text"], fim_rng, one_line=0.8, line_cuts=0.8,
                                            spm=0.75)[0] + [EOS_ID]
            true_rows.append((ids, np.ones(len(ids), np.float32), np.zeros(len(ids), np.float32)))
            if s is None:
                continue
            prompt = tok.encode(c["prompt"])
            if not s["ended"] or args.in_line:
                ids = prompt + s["ids"]
                repeats = (repeated_ngram_mask(s["ids"], args.ngram) if not s["ended"]
                           else in_line_repeats(s["ids"], breaks.__getitem__, args.ngram))
                ul = np.concatenate([np.zeros(len(prompt)), repeats])
                ul *= np.isin(ids, kept)  # an id outside the softmax is not pushed down
                if ul.any():
                    sample_rows.append((ids, np.zeros(len(ids), np.float32), ul.astype(np.float32)))
                    n_ul += int(ul.sum())
            if s["ended"] and s["parses"] and args.self_weight > 0:
                ids = prompt + tok.encode(s["body"]) + [EOS_ID]
                w = np.concatenate([np.zeros(len(prompt)), np.full(len(ids) - len(prompt), args.self_weight)])
                sample_rows.append((ids, w.astype(np.float32), np.zeros(len(ids), np.float32)))
                n_self += 1
        steps = max(1, len(true_rows) // half)
        mles, uls = [], []
        for k in range(steps):
            rows = true_rows[k * half:(k + 1) * half] + sample_rows[k * half:(k + 1) * half]
            x, y, w_mle, w_ul = pack(rows, T, args.batch)
            params, opt_state, mle, ul = step_fn(params, opt_state, x, index_of[y], kept_dev, w_mle, w_ul)
            mles.append(float(mle))
            uls.append(float(ul))
        hole_mles = []
        if args.holes:
            rows = hole_rows(tok, hole_modules, where, args.holes, np.random.default_rng([args.seed, r, 2]),
                             cfg.fim_order, cfg.n_positions, args.multi_line, args.context_weight)
            for k in range(0, len(rows), args.hole_rows):
                x, y, w_mle, w_ul = pack(rows[k:k + args.hole_rows], cfg.n_positions, args.hole_rows)
                w_mle *= np.isin(y, kept)  # a cut can re-encode to an id outside the softmax
                params, opt_state, mle, _ = step_fn(params, opt_state, x, index_of[y], kept_dev, w_mle, w_ul)
                hole_mles.append(float(mle))
        e = {"round": r + 1, "parse": sum(x["parses"] for x in res) if sampled else None,
             "ended": sum(x["ended"] for x in res) if sampled else None,
             "unlikely_tokens": n_ul, "self_rows": n_self, "steps": steps + len(hole_mles),
             "mle": round(float(np.mean(mles)), 4), "ul": round(float(np.mean(uls)), 4),
             "hole_mle": round(float(np.mean(hole_mles)), 4) if hole_mles else None}
        record(e)
        log(f"round {r + 1}: " + (f"sampled bodies parse {e['parse']}/{len(batch)} (ended {e['ended']}); "
            f"{n_ul} repeated tokens pushed down, {n_self} own bodies learnt; " if sampled else "")
            + f"mle {e['mle']:.3f} ul {e['ul']:.3f}" + (f"; holes mle {e['hole_mle']:.3f} in {len(hole_mles)} steps" if hole_mles else ""))
        train.save_state(work, r + 1, params, opt_state)
        if (r + 1) % args.dev_every == 0:
            watch(r + 1)
    return export(args, as_served(params), work, log)


def export(args, model16, work: pathlib.Path, log) -> dict:
    out = save(model16, pathlib.Path(args.out or work / "out"), args.init_from, log)
    return {"out": str(out)}


def save(model16, out: pathlib.Path, init_from, log) -> pathlib.Path:
    """The bfloat16 checkpoint (the served config) -> `out`, with the test slice of the
    checkpoint it started from (train.HELDOUT_FILE: the same held-out rows and unigram)
    measured again on the saved weights."""
    out = save_checkpoint(model16, out, overwrite=True)
    graphdef, params = nnx.split(restore_checkpoint(out))
    heldout = json.loads((pathlib.Path(init_from) / train.HELDOUT_FILE).read_text())
    rows = np.asarray(heldout["rows"], np.int32)
    heldout["model_loss"] = round(evaluate(make_eval(graphdef), params, rows, len(rows)), 4)
    (out / train.HELDOUT_FILE).write_text(json.dumps(heldout) + "\n")
    log(f"wrote {out}; test slice: model {heldout['model_loss']:.3f} vs unigram {heldout['unigram_loss']:.3f}")
    return out


if __name__ == "__main__":
    main()
