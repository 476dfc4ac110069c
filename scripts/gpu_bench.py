"""One prepared command for a lent accelerator: fast tests on it, our engine in bfloat16 against
HF transformers (torch, bfloat16) on the same device, and the HBM roofline; one JSON file out.

    python3 scripts/gpu_bench.py --out "$OUT/gpu_bench.json"          # on the device (~8 min)
    python3 scripts/gpu_bench.py --tiny --out /tmp/gpu_bench.json     # the same path on CPU, tiny shapes

What it does, in order, each step recorded in the JSON (written again after every step, so
a run cut short still leaves what it measured):

1. wheels: packages carried in `.whl/` (the device has no registry) are installed with
   `pip install --no-index --target` into a folder put first on the path (jax, flax,
   torch and transformers are already there; the server's starlette/uvicorn/pydantic are not);
2. tests: a fast subset of the suite (`FAST_TESTS`) under pytest, on the accelerator
   (JAX_PLATFORMS set to it: tests/conftest.py would pick the CPU otherwise);
3. bandwidth: the device's copy bandwidth, bytes read + written by a jitted `x + 1` over a
   large array (best of several);
4. for each preset (gpt2, gpt2-xl; random weights): our Engine (the server's) in bfloat16
   with as many slots as the largest batch and a 256-token context (`--context`; the
   runs need 160), its warm-up time and programs compiled, then
   decode tokens/s at each batch (batch requests of `--prompt` tokens each generating
   `--new-tokens`, the smaller batches on the occupied prefix of the slots, as in serving)
   and the programs compiled after warm-up (0 when the shapes are all warmed); then HF
   `generate` on the same shapes, with a static cache and plain (dynamic cache), greedy,
   its first call's time (torch.compile for the static cache) and tokens/s;
5. the roofline of each (preset, batch): a decode step reads every weight and the KV of
   the rows' contexts (the mean over the run: prompt + new_tokens / 2) once, so
   `tok/s <= batch * bandwidth / (weight bytes + KV bytes)`; each measured rate is also
   given as a fraction of it.

Arms run while `--budget-s` lasts (default 420 s, to fit an 8-minute device call with
start-up); an arm that would start past it is skipped with a note.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FAST_TESTS = ["tests/test_attention.py", "tests/test_devices.py", "tests/test_model.py", "tests/test_sampling.py"]
TINY_TESTS = ["tests/test_devices.py::test_default_dtype_by_backend"]
FULL = dict(presets=["gpt2", "gpt2-xl"], batches=[1, 8, 32, 128], prompt=32, new_tokens=128, context=256, bw_mib=2048,
            tests=FAST_TESTS, tests_timeout=150, engine={})
# Prompt buckets from 64 only: half the programs to compile (the CPU run is a rehearsal).
TINY = dict(presets=["tiny"], batches=[1, 2], prompt=8, new_tokens=8, context=128, bw_mib=16, tests=TINY_TESTS,
            tests_timeout=120, engine=dict(min_bucket=64))
DTYPE = "bfloat16"


class Run:
    """The JSON being built, written to `path` after every step, and the time budget."""

    def __init__(self, path: Path, budget_s: float):
        self.path, self.budget_s, self.t0 = path, budget_s, time.perf_counter()
        self.doc: dict = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "host": platform.node(), "skipped": [], "arms": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def has_time(self, what: str) -> bool:
        if self.elapsed() < self.budget_s:
            return True
        self.doc["skipped"].append(f"{what}: over the {self.budget_s:g} s budget at {self.elapsed():.0f} s")
        print(f"gpu_bench: skipped {what} (time budget)", flush=True)
        return False

    def save(self) -> None:
        self.doc["seconds"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        tmp.replace(self.path)


def install_wheels(folder: Path, target: Path) -> dict:
    """pip install --no-index --target the wheels in `folder` (when any); puts `target` first on the path."""
    wheels = sorted(glob.glob(str(folder / "*.whl")))
    if not wheels:
        return {"wheels": 0}
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                          "--target", str(target), *wheels], capture_output=True, text=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {"wheels": len(wheels), "rc": out.returncode, "tail": (out.stdout + out.stderr)[-1500:]}


def versions() -> dict:
    import jax

    dev = jax.devices()[0]
    env = {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
           "device": dev.device_kind, "devices": jax.device_count()}
    try:
        import torch
        import transformers

        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   torch_device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    except ImportError as e:
        env["torch"] = f"not installed ({e.name})"
    return env


def run_tests(files: list[str], timeout: float) -> dict:
    """The fast subset under pytest, on this process's JAX backend. float32 matmuls at full
    precision: the tests hold float32 results to 1e-5, and a GPU's default may be TF32."""
    import jax

    backend = jax.default_backend()
    env = {**os.environ, "JAX_PLATFORMS": {"gpu": "cuda"}.get(backend, backend),
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    # -n 0: in this one process (the suite's default is xdist workers, each of which would claim the accelerator).
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *files]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = out.returncode, (out.stdout + out.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stdout or "")[-3000:]
    return {"files": files, "jax_platforms": env["JAX_PLATFORMS"], "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


def copy_bandwidth(mib: int) -> dict:
    """Device copy bandwidth in GB/s: bytes read + written by a jitted x + 1 (best of 10)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return {"copy_gbs": round(2 * x.nbytes / best / 1e9, 1), "array_mib": mib}


def roofline(cfg, batch: int, context: float, bw_gbs: float, weight_bytes: int, itemsize: int = 2) -> dict:
    """The decode bound at `batch` rows of `context` tokens each (see the module docstring)."""
    kv = 2 * cfg.n_layer * batch * context * cfg.n_embd * itemsize
    step = weight_bytes + kv
    return {"weight_bytes": weight_bytes, "kv_bytes": int(kv), "roofline_tok_s": round(batch * bw_gbs * 1e9 / step, 1)}


def param_count(cfg) -> int:
    """Parameters of a model of `cfg`'s shape (its padded vocabulary included), from shapes alone."""
    import math

    import jax
    from flax import nnx

    from pgpt_jax.model import GPT

    abstract = nnx.state(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return sum(math.prod(a.shape) for a in jax.tree.leaves(abstract))


def ours(run: Run, preset: str, batches: list[int], prompt: int, new_tokens: int, context: int,
         **engine_args) -> dict:
    """Our Engine in bfloat16 with max(batches) slots and a `context`-token context, warmed up
    once (every program a server of that shape compiles), then each batch. A batch runs the
    decode program of the smallest row bucket that holds it (`rows` in its result), as in serving."""
    from pgpt_jax.config import GPTConfig

    from pgpt_jax import devices
    from pgpt_jax.bench import _run_batch
    from pgpt_jax.engine import Engine
    from pgpt_jax.model import init_model
    from pgpt_jax.tokenizer import get_tokenizer

    model = init_model(GPTConfig.preset(preset, n_positions=context), dtype=DTYPE)
    arm = {"system": "pgpt-jax", "preset": preset, "dtype": DTYPE, "weight_bytes": devices.param_bytes(model),
           "slots": max(batches), "context": context, "results": []}
    eng = Engine(model, get_tokenizer(), slots=max(batches), decode_steps=8, **engine_args)
    arm["warmup_s"] = round(eng.warmup(), 2)
    arm["warmup_compiles"] = warm = eng.compile_count
    for batch in batches:
        if not run.has_time(f"pgpt-jax {preset} batch {batch}"):
            break
        t0 = time.perf_counter()
        _run_batch(eng, batch, prompt, 8, temperature=0.0)  # first call of this shape
        first = time.perf_counter() - t0
        rates = [_run_batch(eng, batch, prompt, new_tokens, temperature=0.0) for _ in range(2)]
        rows = next(r for r in eng.scheduler.row_buckets if r >= batch)
        arm["results"].append({"batch": batch, "rows": rows, "tok_s": round(max(rates), 1),
                               "first_call_s": round(first, 2)})
        print(f"gpu_bench: pgpt-jax {preset} batch {batch}: {max(rates):.1f} tok/s", flush=True)
    arm["compiles_after_warmup"] = eng.compile_count - warm
    return arm


def hf(run: Run, cfg, batches: list[int], prompt: int, new_tokens: int, mode: str) -> dict:
    """HF transformers GPT2LMHeadModel (random weights, same shapes) in torch bfloat16, greedy
    `generate`; mode "static" (a static cache, which generate compiles) or "plain"."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: gpt2-xl's random init on the host takes long
        model = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                           n_positions=cfg.n_positions, vocab_size=cfg.vocab_size))
    model = model.to(torch.bfloat16).eval()
    arm = {"system": "hf-torch", "mode": mode, "preset": cfg.name, "dtype": DTYPE, "device": device,
           "torch": torch.__version__, "results": []}
    extra = {"cache_implementation": "static"} if mode == "static" else {}

    def generate(ids, n):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, **extra)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        for batch in batches:
            if not run.has_time(f"hf-torch {mode} {cfg.name} batch {batch}"):
                break
            ids = torch.randint(0, 50000, (batch, prompt), device=device)
            try:
                t0 = time.perf_counter()
                generate(ids, new_tokens)  # first call: compiles (static) and warms up
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                generate(ids, new_tokens)
                rate = batch * new_tokens / (time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001  (an arm that fails is a finding, not a crash)
                arm["results"].append({"batch": batch, "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            arm["results"].append({"batch": batch, "tok_s": round(rate, 1), "first_call_s": round(first, 2)})
            print(f"gpu_bench: hf-torch {mode} {cfg.name} batch {batch}: {rate:.1f} tok/s", flush=True)
    return arm


def add_roofline(run: Run, cfg, batches: list[int], prompt: int, new_tokens: int) -> None:
    """Roofline rows for a preset, and each measured rate's fraction of its bound."""
    bw = run.doc["bandwidth"]["copy_gbs"]
    weights = param_count(cfg) * 2  # bfloat16
    bounds = {b: roofline(cfg, b, prompt + new_tokens / 2, bw, weights) for b in batches}
    run.doc.setdefault("roofline", {})[cfg.name] = {str(b): r for b, r in bounds.items()}
    for arm in run.doc["arms"]:
        if arm["preset"] == cfg.name:
            for r in arm["results"]:
                if "tok_s" in r:
                    r["of_roofline"] = round(r["tok_s"] / bounds[r["batch"]]["roofline_tok_s"], 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_bench.json"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the whole path in well under a minute on CPU")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no arm after this many seconds")
    p.add_argument("--presets", default=None, help="comma-separated (default: gpt2,gpt2-xl; tiny with --tiny)")
    p.add_argument("--batches", default=None, help="comma-separated (default: 1,8,32,128)")
    p.add_argument("--context", type=int, default=None,
                   help="our engine's context length (default 256: the runs need prompt + new tokens = 160; "
                        "a longer one adds programs to warm up, not work to a step)")
    p.add_argument("--no-tests", action="store_true")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--wheels", default=str(REPO / ".whl"), help="carried wheels to install first (if any)")
    args = p.parse_args(argv)
    plan = dict(TINY if args.tiny else FULL)
    if args.presets:
        plan["presets"] = args.presets.split(",")
    if args.batches:
        plan["batches"] = [int(b) for b in args.batches.split(",")]
    if args.context:
        plan["context"] = args.context

    run = Run(Path(args.out), args.budget_s)
    run.doc["plan"] = {k: v for k, v in plan.items()}
    run.doc["install"] = install_wheels(Path(args.wheels), Path("/tmp/pgpt_site"))
    run.doc["env"] = versions()
    run.save()
    if not args.no_tests:
        run.doc["tests"] = run_tests(plan["tests"], plan["tests_timeout"])
        print(f"gpu_bench: tests rc={run.doc['tests']['rc']} in {run.doc['tests']['seconds']} s", flush=True)
        run.save()
    run.doc["bandwidth"] = copy_bandwidth(plan["bw_mib"])
    print(f"gpu_bench: copy bandwidth {run.doc['bandwidth']['copy_gbs']} GB/s", flush=True)
    run.save()

    from pgpt_jax.config import GPTConfig

    hf_ok = not args.no_hf and _has("torch") and _has("transformers")
    if not hf_ok and not args.no_hf:
        run.doc["skipped"].append("hf-torch: torch or transformers not installed")
    for preset in plan["presets"]:
        cfg = GPTConfig.preset(preset)
        shape = (plan["batches"], plan["prompt"], plan["new_tokens"])
        if run.has_time(f"pgpt-jax {preset}"):
            run.doc["arms"].append(ours(run, preset, *shape, plan["context"], **plan["engine"]))
            run.save()
        for mode in ("static", "plain") if hf_ok else ():
            if run.has_time(f"hf-torch {mode} {preset}"):
                run.doc["arms"].append(hf(run, cfg, *shape, mode))
                run.save()
                _free_torch_memory()
        add_roofline(run, cfg, *shape)
        run.save()
    print(f"gpu_bench: wrote {run.path} after {run.elapsed():.0f} s", flush=True)
    return 0


def _free_torch_memory() -> None:
    """The last HF model's blocks back to the device (JAX's arms allocate from their own pool)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
