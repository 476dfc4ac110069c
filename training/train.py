"""Train pgpt-code, the embedded default model: a small Python code model with fill-in-the-middle.

    python training/train.py                                  # the shipped model's first run
    python training/train.py --init-from training/work --work training/work/continued --seed 1 \
        --steps 1500 --short-seq 512 --short-steps 1250 --one-line 0.5 --lr 1.5e-3 --warmup 50
                                                              # its second -> pgpt_jax/assets/pgpt-code/
    python training/train.py --steps 20 --out /tmp/x --work /tmp/w   # a smoke run
    python training/train.py --resume                         # continue a cut run from --work
    python training/train.py --export                         # checkpoint + measures from --work's state

docs/model_card.md has the run's numbers; training/evaluate.py measures it.

The corpus is what every Python installation has offline: the standard library's `.py`
source (training/code_data.py) and its documentation (training/data.py: the Language
Reference topics and the modules' docstrings). About 1/16 of the modules, by a hash of
their name, are held out of both. Half of the training pieces are fill-in-the-middle
examples, prefix-suffix-middle and suffix-prefix-middle in equal parts. The tokenizer is
GPT-2's plus the FIM tokens plus tokens for runs of 2..33 spaces (pgpt_jax/tokenizer.py):
without them a space of indentation was 45% of the tokens of Python source.

Optimiser: AdamW with linear warm-up and cosine decay, global-norm clipping, weight decay
on matrices only. Training runs in float32; the checkpoint stores bfloat16 params, and the
validation loss reported at the end is that of the saved bfloat16 weights.

The output layer over the 50,304-entry vocabulary costs as much as the 8 transformer
layers, yet the corpus uses about half of the ids. So at most positions the loss takes the
softmax over the ids that occur in the training rows (every target is among them), and at
every `--full-stride`-th position over the whole vocabulary, which keeps pushing the
never-seen tokens' logits down (they share the tied embedding, so nothing else would).
The validation loss is always over the full vocabulary.

A run can continue another (`--init-from`: its params, a fresh optimiser and schedule). Its
first `--short-steps` steps may take shorter rows (`--short-seq`), since attention over 512
positions costs a quarter of 1024's per row. In the shipped second run a step of 8 x 512
tokens ran at 1,500-1,650 tokens/s against 1,240-1,370 for 4 x 1024 (2 Zen 5 cores). Each
short row starts at a random position, so every position's embedding keeps training, and
its pieces are cut to fit the row, so a FIM example keeps its parts together. The last
steps take whole-context rows again, for prompts of up to 1024 tokens.

A middle is a small part of its FIM example, and the one <|endoftext|> after it is all that
teaches a middle to end. `--middle-weight W` counts each middle, and that <|endoftext|>, W
times in the loss (the logged training loss is then the weighted sum over the step's
tokens, divided by their count); `--spm` is the share of FIM examples in
suffix-prefix-middle order, the order pgpt-code is served in.

`--functions N` adds each function and method of the training-split source as a piece of its
own, N times (code_data.function_pieces): a body request sends a `def` line and its
docstring, often a method's at its indentation, with nothing before it, and the body should
end where the function does; in the module pieces a method rarely starts a piece, and
what follows a function's last line is the next statement, not <|endoftext|>.

Every `--save-every` steps the float32 params, the optimiser state and the step go to
`--work`; `--resume` continues from there with the same batches. Reproducible from
`--seed`: the corpus order, the FIM cuts, the batches and the init all derive from it.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
# training/ is not installed: import it, and this checkout's pgpt_jax, from the repository root.
sys.path.insert(0, str(ROOT))

from pgpt_jax.checkpoint import restore_checkpoint, save_checkpoint  # noqa: E402
from pgpt_jax.config import CODE_VOCAB, GPTConfig  # noqa: E402
from pgpt_jax.model import GPT  # noqa: E402
from pgpt_jax.tokenizer import tokenizer_for  # noqa: E402
from training import code_data, data  # noqa: E402
# The loss, the step, the optimiser, evaluation and greedy decoding are pgpt-tiny's (training/train_tiny.py).
from training import train_tiny  # noqa: E402
from training.train_tiny import evaluate, greedy, kept_vocabulary, make_eval, make_step, model_and_optimizer  # noqa: E402

DEFAULT_OUT = ROOT / "pgpt_jax" / "assets" / "pgpt-code"
DEFAULT_WORK = ROOT / "training" / "work"  # float32 state for --resume, the loss log (git-ignored)
HELDOUT_FILE = "heldout.json"  # a small slice of the validation split and its unigram baseline
MODEL_NAME = "pgpt-code"


def parse_args(argv=None):
    p = train_tiny.parser(__doc__.splitlines()[0], DEFAULT_OUT)
    # The shipped run's settings (docs/model_card.md): `python training/train.py` repeats it.
    p.set_defaults(steps=1600, batch=4, seq_len=1024, n_layer=8, n_head=4, n_embd=256, lr=2e-3, warmup=100,
                   eval_every=200, log_every=20)
    p.add_argument("--work", default=str(DEFAULT_WORK))
    p.add_argument("--resume", action="store_true", help="continue from the state in --work")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (state saved) after this step, e.g. to time a few steps")
    p.add_argument("--export", action="store_true",
                   help="train nothing: write the checkpoint from the state in --work (a cut or running run)")
    p.add_argument("--init-from", default=None,
                   help="a finished run's --work, or a saved checkpoint (config.json + params/, e.g. "
                        "pgpt_jax/assets/pgpt-code): its params start this run (fresh optimiser, this run's "
                        "schedule) and its loss log (history.jsonl), where there is one, is continued")
    p.add_argument("--short-seq", type=int, default=None,
                   help="the first --short-steps steps take rows of this many tokens (batch * seq_len / "
                        "short_seq of them, pieces cut to fit), each placed at a random first position")
    p.add_argument("--short-steps", type=int, default=0)
    p.add_argument("--one-line", type=float, default=0.0,
                   help="share of line-boundary FIM cuts whose middle is exactly one non-blank line")
    p.add_argument("--fim-order", choices=["psm", "spm"], default="psm",
                   help="the order the checkpoint's config tells the server to arrange a `suffix` in "
                        "(both are trained; training/evaluate.py --orders psm,spm measures them)")
    p.add_argument("--line-cuts", type=float, default=0.5,
                   help="share of FIM cuts on line boundaries (the rest are uniform over characters)")
    p.add_argument("--spm", type=float, default=0.5,
                   help="share of FIM examples in suffix-prefix-middle order (the rest prefix-suffix-middle)")
    p.add_argument("--middle-weight", type=float, default=1.0,
                   help="a FIM example's middle and the <|endoftext|> that ends it count this many times "
                        "in the loss (teaches middles that end)")
    p.add_argument("--more-text", choices=["library", "all"], default=None,
                   help="also train on the other CPython versions' standard libraries found on this machine "
                        "(library), and on their tests and this one's (all): code_data.more_pieces")
    p.add_argument("--functions", type=int, default=0, metavar="N",
                   help="also train on every function of the training split's source as a piece of its own, "
                        "N copies of each (code_data.function_pieces): bodies that start after a def and end")
    p.add_argument("--piece-chars", type=int, default=None,
                   help="the short phase's pieces are cut to at most this many characters (default: "
                        "what fits its rows, 3000 x short_seq / seq_len)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------


def corpus(encode, T: int, unigram_vocab: int, more_text: str | None = None):
    """-> (documents, train pieces, valid rows i32[R, T + 1], train tokens (plain), unigram nats).
    `more_text` ("library" or "all"): the training pieces also take code_data.more_pieces()
    (other CPython versions' standard libraries; "all": and the tests); the held-out split is
    the same."""
    docs = data.stdlib_documents() + code_data.source_documents()
    train_pieces, valid_pieces = data.split_pieces(docs)
    train_pieces += code_data.more_pieces(tests=more_text == "all") if more_text else []
    train_plain = code_data.token_stream(encode, train_pieces)
    valid_stream = code_data.token_stream(encode, valid_pieces)
    valid_rows = valid_stream[data.row_windows(len(valid_stream), T)]
    unigram = data.unigram_cross_entropy(train_plain, valid_rows[:, 1:].ravel(), unigram_vocab)
    return docs, train_pieces, valid_rows, train_plain, unigram


def phase_rows(encode, pieces: list[str], T: int, n: int, args) -> tuple[np.ndarray, np.ndarray, float]:
    """The first n rows of successive shuffled FIM passes over `pieces` -> (i32[n, T + 1], their
    targets' loss weights f32[n, T], epochs)."""
    out, have, e = [], 0, 0
    while have < n:
        out.append(code_data.epoch_rows(encode, pieces, T, epoch=e, seed=args.seed, fim_rate=args.fim_rate,
                                        one_line=args.one_line, line_cuts=args.line_cuts, spm=args.spm,
                                        middle_weight=args.middle_weight))
        have, e = have + len(out[-1][0]), e + 1
    if not out:
        return np.zeros((0, T + 1), np.int32), np.zeros((0, T), np.float32), 0.0
    rows, weights = (np.concatenate(parts)[:n] for parts in zip(*out))
    return rows, weights, n / len(out[0][0])


def save_state(work: pathlib.Path, step: int, params, opt_state) -> None:
    """float32 params + optimiser state as one .npz of leaves (the tree comes from the code)."""
    leaves = jax.tree.leaves((params, opt_state))
    tmp = work / "state.tmp.npz"
    np.savez(tmp, step=step, **{f"l{i}": np.asarray(x) for i, x in enumerate(leaves)})
    os.replace(tmp, work / "state.npz")


def load_state(work: pathlib.Path, params, opt_state):
    with np.load(work / "state.npz") as z:
        treedef = jax.tree.structure((params, opt_state))
        leaves = [jnp.asarray(z[f"l{i}"]) for i in range(treedef.num_leaves)]
        return int(z["step"]), *jax.tree.unflatten(treedef, leaves)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)  # noqa: E731
    T, B = args.seq_len, args.batch
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_positions=T,
                    vocab_size=CODE_VOCAB, fim=True, space_tokens=True, fim_order=args.fim_order, name=MODEL_NAME)
    tok = tokenizer_for(cfg)
    encode = tok.encode

    # -- data ---------------------------------------------------------------------------
    docs, train_pieces, valid_rows, train_plain, unigram = corpus(encode, T, cfg.vocab_size, args.more_text)
    if args.functions:  # after corpus(): the unigram baseline stays that of the plain training text
        train_pieces += code_data.function_pieces() * args.functions
    n_valid_rows = len(valid_rows)
    n_valid_docs = sum(d.split == "valid" for d in docs)
    log(f"corpus: {len(docs)} documents ({n_valid_docs} held out), {len(train_pieces)} train pieces, "
        f"{len(train_plain):,} train / {n_valid_rows * T:,} valid tokens; "
        f"unigram baseline on validation {unigram:.3f} nats (ppl {math.exp(unigram):.0f})")

    # Two phases: `--short-steps` steps on rows of `--short-seq` tokens (attention over a
    # shorter row costs less), then rows of the whole context. Every step has B * T tokens.
    Ts = args.short_seq or T
    n_short = args.short_steps if args.short_seq else 0
    if (B * T) % Ts:
        raise SystemExit(f"--short-seq {Ts} must divide batch x seq_len = {B * T}")
    Bs = B * T // Ts
    piece_chars = args.piece_chars or code_data.MAX_PIECE_CHARS * Ts // T
    short_pieces = [q for p in train_pieces for q in code_data.cut_lines(p, piece_chars)] if n_short else []
    short_rows, short_weights, short_epochs = phase_rows(encode, short_pieces, Ts, n_short * Bs, args)
    train_rows, train_weights, n_epochs = phase_rows(encode, train_pieces, T, (args.steps - n_short) * B, args)
    kept, index_of = kept_vocabulary(np.concatenate([short_rows.ravel(), train_rows.ravel()]), cfg)
    log(f"training: {args.steps} steps x {B * T:,} tokens = {args.steps * B * T:,} tokens "
        f"({n_short} of them {Bs} x {Ts}, {short_epochs:.2f} epochs; the rest {B} x {T}, {n_epochs:.2f} epochs); "
        f"kept vocabulary {len(kept)} of {cfg.padded_vocab}, "
        f"full-vocabulary softmax at every {args.full_stride}th position")

    # -- model and optimiser --------------------------------------------------------------
    graphdef, params, tx, schedule, opt_state = model_and_optimizer(cfg, args)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    first = 0
    history_file = work / "history.jsonl"
    base_step = base_tokens = 0  # --init-from: where the run this one continues ended
    if args.init_from:
        init = pathlib.Path(args.init_from)
        if (init / "state.npz").exists():  # a run's --work: float32 params
            base_step, init_params, _ = load_state(init, params, opt_state)
        else:  # a saved checkpoint: its bfloat16 params, cast up
            saved = nnx.state(restore_checkpoint(init, dtype=jnp.float32))
            init_params = jax.tree.map(lambda a, b: b.astype(a.dtype), params, saved)
        log_file = init / "history.jsonl"
        init_history = log_file.read_text() if log_file.exists() else ""
        ends = [json.loads(line) for line in init_history.splitlines() if line]
        base_step, base_tokens = (max(e["step"] for e in ends), max(e["tokens"] for e in ends)) if ends else (0, 0)
    if (args.resume or args.export) and (work / "state.npz").exists():
        first, params, opt_state = load_state(work, params, opt_state)
        log(f"{'exporting' if args.export else 'resumed at'} step {first} from {work}")
    elif args.export:
        raise SystemExit(f"--export: no state in {work}")
    elif args.init_from:
        params = init_params
        history_file.write_text(init_history)
        log(f"starting from {args.init_from} (its step {base_step}, {base_tokens:,} tokens)")
    else:
        history_file.write_text("")
    train_step = make_step(graphdef, tx, args.full_stride)
    nll_fn = make_eval(graphdef)
    kept_dev = jnp.asarray(kept)
    eval_rows = valid_rows[np.linspace(0, n_valid_rows - 1, min(args.eval_rows, n_valid_rows)).astype(int)]
    log(f"model: {n_params / 1e6:.2f}M params, {cfg}")

    def record(entry):
        with history_file.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    t_train, tokens_seen, window_t, window_tok = time.perf_counter(), 0, time.perf_counter(), 0
    last = first if args.export else min(args.steps, args.stop_after or args.steps)
    for step in range(first, last):
        if step < n_short:
            r, wt = short_rows[step * Bs:(step + 1) * Bs], short_weights[step * Bs:(step + 1) * Bs]
            starts = np.random.default_rng([args.seed, 1, step]).integers(0, T - Ts + 1, Bs).astype(np.int32)
        else:
            at = slice((step - n_short) * B, (step - n_short + 1) * B)
            r, wt, starts = train_rows[at], train_weights[at], None
        x, y = r[:, :-1], r[:, 1:]
        wt = wt if args.middle_weight != 1.0 else None  # the shipped runs' loss, unweighted
        params, opt_state, loss, gnorm = train_step(params, opt_state, x, y, index_of[y], kept_dev, starts, wt)
        tokens_seen += B * T
        window_tok += B * T
        if (step + 1) % args.log_every == 0 or step == first:
            loss = float(loss)  # waits for the step
            now = time.perf_counter()
            log(f"step {step + 1:5d} loss {loss:.3f} grad-norm {float(gnorm):.2f} "
                f"lr {float(schedule(step)):.2e} {window_tok / (now - window_t):6.0f} tok/s")
            record({"step": base_step + step + 1, "tokens": base_tokens + (step + 1) * B * T,
                    "train_loss": round(loss, 4)})
            window_t, window_tok = now, 0
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            t_eval = time.perf_counter()
            val = evaluate(nll_fn, params, eval_rows, B)
            record({"step": base_step + step + 1, "tokens": base_tokens + (step + 1) * B * T,
                    "val_loss": round(val, 4)})
            log(f"eval step {step + 1}: validation loss {val:.3f} (ppl {math.exp(val):.1f}) on "
                f"{len(eval_rows)} rows [{time.perf_counter() - t_eval:.1f}s]")
            window_t += time.perf_counter() - t_eval  # keep eval time out of tok/s
        if (step + 1) % args.save_every == 0 or step + 1 == last:
            save_state(work, step + 1, params, opt_state)
    train_seconds = time.perf_counter() - t_train
    log(f"trained steps {first}..{last} in {train_seconds / 60:.1f} min "
        f"({tokens_seen / max(train_seconds, 1e-9):.0f} tok/s)")
    if last < args.steps and not args.export:
        log(f"stopped after step {last} (--stop-after); --resume continues")
        return {}
    history = [json.loads(line) for line in history_file.read_text().splitlines() if line]
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    summary = {
        "params": n_params, "seed": args.seed, "steps": last, "batch": B, "seq_len": T,
        "tokens": base_tokens + last * B * T,
        "init_from": {"steps": base_step, "tokens": base_tokens} if args.init_from else None,
        "train_minutes_this_process": round(train_seconds / 60, 2),
        "documents": len(docs), "valid_documents": n_valid_docs, "history": history, "args": vars(args),
    }
    return finish_checkpoint(cfg, params16, pathlib.Path(args.out), work, valid_rows, train_plain, unigram, B,
                             summary, log)


