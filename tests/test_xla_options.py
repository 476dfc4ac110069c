"""XLA:CPU option sets chosen per machine by measurement at warm-up (xla_options.CPU_OPTION_SETS):
each decode row bucket timed under each set, the fastest kept and remembered per CPU and
shape beside the compile cache; a forced set; nothing written to XLA_FLAGS."""

import json
import os

import pytest

from pgpt_jax import programs, xla_options
from pgpt_jax.engine import Engine
from pgpt_jax.request import Request
from pgpt_jax.tokenizer import get_tokenizer


@pytest.fixture
def choices_file(tmp_path, monkeypatch):
    path = tmp_path / "xla_options.json"
    monkeypatch.setattr(xla_options, "option_choices_path", lambda: str(path))
    yield path
    xla_options.choose_options(xla_options.FALLBACK_OPTION_SET)  # the process-wide choice, as other tests expect


def test_auto_measures_every_set_per_row_bucket_and_remembers_the_choice(tiny_model, choices_file):
    before = os.environ.get("XLA_FLAGS")
    eng = Engine(tiny_model, get_tokenizer(), slots=1, decode_steps=2, xla_options="auto")  # one row bucket
    eng.choose_options()
    assert set(eng.option_times) == {1}
    assert all(set(t) == set(xla_options.CPU_OPTION_SETS) and min(t.values()) > 0 for t in eng.option_times.values())
    chosen = xla_options.chosen_options()
    assert chosen["decode"] == {r: min(t, key=t.get) for r, t in eng.option_times.items()}
    (key, saved), = json.loads(choices_file.read_text()).items()
    assert "slots=1" in key and saved["decode"] == {str(r): n for r, n in chosen["decode"].items()}
    assert os.environ.get("XLA_FLAGS") == before
    # The same shape again: the remembered choice, nothing measured.
    again = Engine(tiny_model, get_tokenizer(), slots=1, decode_steps=2, xla_options="auto")
    again.choose_options()
    assert again.option_times == {} and xla_options.chosen_options() == chosen
    assert again.options_note.endswith("(remembered for this CPU)") and f"1: {chosen['decode'][1]}" in again.options_note


def test_each_row_bucket_decodes_with_the_set_that_won_it(tiny_model, choices_file, monkeypatch):
    eng = Engine(tiny_model, get_tokenizer(), slots=2, decode_steps=2, xla_options="auto")
    fake = {1: {"xla-default": 2.0, "no-ynn-fusion": 1.0}, 2: {"xla-default": 1.0, "no-ynn-fusion": 3.0}}
    monkeypatch.setattr(eng.executor, "time_option_sets", lambda rows, window: fake[rows])
    eng.choose_options()
    assert xla_options.chosen_options() == {"default": "xla-default", "decode": {1: "no-ynn-fusion", 2: "xla-default"}}
    # what `pgpt-jax serve` prints when it is ready
    assert eng.options_note == "XLA:CPU options xla-default; decode by rows 1: no-ynn-fusion, 2: xla-default (measured)"
    programs.decode._jits.clear()
    done = []
    eng.submit(Request(prompt=[1, 2], max_tokens=6, n=2, temperature=0.0), done.append)  # two rows: bucket 2
    eng.run_until_idle()
    assert done and set(programs.decode._jits) == {"xla-default"}
    assert xla_options.compiler_options("no-ynn-fusion") == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_a_forced_set_and_an_unknown_one(tiny_model, choices_file):
    forced = Engine(tiny_model, get_tokenizer(), slots=2, xla_options="xla-default")
    forced.choose_options()
    assert xla_options.chosen_options() == {"default": "xla-default", "decode": {}}
    assert forced.options_note == "XLA:CPU options xla-default (forced)"
    assert not choices_file.exists()  # forced: nothing measured, nothing remembered
    with pytest.raises(ValueError, match="unknown XLA:CPU option set"):
        Engine(tiny_model, get_tokenizer(), slots=2, xla_options="fastest").choose_options()
