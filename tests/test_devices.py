"""Device defaults: bfloat16 on GPU/TPU and the model's float32 on CPU; slots sized from a
device's memory (fake numbers), --slots kept where the device reports none; the log line."""

import types

import pytest

from pgpt_jax import devices
from pgpt_jax.config import GPTConfig

GiB = 2**30
GPT2 = GPTConfig.preset("gpt2", dtype="bfloat16", param_dtype="bfloat16")


def test_default_dtype_by_backend():
    assert devices.default_dtype("gpu") == "bfloat16"
    assert devices.default_dtype("tpu") == "bfloat16"
    assert devices.default_dtype("cpu") is None


def test_slot_bytes_counts_kv_of_every_layer_and_the_sampling_row():
    kv = 2 * 12 * 12 * 1024 * 64 * 2  # k and v, layers, heads, context, head_dim, bf16 bytes
    assert devices.slot_bytes(GPT2) == kv + 8 * 50304
    assert devices.slot_bytes(GPT2, "float32") == 2 * kv + 8 * 50304


def test_slots_sized_from_memory():
    per = devices.slot_bytes(GPT2)
    reserve = 250 * 2**20 + 4 * 1024 * 50304 * 4
    # A budget of exactly 20.5 slots after 1 GiB in use and the reserve: 20 slots, rounded down to 16.
    limit = int((1 * GiB + reserve + 20.5 * per) / 0.5)
    plan = devices.plan_slots(GPT2, slots=None, memory=(limit, 1 * GiB), fraction=0.5, weight_bytes=250 * 2**20)
    assert (plan.slots, plan.how, plan.slot_bytes) == (16, "memory", per)
    assert plan.budget_bytes == pytest.approx(20.5 * per, abs=2)
    line = plan.describe()
    assert "16 slots" in line and "sized from device memory" in line and "KV budget" in line
    # A large device stops at max_slots; 5 slots' worth stays 5 (under 8: no rounding).
    big = devices.plan_slots(GPT2, slots=None, memory=(200 * GiB, 0), weight_bytes=0)
    assert big.slots == devices.MAX_SLOTS
    few = devices.plan_slots(GPT2, slots=None, memory=(int(5.5 * per + reserve), 0), fraction=1.0,
                             weight_bytes=250 * 2**20)
    assert few.slots == 5


def test_a_mesh_splits_slots_over_data_and_kv_over_model():
    per = devices.slot_bytes(GPT2)
    plan = devices.plan_slots(GPT2, slots=None, memory=(int(10.5 * per / 2 + 4 * 1024 * 50304 * 4), 0),
                              fraction=1.0, data=4, model=2)
    assert plan.slot_bytes == per // 2
    assert plan.slots == 40  # 10 a data shard, 4 shards, a multiple of 8 and of 4


def test_explicit_slots_and_unknown_memory():
    cpu = devices.plan_slots(GPT2, slots=None, memory=None)
    assert (cpu.slots, cpu.budget_bytes, cpu.how) == (devices.DEFAULT_SLOTS, None, "default")
    assert "32 slots by default: the device reports no memory limit" in cpu.describe()
    given = devices.plan_slots(GPT2, slots=7, memory=None)
    assert given.slots == 7 and "--slots 7" in given.describe()
    # --slots wins over memory, and the log says when it is over the budget.
    over = devices.plan_slots(GPT2, slots=64, memory=(2 * GiB, 0), fraction=0.5)
    assert over.slots == 64 and "OVER the budget" in over.describe()


def test_no_room_is_a_clear_error():
    with pytest.raises(ValueError, match="no KV slot .* fits"):
        devices.plan_slots(GPT2, slots=None, memory=(1 * GiB, int(0.8 * GiB)), fraction=0.9)
    with pytest.raises(ValueError, match="memory-fraction"):
        devices.plan_slots(GPT2, slots=None, memory=(1 * GiB, 0), fraction=1.5)


def test_device_memory_reads_bytes_limit():
    def dev(stats):
        return types.SimpleNamespace(memory_stats=lambda: stats)

    assert devices.device_memory(dev({"bytes_limit": 100, "bytes_in_use": 30})) == (100, 30)
    assert devices.device_memory(dev(None)) is None
    assert devices.device_memory(dev({"bytes_in_use": 30})) is None


def test_serving_on_cpu_keeps_the_given_slots():
    pytest.importorskip("starlette")  # scripts/gpu_bench.py runs this file where the server's stack may be missing
    from server.serve import slots_for

    from pgpt_jax.model import init_model

    model = init_model("tiny")
    plan = slots_for(model, types.SimpleNamespace(slots=3, memory_fraction=0.9))
    assert plan.slots == 3 and plan.budget_bytes is None  # CPU reports no memory limit
