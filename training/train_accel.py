"""Train pgpt-code on an accelerator: several model shapes in one process, the best kept.

    python training/train_accel.py --dump-corpus corpus.json.xz       # here: the corpus, as text
    python training/train_accel.py --dump-corpus corpus.json.xz --more-text all   # 4.2x the text: code_data
    python training/train_accel.py --corpus corpus.json.xz --out OUT --minutes 6 \\
        --model 12x256 --model 8x256:lr=1.5e-3   # on the accelerator
    python training/train_accel.py --convert OUT --out pgpt_jax/assets/pgpt-code   # here: the checkpoint

train.py is the 2-core CPU recipe. On an accelerator the model is small for the chip and
the corpus (3.3M tokens) is small for the model, so this script trains several models in
lockstep (shapes, learning rates, FIM recipes: `--model`; models with the same recipe see the
same batches), measures each on held-out rows as it goes, and keeps the params of the
lowest held-out loss seen (the corpus is seen many times over, so the last
step need not be the best). The corpus comes as a file because the accelerator's machine
may run another Python, whose standard library is another corpus (and another split).

Each epoch is train.py's: shuffled pieces, half of them FIM examples, packed into rows of
1024 tokens (`code_data.epoch_rows`, one epoch per worker process). The loss is train.py's
(`train_tiny.make_step`: softmax over the ids the rows use, the whole vocabulary at every
`--full-stride`-th position), in the causal form without a cache. The learning rate is
computed on the host each step (warm-up, then cosine to --min-lr-ratio of it at the last
step), so that the number of steps can be set after timing the first ones (`--minutes`);
the run's log prints it, and `--steps N` repeats the run with it.

On a GPU with JAX 0.11.2, XLA aborted compiling the step in its Triton GEMM fusion pass;
`XLA_FLAGS=--xla_gpu_enable_triton_gemm=false` (cuBLAS for the matmuls) avoided it.
docs/model_card.md has the command that trained the shipped model.

The chosen params leave as bfloat16 in chunks of at most 15.9 MB (`params.bf16.NNN`, with
`meta.json`), which `--convert` turns into the checkpoint, measured as train.py measures its
own (held-out loss of the saved weights, the test slice, greedy samples).
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import multiprocessing
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 15_900_000  # bytes per params file: the accelerator's files come back in pieces of at most 16 MB


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", help="the file --dump-corpus wrote (default: this Python's standard library)")
    p.add_argument("--dump-corpus", help="write the corpus (train and held-out pieces) to this file and stop")
    p.add_argument("--more-text", choices=["library", "all"], default=None,
                   help="with --dump-corpus (or without --corpus): the training pieces also take the other CPython "
                        "versions' standard libraries (library), and the tests (all): code_data.more_pieces")
    p.add_argument("--convert", help="a training run's --out: write its params as a checkpoint to --out")
    p.add_argument("--out")
    p.add_argument("--model", action="append", default=[],
                   help="LxW[:init=RUN_OUT][:lr=X][:heads=N][:fim=R][:one=R][:spm=R][:mw=W], repeatable "
                        "(default 8x256); fim/one/spm/mw override --fim-rate/--one-line/--spm/--middle-weight "
                        "for that model, which then trains on its own FIM rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="total steps (default: as many as --minutes allow)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time, when --steps is not given")
    p.add_argument("--time-steps", type=int, default=30, help="steps timed to size the run from --minutes")
    p.add_argument("--epochs", type=int, default=64, help="FIM epochs prepared (then they repeat)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--full-stride", type=int, default=8)
    p.add_argument("--fim-rate", type=float, default=0.5)
    p.add_argument("--line-cuts", type=float, default=0.8)
    p.add_argument("--one-line", type=float, default=0.6)
    p.add_argument("--spm", type=float, default=0.75)
    p.add_argument("--middle-weight", type=float, default=1.0,
                   help="a FIM middle and its <|endoftext|> count this many times in the loss (train.py's)")
    p.add_argument("--fim-order", default="spm")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-rows", type=int, default=64)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)))
    p.add_argument("--matmul-precision", default=None,
                   help="jax_default_matmul_precision, e.g. tensorfloat32 on a GPU (default: the backend's)")
    return p.parse_args(argv)


def code_config(n_layer: int, n_embd: int, n_head: int, seq_len: int, fim_order: str):
    from pgpt_jax.config import CODE_VOCAB, GPTConfig

    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=seq_len, vocab_size=CODE_VOCAB,
                     fim=True, space_tokens=True, fim_order=fim_order, name="pgpt-code")


def parse_model(spec: str, args) -> dict:
    shape, *opts = spec.split(":")
    n_layer, n_embd = (int(v) for v in shape.lower().split("x"))
    m = {"name": spec, "n_layer": n_layer, "n_embd": n_embd, "n_head": 4, "lr": args.lr, "init": None,
         "fim": args.fim_rate, "one": args.one_line, "spm": args.spm, "mw": args.middle_weight}
    for opt in opts:
        key, value = opt.split("=", 1)
        m[key] = {"lr": float, "heads": int, "init": str, "fim": float, "one": float, "spm": float,
                  "mw": float}[key](value)
    m["n_head"] = m.pop("heads", m["n_head"])
    return m


def recipe(m: dict, args) -> dict:
    """A model's FIM recipe: code_data.epoch_rows' arguments."""
    return dict(seed=args.seed, fim_rate=m["fim"], one_line=m["one"], line_cuts=args.line_cuts, spm=m["spm"],
                middle_weight=m["mw"])


# -- the corpus and its epochs -----------------------------------------------------------------

_worker = {}


def _init_worker(pieces, seq_len, fim_order):
    os.environ["JAX_PLATFORMS"] = "cpu"  # a worker only tokenizes: it must not take the accelerator
    from pgpt_jax.tokenizer import tokenizer_for

    _worker.update(encode=tokenizer_for(code_config(1, 64, 1, seq_len, fim_order)).encode, pieces=pieces,
                   seq_len=seq_len)


def _epoch(task: tuple[int, dict]) -> tuple[np.ndarray, np.ndarray | None]:
    from training import code_data

    epoch, fim = task
    rows, weights = code_data.epoch_rows(_worker["encode"], _worker["pieces"], _worker["seq_len"], epoch=epoch,
                                         **fim)
    return rows, (weights if fim["middle_weight"] != 1.0 else None)


def epochs(pieces, args, recipes: list[dict], n: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Epochs 0..n-1 of train.py's FIM passes for each recipe, one epoch per worker ->
    [(i32[rows, T + 1], f32[rows, T] loss weights or None where the middle weight is 1)]."""
    ctx = multiprocessing.get_context("spawn")  # no fork after the accelerator's runtime started
    with ctx.Pool(args.workers, _init_worker, (pieces, args.seq_len, args.fim_order)) as pool:
        parts = pool.map(_epoch, [(e, fim) for fim in recipes for e in range(n)])
    out = []
    for k, fim in enumerate(recipes):
        rows, weights = zip(*parts[k * n:(k + 1) * n])
        out.append((np.concatenate(rows), None if fim["middle_weight"] == 1.0 else np.concatenate(weights)))
    return out


