"""Run by tests/test_prefix_cache.py: the prefix cache on a 4-device mesh (data=2, model=2), in one
process or in N processes over gloo (process 0 decides hits; the others replay its ops).

Process 0 runs the same requests (prompts sharing a 3-block prefix, greedy and seeded, n=2)
on an engine without the cache, then twice on one with it (hits inside one plan, then across
plans), then on one with the cache and chunked prefill (chunks of 32: the 100-token prompts
in 3 or 4 `Extend` ops), and prints the tokens and logprobs of each as JSON. The others follow.

usage: prefix_cache_mesh.py single | PORT PROCESS_ID NUM_PROCESSES
"""

import json
import os
import sys
import threading

NUM = 1 if sys.argv[1] == "single" else int(sys.argv[3])
# Forced CPU devices, added to the suite's XLA_FLAGS (tests/conftest.py).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={4 // NUM}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pgpt_jax import sharding  # noqa: E402
from pgpt_jax.engine import Engine  # noqa: E402
from pgpt_jax.model import init_model  # noqa: E402
from pgpt_jax.request import Delta, Request, Result  # noqa: E402
from pgpt_jax.tokenizer import get_tokenizer  # noqa: E402

NO_EOS = {50256: -100.0}
BASE = [int(t) for t in np.random.default_rng(0).integers(100, 5000, size=100)]


def requests():
    kw = dict(max_tokens=5, logit_bias=NO_EOS, logprobs=1)
    return [Request(prompt=BASE + [7, 8, 9], temperature=0.0, **kw),
            Request(prompt=BASE + [11] * 9, temperature=1.0, seed=3, n=2, **kw),
            Request(prompt=BASE[:64], temperature=0.0, **kw),
            Request(prompt=BASE[:40], temperature=0.9, seed=4, **kw)]


def run(eng: Engine) -> list:
    out, done = [None] * 4, threading.Semaphore(0)

    def cb(i):
        def f(ev):
            if not isinstance(ev, Delta):
                out[i] = ([(c.token_ids, c.logprobs.token_logprobs) for c in ev.choices]
                          if isinstance(ev, Result) else repr(ev))
                done.release()
        return f

    for i, r in enumerate(requests()):
        eng.submit(r, cb(i))
    for _ in out:
        assert done.acquire(timeout=600)
    return out


def main() -> None:
    if NUM > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=NUM, process_id=int(sys.argv[2]))
    mesh = sharding.make_mesh(data=2, model=2)
    model = init_model("tiny", seed=0, mesh=mesh)
    engines = {}
    for blocks, chunk in ((0, 0), (16, 0), (16, 32)):
        eng = Engine(model, get_tokenizer(), slots=4, decode_steps=2, mesh=mesh, prefix_cache_blocks=blocks,
                     lockstep_timeout=600, prefill_chunk=chunk)
        if NUM == 1:  # multi-process: programs compile while serving (as tests/workers/multihost_engine.py)
            eng.warmup()
        engines[blocks, chunk] = eng
    if jax.process_index() != 0:
        for key in ((0, 0), (16, 0), (16, 32)):
            engines[key].run_follower()  # returns when process 0 stops that engine
        print(json.dumps({"follower": "stopped"}), flush=True)
        return
    result, counts = {}, {}
    for key, names in (((0, 0), ["off"]), ((16, 0), ["on", "on_again"]), ((16, 32), ["chunked"])):
        eng = engines[key]
        count = counts[key] = eng.compile_count
        eng.start()
        try:
            for name in names:
                result[name] = run(eng)
        finally:
            eng.stop()
    result["hit_blocks"] = engines[16, 0].prefix_cache.hit_blocks
    result["compiles_after_warmup"] = engines[16, 0].compile_count - counts[16, 0] if NUM == 1 else None
    result["chunked_compiles_after_warmup"] = engines[16, 32].compile_count - counts[16, 32] if NUM == 1 else None
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
