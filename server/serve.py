"""`pgpt-jax serve`: load the model in the background, warm it up, and run uvicorn over the app.

SIGTERM or SIGINT drains (server/http.py): new requests get 503 while those in flight
finish, for up to --shutdown-timeout seconds; then what remains is ended and the process
exits with status 0.

Multi-host (--coordinator/--num-processes/--process-id, or --distributed): the CLI has
already joined the processes (`sharding.init_distributed`); every process loads the model
onto one mesh over all processes' devices; process 0 serves HTTP and broadcasts each
engine iteration's decisions, the others run the engine loop only and exit when process
0's engine stops.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

from pgpt_jax.request import Limits
from server.app import create_app
from server.http import DrainingServer, HTTPSettings, uvicorn_config

RANDOM_PREFIX = "random:"


def load_model_for_serving(source: Optional[str], dtype: Optional[str], mesh=None):
    """`--model` -> (model, a line saying what is served).

    `random:PRESET` serves random weights of a preset (benchmarks, smoke tests). When the
    embedded model is missing this refuses rather than quietly serving noise.
    """
    import pgpt_jax

    if source and source.startswith(RANDOM_PREFIX):
        preset = source[len(RANDOM_PREFIX):]
        model = pgpt_jax.init_model(preset, dtype=dtype, mesh=mesh)
        return model, f"RANDOM weights of the {preset!r} preset (its text is noise)"
    try:
        model = pgpt_jax.load_model(source, dtype=dtype, shardings=mesh)
    except Exception as exc:
        if source is None:
            raise RuntimeError(
                f"the embedded model could not be loaded ({exc}). Pass --model with an orbax "
                "checkpoint dir, an HF dir or hub id, or --model random:tiny (or random:gpt2) "
                "to serve random weights of a preset.") from exc
        raise
    return model, f"{source or 'the embedded model'} ({model.config.name}, {model.config.n_layer} layers)"


def default_model_name(source: Optional[str]) -> str:
    from pgpt_jax.checkpoint import EMBEDDED_NAME

    return EMBEDDED_NAME if source is None else source.rstrip("/")


def slots_for(model, args, mesh=None):
    """The slot plan (`devices.plan_slots`) for a loaded model and the flags --slots and
    --memory-fraction. Multi-host, every process runs process 0's count (the programs must
    match, and the memory each process sees in use may differ by a little)."""
    import dataclasses

    import jax

    from pgpt_jax import devices
    from pgpt_jax.prefix_cache import BLOCK_TOKENS

    shape = dict(mesh.shape) if mesh is not None else {}
    plan = devices.plan_slots(model.config, slots=args.slots, memory=devices.device_memory(),
                              fraction=getattr(args, "memory_fraction", devices.DEFAULT_MEMORY_FRACTION),
                              weight_bytes=devices.param_bytes(model), data=shape.get("data", 1),
                              pool_tokens=getattr(args, "prefix_cache_blocks", 0) * BLOCK_TOKENS,
                              model=shape.get("model", 1))
    if jax.process_count() > 1 and plan.how == "memory":
        from jax.experimental import multihost_utils

        plan = dataclasses.replace(plan, slots=int(multihost_utils.broadcast_one_to_all(plan.slots)))
    return plan


def _engine_from_args(args, mesh, limits: Limits, on_fatal=None):
    import jax

    from pgpt_jax import devices
    from pgpt_jax.engine import Engine
    from pgpt_jax.tokenizer import tokenizer_for

    dtype = args.dtype or devices.default_dtype(jax.default_backend())
    model, what = load_model_for_serving(args.model, dtype, mesh)
    try:
        plan = slots_for(model, args, mesh)
    except ValueError as e:
        raise SystemExit(f"pgpt-jax: {e}")
    print(f"pgpt-jax: {model.config.dtype} on {jax.default_backend()}; {plan.describe()}", file=sys.stderr, flush=True)
    try:
        engine = Engine(model, tokenizer_for(model.config), slots=plan.slots,
                        decode_steps=args.decode_steps or devices.default_decode_steps(jax.default_backend()),
                        limits=limits, mesh=mesh,
                        lockstep_timeout=args.lockstep_timeout, on_fatal=on_fatal,
                        batch_slack=getattr(args, "batch_slack", 1.25), xla_options=getattr(args, "xla_options", None),
                        prefix_cache_blocks=getattr(args, "prefix_cache_blocks", 0),
                        prefill_chunk=getattr(args, "prefill_chunk", 0),
                        speculative=getattr(args, "speculative", None))
    except ValueError as e:  # --prefill-chunk that is not a prompt bucket
        raise SystemExit(f"pgpt-jax: {e}")
    return engine, what


def _exit_broken_group(delay: float):
    """What a process does when its multi-host group breaks: exit non-zero, so that the
    orchestrator restarts the whole group (LeaderWorkerSet's recreate-group policy). Process 0
    first gives the event loop `delay` seconds to send every client its error."""
    def on_fatal(exc: BaseException) -> None:
        print(f"pgpt-jax: the multi-host group is broken ({exc}); exiting", file=sys.stderr, flush=True)
        timer = threading.Timer(delay, os._exit, args=(1,))
        timer.daemon = True
        timer.start()

    return on_fatal


def serve(args, mesh=None, limits: Limits = Limits()) -> None:
    """Listen at once, load and warm up in the background, then serve (see the module docstring)."""
    import jax

    if mesh is None and jax.process_count() > 1:
        from pgpt_jax import sharding

        mesh = sharding.make_mesh(model=1)  # every device on the data axis
    if jax.process_index() != 0:
        # A follower ends when process 0 says so (after its drain), or when the group breaks.
        # SIGTERM reaches every pod of a group at once: dying on it would cut process 0's drain.
        signal.signal(signal.SIGTERM, lambda *_: print("pgpt-jax: SIGTERM: this process stops with process 0",
                                                       file=sys.stderr, flush=True))
        engine, what = _engine_from_args(args, mesh, limits, on_fatal=_exit_broken_group(0.0))
        print(f"pgpt-jax: process {jax.process_index()} follows process 0 ({what})", file=sys.stderr, flush=True)
        engine.warmup(progress=False)
        engine.run_follower()
        return

    api_key = args.api_key or os.environ.get("PGPT_API_KEY") or None
    name = args.served_model_name or default_model_name(args.model)
    server: Optional[DrainingServer] = None

    def load():
        try:
            engine, what = _engine_from_args(args, mesh, limits, on_fatal=_exit_broken_group(2.0))
            print(f"pgpt-jax: serving {what} as {name!r}", file=sys.stderr, flush=True)
            secs = engine.warmup(progress=True, on_program=lambda done, total: setattr(app.state.pgpt, "warmup",
                                                                                      (done, total)))
            print(f"pgpt-jax: ready after {secs:.1f} s of warm-up (compiled {engine.compile_count} programs; "
                  f"{engine.options_note}); "
                  f"http://{args.host}:{args.port}/v1 {'(API key required)' if api_key else ''}",
                  file=sys.stderr, flush=True)
            return engine
        except BaseException:
            server.should_exit = True  # nothing to serve: stop listening, serve() reports why
            raise

    app = create_app(served_model_name=name, loader=load, api_key=api_key, max_body_bytes=args.max_body_bytes,
                     body_timeout=args.body_timeout, metrics_public=args.metrics_public,
                     stream_buffer=args.stream_buffer, shutdown_timeout=args.shutdown_timeout,
                     batch_dir=args.batch_dir or None, batch_window=args.batch_window,
                     max_file_bytes=args.max_file_bytes)
    http = HTTPSettings(limit_concurrency=args.limit_concurrency, timeout_keep_alive=args.timeout_keep_alive,
                        header_timeout=args.header_timeout)
    server = DrainingServer(uvicorn_config(app, args.host, args.port, http, log_level="info"),
                            drain=app.state.pgpt.drain)
    server.run()
    st = app.state.pgpt
    if st.load_error is not None:
        raise SystemExit(f"pgpt-jax serve: {st.load_error}")
    if st.engine is None:
        # Stopped during warm-up: the loader thread is inside XLA, and tearing the interpreter
        # down under it aborts the process. Nothing is in flight, so leave at once, cleanly.
        print("pgpt-jax: stopped during warm-up", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)
