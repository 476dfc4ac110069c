"""GPTConfig: the one frozen description of a GPT-2-family model, with presets as data."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

EOS_ID = 50256
GPT2_VOCAB = 50257
# Fill-in-the-middle tokens live in the padded part of the vocabulary (models that have them only).
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = 50257, 50258, 50259
FIM_TOKENS = {"<|fim_prefix|>": FIM_PREFIX, "<|fim_suffix|>": FIM_SUFFIX, "<|fim_middle|>": FIM_MIDDLE}
# Code models add BPE tokens for runs of 2..33 spaces after the FIM tokens (GPT-2 has one for a
# single space only, so Python's indentation would be a token per space): ids 50260..50291.
SPACE_RUNS = range(2, 34)
SPACE_TOKEN_BASE = FIM_MIDDLE + 1
CODE_VOCAB = SPACE_TOKEN_BASE + len(SPACE_RUNS)  # 50292


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024  # context length
    vocab_size: int = GPT2_VOCAB  # tokens the model may produce; 50260 with FIM tokens
    layer_norm_epsilon: float = 1e-5
    fim: bool = False  # model was trained with <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>
    space_tokens: bool = False  # its tokenizer has the SPACE_RUNS tokens (needs fim: they follow)
    fim_order: str = "psm"  # how a request's `suffix` is arranged: prefix-suffix-middle or suffix-prefix-middle
    dtype: str = "float32"  # compute dtype (bfloat16 on TPU/GPU)
    param_dtype: str = "float32"
    name: str = "gpt2"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.fim and self.vocab_size < FIM_MIDDLE + 1:
            raise ValueError("a FIM model needs vocab_size >= 50260")
        if self.fim_order not in ("psm", "spm"):
            raise ValueError(f"fim_order must be 'psm' or 'spm', not {self.fim_order!r}")
        if self.space_tokens and not (self.fim and self.vocab_size >= CODE_VOCAB):
            raise ValueError(f"space_tokens needs fim and vocab_size >= {CODE_VOCAB}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def never_emitted(self) -> tuple[int, ...]:
        """Tokens a completion never produces: the FIM control tokens only arrange prompts."""
        return (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) if self.fim else ()

    @property
    def padded_vocab(self) -> int:
        """Compute vocabulary: a multiple of 64 (50257 -> 50304); logits past vocab_size are -inf."""
        return -(-self.vocab_size // 64) * 64

    @staticmethod
    def preset(name: str, **overrides: Any) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes: Any) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @staticmethod
    def from_dict(d: dict) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(GPTConfig)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {unknown}")
        return GPTConfig(**d)


PRESETS = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, name="gpt2"),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, name="gpt2-medium"),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280, name="gpt2-large"),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600, name="gpt2-xl"),
    # For tests: 4 heads so that model-parallel meshes of 2 and 4 divide it.
    "tiny": GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=128, name="tiny"),
}
