"""`pgpt-jax serve` in a subprocess: SIGTERM mid-stream drains (new work 503, the stream ends with
[DONE], exit 0 within the shutdown timeout); a second signal is not needed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from test_server_helpers import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
SHUTDOWN_TIMEOUT = 3.0


def test_sigterm_mid_stream_drains_and_exits_zero():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpt_jax.cli", "serve", "--model", "random:tiny", "--slots", "2",
         "--decode-steps", "1", "--port", str(port), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, [proc], timeout=300)
        # 128 choices of ~127 tokens on 2 slots: far longer than the shutdown timeout.
        body = {"model": "random:tiny", "prompt": "a", "max_tokens": None, "n": 128, "stream": True,
                "logit_bias": {"50256": -100}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # The listener stays open while draining and /ready turns 503: polled, since a busy
            # machine may take a moment to run the handler, but well inside the drain.
            deadline = t0 + SHUTDOWN_TIMEOUT - 1.5
            while (ready := httpx.get(url + "/ready", timeout=5)).status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ready.status_code == 503 and "retry-after" in ready.headers
            refused = httpx.post(url + "/v1/completions", json={"model": "random:tiny", "prompt": "b"}, timeout=5)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_unavailable"
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][len("data: "):])["error"]
        assert err["code"] == "server_unavailable" and "shutting down" in err["message"]
        assert time.monotonic() - t0 >= SHUTDOWN_TIMEOUT - 0.5  # the stream had its time to finish
        assert proc.wait(timeout=SHUTDOWN_TIMEOUT + 15) == 0
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_during_warm_up_exits_zero_at_once():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "pgpt_jax.cli", "serve", "--model", "random:tiny",
                             "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # listening, still compiling
            try:
                r = httpx.get(url + "/health", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert httpx.get(url + "/ready", timeout=5).status_code == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stdout.read()[-2000:]
    finally:
        proc.kill()
        proc.wait()
