"""The inputs every system shares, built once and cached in the work dir: random GPT-2 weights as
an HF dir (with the vocab.json/merges.txt a GGUF converter needs), and the GGUF files made from it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from compare import log


def gpt2_tokenizer_files(out_dir: Path) -> None:
    """Writes vocab.json and merges.txt (HF's byte-level BPE files) rebuilt from gpt2.tiktoken.

    The ranks are the vocabulary (each token's bytes spelled with GPT-2's byte-to-unicode map);
    merge number r - 256 forms the token of rank r from the two lower-ranked tokens that BPE
    reaches when it may only use merges below r.
    """
    from pgpt_jax.config import EOS_ID
    from pgpt_jax.tokenizer import ENDOFTEXT, _load_ranks  # the sha256-checked ranks the package ships

    ranks = _load_ranks()
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    byte_char = {b: chr(c) for b, c in zip(printable, chars)}

    def spell(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    def split(token: bytes, max_rank: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < max_rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                return parts
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    vocab = {spell(tok): r for tok, r in ranks.items()}
    vocab[ENDOFTEXT] = EOS_ID
    merges = ["#version: 0.2"]
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            pair = split(tok, r)
            assert len(pair) == 2, (tok, pair)
            merges.append(f"{spell(pair[0])} {spell(pair[1])}")
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("\n".join(merges) + "\n")


def make_weights(preset: str, out_dir: Path) -> str:
    """Random GPT-2 weights of `preset` as an HF dir (config.json with n_ctx, model.safetensors,
    vocab.json, merges.txt): the package's own init, seed 0, written through its one HF name
    mapping, so the tensors are the same whichever peers are installed. Returns who made them."""
    import jax

    from pgpt_jax.checkpoint import save_hf
    from pgpt_jax.model import init_model

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(init_model(preset, seed=0), tmp)
    gpt2_tokenizer_files(tmp)
    made_by = f"pgpt_jax.model.init_model({preset!r}, seed=0) + checkpoint.save_hf (jax {jax.__version__})"
    (tmp / "MADE_BY").write_text(made_by + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return made_by


def count_params(weights: Path) -> int:
    """Parameters in an HF dir's model.safetensors, from its header (tied lm_head stored once)."""
    from safetensors import safe_open

    from pgpt_jax.checkpoint import HF_BUFFERS

    with safe_open(str(weights / "model.safetensors"), framework="np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(HF_BUFFERS))


def llama_converter(work: Path) -> Path:
    """convert_hf_to_gguf.py (with its conversion/ and gguf-py/ beside it) from the sdist of the
    installed llama-cpp-python version, fetched once with pip."""
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    dst = work / f"llama.cpp-{ver}"
    script = dst / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    sdist_dir = work / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.exists():
        log(f"fetching the llama-cpp-python {ver} sdist (for its GGUF converter) with pip download ...")
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(sdist_dir)], check=True,
                       stdout=subprocess.DEVNULL)
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and rel.startswith(keep) and (m.isfile() or m.isdir()):
                m.name = rel
                try:
                    tar.extract(m, tmp, filter="data")
                except TypeError:  # Python without tarfile filters (before 3.10.12 / 3.11.4)
                    tar.extract(m, tmp)
    tmp.rename(dst)
    return script


def make_gguf(work: Path, weights: Path, outtype: str) -> Path:
    """`weights` as a GGUF file of `outtype` (f32, f16) beside it, made by llama.cpp's converter."""
    out = weights.with_name(f"{weights.name}-{outtype}.gguf")
    if out.exists():
        return out
    script = llama_converter(work)
    log(f"converting {weights.name} to GGUF {outtype} with {script.parent.name}/{script.name} ...")
    tmp = out.with_name(out.name + ".tmp")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py beside the script
    res = subprocess.run([sys.executable, str(script), str(weights), "--outtype", outtype, "--outfile", str(tmp)],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed:\n{res.stderr[-3000:]}")
    tmp.rename(out)
    return out
