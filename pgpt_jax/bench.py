"""`pgpt-jax bench`: compile time, prefill per bucket, decode tokens/s per slot count, TTFT, memory.

Every figure comes from the Engine the server uses (no separate fast path). Results are
printed as a table and as JSON lines. With `--compare hf` the same weights run in HF
transformers `generate` in the same process, and the ratios are printed.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time

import jax
import numpy as np

from pgpt_jax import xla_options
from pgpt_jax.devices import default_dtype
from pgpt_jax.engine import Engine
from pgpt_jax.programs import prefill
from pgpt_jax.model import init_model
from pgpt_jax.request import Delta, Request
from pgpt_jax.tokenizer import get_tokenizer

NO_EOS = {50256: -100.0}


def _emit(rows: list, out, **row) -> None:
    rows.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def _run_batch(engine: Engine, slots: int, prompt_len: int, new_tokens: int, **sampling) -> float:
    """Fills every slot with one request; returns generated tokens per second of wall time."""
    rng = np.random.default_rng(0)
    done = []
    for i in range(slots):
        prompt = rng.integers(0, 50000, prompt_len).tolist()
        engine.submit(Request(prompt=prompt, max_tokens=new_tokens, logit_bias=NO_EOS, seed=i, **sampling),
                      done.append)
    before = engine.generated_tokens
    t0 = time.perf_counter()
    engine.run_until_idle()
    dt = time.perf_counter() - t0
    assert len(done) == slots and not any(isinstance(d, Exception) for d in done), done
    return (engine.generated_tokens - before) / dt


def _ttft(engine: Engine, prompt_len: int) -> float:
    """Seconds from submit to the first streamed token, engine running in its thread."""
    first = threading.Event()
    finished = threading.Event()

    def cb(ev):
        if isinstance(ev, Delta):
            first.set()
        else:
            finished.set()

    engine.start()
    try:
        t0 = time.perf_counter()
        engine.submit(Request(prompt=[11] * prompt_len, max_tokens=2, stream=True, logit_bias=NO_EOS), cb)
        first.wait(120)
        t = time.perf_counter() - t0
        finished.wait(120)
    finally:
        engine.stop()
    return t


def _hf_tokens_per_s(model, slots: int, prompt_len: int, new_tokens: int, top_p: float) -> float | None:
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    from pgpt_jax.checkpoint import hf_state_dict

    cfg = model.config
    hf = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                    n_positions=cfg.n_positions, vocab_size=cfg.vocab_size))
    weights = {"transformer." + k: torch.from_numpy(np.array(v, np.float32)) for k, v in hf_state_dict(model).items()}
    hf.load_state_dict(weights, strict=False)  # lm_head.weight is tied to wte
    hf.eval()
    ids = torch.randint(0, 50000, (slots, prompt_len))
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
              do_sample=top_p < 1.0, top_p=top_p if top_p < 1.0 else None)
    with torch.inference_mode():
        hf.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        hf.generate(ids, **kw)
        return slots * new_tokens / (time.perf_counter() - t0)


def main(args, mesh=None) -> None:
    """`pgpt-jax bench` with parsed `args` on `mesh` (None: one device)."""
    out = open(args.json, "a") if args.json else None
    rows: list = []
    dtype = args.dtype or default_dtype(jax.default_backend()) or "float32"
    model = init_model(args.preset, dtype=dtype, mesh=mesh)
    tok = get_tokenizer()
    slot_counts = [int(s) for s in str(args.slots).split(",")]
    prompt_len = 32

    # Compile/warm-up time and prefill per bucket, on the smallest engine.
    options = getattr(args, "xla_options", None)
    eng = Engine(model, tok, slots=slot_counts[0], decode_steps=args.decode_steps, mesh=mesh, xla_options=options)
    t = eng.warmup(progress=True)
    _emit(rows, out, metric="warmup_s", value=round(t, 2), compiles=eng.compile_count)
    for b in eng.scheduler.buckets:
        tokens = np.zeros((1, b), np.int32)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = prefill(eng.graphdef, eng.params, eng.head, tokens, np.array([b], np.int32),
                          np.zeros((2,), np.int32), want_logprobs=False, top_k=eng.top_k, mesh=mesh)
            np.asarray(res[1])
            times.append(time.perf_counter() - t0)
        _emit(rows, out, metric="prefill_ms", bucket=b, value=round(1000 * min(times), 2))
    for n in (32, 512):
        if n <= eng.context_length:
            _emit(rows, out, metric="ttft_ms", prompt_tokens=n, value=round(1000 * _ttft(eng, n), 1))
    del eng

    for slots in slot_counts:
        eng = Engine(model, tok, slots=slots, decode_steps=args.decode_steps, mesh=mesh, xla_options=options)
        eng.choose_options()  # the option sets for this engine's row buckets (measured once per CPU)
        _emit(rows, out, metric="xla_options", slots=slots, value=xla_options.chosen_options()["decode"].get(slots)
              or xla_options.chosen_options()["default"])
        for mode, kw in (("greedy", dict(temperature=0.0)), ("top_p=0.9", dict(temperature=1.0, top_p=0.9))):
            _run_batch(eng, slots, prompt_len, 8, **kw)  # compiles what this shape needs
            rates = [_run_batch(eng, slots, prompt_len, args.new_tokens, **kw) for _ in range(2)]
            row = dict(metric="decode_tok_s", slots=slots, mode=mode, value=round(max(rates), 1))
            if args.compare == "hf":
                hf = _hf_tokens_per_s(model, slots, prompt_len, args.new_tokens, kw.get("top_p", 1.0))
                if hf is None:
                    print("--compare hf: torch/transformers not installed; skipped", file=sys.stderr)
                else:
                    row.update(hf_tok_s=round(hf, 1), ratio=round(row["value"] / hf, 2))
            _emit(rows, out, **row)
        del eng
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _emit(rows, out, metric="peak_rss_mb", value=round(peak_mb))

    print(f"\n{args.preset} {dtype}, prompt {prompt_len}, {args.new_tokens} new tokens, "
          f"decode_steps {args.decode_steps}")
    print(f"{'metric':<14} {'where':<22} {'value':>10} {'hf':>10} {'ratio':>7}")
    for r in rows:
        where = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("metric", "value", "hf_tok_s", "ratio"))
        print(f"{r['metric']:<14} {where:<22} {r['value']:>10} {r.get('hf_tok_s', ''):>10} {r.get('ratio', ''):>7}")
    if out is not None:
        out.close()
