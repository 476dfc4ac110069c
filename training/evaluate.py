"""Held-out evaluation of the embedded code model (docs/model_card.md has the shipped figures).

    python training/evaluate.py                                    # the embedded model -> training/work/eval.json
    python training/evaluate.py --model DIR --old pgpt-tiny        # also the embedded model, on the same text
    python training/evaluate.py --fixture tests/fixtures/pgpt_code_eval.json   # write the CI sample
    python training/evaluate.py --fixture tests/fixtures/pgpt_code_eval.json --fixture-only  # only the sample

Everything is measured on modules the model never saw (training/data.py's hash split):

- *Compression*: nats per token of each model under its own tokenizer on the same held-out
  text (Python source, and separately the documentation text), in windows of the model's
  context, next to the add-one unigram of the training split; and bits per byte, the figure
  that compares models whose tokenizers differ.
- *Single-line infill*: `--infill` non-blank held-out lines; the prompt is up to 600 tokens
  before the line, the suffix up to 300 tokens after it, in the model's FIM order (as a
  request with `suffix` sends it; `--orders psm,spm` measures both); greedy; the middle
  must equal the line (one trailing newline allowed), within 64 tokens. Also reported: how often the middle's first line is the line
  (the middle may run on), and whether the model uses the suffix at all: the true line's
  teacher-forced nats/token after the FIM prompt against after the prefix alone.
- *Function bodies*: `--bodies` held-out functions with a docstring and a body; the prompt
  is the `def` line(s) and the docstring; temperature 0.2, up to 160 tokens, cut at the first
  line that dedents to the `def`'s level. It counts when the body ended within the budget
  (by that dedent or <|endoftext|>), holds at least one statement, and `ast.parse` accepts
  the prompt with it.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pathlib
import sys
import textwrap
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pgpt_jax  # noqa: E402
from pgpt_jax.checkpoint import load_model  # noqa: E402
from pgpt_jax.model import forward, init_cache  # noqa: E402
from pgpt_jax.request import fim_prompt  # noqa: E402
from pgpt_jax.tokenizer import tokenizer_for  # noqa: E402
from training import code_data, data  # noqa: E402

PREFIX_TOKENS, SUFFIX_TOKENS, INFILL_MAX_TOKENS = 600, 300, 64
BODY_MAX_TOKENS, BODY_TEMPERATURE = 160, 0.2


def heldout_sources() -> list[tuple[str, str]]:
    return [(n, t) for n, t in code_data.source_files() if data.is_validation(f"module:{n}")]


# ---------------------------------------------------------------------------------------
# Cases


def infill_cases(sources, tok, count: int, seed: int = 0) -> list[dict]:
    """`count` non-blank held-out lines with their prefix (<= 600 tokens) and suffix (<= 300)."""
    where = [(m, i) for m, (_, text) in enumerate(sources)
             for i, line in enumerate(text.splitlines()) if line.strip()]
    rng = np.random.default_rng(seed)
    cases = []
    for k in sorted(rng.choice(len(where), size=min(count, len(where)), replace=False)):
        m, i = where[k]
        name, text = sources[m]
        lines = text.splitlines(keepends=True)
        prefix, suffix = around(lines, i, i + 1, tok)
        cases.append({"module": name, "line_no": i + 1, "prefix": prefix, "suffix": suffix,
                      "line": lines[i].rstrip("\n")})
    return cases


def around(lines: list[str], i: int, j: int, tok, prefix_tokens: int = PREFIX_TOKENS,
           suffix_tokens: int = SUFFIX_TOKENS) -> tuple[str, str]:
    """The hole lines[i:j]'s prefix (the last `prefix_tokens` tokens before it) and suffix (the
    first `suffix_tokens` after it), as text (training/tune_bodies.py's holes are cut the same way)."""
    before, after = "".join(lines[:i])[-8 * prefix_tokens:], "".join(lines[j:])[:8 * suffix_tokens]
    return tok.decode(tok.encode(before)[-prefix_tokens:]), tok.decode(tok.encode(after)[:suffix_tokens])


def documented_functions(sources) -> list[dict]:
    """The functions of `sources` with a docstring and a body: prompt = def line(s) + docstring,
    text = the whole function (training/tune_bodies.py takes the training split's)."""
    return [{"module": name, "function": node.name, "line_no": node.lineno,
             "prompt": "".join(lines[node.lineno - 1:node.body[0].end_lineno]),
             "text": "".join(lines[node.lineno - 1:node.end_lineno])}
            for name, node, lines in code_data.functions(sources)
            if len(node.body) > 1 and ast.get_docstring(node) is not None]


def body_cases(sources, count: int, seed: int = 0) -> list[dict]:
    """`count` held-out functions with a docstring and a body (documented_functions)."""
    found = documented_functions(sources)
    rng = np.random.default_rng(seed)
    return [found[k] for k in sorted(rng.choice(len(found), size=min(count, len(found)), replace=False))]


# ---------------------------------------------------------------------------------------
# Scores


def infill_score(model, cases: list[dict], slots: int = 16, order: str | None = None) -> list[dict]:
    """Greedy middles, the FIM prompt in `order` (default: the model's, as a request's `suffix` is)."""
    tok = tokenizer_for(model.config)
    order = order or model.config.fim_order
    prompts = [fim_prompt(tok.encode(c["prefix"]), tok.encode(c["suffix"]), True, order) for c in cases]
    out = pgpt_jax.generate(model, prompts, max_tokens=INFILL_MAX_TOKENS, temperature=0.0, slots=slots)
    results = []
    for c, (choice,) in zip(cases, out):
        middle = choice.text[:-1] if choice.text.endswith("\n") else choice.text
        results.append({"middle": choice.text, "finish": choice.finish_reason,
                        "exact": choice.finish_reason == "stop" and middle == c["line"],
                        "first_line": choice.text.split("\n", 1)[0] == c["line"]})
    return results


def line_nats(model, cases: list[dict], batch: int = 8, order: str | None = None) -> list[tuple[float, float, int]]:
    """Does the model use the suffix? For each infill case, the nats (summed over its tokens) of
    the true line and its newline teacher-forced after the FIM prompt (in `order`), and after
    the prefix alone (a plain left-to-right continuation), and the line's token count. Rows are
    right-padded to the context, `batch` at a time: one compiled shape."""
    tok = tokenizer_for(model.config)
    T, order = model.config.n_positions, order or model.config.fim_order
    fwd = jax.jit(lambda m, x: forward(m, x, jnp.broadcast_to(jnp.arange(T), x.shape), init_cache(m.config, x.shape[0], T))[0])
    rows = []  # (context ids, target ids) pairs, two per case
    for c in cases:
        target = tok.encode(c["line"] + "\n")
        prefix = tok.encode(c["prefix"])
        rows.append((fim_prompt(prefix, tok.encode(c["suffix"]), True, order), target))
        rows.append((prefix, target))
    sums = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        x = np.zeros((batch, T), np.int32)
        for i, (ctx, target) in enumerate(chunk):
            ids = (ctx + target)[-T:]
            x[i, : len(ids)] = ids
        logp = jax.nn.log_softmax(fwd(model, jnp.asarray(x)), -1)
        for i, (ctx, target) in enumerate(chunk):
            n = min(len(ctx) + len(target), T)
            pos = np.arange(n - len(target) - 1, n - 1)  # positions whose next token is a target token
            sums.append(-float(logp[i, pos, np.asarray(target)].sum()))
    return [(sums[2 * k], sums[2 * k + 1], len(tok.encode(c["line"] + "\n"))) for k, c in enumerate(cases)]


def cut_body(prompt: str, completion: str) -> tuple[str, bool]:
    """The completion up to the first non-blank line indented no deeper than the `def`;
    -> (body, found that line)."""
    depth = len(prompt) - len(prompt.lstrip(" \t"))
    lines = completion.splitlines(keepends=True)
    for i, line in enumerate(lines):
        starts_line = i > 0 or prompt.endswith("\n")
        if starts_line and line.strip() and len(line) - len(line.lstrip(" \t")) <= depth:
            return "".join(lines[:i]), True
    return completion, False


def body_parses(prompt: str, body: str) -> bool:
    try:
        tree = ast.parse(textwrap.dedent(prompt + body))
    except SyntaxError:
        return False
    fn = tree.body[0] if tree.body else None
    return isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(fn.body) > 1


def body_score(model, cases: list[dict], seed: int = 0, slots: int = 32) -> list[dict]:
    out = pgpt_jax.generate(model, [c["prompt"] for c in cases], max_tokens=BODY_MAX_TOKENS,
                            temperature=BODY_TEMPERATURE, seed=seed, slots=slots)
    results = []
    for c, (choice,) in zip(cases, out):
        body, dedented = cut_body(c["prompt"], choice.text)
        ended = dedented or choice.finish_reason == "stop"
        results.append({"completion": choice.text, "finish": choice.finish_reason, "ended": ended,
                        "parses": ended and body_parses(c["prompt"], body)})
    return results


def nats_per_token(model, ids: list[int]) -> tuple[float, int]:
    """Sum of next-token nats over `ids` in non-overlapping windows of the model's context."""
    T = model.config.n_positions
    fwd = jax.jit(lambda m, x: forward(m, x, jnp.arange(x.shape[1])[None], init_cache(m.config, 1, x.shape[1]))[0])
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, T):
        window = ids[start:start + T + 1]
        if len(window) < 2:
            break
        x = np.asarray(window[:-1] + [0] * (T - len(window) + 1), np.int32)[None]
        logits = fwd(model, jnp.asarray(x))[0, : len(window) - 1]
        y = jnp.asarray(window[1:])
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
        total += float(nll.sum())
        count += len(window) - 1
    return total, count