def load_corpus(path, more_text: str | None = None) -> tuple[list[str], list[str]]:
    if path and more_text:
        raise SystemExit("--more-text makes a corpus: give it to --dump-corpus, not with --corpus (the file has its text)")
    if path:
        blob = json.loads(lzma.decompress(pathlib.Path(path).read_bytes()))
        return blob["train"], blob["valid"]
    from training import code_data, data

    train_pieces, valid_pieces = data.split_pieces(data.stdlib_documents() + code_data.source_documents())
    return train_pieces + (code_data.more_pieces(tests=more_text == "all") if more_text else []), valid_pieces


# -- params out and in -------------------------------------------------------------------------


def write_params(out: pathlib.Path, params, meta: dict) -> None:
    """bfloat16 leaves, concatenated and cut into files of CHUNK bytes, and meta.json (written last)."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = [np.asarray(jax.device_get(x)).astype(jax.numpy.bfloat16) for _, x in leaves]
    flat = b"".join(a.view(np.uint16).tobytes() for a in arrays)
    chunks = [flat[i:i + CHUNK] for i in range(0, len(flat), CHUNK)]
    for i, c in enumerate(chunks):
        tmp = out / f"params.bf16.{i:03d}.tmp"
        tmp.write_bytes(c)
        os.replace(tmp, out / f"params.bf16.{i:03d}")
    meta = dict(meta, chunks=len(chunks), leaves=[[jax.tree_util.keystr(p), list(a.shape)]
                                                  for (p, _), a in zip(leaves, arrays)])
    (out / "meta.tmp").write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(out / "meta.tmp", out / "meta.json")


def read_params(src: pathlib.Path):
    """-> (meta, GPT with the saved bfloat16 params)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pgpt_jax.model import GPT

    meta = json.loads((src / "meta.json").read_text())
    m = meta["model"]
    cfg = code_config(m["n_layer"], m["n_embd"], m["n_head"], meta["seq_len"], meta["fim_order"])
    cfg = cfg.replace(param_dtype="bfloat16")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    flat = np.frombuffer(b"".join((src / f"params.bf16.{i:03d}").read_bytes() for i in range(meta["chunks"])),
                         np.uint16)
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    if [jax.tree_util.keystr(p) for p, _ in paths] != [p for p, _ in meta["leaves"]]:
        raise SystemExit(f"{src}: its params are not this code's {cfg.n_layer}-layer GPT's")
    leaves, at = [], 0
    for _, shape in meta["leaves"]:
        n = math.prod(shape)
        leaves.append(jnp.asarray(flat[at:at + n].view(jnp.bfloat16).reshape(shape)))
        at += n
    return meta, nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


