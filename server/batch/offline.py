"""`pgpt-jax run-batch -i in.jsonl -o out.jsonl`: a batch file on the engine, with no HTTP.

The input and output lines are the Batch API's (lines.py); all output lines, answers and
errors alike, go to the one output file in the order they end, each flushed as it ends.
Resumable: the custom_ids already in the output file are skipped, so a run that was killed
goes on where it stopped when started again with the same files (a last line cut short by
the kill is dropped first). The engine runs in its own thread; this one keeps a window of
lines in flight and writes what ends.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import time
from typing import Optional, TextIO

from server.batch.lines import LineRun, read_input
from server.protocol import ModelInfo


def finished_ids(path: str) -> set[str]:
    """The custom_ids of the complete lines of a partial output file; cuts off a torn last line."""
    if not os.path.exists(path):
        return set()
    done, good = set(), 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the kill cut this line short
            try:
                done.add(json.loads(raw)["custom_id"])
            except (ValueError, KeyError, TypeError):
                break
            good += len(raw)
    if good != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def run_batch(engine, info: ModelInfo, input_path: str, output_path: str, *, window: Optional[int] = None,
              progress: bool = True, log: Optional[TextIO] = None) -> dict:
    """Runs every line of `input_path` not yet in `output_path` (see the module docstring);
    returns {"lines", "skipped", "ok", "failed", "tokens", "seconds", "tokens_per_s"}."""
    with open(input_path, "rb") as f:
        lines = read_input(f)
    skip = finished_ids(output_path)
    todo = [line for line, _ in lines if line.custom_id not in skip]
    window = window or 2 * engine.slots
    ended: queue.Queue = queue.Queue()
    stats = {"lines": len(lines), "skipped": len(lines) - len(todo), "ok": 0, "failed": 0, "tokens": 0}
    bar = _bar(len(lines), stats["skipped"]) if progress else None
    engine.start()
    t0 = time.perf_counter()
    flight = 0
    with open(output_path, "a", encoding="utf-8") as out:
        pending = iter(todo)
        while True:
            while flight < window:
                line = next(pending, None)
                if line is None:
                    break
                LineRun(line, info, ended.put).submit(engine)
                flight += 1
            if not flight:
                break
            run = ended.get()
            flight -= 1
            if run.lost:
                raise RuntimeError("the engine stopped; run the same command again to go on")
            out.write(json.dumps(run.format(), ensure_ascii=False, separators=(",", ":")) + "\n")
            out.flush()
            stats["ok" if run.ok else "failed"] += 1
            stats["tokens"] += run.tokens
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{stats['tokens'] / (time.perf_counter() - t0):.1f} tok/s", refresh=False)
    stats["seconds"] = time.perf_counter() - t0
    stats["tokens_per_s"] = stats["tokens"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    if bar is not None:
        bar.close()
    print(f"run-batch: {stats['ok']} ok, {stats['failed']} failed, {stats['skipped']} already done; "
          f"{stats['tokens']} tokens in {stats['seconds']:.1f} s ({stats['tokens_per_s']:.1f} tok/s)",
          file=log or sys.stderr)
    return stats


def _bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="req", dynamic_ncols=True)


def main(args, limits, mesh=None) -> dict:
    """`pgpt-jax run-batch`: load, warm up, run (the flags are serve's engine flags plus -i/-o)."""
    from server.serve import _engine_from_args, default_model_name

    engine, what = _engine_from_args(args, mesh, limits)
    name = args.served_model_name or default_model_name(args.model)
    print(f"run-batch: {what} as {name!r}; warming up", file=sys.stderr, flush=True)
    engine.warmup(progress=not args.no_progress)
    info = ModelInfo(name=name, vocab_size=engine.config.vocab_size, context_length=engine.context_length,
                     fim=bool(engine.config.fim), fim_order=engine.config.fim_order, limits=engine.limits,
                     tokenizer=engine.tokenizer)
    try:
        return run_batch(engine, info, args.input, args.output, window=args.window or None,
                         progress=not args.no_progress)
    except ValueError as err:  # a malformed input file: say which line
        raise SystemExit(f"pgpt-jax run-batch: {err}")
    finally:
        engine.stop()