def compression(model, texts: list[str], train_counts: np.ndarray) -> dict:
    """nats/token, perplexity, bits/byte of `model` and of the add-one unigram on the joined texts."""
    tok = tokenizer_for(model.config)
    text = "".join(t + "<|endoftext|>" for t in texts)
    ids = tok.encode(text)
    total, count = nats_per_token(model, ids)
    n_bytes = len(text.encode())
    logp = np.log(train_counts + 1.0) - np.log(train_counts.sum() + len(train_counts))
    uni = float(-logp[np.asarray(ids[1:])].sum())
    return {"tokens": count, "bytes": n_bytes,
            "model_nats_per_token": round(total / count, 4), "model_ppl": round(math.exp(total / count), 2),
            "model_bits_per_byte": round(total / n_bytes / math.log(2), 4),
            "unigram_nats_per_token": round(uni / count, 4), "unigram_ppl": round(math.exp(uni / count), 1),
            "unigram_bits_per_byte": round(uni / n_bytes / math.log(2), 4)}


def train_counts(tok, vocab: int) -> np.ndarray:
    docs = data.stdlib_documents() + code_data.source_documents()
    train, _ = data.split_pieces(docs)
    stream = code_data.token_stream(tok.encode, train)
    return np.bincount(stream, minlength=vocab)[:vocab].astype(np.float64)