# -- training ----------------------------------------------------------------------------------


def lr_at(step: int, peak: float, warmup: int, total: int | None, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None:  # still timing: the decay starts after the warm-up whatever the total
        return peak
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(args) -> None:
    # jax first: training.train_tiny (below) defaults JAX_PLATFORMS to cpu for the CPU scripts,
    # which jax reads only when it is first imported. So the backend here is JAX's own choice
    # (the accelerator), or JAX_PLATFORMS where it is set. Its flags are train_tiny's, not
    # train_tiny.parser(), which would import it first.
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from pgpt_jax.model import GPT
    from pgpt_jax.tokenizer import tokenizer_for
    from training import code_data
    from training.data import row_windows
    from training.train_tiny import causal_hidden_states, kept_vocabulary, make_step, token_nll

    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    t0 = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = (out / "log.txt").open("a")

    def log(msg):
        line = f"[{time.perf_counter() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    T, B = args.seq_len, args.batch
    train_pieces, valid_pieces = load_corpus(args.corpus, args.more_text)
    specs = [parse_model(spec, args) for spec in args.model or ["8x256"]]
    recipes = []  # each distinct FIM recipe gets its own rows; models that share one share them
    for m in specs:
        if recipe(m, args) not in recipes:
            recipes.append(recipe(m, args))
    data = epochs(train_pieces, args, recipes, args.epochs)
    per_epoch = len(data[0][0]) / args.epochs
    base = code_config(1, 64, 1, T, args.fim_order)
    valid_stream = code_data.token_stream(tokenizer_for(base).encode, valid_pieces)
    valid_rows = valid_stream[row_windows(len(valid_stream), T)]
    n_valid = len(valid_rows)
    eval_rows = valid_rows[np.linspace(0, n_valid - 1, min(args.eval_rows, n_valid)).astype(int)]
    kept, index_of = kept_vocabulary(np.concatenate([rows for rows, _ in data]), base)
    log(f"backend {jax.default_backend()} {jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"{len(train_pieces)} train pieces; {len(recipes)} FIM recipe(s) x {args.epochs} epochs = "
        f"{sum(len(rows) for rows, _ in data):,} rows of {T} (~{per_epoch:.0f} per epoch); {n_valid} held-out rows; "
        f"kept vocabulary {len(kept)}")

    first = jnp.zeros((B,), jnp.int32)
    kept_dev = jnp.asarray(kept)
    models = []
    for m in specs:
        cfg = code_config(m["n_layer"], m["n_embd"], m["n_head"], T, args.fim_order)
        graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(args.seed)))
        if m["init"]:  # another run's --out (no orbax needed on the accelerator's machine)
            saved = nnx.state(read_params(pathlib.Path(m["init"]))[1])
            params = jax.tree.map(lambda a, b: b.astype(a.dtype), params, saved)
        decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
        tx = optax.chain(optax.clip_by_global_norm(args.clip),
                         optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.95,
                                                               weight_decay=args.weight_decay, mask=decay_mask))

        def nll(params, x, y, graphdef=graphdef):
            model, h = causal_hidden_states(graphdef, params, x, jnp.zeros((x.shape[0],), jnp.int32))
            return token_nll(model.logits(h), y).mean()

        m.update(recipe=recipes.index(recipe(m, args)),
                 cfg=cfg, params=params, opt=tx.init(params), step=make_step(graphdef, tx, args.full_stride),
                 nll=jax.jit(nll), best=(math.inf, 0), best_params=None, history=[],
                 n_params=sum(x.size for x in jax.tree.leaves(params)))
        models.append(m)
        log(f"model {m['name']}: {m['n_params'] / 1e6:.2f}M params, lr {m['lr']}, init {m['init']}, "
            f"FIM {recipe(m, args)}")

    def evaluate(m) -> float:
        losses = [float(m["nll"](m["params"], eval_rows[i:i + B, :-1], eval_rows[i:i + B, 1:]))
                  for i in range(0, len(eval_rows) - B + 1, B)]
        return sum(losses) / len(losses)

    def save_best(step_done: int):
        m = min(models, key=lambda m: m["best"][0])
        meta = {"model": {k: m[k] for k in ("name", "n_layer", "n_embd", "n_head", "lr", "init", "fim", "one", "spm",
                                            "mw")},
                "best_val": m["best"][0], "best_step": m["best"][1], "steps_done": step_done,
                "total_steps": total, "seq_len": T, "batch": B, "fim_order": args.fim_order,
                "args": vars(args), "jax": jax.__version__, "device": jax.devices()[0].device_kind,
                "history": {mm["name"]: mm["history"] for mm in models}}
        write_params(out, m["best_params"], meta)

    total = args.steps
    step, t_timed = 0, None
    window_t, window_steps = time.perf_counter(), 0
    deadline = None

    def batch(rows, weights):
        """This step's (inputs, targets, targets among the kept ids, loss weights or None)."""
        at = (step * B) % (len(rows) - B + 1)
        r = rows[at:at + B]
        return r[:, :-1], r[:, 1:], index_of[r[:, 1:]], None if weights is None else weights[at:at + B]

    while total is None or step < total:
        batches = [batch(*d) for d in data]  # once per recipe, whatever the number of its models
        for m in models:
            x, y, y_kept, wt = batches[m["recipe"]]
            m["opt"][1].hyperparams["learning_rate"] = jnp.asarray(
                lr_at(step, m["lr"], args.warmup, total, args.min_lr_ratio), jnp.float32)
            m["params"], m["opt"], m["loss"], m["gnorm"] = m["step"](m["params"], m["opt"], x, y, y_kept, kept_dev,
                                                                     first, wt)
        step += 1
        window_steps += 1
        if step == 2:  # compiled and one step run: time from here
            float(models[-1]["loss"])
            t_timed = time.perf_counter()
            deadline = None if args.steps else t_timed + args.minutes * 60
        if total is None and step == 2 + args.time_steps:
            float(models[-1]["loss"])
            per_step = (time.perf_counter() - t_timed) / args.time_steps
            # evaluation takes a little of each --eval-every steps: leave 5% for it
            total = step + int(0.95 * (deadline - time.perf_counter()) / per_step)
            log(f"{per_step * 1000:.1f} ms per step (all models): {total} steps in {args.minutes} min = "
                f"{total * B * T / per_epoch / T:.1f} epochs; rerun with --steps {total}")
        if step % args.log_every == 0 or step == 1:
            losses = [float(m["loss"]) for m in models]
            now = time.perf_counter()
            for m, loss in zip(models, losses):
                m["history"].append({"step": step, "tokens": step * B * T, "train_loss": round(loss, 4)})
            log(f"step {step:5d} " + " ".join(f"[{m['name']}] {loss:.3f} |g| {float(m['gnorm']):.2f}"
                                              for m, loss in zip(models, losses))
                + f" {window_steps * B * T / (now - window_t):8.0f} tok/s")
            window_t, window_steps = now, 0
        if step % args.eval_every == 0 or step == total:
            for m in models:
                val = evaluate(m)
                m["history"].append({"step": step, "tokens": step * B * T, "val_loss": round(val, 4)})
                if val < m["best"][0]:
                    m["best"] = (val, step)
                    m["best_params"] = jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16), m["params"])
            log(f"eval {step}: " + " ".join(f"[{m['name']}] {m['history'][-1]['val_loss']:.4f} "
                                            f"(best {m['best'][0]:.4f} at {m['best'][1]})" for m in models))
            save_best(step)
            window_t = time.perf_counter()
        if deadline and time.perf_counter() > deadline + 30:
            log(f"past the deadline at step {step}: stopping")
            break
    log(f"done: {step} steps; kept {min(models, key=lambda m: m['best'][0])['name']}")


