"""The layout holds: imports flow one way (import-linter, contracts in pyproject.toml), every
module sits in a layer, a broken layer is caught, and importing pgpt_jax changes no environment."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pgpt_jax", "server")


def lint_imports(cwd: Path):
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
                           "sys.exit(lint_imports_command())", "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_imports_flow_one_way():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_every_module_is_in_a_layer():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    layered = {m.strip() for layer in layers for m in layer.split("|")}
    modules = {".".join(f.relative_to(ROOT).with_suffix("").parts) for pkg in PACKAGES
               for f in (ROOT / pkg).rglob("*.py") if f.stem != "__init__"}
    assert modules == layered, f"not in a layer: {sorted(modules - layered)}; gone: {sorted(layered - modules)}"


def test_an_upward_import_breaks_the_contract(tmp_path):
    # The same tree with model.py importing the engine (a cycle through programs): the check must fail.
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    model = tmp_path / "pgpt_jax" / "model.py"
    model.write_text(model.read_text() + "\n\ndef _engine():\n    from pgpt_jax.engine import Engine\n    return Engine\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0 and "pgpt_jax.model -> pgpt_jax.engine" in out.stdout, out.stdout[-3000:]


def test_importing_the_package_changes_no_environment_variable():
    # jax itself sets a few variables when imported (TF_CPP_MIN_LOG_LEVEL, ...): the baseline
    # is taken after it, so what is checked is what pgpt_jax adds (it once set XLA_FLAGS).
    code = ("import os, json, jax, flax, tiktoken; before = dict(os.environ)\n"
            "import pgpt_jax, pgpt_jax.engine, pgpt_jax.programs, pgpt_jax.bench, pgpt_jax.cli, server.app\n"
            "after = dict(os.environ)\n"
            "print(json.dumps(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_package_is_installed():
    """`pip install .` (the container image) ships every package and subpackage: pyproject's
    find patterns match them all (an explicit list once left server.batch out of the wheel)."""
    import fnmatch

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [".".join(p.parent.relative_to(ROOT).parts)
                for top in ("pgpt_jax", "server") for p in (ROOT / top).rglob("__init__.py")]
    assert {"pgpt_jax", "server", "server.batch"} <= set(packages)
    assert all(any(fnmatch.fnmatch(p, pat) for pat in include) for p in packages), packages