def plot_history(history_file: pathlib.Path, png: pathlib.Path) -> None:
    """Training loss (every logged step) and held-out loss (each eval) against tokens seen; a
    run that continued another (`train.py --init-from`, its summary.json beside the history)
    gets a line where it took over, and one that kept earlier params (train_accel.py) a line
    where they were taken."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in history_file.read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label, style in [("train_loss", "training batch", "-"), ("val_loss", "held-out modules", "o-")]:
        pts = [(r["tokens"] / 1e6, r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), style, label=label, markersize=4)
    summary = history_file.parent / "summary.json"
    summary = json.loads(summary.read_text()) if summary.exists() else {}
    if summary.get("init_from"):
        ax.axvline(summary["init_from"]["tokens"] / 1e6, color="grey", linestyle=":",
                   label="continued (--init-from)")
    if summary.get("kept"):  # training/train_accel.py keeps the params of its lowest held-out loss
        ax.axvline(summary["kept"]["tokens"] / 1e6, color="green", linestyle="--",
                   label=f"weights kept (step {summary['kept']['step']})")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.set_title("pgpt-code training (float32 weights)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)


def fixture_picks(n_infill: int, n_bodies: int) -> tuple[list[int], list[int]]:
    """The CI sample: 40 of the infill cases and 24 of the bodies, evenly spread."""
    step_i, step_b = max(1, n_infill // 40), max(1, n_bodies // 24)
    return list(range(0, n_infill, step_i))[:40], list(range(0, n_bodies, step_b))[:24]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    p.add_argument("--old", default=None, help="also measure this checkpoint's compression (e.g. pgpt-tiny)")
    p.add_argument("--infill", type=int, default=500)
    p.add_argument("--orders", default=None,
                   help="FIM orders to measure infill in, e.g. psm,spm (default: the model's fim_order); "
                        "the first is the one reported as `infill`, the others as `infill_<order>`")
    p.add_argument("--bodies", type=int, default=200)
    p.add_argument("--body-seeds", default="0",
                   help="sampling seeds for the bodies, e.g. 0,1,2: the first is reported as `bodies`, "
                        "all of them in `bodies.parse_by_seed` (how much the figure moves with the draw)")
    p.add_argument("--text-bytes", type=int, default=120_000, help="held-out bytes of code, and of docs, to score")
    p.add_argument("--out", default=str(ROOT / "training" / "work" / "eval.json"))
    p.add_argument("--fixture", default=None, help="write the CI sample (40 infill lines, 24 bodies) here")
    p.add_argument("--fixture-only", action="store_true",
                   help="with --fixture: score only the sample's cases (drawn from --infill and --bodies as a "
                        "full run draws them); --out then holds the sample's figures")
    p.add_argument("--plot", default=None, metavar="PNG", help="also plot the loss curve of --history to PNG")
    p.add_argument("--history", default=str(ROOT / "training" / "work" / "history.jsonl"),
                   help="a training run's loss log (train.py writes it to its --work)")
    args = p.parse_args(argv)
    if args.plot:
        plot_history(pathlib.Path(args.history), pathlib.Path(args.plot))
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731

    model = load_model(args.model)
    tok = tokenizer_for(model.config)
    sources = heldout_sources()
    log(f"{model.config.name}: {len(sources)} held-out modules")
    report: dict = {"model": model.config.name, "heldout_modules": [n for n, _ in sources]}

    code_text = "".join(t for _, t in sources)[: args.text_bytes]
    docs = [d for d in data.stdlib_documents() if d.split == "valid"]
    doc_text = "\n".join(p for d in docs for p in d.pieces)[: args.text_bytes]
    for name, m in [("model", model)] + ([("old", load_model(args.old))] if args.old else []):
        counts = train_counts(tokenizer_for(m.config), m.config.vocab_size)
        report[f"compression_{name}"] = {"name": m.config.name, "code": compression(m, [code_text], counts),
                                         "docs": compression(m, [doc_text], counts)}
        log(f"compression {name}: {json.dumps(report[f'compression_{name}'])}")

    cases, bodies = infill_cases(sources, tok, args.infill), body_cases(sources, args.bodies)
    if args.fixture_only:  # score only the cases the fixture keeps (the same ones a full run keeps)
        pick_i, pick_b = fixture_picks(len(cases), len(bodies))
        cases, bodies = [cases[i] for i in pick_i], [bodies[i] for i in pick_b]
    orders = (args.orders or model.config.fim_order).split(",") if cases else []
    res, nats = [], []
    for k, order in reversed(list(enumerate(orders))):  # the reported order last: its results are kept
        res = infill_score(model, cases, order=order)
        exact = sum(r["exact"] for r in res)
        key = "infill" if k == 0 else f"infill_{order}"
        report[key] = {"order": order, "cases": len(cases), "exact": exact,
                       "exact_rate": round(exact / len(cases), 4), "stopped": sum(r["finish"] == "stop" for r in res)}
        first = sum(r["first_line"] for r in res)
        nats = line_nats(model, cases, order=order)
        fim_n, plain_n, count = (sum(x[i] for x in nats) for i in range(3))
        report[key].update(first_line=first, line_nats_per_token_fim=round(fim_n / count, 4),
                           line_nats_per_token_prefix_only=round(plain_n / count, 4),
                           suffix_helps=sum(f < p for f, p, _ in nats))
        log(f"infill ({order}): {exact}/{len(cases)} exact ({exact / len(cases):.1%}); first line right {first}; "
            f"{report[key]['stopped']} ended; the line's nats/token {fim_n / count:.3f} with the suffix, "
            f"{plain_n / count:.3f} after the prefix alone (lower with the suffix on {report[key]['suffix_helps']} lines)")

    seeds, by_seed, bres = [int(x) for x in args.body_seeds.split(",")] if bodies else [], {}, []
    for seed in reversed(seeds):  # the reported seed last: kept
        bres = body_score(model, bodies, seed=seed)
        by_seed[seed] = sum(r["parses"] for r in bres)
        log(f"bodies, seed {seed}: {by_seed[seed]}/{len(bodies)} parse ({by_seed[seed] / len(bodies):.1%}); "
            f"{sum(r['ended'] for r in bres)} ended within {BODY_MAX_TOKENS} tokens")
    if bodies:  # --bodies 0: infill and compression only
        ok = by_seed[seeds[0]]
        report["bodies"] = {"cases": len(bodies), "parse": ok, "parse_rate": round(ok / len(bodies), 4),
                            "ended": sum(r["ended"] for r in bres), "parse_by_seed": dict(sorted(by_seed.items()))}
    report["examples"] = {"infill": [dict(c, **r) for c, r in zip(cases[:10], res[:10])],
                          "bodies": [dict(c, **r) for c, r in zip(bodies[:6], bres[:6])]}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out}")

    if args.fixture:
        pick_i, pick_b = ((range(len(cases)), range(len(bodies))) if args.fixture_only
                          else fixture_picks(len(cases), len(bodies)))
        fixture = {
            "about": "written by training/evaluate.py: held-out infill lines and function prompts, "
                     "with what the shipped model scored on them",
            "infill_order": orders[0],
            "infill": [cases[i] for i in pick_i], "infill_exact": sum(res[i]["exact"] for i in pick_i),
            "infill_first_line": sum(res[i]["first_line"] for i in pick_i),
            "infill_line_nats": [list(nats[i]) for i in pick_i],
            "bodies": [bodies[i] for i in pick_b], "bodies_parse": sum(bres[i]["parses"] for i in pick_b),
            "bodies_ended": sum(bres[i]["ended"] for i in pick_b),
            "body_seed": seeds[0],
        }
        pathlib.Path(args.fixture).write_text(json.dumps(fixture, indent=1) + "\n")
        log(f"wrote {args.fixture}: infill {fixture['infill_exact']}/{len(pick_i)}, "
            f"bodies {fixture['bodies_parse']}/{len(pick_b)}")
    return report


if __name__ == "__main__":
    main()