def convert(args) -> None:
    import jax
    from flax import nnx

    from pgpt_jax.tokenizer import tokenizer_for
    from training import train

    src, out = pathlib.Path(args.convert), pathlib.Path(args.out)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731
    meta, model = read_params(src)
    m, cfg = meta["model"], model.config
    log(f"{src}: {m['name']}, held-out loss {meta['best_val']:.4f} on {meta['args']['eval_rows']} rows at step "
        f"{meta['best_step']} of {meta['total_steps']} ({meta['device']})")
    docs, _, valid_rows, train_plain, unigram = train.corpus(tokenizer_for(cfg).encode, cfg.n_positions,
                                                              cfg.vocab_size)
    B, T = meta["batch"], meta["seq_len"]
    history = [e for e in meta["history"][m["name"]] if e["step"] <= meta["steps_done"]]
    (src / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history))  # evaluate.py --plot
    summary = {
        "params": sum(x.size for x in jax.tree.leaves(nnx.state(model))), "seed": meta["args"]["seed"],
        "steps": meta["best_step"], "batch": B, "seq_len": T, "tokens": meta["best_step"] * B * T,
        "trained_on": f"{meta['device']} (jax {meta['jax']}), training/train_accel.py",
        "documents": len(docs), "valid_documents": sum(d.split == "valid" for d in docs),
        "history": history, "args": meta["args"],
        "kept": {"step": meta["best_step"], "tokens": meta["best_step"] * B * T, "of_steps": meta["steps_done"]},
    }
    train.finish_checkpoint(cfg.replace(param_dtype="float32"), nnx.state(model), out, src, valid_rows,
                            train_plain, unigram, 4, summary, log)


def main(argv=None):
    args = parse_args(argv)
    if args.dump_corpus:
        train_pieces, valid_pieces = load_corpus(None, args.more_text)
        blob = json.dumps({"train": train_pieces, "valid": valid_pieces, "python": sys.version})
        pathlib.Path(args.dump_corpus).write_bytes(lzma.compress(blob.encode(), preset=6))
        print(f"{args.dump_corpus}: {len(train_pieces)} train, {len(valid_pieces)} held-out pieces")
    elif args.convert:
        convert(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
