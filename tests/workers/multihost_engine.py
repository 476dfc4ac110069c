"""Run by tests/test_sharding.py: one of N processes forming one mesh with jax.distributed over gloo
(or one process alone). Process 0 runs a scenario and prints its outcomes as JSON; the others
replay process 0's ops until it stops.

The scenario, one batch in flight at once: a greedy request cut by a stop string, a seeded
top_p request with n=2, a stream aborted (as by a client that leaves) after its third delta, a
stream whose deadline passes after its second delta, a greedy request with logprobs, and a
seeded request constrained by a regex (its masks travel in a second broadcast). Every
decision is process 0's, so the outcomes must equal the single-process run's. With
PGPT_TEST_SPECULATIVE (e.g. ngram:2) the engines speculate (Verify ops broadcast like any
other): the outcomes must still equal the single-process run's without it.

usage: multihost_engine.py single | PORT PROCESS_ID NUM_PROCESSES
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

from pgpt_jax import sharding  # noqa: E402
from pgpt_jax.engine import Engine  # noqa: E402
from pgpt_jax.model import init_model  # noqa: E402
from pgpt_jax.request import Constraint, Delta, Request, Result  # noqa: E402
from pgpt_jax.tokenizer import get_tokenizer  # noqa: E402

NO_EOS = {50256: -100.0}
A, B = [464, 2068, 7586], [15496, 11, 616, 1438]


def outcome(event) -> dict:
    if isinstance(event, Result):
        return {"result": [{"tokens": c.token_ids, "finish": c.finish_reason,
                            "logprobs": c.logprobs.token_logprobs if c.logprobs else None} for c in event.choices]}
    return {"error": type(event).__name__, "where": getattr(event, "where", None)}


def scenario(eng: Engine) -> dict:
    done, out, handles = threading.Semaphore(0), {}, {}

    def final(name):
        def cb(ev):
            if not isinstance(ev, Delta):
                out[name] = outcome(ev)
                done.release()
        return cb

    def run(requests: dict) -> None:
        for name, (request, cb) in requests.items():
            handles[name] = eng.submit(request, cb or final(name))
        for _ in [n for n, (_, cb) in requests.items() if cb is None or n == "deadline"]:
            assert done.acquire(timeout=300)

    run({"base": (Request(prompt=A, max_tokens=12, temperature=0.0, logit_bias=NO_EOS), None)})
    text = get_tokenizer().decode(out["base"]["result"][0]["tokens"])
    stop = text[len(text) // 2: len(text) // 2 + 3]
    deltas = {"abort": 0, "deadline": 0}

    def abort_after_three(ev):
        if isinstance(ev, Delta):
            deltas["abort"] += 1
            if deltas["abort"] == 3:
                handles["abort"].abort()  # a client that leaves mid-stream

    def expire_after_two(ev):
        if isinstance(ev, Delta):
            deltas["deadline"] += 1
            if deltas["deadline"] == 2:
                handles["deadline"]._entry.deadline = 0.0  # its deadline passes now
        else:
            final("deadline")(ev)

    run({
        "stop": (Request(prompt=A, max_tokens=12, temperature=0.0, stop=[stop], logit_bias=NO_EOS), None),
        "top_p": (Request(prompt=B, max_tokens=10, temperature=1.0, top_p=0.9, n=2, seed=5, logit_bias=NO_EOS), None),
        "abort": (Request(prompt=B, max_tokens=None, stream=True, seed=1, logit_bias=NO_EOS), abort_after_three),
        "deadline": (Request(prompt=A, max_tokens=None, stream=True, seed=2, logit_bias=NO_EOS), expire_after_two),
        "logprobs": (Request(prompt=B, max_tokens=8, temperature=0.0, logprobs=1, logit_bias=NO_EOS), None),
        "loop": (Request(prompt=[7] * 6, max_tokens=10, temperature=0.0, logit_bias={7: 50.0}), None),  # accepted
        "regex": (Request(prompt=A, max_tokens=8, temperature=1.0, seed=3, n=2,
                          constraint=Constraint("regex", "[ab]{1,5}", "structured_outputs.regex")), None),
    })
    for _ in range(100):  # the abort ends it at process 0's next iteration
        if handles["abort"].done:
            break
        threading.Event().wait(0.1)
    out["abort"] = {"aborted": handles["abort"].done and "abort" not in out}
    out["stop_string"] = stop
    return out


def main():
    if sys.argv[1] == "single":
        mesh, leader = None, True
    else:
        port, pid = sys.argv[1], int(sys.argv[2])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=NUM, process_id=pid)
        assert len(jax.devices()) == 4 and len(jax.local_devices()) == 4 // NUM
        mesh, leader = sharding.make_mesh(data=2, model=2), pid == 0
    # No warm-up here: programs compile while serving, longer than a lockstep timeout allows.
    # Two slots, one decode step: few programs to compile (each process compiles each one).
    eng = Engine(init_model("tiny", seed=0, mesh=mesh), get_tokenizer(), slots=2, decode_steps=1, mesh=mesh,
                 lockstep_timeout=600, speculative=os.environ.get("PGPT_TEST_SPECULATIVE"))
    if not leader:
        eng.run_follower()  # returns when process 0 stops its engine
        print(json.dumps({"follower": "stopped"}))
        return
    eng.start()
    try:
        result = scenario(eng)
    finally:
        eng.stop()
    result["speculated"] = [eng.spec_proposed_tokens, eng.spec_accepted_tokens]
    print(json.dumps(result))


main()
