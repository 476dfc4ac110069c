"""The results file and what is drawn from it: a JSON line per measurement written as the run
goes (Results), read back into medians over rounds (summarize), a table with the targets
(print_summary) and two PNGs (plot). `--plot-only` runs only this module's half."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from compare import COLORS, ENGINE_SYSTEMS, EXTRA, LABELS, SERVING_SYSTEMS, TOP_P, has, log, roofline


class Results:
    """The run's results file, one JSON object a line, flushed as each row is added."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w")  # one run per file: medians never mix two runs

    def add(self, **row) -> dict:
        # The 1-minute load average says when another process shared the cores during a figure.
        row.setdefault("load1", round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
        self.rows.append(row)
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        return row

    def skip(self, what: str, why: str) -> None:
        log(f"SKIPPED {what}: {why}")
        self.add(kind="skip", what=what, why=why)

    def close(self) -> None:
        self.f.close()


def simd(flags) -> str:
    """The widest vector/matrix unit, in words: "AMX", "AVX-512 BF16", "AVX-512", "AVX2", ..."""
    flags = set(flags or ())
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                       ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return name
    return "flags unknown"


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(rows: list[dict]) -> dict:
    """Medians over rounds: engine[(system, batch, mode)] = tok/s; serving[(system, C)] = {...}."""
    eng: dict = {}
    for r in rows:
        if r.get("kind") == "engine":
            eng.setdefault((r["system"], r["batch"], r["mode"]), []).append(r["tok_s"])
    srv: dict = {}
    for r in rows:
        if r.get("kind") == "serving":
            srv.setdefault((r["system"], r["concurrency"]), []).append(r)
    serving = {}
    for key, rs in srv.items():
        serving[key] = {"output_tokens_per_s": _median([r["output_tokens_per_s"] for r in rs]), "n": len(rs)}
        for m in ("ttft_ms", "tpot_ms"):
            serving[key][m] = {p: _median([r[m][p] for r in rs]) for p in ("p50", "p90", "p99")}
    roofs = [r for r in rows if r.get("kind") == "roofline"]
    roof = None
    if roofs:  # the best bandwidth and the best GEMM over the samples (start and end of the run)
        roof = dict(roofs[0], bw_gbs=max(r["bw_gbs"] for r in roofs),
                    peak_gflops=max(r["peak_gflops"] for r in roofs), samples=len(roofs))
        roof["bound_tok_s"] = {b: round(roofline.bound(int(b), roof["bw_gbs"], roof["peak_gflops"], roof["params"]), 1)
                               for b in roofs[0]["bound_tok_s"]}
    meta = next((r for r in rows if r.get("kind") == "meta"), {})
    return {"engine": {k: _median(v) for k, v in eng.items()}, "engine_n": {k: len(v) for k, v in eng.items()},
            "serving": serving, "roofline": roof, "meta": meta,
            "weights": next((r for r in rows if r.get("kind") == "weights"), None),
            "measurements": [r for r in rows if r.get("kind") in ("engine", "serving")],
            "peers": [r for r in rows if r.get("kind") == "peer"],
            "skips": [r for r in rows if r.get("kind") == "skip"],
            "errors": [r for r in rows if r.get("kind") == "error"]}


def _ratio(x, y) -> float | None:
    return round(x / y, 2) if x and y else None


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def print_summary(S: dict) -> list[str]:
    lines = []
    meta, roof = S["meta"], S["roofline"]
    lines.append(f"# {meta.get('date', '?')}  {meta.get('cpu', '?')} (family/model {meta.get('cpu_family_model')}, "
                 f"{simd(meta.get('cpu_flags'))}), {meta.get('cores', '?')} cores, "
                 f"{meta.get('mem_gib', '?')} GiB; preset {meta.get('preset')}, float32 unless named; "
                 f"medians of {meta.get('rounds')} round(s); load average at start {meta.get('load1')}")
    loads = [r["load1"] for r in S["measurements"] if r.get("load1") is not None]
    if loads and max(loads) > 0.5 * (meta.get("cores") or 1) + 1:
        lines.append(f"WARNING: 1-minute load average reached {max(loads)} during the run: another process "
                     "shared the cores (llama.cpp's spinning thread barrier suffers most); rerun on a quiet machine")
    if roof:
        lines.append(f"roofline: {roof['bw_gbs']} GB/s read, {roof['peak_gflops']} GFLOP/s fp32 GEMM, "
                     f"{roof['params'] / 1e6:.1f}M params ({roof['weight_bytes'] / 1e6:.0f} MB fp32): "
                     "bound min(B*BW/W, PEAK/(2P)) = "
                     + ", ".join(f"B={b}: {v}" for b, v in roof["bound_tok_s"].items()) + " tok/s")
    eng = S["engine"]
    if eng:
        systems = [s for s in ENGINE_SYSTEMS if any(k[0] == s for k in eng)]
        head = ["batch", "mode"] + [LABELS[s] for s in systems] + ["roofline", "vs HF fp32", "vs llama f32"]
        lines.append("")
        lines.append("engine, generated tokens/s (" + f"{meta.get('prompt_tokens')}-token prompts, "
                     f"{meta.get('new_tokens')} new tokens, EOS banned, prefill included)")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for b in sorted({k[1] for k in eng}):
            for mode in ("greedy", "top_p"):
                if not any(k[1] == b and k[2] == mode for k in eng):
                    continue
                vals = [eng.get((s, b, mode)) for s in systems]
                ours = eng.get(("pgpt", b, mode))
                bound = roof["bound_tok_s"].get(str(b), roof["bound_tok_s"].get(b)) if roof else None
                lines.append("| " + " | ".join([str(b), mode if mode == "greedy" else f"top_p {TOP_P}"]
                                               + [f"{v:.1f}" if v else "-" for v in vals]
                                               + [f"{bound}" if bound else "-",
                                                  _x(_ratio(ours, eng.get(("hf-float32", b, mode)))),
                                                  _x(_ratio(ours, eng.get(("llama-f32", b, mode))))]) + " |")
    srv = S["serving"]
    if srv:
        lines.append("")
        lines.append(f"serving, closed loop, streaming, {meta.get('prompt_tokens')}-token prompts, "
                     f"{meta.get('serving_output_tokens')} output tokens a request, EOS banned, temperature "
                     f"{meta.get('serving_temperature', 1.0)}")
        if meta.get("pgpt_args"):
            lines.append(f"  pgpt-jax: serve flags {meta['pgpt_args']}")
        for r in S["peers"]:
            lines.append(f"  {LABELS.get(r['system'], r['system'])}: {r.get('vllm')}, {r.get('torch')}, "
                         f"{r.get('transformers')}; dtype {r.get('dtype')}; flags {' '.join(r.get('flags', []))}; "
                         f"env {' '.join(f'{k}={v}' for k, v in (r.get('env') or {}).items())}; "
                         f"OpenMP binding: {r.get('binding') or '?'}")
        head = ["C", "system", "output tok/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
                "tok/s vs vLLM", "TTFT p50 vs vLLM", "tok/s vs llama f32"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for c in sorted({k[1] for k in srv}):
            for s in SERVING_SYSTEMS:
                v = srv.get((s, c))
                if not v:
                    continue
                ll, vl = srv.get(("llama-f32", c)), srv.get(("vllm", c))
                lines.append("| " + " | ".join([
                    str(c), LABELS[s], f"{v['output_tokens_per_s']:.1f}",
                    " / ".join(f"{v['ttft_ms'][p]:.0f}" for p in ("p50", "p90", "p99")),
                    " / ".join(f"{v['tpot_ms'][p]:.1f}" for p in ("p50", "p90", "p99")),
                    _x(_ratio(v["output_tokens_per_s"], vl and vl["output_tokens_per_s"])),
                    _x(_ratio(v["ttft_ms"]["p50"], vl and vl["ttft_ms"]["p50"])),
                    _x(_ratio(v["output_tokens_per_s"], ll and ll["output_tokens_per_s"]))]) + " |")
    # The targets, from this run's ratios.
    lines.append("")
    lines.append("targets (2-core CPU, float32, ratios from this run):")

    def target(name, value, goal, fmt="{:.2f}x"):
        got = "n/a (not measured)" if value is None else fmt.format(value)
        ok = "" if value is None else (" MET" if value >= goal else " MISSED")
        lines.append(f"  {name}: {got} (target >= {fmt.format(goal)}){ok}")

    target("batch-1 greedy decode vs llama.cpp f32", _ratio(eng.get(("pgpt", 1, "greedy")),
                                                            eng.get(("llama-f32", 1, "greedy"))), 1.0)
    target("batch-32 greedy decode vs HF transformers fp32", _ratio(eng.get(("pgpt", 32, "greedy")),
                                                                   eng.get(("hf-float32", 32, "greedy"))), 3.0)
    if any(k[0] == "pgpt-spec" for k in eng):  # issue 16: speculation on the repeating (greedy) case
        target("batch-1 greedy, speculative vs plain pgpt-jax", _ratio(eng.get(("pgpt-spec", 1, "greedy")),
                                                                     eng.get(("pgpt", 1, "greedy"))), 1.8)
        target("batch-1 greedy, speculative vs llama.cpp f32", _ratio(eng.get(("pgpt-spec", 1, "greedy")),
                                                                    eng.get(("llama-f32", 1, "greedy"))), 1.5)
    p32, l32, p1 = srv.get(("pgpt", 32)), srv.get(("llama-f32", 32)), srv.get(("pgpt", 1))
    target("serving at 32 streams vs llama.cpp server f32, output tok/s",
           _ratio(p32 and p32["output_tokens_per_s"], l32 and l32["output_tokens_per_s"]), 5.0)
    tp = _ratio(p32 and p32["tpot_ms"]["p50"], p1 and p1["tpot_ms"]["p50"])
    lines.append("  pgpt-jax p50 TPOT at 32 streams / at 1: "
                 + ("n/a (not measured)" if tp is None else
                    f"{p32['tpot_ms']['p50']:.1f} / {p1['tpot_ms']['p50']:.1f} ms = {tp:.2f}x (target <= 2.00x)"
                    + (" MET" if tp <= 2 else " MISSED")))
    for c in sorted({k[1] for k in srv if k[0] == "vllm"}):  # issue 20's targets against vLLM's CPU build
        ours, theirs = srv.get(("pgpt", c)), srv.get(("vllm", c))
        if ours and theirs:
            target(f"serving at {c} stream(s) vs vLLM CPU fp32, output tok/s",
                   _ratio(ours["output_tokens_per_s"], theirs["output_tokens_per_s"]), 1.5)
            t = _ratio(ours["ttft_ms"]["p50"], theirs["ttft_ms"]["p50"])
            lines.append(f"  p50 TTFT at {c} stream(s), pgpt-jax / vLLM CPU: "
                         + ("n/a" if t is None else f"{t:.2f}x (target <= 1.00x)" + (" MET" if t <= 1 else " MISSED")))
    for r in S["skips"]:
        lines.append(f"skipped {r['what']}: {r['why']}")
    for r in S["errors"]:
        lines.append(f"error in {r.get('phase')} {r.get('system', '')}: {str(r.get('error'))[:300]}")
    print("\n".join(lines), flush=True)
    return lines


def plot(S: dict, out_dir: Path) -> list[Path]:
    """docs-style PNGs: decode tokens/s vs batch with the roofline, and serving vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    sparse = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")  # minor ticks: 2s and 5s

    def log_axes(ax, xs) -> None:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)

    out_dir.mkdir(parents=True, exist_ok=True)
    meta, roof, eng, srv = S["meta"], S["roofline"], S["engine"], S["serving"]
    where = (f"{meta.get('cpu', '?')} ({simd(meta.get('cpu_flags'))}), {meta.get('cores', '?')} cores, "
             f"{str(meta.get('date', '?'))[:10]}"
             + (" (--quick smoke run)" if meta.get("quick") else ""))
    params = (S.get("weights") or {}).get("params")
    model = f"GPT-2 (preset {meta.get('preset')}" + (f", {params / 1e6:.0f}M params)" if params else ")")
    paths = []
    if eng or roof:
        fig, ax = plt.subplots(figsize=(11, 5.5))
        batches = sorted({k[1] for k in eng} | set(meta.get("batches") or []))
        for s in ENGINE_SYSTEMS:
            for mode, style in (("greedy", "-"), ("top_p", "--")):
                pts = sorted((b, v) for (sys_, b, m), v in eng.items() if sys_ == s and m == mode and v)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o" if mode == "greedy" else "s",
                            color=COLORS[s], label=f"{LABELS[s]}, {'greedy' if mode == 'greedy' else f'top_p {TOP_P}'}")
        if roof and batches:
            import numpy as np

            xs = np.geomspace(min(batches), max(batches), 100)
            ax.plot(xs, [roofline.bound(x, roof["bw_gbs"], roof["peak_gflops"], roof["params"]) for x in xs], "k-",
                    lw=2, alpha=0.6, label=f"roofline fp32: min(B·{roof['bw_gbs']:.0f} GB/s / "
                                           f"{roof['weight_bytes'] / 1e6:.0f} MB, {roof['peak_gflops']:.0f} GFLOP/s"
                                           f" / (2·{roof['params'] / 1e6:.0f}M))")
            ax.plot(xs, [roofline.bound(x, roof["bw_gbs"], roof["peak_gflops"], roof["params"], 2) for x in xs],
                    "k--", lw=1, alpha=0.4, label="roofline with 2-byte (f16) weights, for llama.cpp f16")
        log_axes(ax, batches)
        ax.set_xlabel("batch size (sequences decoded together)")
        ax.set_ylabel("generated tokens/s (prefill included)")
        ax.set_title(f"{model} decode: {meta.get('prompt_tokens')}-token prompt, "
                     f"{meta.get('new_tokens')} new tokens, EOS banned\n{where}", fontsize=10)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        p = out_dir / "compare_decode.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    if srv:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
        conc = sorted({k[1] for k in srv})
        for s in SERVING_SYSTEMS:
            pts = [(c, srv[(s, c)]) for c in conc if (s, c) in srv]
            if not pts:
                continue
            cs = [c for c, _ in pts]
            axes[0].plot(cs, [v["output_tokens_per_s"] for _, v in pts], "-o", color=COLORS[s], label=LABELS[s])
            for ax, m in ((axes[1], "ttft_ms"), (axes[2], "tpot_ms")):
                p50 = [v[m]["p50"] for _, v in pts]
                ax.plot(cs, p50, "-o", color=COLORS[s], label=f"{LABELS[s]} p50")
                ax.plot(cs, [v[m]["p90"] for _, v in pts], "--", color=COLORS[s], alpha=0.7, label=f"{LABELS[s]} p90")
                ax.plot(cs, [v[m]["p99"] for _, v in pts], ":", color=COLORS[s], alpha=0.7, label=f"{LABELS[s]} p99")
        for ax, ylabel in zip(axes, ("output tokens/s (all streams)", "time to first token (ms)",
                                     "time per output token (ms)")):
            log_axes(ax, conc)
            ax.set_xlabel("concurrent streams")
            ax.set_ylabel(ylabel)
        axes[0].legend(fontsize=8)
        axes[2].legend(fontsize=6.5)
        fig.suptitle(f"{model} serving (OpenAI Completions, streaming, closed loop): "
                     f"{meta.get('prompt_tokens')}-token prompts, {meta.get('serving_output_tokens')} output "
                     f"tokens a request\n{where}", fontsize=10)
        fig.tight_layout()
        p = out_dir / "compare_serving.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def report_and_plot(results: Path, plots_dir: Path) -> None:
    S = summarize(load_rows(results))
    print_summary(S)
    if not has("matplotlib"):
        log(f"SKIPPED plots: matplotlib not installed ({EXTRA})")
        return
    for p in plot(S, plots_dir):
        log(f"plot: {p}")
