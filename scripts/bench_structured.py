"""Structured output: the grammar engine on the GPT-2 vocabulary, and what constraints cost a decode step.

    PYTHONPATH=. python scripts/bench_structured.py [--preset gpt2] [--slots 32] [--tokens 96]

1. Grammar engine (llguidance through pgpt_jax/grammar.py): the tokenizer's one-time build,
   a mid-size JSON schema's compile cold (to its first mask) and cached (by schema hash), a matcher, and the per-token host work of a constrained row
   (fill its next-token mask, advance by one allowed token) over random walks through the
   grammar, p50 and p99.
2. Decode: an engine of `slots` slots on a random-init `preset`, every row generating, once
   unconstrained (decode_steps 4, pipelined) and twice with every row constrained by the same
   schema (one step a call in two halves, masks from the matchers): as the engine runs it
   (the host reads tokens and fills masks while the forward half runs), and with the forward
   waited for before the host goes on (what the engine did before the halves: the device
   idles while the host works), in the same process. The figure is the milliseconds between
   consecutive dispatches of all `slots` rows (a decode, or a forward half), divided by the
   steps each carried (host work included), median over the run; and whether the device
   waits for the host's masks: overlapped, how many sampling halves went out while their
   forward still ran (the device then never waits); forward waited for, the host's time from
   the forward's end to the sampling's dispatch (the device's idle time per step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from pgpt_jax import grammar  # noqa: E402
from pgpt_jax.tokenizer import get_tokenizer  # noqa: E402

V = 50304
SCHEMA = {  # mid-size: nested object, enum array with bounds, strings with maxLength and pattern, numbers
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 16},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        "score": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.5},
        "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer", "guest"]},
                  "minItems": 1, "maxItems": 4},
        "address": {"type": "object",
                    "properties": {"street": {"type": "string", "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                   "country": {"enum": ["US", "DE", "FR", "JP"]}},
                    "required": ["street", "zip", "country"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "email", "score", "roles", "address", "active"],
    "additionalProperties": False,
}


def grammar_figures(tok, walks: int = 20, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    grammar._lltokenizer(tok, V)
    out = {"tokenizer_s": time.perf_counter() - t0}
    cold = []
    for i in range(5):  # a fresh schema each time: cold compiles
        grammar._cache.clear()
        t0 = time.perf_counter()
        grammar.compile("json", {**SCHEMA, "title": f"s{i}"}, tok, V).matcher().mask()
        cold.append(time.perf_counter() - t0)  # llguidance builds lexer states lazily: the first mask counts
    t0 = time.perf_counter()
    for _ in range(100):
        compiled = grammar.compile("json", {**SCHEMA, "title": "s4"}, tok, V)
    out["compile_cold_ms"] = 1e3 * statistics.median(cold)
    out["compile_cached_us"] = 1e6 * (time.perf_counter() - t0) / 100
    t0 = time.perf_counter()
    for _ in range(20):
        compiled.matcher()
    out["matcher_us"] = 1e6 * (time.perf_counter() - t0) / 20
    rng = np.random.default_rng(seed)
    row, fills, advances = np.zeros((grammar.mask_words(V),), np.uint32), [], []
    for _ in range(walks):
        m = compiled.matcher()
        while not m.stopped():
            t0 = time.perf_counter()
            m.fill(row)
            t1 = time.perf_counter()
            allowed = np.nonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))[0]
            allowed = allowed[allowed != tok.eos_id] if len(allowed) > 1 else allowed
            if allowed[0] == tok.eos_id:
                break
            t2 = time.perf_counter()
            m.advance(int(rng.choice(allowed)))
            fills.append(t1 - t0)
            advances.append(time.perf_counter() - t2)
    out["fill_p50_us"], out["fill_p99_us"] = (1e6 * np.percentile(fills, q) for q in (50, 99))
    out["advance_p50_us"] = 1e6 * np.percentile(advances, 50)
    out["tokens_walked"] = len(fills)
    return out


def decode_figures(preset: str, slots: int, tokens: int) -> dict:
    from pgpt_jax.engine import Engine
    import jax

    from pgpt_jax.executor import Decode, Forward, Sample
    from pgpt_jax.model import init_model
    from pgpt_jax.request import Constraint, Limits, Request

    tok = get_tokenizer()
    model = init_model(preset, seed=0)
    eng = Engine(model, tok, slots=slots, decode_steps=4, min_bucket=16, min_window=128,
                 limits=Limits(max_n=slots, max_queue=4 * slots))
    stamps: list = []
    run = eng.executor.run
    serial = [False]

    # Does the device wait for the host's masks? Overlapped: whether each sampling half went out
    # while its forward still ran. Forward waited for: the host's time from the forward's end
    # to the sampling's dispatch, which the device spends idle.
    running, idle, ready_at = [], [], [0.0]

    def timed(op):
        if isinstance(op, (Decode, Forward)) and op.rows == slots:
            stamps.append((time.perf_counter(), getattr(op, "steps", 1) or eng.decode_steps))
        if isinstance(op, Sample):
            if serial[0]:
                idle.append(time.perf_counter() - ready_at[0])
            else:
                running.append(not eng.executor.logits.is_ready())
        out = run(op)
        if serial[0] and isinstance(op, Forward):
            jax.block_until_ready(eng.executor.logits)
            ready_at[0] = time.perf_counter()
        return out

    eng.executor.run = timed
    prompt = tok.encode("Here is the record:")

    def one(constraint, wait_forward: bool = False) -> dict:
        stamps.clear()
        running.clear()
        idle.clear()
        serial[0] = wait_forward
        req = Request(prompt=prompt, max_tokens=tokens, n=slots, seed=1, logit_bias={tok.eos_id: -100.0},
                      constraint=constraint)
        done = []
        eng.submit(req, done.append)
        t0 = time.perf_counter()
        eng.run_until_idle()
        wall = time.perf_counter() - t0
        per_step = [(b - a) / steps for (a, steps), (b, _) in zip(stamps, stamps[1:])][2:]  # past the compiles
        gen = done[0].completion_tokens
        return {"ms_per_step": 1e3 * statistics.median(per_step), "steps_timed": sum(s for _, s in stamps[3:]),
                "samples_sent_while_forward_ran": f"{sum(running)}/{len(running)}" if running else None,
                "ms_device_idle_per_step": 1e3 * statistics.median(idle) if idle else None,
                "wall_s": wall, "tokens": gen, "finish": sorted({c.finish_reason for c in done[0].choices})}

    one(None)  # compiles the 4-step programs
    one(Constraint("json", SCHEMA, "bench"))  # compiles the 1-step ones
    free = one(None)
    constrained = one(Constraint("json", SCHEMA, "bench"))
    serial = one(Constraint("json", SCHEMA, "bench"), wait_forward=True)
    return {"unconstrained": free, "constrained": constrained, "constrained, forward waited for": serial,
            "overhead": constrained["ms_per_step"] / free["ms_per_step"] - 1,
            "overhead, forward waited for": serial["ms_per_step"] / free["ms_per_step"] - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=96, help="max_tokens per row")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    g = grammar_figures(get_tokenizer())
    for k, v in g.items():
        print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    if not args.skip_decode:
        d = decode_figures(args.preset, args.slots, args.tokens)
        for k in ("unconstrained", "constrained", "constrained, forward waited for"):
            print(k, {n: round(v, 3) if isinstance(v, float) else v for n, v in d[k].items()})
        print(f"decode step overhead, every row constrained: {100 * d['overhead']:+.1f}% "
              f"(forward waited for: {100 * d['overhead, forward waited for']:+.1f}%)")


if __name__ == "__main__":
    main()
