"""`pgpt-jax serve | run-batch | generate | convert | bench`: argument parsing, and the top of the import graph.

Each command lives in its own module; this file only maps flags onto them. Nothing imports
this module, so it may import anything (the server included).
"""

from __future__ import annotations

import argparse
import sys

from pgpt_jax.request import LOGPROBS_MODES, Limits

LIMITS = Limits()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="orbax dir, HF dir, HF hub id, or embedded model name (default: the embedded model)")
    p.add_argument("--dtype", default=None,
                   help="compute/param/KV dtype (default: bfloat16 on GPU/TPU, the model's own, float32, on CPU)")
    p.add_argument("--mesh", default=None, help="data=D,model=M over all devices (default: one device)")
    _add_cache_args(p)


def _add_options_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--xla-options", default="auto", metavar="SET",
                   help="XLA:CPU compiler options: auto (measure each set at warm-up, remembered per CPU beside "
                        "the compile cache) or a set: xla-default, no-ynn-fusion")


def _add_slots_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slots", type=int, default=None,
                   help="sequences decoded at once (default: as many as --memory-fraction of the device holds, "
                        "at most 256; 32 where the device reports no memory, as CPUs)")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of the device memory JAX may use that the model, its programs and the KV cache "
                        "take, when sizing --slots (like vLLM's gpu_memory_utilization; default %(default)s)")


DEFAULT_PREFIX_CACHE_BLOCKS = 256  # 8192 tokens; see docs/operating.md, "Prefix cache"


def _add_prefix_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-cache-blocks", type=int, default=DEFAULT_PREFIX_CACHE_BLOCKS, metavar="N",
                   help="KV of N whole 32-token prompt blocks kept on the device for prompts that share a "
                        "prefix (0: no prefix cache; default %(default)s, 8 contexts of 1024 tokens)")


DEFAULT_PREFILL_CHUNK = 256  # see docs/operating.md, "Chunked prefill"


def _add_prefill_chunk_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help="prefill prompts longer than N tokens N tokens an engine iteration, beside the running "
                        "streams' decode (a prompt bucket: 16, 32, 64, ...; 0, or the context length or "
                        "more: every prompt whole; default %(default)s)")


def _speculative(text: str):
    from pgpt_jax import ngram

    try:
        return ngram.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_speculative_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", type=_speculative, default=None, metavar="ngram:K[:MIN-MAX]",
                   help="speculative decoding without a draft model: each row proposes up to K tokens that "
                        "followed an earlier occurrence of its last MIN..MAX tokens (default 1-3) and one "
                        "forward pass checks them; outputs are unchanged (docs/architecture.md; default: off)")


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache (default: $JAX_COMPILATION_CACHE_DIR if set, "
                        "else ~/.cache/pgpt-jax/xla/<cpu>)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile everything at every start (also when JAX_COMPILATION_CACHE_DIR is set)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgpt-jax", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", allow_abbrev=False, help="convert an HF GPT-2 checkpoint (dir or hub id) to an orbax checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    p = sub.add_parser("serve", allow_abbrev=False, help="serve the OpenAI-compatible API")
    _add_model_args(p)
    _add_options_arg(p)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="also read from PGPT_API_KEY")
    _add_slots_args(p)
    _add_prefix_cache_arg(p)
    _add_prefill_chunk_arg(p)
    _add_speculative_arg(p)
    p.add_argument("--decode-steps", type=int, default=None,
                   help="decode steps a call (default: 1 on CPU, 4 on GPU/TPU; the planner runs 1 near a "
                        "row's end or while work waits)")
    p.add_argument("--max-logprobs", type=int, default=LIMITS.max_logprobs)
    p.add_argument("--logprobs-mode", choices=LOGPROBS_MODES, default=LIMITS.logprobs_mode,
                   help="logprobs of sampled tokens for requests that do not say (docs/api.md)")
    g = p.add_argument_group("admission, deadlines and drain (docs/operating.md)")
    g.add_argument("--max-queue", type=int, default=LIMITS.max_queue, help="choices waiting for a slot")
    g.add_argument("--max-queued-tokens", type=int, default=LIMITS.max_queued_tokens,
                   help="prompt + max_tokens over waiting choices (default: 8 x slots x context)")
    g.add_argument("--max-prompts", type=int, default=LIMITS.max_prompts, help="prompts in one request")
    g.add_argument("--max-choices", type=int, default=LIMITS.max_choices, help="prompts x best_of in one request")
    g.add_argument("--request-timeout", type=float, default=None, help="seconds a whole request may take")
    g.add_argument("--queue-timeout", type=float, default=None, help="seconds a request may wait for a slot")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds requests in flight may take to finish")
    g = p.add_argument_group("HTTP")
    g.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    g.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request body")
    g.add_argument("--header-timeout", type=float, default=10.0, help="seconds to receive a request head")
    g.add_argument("--timeout-keep-alive", type=float, default=5.0, help="seconds an idle connection stays open")
    g.add_argument("--limit-concurrency", type=int, default=512, help="connections and requests at once")
    g.add_argument("--stream-buffer", type=int, default=256,
                   help="events a stream may hold for a slow reader before it is aborted")
    g.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    g = p.add_argument_group("Batch API (docs/api.md)")
    g.add_argument("--batch-dir", default=default_batch_dir(), metavar="DIR",
                   help="the Batch API's files and SQLite state (default: %(default)s); '' turns the Batch API off")
    g.add_argument("--batch-window", type=int, default=0,
                   help="batch lines on the engine at once (default 0: twice --slots)")
    g.add_argument("--max-file-bytes", type=int, default=200 * 1024 * 1024, help="the largest batch input file")
    g.add_argument("--batch-slack", type=float, default=1.25,
                   help="while interactive work runs, batch rows may make a decode call at most this many "
                        "times slower (measured at warm-up); 1 keeps batch work to rows computed anyway")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0's coordinator")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host with no arguments (TPU pods: jax.distributed.initialize() finds them)")
    p.add_argument("--lockstep-timeout", type=float, default=30.0,
                   help="multi-host: seconds an iteration may hang before the group counts as broken "
                        "(every process then exits non-zero, for the orchestrator to restart the group)")

    p = sub.add_parser("run-batch", allow_abbrev=False,
                       help="run a Batch API input file (JSONL) on the engine, no HTTP; resumable")
    _add_model_args(p)
    _add_options_arg(p)
    p.add_argument("-i", "--input", required=True, help="input JSONL: {custom_id, method, url, body} a line")
    p.add_argument("-o", "--output", required=True,
                   help="output JSONL (appended; the custom_ids already in it are skipped)")
    p.add_argument("--served-model-name", default=None, help="the name the lines' `model` must give")
    _add_slots_args(p)
    _add_prefix_cache_arg(p)
    _add_prefill_chunk_arg(p)
    _add_speculative_arg(p)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--max-logprobs", type=int, default=LIMITS.max_logprobs)
    p.add_argument("--window", type=int, default=0, help="lines on the engine at once (default 0: twice --slots)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(lockstep_timeout=30.0)

    p = sub.add_parser("generate", allow_abbrev=False, help="complete a prompt from the command line")
    _add_model_args(p)
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)

    p = sub.add_parser("bench", allow_abbrev=False, help="compile, prefill and decode benchmarks (JSON lines + table)")
    p.add_argument("--mesh", default=None, help="data=D,model=M over all devices (default: one device)")
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--slots", default="1,8,32,64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--compare", default=None, help="hf: also run HF transformers on the same weights")
    p.add_argument("--json", default=None, help="append JSON lines to this file")
    _add_options_arg(p)
    _add_cache_args(p)
    return parser


