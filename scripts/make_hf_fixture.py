"""Make tests/fixtures/hf_tiny/: a small random GPT-2 saved by HF transformers, and its logits.

The fixture lets the tests check our HF import against HF's own forward pass without torch or
transformers at test time (they are not runtime dependencies). Run it in a separate venv:

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy  # 2.13.0: the CPU build
    /tmp/hfvenv/bin/python scripts/make_hf_fixture.py

Made with transformers 5.24.0, torch 2.13.0+cpu, numpy 2.4.6 (the script records the versions
it ran with in reference.npz as well).

Size: the full 50257-token vocabulary is kept (so the real tokenizer's ids are valid), which
makes the embedding the bulk of the file; n_embd=16 keeps it at ~3.2 MB. The reference keeps
1000 logit columns (a seeded sample over the vocabulary, EOS included) for each position, plus
the full-vocabulary argmax and logsumexp, which check all other columns in aggregate.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf_tiny"
SEQ_LENS = (5, 12, 20)
N_COLUMNS = 1000
SEED = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    args = ap.parse_args()

    torch.manual_seed(SEED)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=16, n_positions=128, vocab_size=50257,
                     activation_function="gelu_new", layer_norm_epsilon=1e-5)
    model = GPT2LMHeadModel(cfg).eval()
    # HF's init leaves LayerNorm at (1, 0), all biases at 0, and weights at std 0.02, which gives
    # near-uniform attention and tiny logits: a swapped scale/bias or a dropped bias would still
    # pass. Random values everywhere make every tensor visibly matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)

    rng = np.random.default_rng(SEED)
    tokens = np.zeros((len(SEQ_LENS), max(SEQ_LENS)), np.int32)
    for i, n in enumerate(SEQ_LENS):
        tokens[i, :n] = rng.integers(0, cfg.vocab_size, n)
    tokens[0, 0] = 50256  # a prompt starting with <|endoftext|>, as empty prompts do
    columns = np.unique(np.concatenate([rng.choice(cfg.vocab_size, N_COLUMNS - 2, replace=False),
                                        [0, cfg.vocab_size - 1]]))[:N_COLUMNS].astype(np.int32)

    logits, argmax, lse = [], [], []
    with torch.no_grad():
        for i, n in enumerate(SEQ_LENS):
            out = model(torch.from_numpy(tokens[i:i + 1, :n]).long()).logits[0].float()  # [n, vocab]
            pad = max(SEQ_LENS) - n
            logits.append(np.pad(out[:, columns].numpy(), ((0, pad), (0, 0))))
            argmax.append(np.pad(out.argmax(-1).numpy().astype(np.int32), (0, pad)))
            lse.append(np.pad(torch.logsumexp(out, -1).numpy(), (0, pad)))

    versions = {"transformers": transformers.__version__, "torch": torch.__version__, "numpy": np.__version__}
    np.savez_compressed(
        args.out / "reference.npz",
        tokens=tokens,                               # i32[3, 20], right-padded with 0
        lengths=np.array(SEQ_LENS, np.int32),        # valid prefix of each row
        columns=columns,                             # i32[1000] vocabulary ids kept
        logits=np.stack(logits).astype(np.float32),  # f32[3, 20, 1000]
        argmax=np.stack(argmax),                     # i32[3, 20] over the full vocabulary
        logsumexp=np.stack(lse).astype(np.float32),  # f32[3, 20] over the full vocabulary
        versions=np.array(json.dumps(versions)),
    )
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) with {versions}")


if __name__ == "__main__":
    main()
