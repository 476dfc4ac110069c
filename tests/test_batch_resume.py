"""The Batch API survives kill -9: `pgpt-jax serve` in a subprocess is killed mid-batch and
started again on the same --batch-dir; the batch resumes, the lines finished before the kill
are not run again, and every custom_id appears exactly once in the output."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from test_server_helpers import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
LINES = 24


def start(port: int, batch_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "pgpt_jax.cli", "serve", "--model", "random:tiny", "--slots", "2",
         "--decode-steps", "2", "--port", str(port), "--batch-dir", str(batch_dir), "--batch-window", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finished_in_store(batch_dir: Path) -> int:
    db = sqlite3.connect(batch_dir / "batches.sqlite")
    try:
        return db.execute("SELECT COUNT(*) FROM lines WHERE ok IS NOT NULL").fetchone()[0]
    finally:
        db.close()


def test_a_batch_resumes_after_kill_9_without_running_finished_lines_again(tmp_path):
    batch_dir, port = tmp_path / "batches", free_port()
    url = f"http://127.0.0.1:{port}"
    body = {"model": "random:tiny", "prompt": "a", "max_tokens": 48, "logit_bias": {"50256": -100}}
    text = "\n".join(json.dumps({"custom_id": f"k{i}", "method": "POST", "url": "/v1/completions",
                                 "body": {**body, "seed": i}}) for i in range(LINES))
    proc = start(port, batch_dir)
    try:
        wait_until_ready(url, [proc], timeout=300)
        fid = httpx.post(url + "/v1/files", files={"file": ("in.jsonl", text.encode())},
                         data={"purpose": "batch"}).json()["id"]
        b = httpx.post(url + "/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/completions",
                                                  "completion_window": "24h"}).json()
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/v1/batches/{b['id']}").json()["request_counts"]["completed"] < 4:
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    before = finished_in_store(batch_dir)
    assert 4 <= before < LINES, "kill the server mid-batch"

    proc = start(port, batch_dir)
    try:
        wait_until_ready(url, [proc], timeout=300)
        deadline = time.monotonic() + 180
        while (done := httpx.get(f"{url}/v1/batches/{b['id']}").json())["status"] != "completed":
            assert time.monotonic() < deadline, done
            time.sleep(0.1)
        assert done["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
        out = [json.loads(x) for x in httpx.get(f"{url}/v1/files/{done['output_file_id']}/content").text.splitlines()]
        assert sorted(o["custom_id"] for o in out) == sorted(f"k{i}" for i in range(LINES))  # each once
        assert all(len(o["response"]["body"]["choices"][0]["text"]) > 0 for o in out)
        # This process ran only the lines that had not finished before the kill.
        ran = re.search(r'^pgpt_batch_lines_total\{outcome="ok"\} (\S+)$', httpx.get(url + "/metrics").text, re.M)
        assert ran is not None and float(ran.group(1)) == LINES - before
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
