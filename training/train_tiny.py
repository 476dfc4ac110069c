"""Train pgpt-tiny, the embedded default model, on the standard library's documentation.

    python training/train_tiny.py                          # the shipped run: pgpt_jax/assets/pgpt-tiny/
    python training/train_tiny.py --steps 20 --out /tmp/x   # a smoke run (~1 min)

The shipped run took 45 minutes on 2 shared CPU cores; docs/model_card.md has its numbers.

The corpus (training/data.py) is what every Python installation has offline: the Language
Reference topics of `help()` and the docstrings of the stdlib's modules, classes and
functions. About 1/16 of the documents (by a hash of their name) are held out.
Half of the training pieces are fill-in-the-middle examples (prefix-suffix-middle).

Optimiser: AdamW with linear warm-up and cosine decay, global-norm clipping, weight decay
on matrices only. Training runs in float32; the checkpoint stores bfloat16 params (the
GPT-2 vocabulary embedding is most of the model, and bfloat16 halves it to fit 16 MB),
and the validation loss reported at the end is that of the saved bfloat16 weights.

Where the time goes: with n_embd=128 the output layer over the 50,304-entry vocabulary is
~80% of a step's FLOPs, yet the corpus uses only ~12k distinct tokens. So at most positions
the loss takes the softmax over the ids that occur in the training rows (every target is
among them), and at every `--full-stride`-th position over the whole vocabulary, which
keeps pushing the never-seen tokens' logits down (they share the tied embedding, so
nothing else would). The validation loss is always over the full vocabulary.

Reproducible from `--seed`: the corpus order, the FIM cuts, the batches and the init all
derive from it (two runs on one machine wrote bitwise-equal params).
"""

from __future__ import annotations

import argparse
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
import optax  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
# training/ is not installed: import it, and this checkout's pgpt_jax, from the repository root.
sys.path.insert(0, str(ROOT))

from pgpt_jax.checkpoint import restore_checkpoint, save_checkpoint  # noqa: E402
from pgpt_jax.config import EOS_ID, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, GPTConfig  # noqa: E402
from pgpt_jax.model import GPT, forward, init_cache  # noqa: E402
from pgpt_jax.tokenizer import get_tokenizer  # noqa: E402
from training import data  # noqa: E402

DEFAULT_OUT = ROOT / "pgpt_jax" / "assets" / "pgpt-tiny"
HELDOUT_FILE = "heldout.json"  # a small slice of the validation split and its unigram baseline


def parse_args(argv=None):
    return parser().parse_args(argv)