def default_batch_dir() -> str:
    """$XDG_STATE_HOME (or ~/.local/state)/pgpt-jax/batches: job state outlives caches."""
    import os

    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "pgpt-jax", "batches")


def compile_cache_from_args(args) -> None:
    """The persistent compilation cache: in --compile-cache, else in JAX's own
    JAX_COMPILATION_CACHE_DIR where the environment sets it, else in the per-CPU directory
    under ~/.cache/pgpt-jax; --no-compile-cache turns it off, JAX's variable too."""
    if not hasattr(args, "no_compile_cache"):  # a command without the cache flags
        return
    import os

    from pgpt_jax import xla_options

    if args.no_compile_cache:
        xla_options.no_compile_cache()
        return
    directory = args.compile_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    xla_options.use_compile_cache(directory or xla_options.default_compile_cache_dir())


def limits_from_args(args) -> Limits:
    """The Limits table with the flags that set its fields (flag names are field names)."""
    import dataclasses

    return Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits) if hasattr(args, f.name)})


def mesh_from_args(args):
    """The --mesh flag -> a jax Mesh (None without the flag); a clear exit when it cannot fit."""
    from pgpt_jax import sharding

    try:
        return sharding.mesh_from_flag(getattr(args, "mesh", None))
    except ValueError as e:
        raise SystemExit(f"pgpt-jax: {e}")


def _generate(args) -> None:
    """`pgpt-jax generate PROMPT`: prints each choice."""
    import jax

    from pgpt_jax.checkpoint import load_model
    from pgpt_jax.devices import default_dtype
    from pgpt_jax.generate import generate

    mesh = mesh_from_args(args)
    model = load_model(args.model, dtype=args.dtype or default_dtype(jax.default_backend()), shardings=mesh)
    slots = 8 if mesh is None else max(8, mesh.shape["data"])
    for c in generate(model, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                      top_p=args.top_p, n=args.n, seed=args.seed, slots=slots, mesh=mesh):
        print(f"--- choice {c.index} ({c.finish_reason})")
        print(args.prompt + c.text)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    compile_cache_from_args(args)
    if args.command == "convert":
        from pgpt_jax.checkpoint import convert

        convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    elif args.command == "serve":
        from pgpt_jax import sharding
        from server.serve import serve

        # Before anything touches a device: a multi-host run must join the others first.
        sharding.init_distributed(args.coordinator, args.num_processes, args.process_id, args.distributed)
        serve(args, mesh=mesh_from_args(args), limits=limits_from_args(args))
    elif args.command == "run-batch":
        from server.batch.offline import main as run_batch_main

        run_batch_main(args, limits_from_args(args), mesh_from_args(args))
    elif args.command == "generate":
        _generate(args)
    elif args.command == "bench":
        from pgpt_jax.bench import main as bench_main

        bench_main(args, mesh=mesh_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
