"""Run by tests/test_sharding.py: one of two processes (2 CPU devices each) forming a
4-device mesh with jax.distributed over gloo. Process 0 submits requests and prints the
results as JSON; process 1 follows process 0's broadcasts until process 0 stops.

usage: multihost_engine.py PORT PROCESS_ID   (or: multihost_engine.py single)
"""

import json
import os
import sys
import threading

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from pgpt_jax import sharding  # noqa: E402
from pgpt_jax.engine import Engine  # noqa: E402
from pgpt_jax.model import init_model  # noqa: E402
from pgpt_jax.request import Request  # noqa: E402
from pgpt_jax.tokenizer import get_tokenizer  # noqa: E402

REQUESTS = [
    Request(prompt=[464, 2068, 7586], max_tokens=8, temperature=0.0, logprobs=1, logit_bias={50256: -100.0}),
    Request(prompt=[15496, 11, 616, 1438], max_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=5,
            logit_bias={50256: -100.0}),
]


def main():
    if sys.argv[1] == "single":
        mesh, leader = None, True
    else:
        port, pid = sys.argv[1], int(sys.argv[2])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
        assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
        mesh, leader = sharding.make_mesh(data=2, model=2), pid == 0
    eng = Engine(init_model("tiny", seed=0, mesh=mesh), get_tokenizer(), slots=4, decode_steps=2, mesh=mesh)
    if not leader:
        eng.run_follower()  # returns when process 0 stops its engine
        print(json.dumps({"follower": "stopped"}))
        return
    results = [None] * len(REQUESTS)
    done = threading.Semaphore(0)

    def cb(i):
        return lambda ev: (results.__setitem__(i, ev), done.release())

    eng.start()
    for i, r in enumerate(REQUESTS):
        eng.submit(r, cb(i))
    for _ in REQUESTS:
        assert done.acquire(timeout=300)
    eng.stop()
    print(json.dumps([[{"tokens": c.token_ids, "logprobs": c.logprobs.token_logprobs if c.logprobs else None}
                       for c in r.choices] for r in results]))


main()