def parser(description: str = __doc__.splitlines()[0], out=DEFAULT_OUT) -> argparse.ArgumentParser:
    """The run's flags, with pgpt-tiny's values as defaults (train.py sets its own)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=str(out))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256, help="also the model's n_positions")
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--fim-rate", type=float, default=0.5)
    p.add_argument("--full-stride", type=int, default=8,
                   help="every N-th position takes the softmax over the whole vocabulary")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-rows", type=int, default=16, help="validation rows for the periodic eval")
    p.add_argument("--log-every", type=int, default=10)
    return p


# ---------------------------------------------------------------------------------------
# Loss and steps. Shapes: B rows, T tokens, D n_embd, V padded vocab, K kept vocab.


def hidden_states(graphdef, params, x):
    """x i32[B, T] -> (model, hidden f32[B, T, D]); a zero cache of length T is an ordinary causal forward."""
    model = nnx.merge(graphdef, params)
    B, T = x.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    hidden, _ = model(x, positions, init_cache(model.config, B, T))
    return model, hidden


def causal_hidden_states(graphdef, params, x, first):
    """x i32[B, T], first i32[B] (row b's tokens sit at positions first[b] + 0..T-1) ->
    (model, hidden f32[B, T, D]). The model's own math (pgpt_jax/model.py: the same
    modules, c_attn read as [q | k | v] of N heads, scaled dot-product attention) without a
    cache: causal attention inside the row. A row may start past position 0, so a run on
    rows shorter than the context still trains every position's embedding."""
    model = nnx.merge(graphdef, params)
    B, T = x.shape
    N, H = model.config.n_head, model.config.head_dim
    positions = first[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    h = model.wte(x) + model.wpe(positions)
    for block in model.h:
        qkv = block.attn.c_attn(block.ln_1(h)).reshape(B, T, 3, N, H)
        y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
        h = h + block.attn.c_proj(y.reshape(B, T, N * H))
        h = h + block.mlp(block.ln_2(h))
    return model, model.ln_f(h)


def token_nll(logits, y):
    """logits f32[B, T, V], y i32[B, T] -> f32[B, T] nats."""
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def make_step(graphdef, tx, full_stride: int):
    """One AdamW step. Positions t % full_stride == 0 take the softmax over the whole vocabulary,
    the others over the K kept ids only (`y_kept` indexes into `kept` i32[K]). With `first`
    (i32[B], each row's first position) the forward is `causal_hidden_states`. With `weight`
    (f32[B, T]) each target's loss counts that many times (the mean stays over B * T)."""

    def loss_fn(params, x, y, y_kept, kept, first, weight):
        if first is None:
            model, h = hidden_states(graphdef, params, x)  # [B, T, D]
        else:
            model, h = causal_hidden_states(graphdef, params, x, first)
        if weight is None:
            weight = jnp.ones(x.shape, h.dtype)
        w = model.wte.embedding[...][kept].astype(h.dtype)  # [K, D]
        nll_kept = token_nll(jnp.einsum("BTD,KD->BTK", h, w), y_kept)  # [B, T]
        nll_full = token_nll(model.logits(h[:, ::full_stride]), y[:, ::full_stride])  # [B, T/stride]
        full = jnp.arange(x.shape[1]) % full_stride == 0
        kept_part = (jnp.where(full, 0.0, nll_kept) * weight).sum()
        return (kept_part + (nll_full * weight[:, ::full_stride]).sum()) / x.size

    def step(params, opt_state, x, y, y_kept, kept, first=None, weight=None):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, y_kept, kept, first, weight)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval(graphdef):
    @jax.jit
    def nll(params, x, y):
        model, h = hidden_states(graphdef, params, x)
        return token_nll(model.logits(h), y)

    return nll


def evaluate(nll_fn, params, rows: np.ndarray, batch: int) -> float:
    """Mean nats per target token over rows i32[R, T + 1], full vocabulary."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        r = rows[i:i + batch]
        if len(r) < batch:  # keep one compiled shape: pad with copies, count only the real rows
            pad = np.concatenate([r, np.repeat(r[-1:], batch - len(r), axis=0)])
            out = np.asarray(nll_fn(params, pad[:, :-1], pad[:, 1:]))[: len(r)]
        else:
            out = np.asarray(nll_fn(params, r[:, :-1], r[:, 1:]))
        total += float(out.sum())
        count += out.size
    return total / count


def kept_vocabulary(rows: np.ndarray, cfg: GPTConfig) -> tuple[np.ndarray, np.ndarray]:
    """The ids the training rows use (and the control tokens), rounded up to whole SIMD tiles
    with unseen ids (a repeated id would count twice in the softmax) -> (kept i32[K], index_of
    i32[V]: an id's column among the kept, for targets)."""
    kept = np.unique(np.concatenate([rows.ravel(), [EOS_ID, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]]))
    unseen = np.setdiff1d(np.arange(cfg.vocab_size), kept)[: -len(kept) % 64]
    kept = np.sort(np.concatenate([kept, unseen])).astype(np.int32)
    index_of = np.zeros(cfg.padded_vocab, np.int32)
    index_of[kept] = np.arange(len(kept))
    return kept, index_of


def optimizer(args, params):
    """AdamW (weight decay on matrices only) after global-norm clipping, with linear warm-up and
    cosine decay over args.steps -> (transformation, schedule)."""
    warmup = min(args.warmup, args.steps // 5)  # short smoke runs still get a decay phase
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps,
                                                  end_value=args.lr * args.min_lr_ratio)
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(optax.clip_by_global_norm(args.clip),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask))
    return tx, schedule


def model_and_optimizer(cfg: GPTConfig, args):
    """A fresh model from `args.seed` and its optimiser -> (graphdef, params, tx, schedule, opt_state)."""
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(args.seed)))
    tx, schedule = optimizer(args, params)
    return graphdef, params, tx, schedule, tx.init(params)


def greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Plain argmax decoding with the KV cache; stops at <|endoftext|>."""
    cfg = model.config
    cache = init_cache(cfg, 1, cfg.n_positions)
    fwd = nnx.jit(forward)
    tokens = jnp.asarray([prompt], jnp.int32)
    logits, cache = fwd(model, tokens, jnp.arange(len(prompt), dtype=jnp.int32)[None], cache)
    out = []
    for i in range(n):
        nxt = int(jnp.argmax(logits[0, -1]))
        if nxt == EOS_ID or len(prompt) + i >= cfg.n_positions:
            break
        out.append(nxt)
        pos = jnp.asarray([[len(prompt) + i]], jnp.int32)
        logits, cache = fwd(model, jnp.asarray([[nxt]], jnp.int32), pos, cache)
    return out


# ---------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)  # noqa: E731
    T, B = args.seq_len, args.batch
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_positions=T,
                    vocab_size=50260, fim=True, name="pgpt-tiny")
    tok = get_tokenizer(fim=True)
    encode = tok.encode

    # -- data ---------------------------------------------------------------------------
    docs = data.stdlib_documents()
    train_pieces, valid_pieces = data.split_pieces(docs)
    n_valid_docs = sum(d.split == "valid" for d in docs)
    train_plain = data.token_stream(encode, train_pieces)
    valid_stream = data.token_stream(encode, valid_pieces)
    valid_rows = valid_stream[data.row_windows(len(valid_stream), T)]
    n_valid_rows = len(valid_rows)
    unigram = data.unigram_cross_entropy(train_plain, valid_rows[:, 1:].ravel(), cfg.vocab_size)
    log(f"corpus: {len(docs)} documents ({n_valid_docs} held out), {len(train_pieces)} train / "
        f"{len(valid_pieces)} valid pieces, {len(train_plain):,} train / {len(valid_stream):,} valid tokens; "
        f"unigram baseline on validation {unigram:.3f} nats (ppl {math.exp(unigram):.0f})")

    rows_per_epoch = len(data.epoch_rows(encode, train_pieces, T, epoch=0, seed=args.seed,
                                         fim_rate=args.fim_rate))
    n_epochs = -(-args.steps * B // rows_per_epoch)
    train_rows = np.concatenate([data.epoch_rows(encode, train_pieces, T, epoch=e, seed=args.seed,
                                                 fim_rate=args.fim_rate) for e in range(n_epochs)])
    kept, index_of = kept_vocabulary(train_rows[: args.steps * B], cfg)
    log(f"training: {args.steps} steps x {B} x {T} = {args.steps * B * T:,} tokens "
        f"({args.steps * B / rows_per_epoch:.2f} epochs); kept vocabulary {len(kept)} of {cfg.padded_vocab}, "
        f"full-vocabulary softmax at every {args.full_stride}th position")

    # -- model and optimiser --------------------------------------------------------------
    graphdef, params, tx, schedule, opt_state = model_and_optimizer(cfg, args)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    train_step = make_step(graphdef, tx, args.full_stride)
    nll_fn = make_eval(graphdef)
    kept_dev = jnp.asarray(kept)
    eval_rows = valid_rows[np.linspace(0, n_valid_rows - 1, min(args.eval_rows, n_valid_rows)).astype(int)]
    log(f"model: {n_params / 1e6:.2f}M params, {cfg}")

    history = []
    t_train, tokens_seen, window_t, window_tok = time.perf_counter(), 0, time.perf_counter(), 0
    for step in range(args.steps):
        rows = train_rows[step * B:(step + 1) * B]
        x, y = rows[:, :-1], rows[:, 1:]
        params, opt_state, loss, gnorm = train_step(params, opt_state, x, y, index_of[y], kept_dev)
        tokens_seen += B * T
        window_tok += B * T
        if (step + 1) % args.log_every == 0 or step == 0:
            loss = float(loss)  # waits for the step
            now = time.perf_counter()
            log(f"step {step + 1:5d} loss {loss:.3f} grad-norm {float(gnorm):.2f} "
                f"lr {float(schedule(step)):.2e} {window_tok / (now - window_t):6.0f} tok/s")
            window_t, window_tok = now, 0
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            t_eval = time.perf_counter()
            val = evaluate(nll_fn, params, eval_rows, B)
            history.append({"step": step + 1, "tokens": tokens_seen, "val_loss": round(val, 4)})
            log(f"eval step {step + 1}: validation loss {val:.3f} (ppl {math.exp(val):.1f}) on "
                f"{len(eval_rows)} rows [{time.perf_counter() - t_eval:.1f}s]")
            window_t += time.perf_counter() - t_eval  # keep eval time out of tok/s
    train_seconds = time.perf_counter() - t_train
    log(f"trained in {train_seconds / 60:.1f} min ({tokens_seen / train_seconds:.0f} tok/s overall)")

    # -- save bfloat16 weights, reload them the way load_model does, measure them ----------
    saved_cfg = cfg.replace(param_dtype="bfloat16")
    graphdef16, _ = nnx.split(nnx.eval_shape(lambda: GPT(saved_cfg, rngs=nnx.Rngs(0))))
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out = save_checkpoint(nnx.merge(graphdef16, params16), args.out, overwrite=True)
    loaded = restore_checkpoint(out)
    loaded_graphdef, loaded_params = nnx.split(loaded)
    nll16 = make_eval(loaded_graphdef)
    val_bf16_sub = evaluate(nll16, loaded_params, eval_rows, B)
    log(f"on the periodic-eval rows: float32 {history[-1]['val_loss']:.4f}, saved bfloat16 {val_bf16_sub:.4f}")
    val_bf16 = evaluate(nll16, loaded_params, valid_rows, B)
    log(f"validation loss on all {n_valid_rows} rows ({n_valid_rows * T:,} tokens), saved bfloat16 weights: "
        f"{val_bf16:.4f} (ppl {math.exp(val_bf16):.2f}); unigram {unigram:.4f} "
        f"(ppl {math.exp(unigram):.0f}); margin {unigram - val_bf16:.3f} nats")

    # A small slice for the test: 8 rows of 128 tokens spread over the held-out split.
    pick = np.linspace(0, n_valid_rows - 1, 8).astype(int)
    slice_rows = valid_rows[pick, :129]
    slice_loss = evaluate(nll16, loaded_params, slice_rows, 8)
    slice_unigram = data.unigram_cross_entropy(train_plain, slice_rows[:, 1:].ravel(), cfg.vocab_size)
    (out / HELDOUT_FILE).write_text(json.dumps({
        "about": "8 rows of 129 tokens from the held-out split (inputs [:, :-1], targets [:, 1:]); "
                 "unigram = add-one unigram of the training split on these targets, nats/token",
        "unigram_loss": round(slice_unigram, 4), "model_loss": round(slice_loss, 4),
        "rows": slice_rows.tolist()}) + "\n")
    log(f"test slice: model {slice_loss:.3f} vs unigram {slice_unigram:.3f} "
        f"(margin {slice_unigram - slice_loss:.3f} nats)")

    samples = {}
    for prompt in ["The json module", "Return a copy of the", "class collections.OrderedDict"]:
        samples[prompt] = tok.decode(greedy(loaded, encode(prompt), 48))
        log(f"greedy {prompt!r} -> {samples[prompt]!r}")
    fim_prefix, fim_suffix = "str.strip([chars])\nReturn a copy of the string with ", " removed.\n"
    ids = [FIM_PREFIX] + encode(fim_prefix) + [FIM_SUFFIX] + encode(fim_suffix) + [FIM_MIDDLE]
    samples["fim"] = {"prefix": fim_prefix, "suffix": fim_suffix, "middle": tok.decode(greedy(loaded, ids, 24))}
    log(f"FIM middle -> {samples['fim']['middle']!r}")

    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    summary = {
        "config": saved_cfg.to_dict(), "params": n_params, "checkpoint_bytes": size,
        "seed": args.seed, "steps": args.steps, "batch": B, "seq_len": T, "tokens": tokens_seen,
        "train_minutes": round(train_seconds / 60, 2), "tok_per_s": round(tokens_seen / train_seconds),
        "documents": len(docs), "valid_documents": n_valid_docs,
        "train_tokens": int(len(train_plain)), "valid_tokens": int(n_valid_rows * T),
        "eval_rows_loss_f32": history[-1]["val_loss"], "eval_rows_loss_bf16": round(val_bf16_sub, 4),
        "val_loss_bf16": round(val_bf16, 4),
        "val_ppl_bf16": round(math.exp(val_bf16), 2), "unigram_loss": round(unigram, 4),
        "unigram_ppl": round(math.exp(unigram), 1), "history": history, "samples": samples,
        "python": platform.python_version(), "jax": jax.__version__, "args": vars(args),
    }
    print(json.dumps(summary, indent=1), flush=True)
    log(f"wrote {out} ({size / 1e6:.2f} MB)")
    return summary


if __name__ == "__main__":
    main()
