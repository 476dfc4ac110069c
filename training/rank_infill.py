"""Single-line infill by decoding alone: sampled lines ranked by how well the suffix follows them.

    python training/rank_infill.py --start 0 --cases 100 --out training/work/rank_0_100.json

The cases are the infill measure's (training/evaluate.py `infill_cases`: the same 500
held-out lines, prefix and suffix, in the same order; `--start`/`--cases` take a slice).
For each, lines are sampled (temperature `--temperature`, top_p 0.95, cut at the first
newline) from the FIM prompt in the model's order, as a request with `suffix` sends it, and
from the prefix alone, plus the greedy FIM line. Every distinct line that ended (at its
newline) is then scored left to right, given the prefix: log P(line, newline, and the
suffix's first `--suffix-tokens` tokens). The prefix runs once a case; the lines run on its
cache, 16 rows a call, so two programs are compiled in all. Reported, of the cases: the
greedy FIM middle's line is the line (what the measure's "first line right" counts), any
sampled line is the line ("oracle": the most a ranking of these samples could reach), and
the highest-scored line is the line ("ranked"). docs/model_card.md has the figures.
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

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pgpt_jax  # noqa: E402
from pgpt_jax.checkpoint import load_model  # noqa: E402
from pgpt_jax.model import forward, init_cache  # noqa: E402
from pgpt_jax.request import fim_prompt  # noqa: E402
from pgpt_jax.tokenizer import tokenizer_for  # noqa: E402
from training.evaluate import heldout_sources, infill_cases  # noqa: E402

PREFIX_ROWS, LINE_ROWS, LINE_TOKENS, MAX_LINE_TOKENS = 640, 16, 96, 40


def sample_lines(model, prompts, *, n: int, temperature: float, seed: int) -> list[list[str]]:
    """Per prompt, the lines that ended at their newline (the newline left out)."""
    kw = dict(temperature=temperature, top_p=0.95, n=n, seed=seed) if temperature > 0 else dict(temperature=0.0)
    out = pgpt_jax.generate(model, prompts, max_tokens=MAX_LINE_TOKENS, stop=["\n"], slots=32, **kw)
    return [[c.text for c in choices if c.finish_reason == "stop"] for choices in out]


class Scorer:
    """log P(line + "\\n" + suffix head | prefix), split into the line's part and the suffix's."""

    def __init__(self, model, suffix_tokens: int):
        self.model, self.tok, self.suffix_tokens = model, tokenizer_for(model.config), suffix_tokens
        T = model.config.n_positions
        self._prefix = jax.jit(lambda m, x: forward(m, x, jnp.arange(x.shape[1])[None], init_cache(m.config, 1, T))[1])

        def lines(m, x, positions, cache):
            cache = tuple((jnp.repeat(k, x.shape[0], 0), jnp.repeat(v, x.shape[0], 0)) for k, v in cache)
            return jax.nn.log_softmax(forward(m, x, positions, cache)[0], -1)

        self._lines = jax.jit(lines)

    def score(self, prefix: str, candidates: list[str], suffix: str) -> dict[str, tuple[float, float]]:
        tok = self.tok
        head = tok.decode(tok.encode(suffix)[: self.suffix_tokens])
        p = tok.encode(prefix)[-(PREFIX_ROWS - 1):] or [tok.eos_id]  # a file's first line: <|endoftext|> before it
        x = np.zeros((1, PREFIX_ROWS), np.int32)
        x[0, : len(p)] = p  # padding after the prefix is overwritten by the lines' pass before it is read
        cache = self._prefix(self.model, jnp.asarray(x))
        positions = len(p) - 1 + jnp.broadcast_to(jnp.arange(LINE_TOKENS), (LINE_ROWS, LINE_TOKENS))
        scores = {}
        for start in range(0, len(candidates), LINE_ROWS):
            chunk = candidates[start:start + LINE_ROWS]
            targets = [tok.encode(c + "\n" + head)[:LINE_TOKENS] for c in chunk]
            x = np.zeros((LINE_ROWS, LINE_TOKENS), np.int32)
            x[:, 0] = p[-1]  # each row starts again from the prefix's last token, at its position
            for i, t in enumerate(targets):
                x[i, 1:len(t)] = t[:-1]
            logp = np.asarray(self._lines(self.model, jnp.asarray(x), positions, cache))
            for i, (c, t) in enumerate(zip(chunk, targets)):
                per = logp[i, np.arange(len(t)), np.asarray(t)]
                cut = min(len(tok.encode(c + "\n")), len(t))
                scores[c] = (float(per[:cut].sum()), float(per[cut:].sum()))
        return scores


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    p.add_argument("--start", type=int, default=0, help="first case of the measure's 500")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--samples", type=int, default=32, help="sampled lines per prompt (FIM and prefix alone each)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--suffix-tokens", type=int, default=48)
    p.add_argument("--out", default=str(ROOT / "training" / "work" / "rank_infill.json"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731

    model = load_model(args.model)
    tok = tokenizer_for(model.config)
    cases = infill_cases(heldout_sources(), tok, 500)[args.start:args.start + args.cases]
    fim = [fim_prompt(tok.encode(c["prefix"]), tok.encode(c["suffix"]), True, model.config.fim_order) for c in cases]
    alone = [tok.encode(c["prefix"]) for c in cases]
    greedy = sample_lines(model, fim, n=1, temperature=0.0, seed=0)
    pools = [a + b + c for a, b, c in zip(
        greedy, sample_lines(model, fim, n=args.samples, temperature=args.temperature, seed=1),
        sample_lines(model, alone, n=args.samples, temperature=args.temperature, seed=2))]
    log(f"sampled {len(cases)} cases")
    scorer, rows = Scorer(model, args.suffix_tokens), []
    for c, g, pool in zip(cases, greedy, pools):
        scores = scorer.score(c["prefix"], sorted(set(pool)), c["suffix"])
        ranked = max(scores, key=lambda t: sum(scores[t])) if scores else None
        rows.append({"module": c["module"], "line_no": c["line_no"], "line": c["line"], "ranked": ranked,
                     "greedy_right": bool(g) and g[0] == c["line"], "oracle": c["line"] in scores,
                     "ranked_right": ranked == c["line"], "candidates": len(scores)})
        if len(rows) % 10 == 0:
            log(f"scored {len(rows)}")
    report = {"model": model.config.name, "start": args.start, "cases": len(rows), "samples": args.samples,
              "temperature": args.temperature, "suffix_tokens": args.suffix_tokens,
              **{k: sum(r[k] for r in rows) for k in ("greedy_right", "oracle", "ranked_right")}, "rows": rows}
    log(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