def finish_checkpoint(cfg: GPTConfig, params16, out: pathlib.Path, work: pathlib.Path, valid_rows, train_plain,
                      unigram: float, batch: int, summary: dict, log) -> dict:
    """Save bfloat16 params as the checkpoint, reload them the way load_model does, and measure
    them: the whole held-out split, the test slice (heldout.json), greedy samples -> summary
    (also written to `work`/summary.json)."""
    n_valid_rows = len(valid_rows)
    saved_cfg = cfg.replace(param_dtype="bfloat16")
    graphdef16, _ = nnx.split(nnx.eval_shape(lambda: GPT(saved_cfg, rngs=nnx.Rngs(0))))
    out = save_checkpoint(nnx.merge(graphdef16, params16), out, overwrite=True)
    loaded = restore_checkpoint(out)
    loaded_graphdef, loaded_params = nnx.split(loaded)
    nll16 = make_eval(loaded_graphdef)
    val_bf16 = evaluate(nll16, loaded_params, valid_rows, batch)
    log(f"validation loss on all {n_valid_rows} rows ({n_valid_rows * cfg.n_positions:,} tokens), saved "
        f"bfloat16 weights: {val_bf16:.4f} (ppl {math.exp(val_bf16):.2f}); unigram {unigram:.4f} "
        f"(ppl {math.exp(unigram):.0f}); margin {unigram - val_bf16:.3f} nats")

    # A small slice for the test: 8 rows of 128 tokens spread over the held-out split.
    pick = np.linspace(0, n_valid_rows - 1, 8).astype(int)
    slice_rows = valid_rows[pick, :129]
    slice_loss = evaluate(make_eval(loaded_graphdef), loaded_params, slice_rows, 8)
    slice_unigram = data.unigram_cross_entropy(train_plain, slice_rows[:, 1:].ravel(), cfg.vocab_size)
    (out / HELDOUT_FILE).write_text(json.dumps({
        "about": "8 rows of 129 tokens from the held-out split (inputs [:, :-1], targets [:, 1:]); "
                 "unigram = add-one unigram of the training split on these targets, nats/token",
        "unigram_loss": round(slice_unigram, 4), "model_loss": round(slice_loss, 4),
        "rows": slice_rows.tolist()}) + "\n")
    log(f"test slice: model {slice_loss:.3f} vs unigram {slice_unigram:.3f} "
        f"(margin {slice_unigram - slice_loss:.3f} nats)")

    tok = tokenizer_for(saved_cfg)
    samples = {}
    for prompt in ["import os\n\n\ndef ", "def parse_args(argv=None):\n    "]:
        samples[prompt] = tok.decode(greedy(loaded, tok.encode(prompt), 48))
        log(f"greedy {prompt!r} -> {samples[prompt]!r}")

    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    summary = {
        "config": saved_cfg.to_dict(), "checkpoint_bytes": size, **summary,
        "train_tokens": int(len(train_plain)), "valid_tokens": int(n_valid_rows * cfg.n_positions),
        "val_loss_bf16": round(val_bf16, 4), "val_ppl_bf16": round(math.exp(val_bf16), 2),
        "unigram_loss": round(unigram, 4), "unigram_ppl": round(math.exp(unigram), 1),
        "samples": samples, "python": platform.python_version(), "jax": jax.__version__,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"wrote {out} ({size / 1e6:.2f} MB) and {work / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
