"""What the device decides when the user does not: the dtype, and how many KV slots fit.

- `default_dtype(backend)`: bfloat16 params, compute and KV cache on GPU and TPU (their
  matmul units are built for it, and it halves the bytes each decode step reads); on CPU
  the model's own dtypes, which compute in float32 for every preset and the embedded model
  (XLA:CPU upcasts bfloat16 matmuls and runs them slower, DESIGN.md).
- `plan_slots(...)`: `--slots` when given; otherwise as many slots of the full context as
  fit in `fraction` of the memory JAX's allocator may use (`bytes_limit` in
  `device.memory_stats()`, like vLLM's `gpu_memory_utilization`), after what is already on
  the device and a reserve for the programs (see `plan_slots`). A backend that reports no
  memory (CPU) keeps the default slot count, and the plan says so.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from pgpt_jax.config import GPTConfig

ACCELERATORS = ("gpu", "tpu", "cuda", "rocm")
DEFAULT_SLOTS = 32  # without --slots where the device reports no memory (CPU)
MAX_SLOTS = 256  # a memory-sized slot count stops here: each row bucket is one more program to compile
DEFAULT_MEMORY_FRACTION = 0.9
PREFILL_TOKENS = 1024  # the engine's max_prefill_tokens: the rows x bucket of one prefill call


def default_dtype(backend: str) -> Optional[str]:
    """"bfloat16" on a GPU or TPU backend; None on CPU (the model's own dtypes: float32 compute)."""
    return "bfloat16" if backend in ACCELERATORS else None


def default_decode_steps(backend: str) -> int:
    """Decode steps a serving call runs when --decode-steps is not given: 1 on CPU, where a
    step is long next to the host's work for a call and one step a call cut TTFT at 1 and 8
    streams by about half at no cost per token (docs/benchmarks.md, issue 20); 4 on a GPU or
    TPU, whose steps are short enough for the host's per-call work to show (the planner still
    runs 1 step when a row is near its end or work waits: planner.Planner._steps)."""
    return 4 if backend in ACCELERATORS else 1


def device_memory(device=None) -> Optional[tuple[int, int]]:
    """(bytes_limit, bytes_in_use) of `device` (default: this process's first), or None when
    the backend reports no limit (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise rather than return None
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))


def slot_bytes(cfg: GPTConfig, dtype=None) -> int:
    """Device bytes one slot holds at the full context: its K and V in every layer
    ([N, L, H] each, in `dtype`, default the config's) and its sampling row (a logit bias
    and token counts over the vocabulary, 4 bytes each)."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    kv = 2 * cfg.n_layer * cfg.n_head * cfg.n_positions * cfg.head_dim * itemsize
    return kv + 2 * 4 * cfg.padded_vocab


def param_bytes(model) -> int:
    """Bytes of the model's parameters (all shards together)."""
    from flax import nnx

    return sum(int(a.nbytes) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    slots: int
    slot_bytes: int  # per slot, on each device
    budget_bytes: Optional[int]  # per device, what the slots may take (None: no memory reported)
    how: str  # "--slots", "memory" or "default"

    def describe(self) -> str:
        """One log line: the slots, what their KV cache takes, and from what budget."""
        gib = 2**30
        kv = f"{self.slots} slots x {self.slot_bytes / 2**20:.1f} MiB = {self.slots * self.slot_bytes / gib:.2f} GiB"
        if self.budget_bytes is None:
            given = f"--slots {self.slots}" if self.how == "--slots" else f"{self.slots} slots by default"
            return f"KV cache: {kv} ({given}: the device reports no memory limit to size them from)"
        over = " -- OVER the budget" if self.slots * self.slot_bytes > self.budget_bytes else ""
        source = "--slots" if self.how == "--slots" else "sized from device memory"
        return f"KV cache: {kv} ({source}; KV budget {self.budget_bytes / gib:.2f} GiB a device{over})"


def plan_slots(cfg: GPTConfig, *, slots: Optional[int], memory: Optional[tuple[int, int]],
               fraction: float = DEFAULT_MEMORY_FRACTION, weight_bytes: int = 0, dtype=None,
               data: int = 1, model: int = 1, max_slots: int = MAX_SLOTS, pool_tokens: int = 0) -> SlotPlan:
    """How many slots to run (see the module docstring).

    memory: (bytes_limit, bytes_in_use) of one device (`device_memory()`), None when unknown;
    in_use already holds the loaded weights. The budget a device gives the slots is
    `fraction x limit - in_use - reserve`, where the reserve covers the programs' own copy
    of the params (at most the weights again: the engine lays c_attn and the LM head out
    anew) and a prefill's float32 logits over the vocabulary (four [PREFILL_TOKENS, V]
    buffers). A mesh of `data` x `model` devices splits slots over `data` and heads (so
    each slot's KV) over `model`; `weight_bytes` is the whole model's. The prefix cache's
    pool of `pool_tokens` tokens of KV (split over `model` like a slot's) is reserved too. Memory-sized counts
    are rounded down to a multiple of 8 (when at least 8) and of `data`, at most `max_slots`.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"--memory-fraction must be in (0, 1], not {fraction}")
    per_slot = -(-slot_bytes(cfg, dtype) // model)
    if memory is None:
        return SlotPlan(slots or DEFAULT_SLOTS, per_slot, None, "--slots" if slots else "default")
    limit, in_use = memory
    reserve = weight_bytes // model + 4 * PREFILL_TOKENS * cfg.padded_vocab * 4
    reserve += pool_tokens * (slot_bytes(cfg, dtype) - 8 * cfg.padded_vocab) // cfg.n_positions // model
    budget = max(int(fraction * limit) - in_use - reserve, 0)
    if slots:
        return SlotPlan(slots, per_slot, budget, "--slots")
    fit = budget // per_slot * data
    if fit >= 8:
        fit -= fit % 8
    fit = min(fit, max_slots)
    fit -= fit % data
    if fit < 1 or fit < data:
        raise ValueError(
            f"no KV slot of {cfg.n_positions} tokens ({per_slot / 2**20:.1f} MiB a device) fits: "
            f"{fraction:g} x {limit / 2**30:.2f} GiB, less {in_use / 2**30:.2f} GiB in use and "
            f"{reserve / 2**30:.2f} GiB reserved, leaves {budget / 2**30:.2f} GiB; "
            "raise --memory-fraction or pass --slots")
    return SlotPlan(fit, per_slot, budget, "memory")
