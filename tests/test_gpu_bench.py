"""scripts/gpu_bench.py rehearsed on CPU with tiny shapes, so that its first run on a lent device
is not its first run: one JSON with the environment, the test step, the copy bandwidth, our
engine's warm-up and tokens/s per batch (nothing compiled after warm-up), the roofline, and
HF's arms or a note that torch is missing; a spent time budget skips arms with a note."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_bench.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_section(tmp_path):
    out = tmp_path / "out" / "gpu_bench.json"
    assert _script().main(["--tiny", "--out", str(out), "--wheels", str(tmp_path / "none")]) == 0
    doc = json.loads(out.read_text())
    assert doc["env"]["backend"] == "cpu" and doc["install"] == {"wheels": 0}
    assert doc["tests"]["rc"] == 0, doc["tests"]["tail"]
    assert doc["bandwidth"]["copy_gbs"] > 0
    (ours,) = [a for a in doc["arms"] if a["system"] == "pgpt-jax"]
    assert ours["dtype"] == "bfloat16" and ours["warmup_s"] > 0 and ours["warmup_compiles"] > 0
    assert ours["compiles_after_warmup"] == 0
    assert [r["batch"] for r in ours["results"]] == [1, 2]
    roof = doc["roofline"]["tiny"]
    for r in ours["results"]:
        assert r["tok_s"] > 0 and r["of_roofline"] == round(r["tok_s"] / roof[str(r["batch"])]["roofline_tok_s"], 3)
    # Twice the rows read the same weights: the bound nearly doubles.
    assert 1.9 < roof["2"]["roofline_tok_s"] / roof["1"]["roofline_tok_s"] <= 2
    hf = [a for a in doc["arms"] if a["system"] == "hf-torch"]
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        assert sorted(a["mode"] for a in hf) == ["plain", "static"]
    else:
        assert hf == [] and any("torch" in s for s in doc["skipped"])
    assert not [s for s in doc["skipped"] if "budget" in s]


def test_a_spent_budget_skips_the_arms_and_still_writes(tmp_path, monkeypatch):
    out = tmp_path / "gpu_bench.json"
    monkeypatch.setattr(sys, "argv", ["gpu_bench.py"])
    assert _script().main(["--tiny", "--no-tests", "--no-hf", "--budget-s", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["arms"] == [] and "tests" not in doc
    assert any(s.startswith("pgpt-jax tiny: over the 0 s budget") for s in doc["skipped"])
