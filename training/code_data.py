"""The code model's corpus: the standard library's own Python source, plus its documentation.

Every Python installation carries its standard library as `.py` files (CPython 3.11: ~650
files, ~11 MB outside the tests). This module reads them in sorted order, names each file
after its module (`json/decoder.py` -> `module:json.decoder`, the name training/data.py
gives the module's documentation, so a held-out module is held out in both corpora), and
cuts each file into *pieces* of at most MAX_PIECE_CHARS characters at line boundaries.

Left out: tests (`test`, `tests`, `idle_test` folders), `site-packages`, `pydoc_data`
(the Language Reference text, which training/data.py renders as documentation) and the
generated charmap tables of `encodings` (256-entry tables that would be 30% of the bytes).

More text (`more_pieces`, `train.py --more-text all`): the standard library's `test`
package, and the standard libraries (with their tests) of the other CPython 3 versions
installed beside this one, kept by paragraph where the paragraph is new, with every held-out
module, and every test of one, left out. On the development machine (CPython 3.6 to 3.13)
the training text grows from 3.3M tokens (this interpreter's library and docs) to 13.9M,
4.2 times as much.

Whole functions (`function_pieces`, `train.py --functions`): each function and method of
the training-split modules as a piece of its own, from its `def` to its last line, the shape
of a request for a function body and of the body that should end it.

Fill-in-the-middle examples come in both orders of the FIM paper (Bavarian et al., 2022),
prefix-suffix-middle and suffix-prefix-middle (a checkpoint's `fim_order` says which one a
request with `suffix` is arranged in),

    PSM: <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
    SPM: <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle

with cut points either uniform over characters (a part may end inside a word, as it may
in a request) or on line boundaries (the middle is one to three whole lines, the way an
editor asks to fill a line).
"""

from __future__ import annotations

import ast
import hashlib
import pathlib
import sys
import sysconfig
import warnings

import numpy as np

from pgpt_jax.config import EOS_ID, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from training.data import Document, is_validation, row_windows

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "pydoc_data", "__pycache__"}
MAX_PIECE_CHARS = 3000  # ~1000 tokens with the space-run tokens: most pieces fit one row
CHARMAP_MARK = "decoding_table = ("


def module_name(rel: pathlib.PurePath) -> str:
    """`json/decoder.py` -> `json.decoder`; `json/__init__.py` -> `json`."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def source_files(root: pathlib.Path | None = None) -> list[tuple[str, str]]:
    """(module name, source text) of the stdlib's `.py` files, sorted by path."""
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if CHARMAP_MARK in text or not text.strip():
            continue
        out.append((module_name(rel), text))
    return out


def cut_lines(text: str, limit: int = MAX_PIECE_CHARS) -> list[str]:
    """Pieces of at most `limit` characters, cut between lines, preferably before a line that
    starts at column 0 after a blank line (a top-level statement); a single longer line is
    cut inside."""
    lines = text.splitlines(keepends=True)
    pieces, cur, size, good = [], [], 0, 0  # good: len(cur) at the last top-level boundary
    for line in lines:
        if size + len(line) > limit and cur:
            cut = good if good * 2 > len(cur) else len(cur)
            pieces.append("".join(cur[:cut]))
            cur = cur[cut:]
            size, good = sum(map(len, cur)), 0
        if cur and line[:1].strip() and not cur[-1].strip():
            good = len(cur)
        cur.append(line)
        size += len(line)
        while size > limit and len(cur) == 1:  # one line longer than a piece
            pieces.append(cur[0][:limit])
            cur[0] = cur[0][limit:]
            size = len(cur[0])
    if cur and "".join(cur).strip():
        pieces.append("".join(cur))
    return [p for p in pieces if p.strip()]


def source_documents(root: pathlib.Path | None = None) -> list[Document]:
    return [Document(f"module:{name}", tuple(cut_lines(text))) for name, text in source_files(root)]


# ---------------------------------------------------------------------------------------
# More text: other CPython versions' standard libraries, and the standard library's tests


def other_stdlibs() -> list[pathlib.Path]:
    """The standard libraries of the other CPython 3 installations on this machine: those beside
    this one (`~/.pyenv/versions/3.X.Y/lib/python3.X`) and the system's (`/usr/lib/python3.X`),
    newest version first."""
    this = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    found = {*pathlib.Path(sys.base_prefix).parent.glob("*/lib/python3.*"), *pathlib.Path("/usr/lib").glob("python3.*")}
    roots = [r for r in found if (r / "os.py").is_file() and r.resolve() != this]

    def version(root: pathlib.Path) -> tuple[int, ...]:
        return tuple(int(x) for x in root.name.removeprefix("python").split(".") if x.isdigit())

    return sorted(roots, key=lambda r: (version(r), str(r)), reverse=True)


def test_files(root: pathlib.Path) -> list[tuple[str, str]]:
    """(module name, source) of a standard library's `test` package, sorted by path."""
    out = []
    for path in sorted((root / "test").rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and "__pycache__" not in path.parts:
            out.append((module_name(path.relative_to(root)), text))
    return out


def tested_modules(name: str) -> list[str]:
    """The names a test module's text is about: itself and, without the `test_` prefixes, the
    modules it tests (`test.test_asyncio.test_streams` -> itself, `asyncio`, `asyncio.streams`)."""
    names, parts = [name], []
    for part in name.split(".")[1:]:
        part = part.removeprefix("test_").strip("_")
        if part:
            parts.append(part)
            names.append(".".join(parts))
    return names


def paragraphs(text: str) -> list[str]:
    """Runs of lines, each ending with its first blank line."""
    out, cur = [], []
    for line in text.splitlines(keepends=True):
        cur.append(line)
        if not line.strip():
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def more_pieces(roots: list[pathlib.Path] | None = None, *, tests: bool = True, seen_texts: list[str] | None = None,
                min_chars: int = 80) -> list[str]:
    """Training pieces beyond this interpreter's standard library: by default its `test`
    package, then the standard library and tests of each of other_stdlibs(); with `roots`, the
    standard library and tests of each of those. All of it is under the PSF License.

    Nothing held out reaches them: a module is skipped when its name, or for a test any module
    it tests (`tested_modules`), falls in the held-out split, so the held-out modules and
    their tests stay unseen in every version, and the held-out split itself is unchanged. Each
    version repeats most of the others, so text is kept by paragraph (`paragraphs`): a
    paragraph whose stripped text came earlier (first `seen_texts`, by default this
    interpreter's source, held-out modules included) is dropped, and each run of new
    paragraphs of a file becomes pieces (`cut_lines`). Files that do not parse under this
    Python (Python 2 code, tests of syntax errors, newer syntax) are skipped."""
    seen_texts = [text for _, text in source_files()] if seen_texts is None else seen_texts
    seen = {hashlib.sha1(p.strip().encode()).digest() for text in seen_texts for p in paragraphs(text)}
    here = pathlib.Path(sysconfig.get_paths()["stdlib"])
    sources = [(test_files(here), True)] if tests and roots is None else []
    for root in other_stdlibs() if roots is None else roots:
        sources += [(source_files(root), False)] + ([(test_files(root), True)] if tests else [])
    pieces = []
    for files, are_tests in sources:
        for name, text in files:
            if any(is_validation(f"module:{n}") for n in (tested_modules(name) if are_tests else [name])):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # old versions' invalid escapes
                    ast.parse(text)
            except (SyntaxError, ValueError):
                continue
            run = []
            for para in paragraphs(text) + [""]:  # "" ends the last run
                if para and not para.strip():  # blank lines go with the run they are in
                    run += [para] if run else []
                    continue
                key = hashlib.sha1(para.strip().encode()).digest()
                if para and key not in seen:
                    seen.add(key)
                    run.append(para)
                    continue
                if sum(map(len, run)) >= min_chars:
                    pieces += cut_lines("".join(run))
                run = []
    return pieces


def functions(sources: list[tuple[str, str]]):
    """-> (module name, function node, the module's lines) for each function and method, nested
    ones too, of `sources` ((module name, text) pairs) that parse."""
    for name, text in sources:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node, lines


def function_pieces(root: pathlib.Path | None = None) -> list[str]:
    """Each function and method of the standard library's training-split modules (held-out
    modules are skipped) as a piece of its own: its lines from the `def` (decorators left out)
    to its last, at their own indentation. A request for a function body sends the `def` line
    and the docstring, often of a method, and ends when the body does: these pieces, each
    followed by <|endoftext|> in the stream, show a body that begins after its `def` with
    nothing before it and ends with its last statement (`train.py --functions`)."""
    sources = [(name, text) for name, text in source_files(root) if not is_validation(f"module:{name}")]
    return [piece for _, node, lines in functions(sources)
            for piece in cut_lines("".join(lines[node.lineno - 1:node.end_lineno]))]


def fim_cuts(text: str, rng: np.random.Generator, one_line: float = 0.0,
             line_cuts: float = 0.5) -> tuple[int, int]:
    """Two character offsets lo <= hi: on line boundaries with probability `line_cuts` (middle
    = 1 to 3 whole lines; with probability `one_line` exactly one non-blank line, the hole a
    single-line infill asks to fill), else uniform. The defaults draw as the first run did."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    if len(starts) > 2 and rng.random() < line_cuts:
        k = int(rng.integers(0, len(starts) - 1))
        j = min(len(starts) - 1, k + int(rng.integers(1, 4)))
        if one_line and rng.random() < one_line:
            filled = [i for i in range(len(starts) - 1) if text[starts[i]:starts[i + 1]].strip()]
            k = filled[int(rng.integers(0, len(filled)))] if filled else k
            j = k + 1
        return starts[k], starts[j]
    lo, hi = sorted(rng.integers(0, len(text) + 1, size=2))
    return int(lo), int(hi)


def fim_example(encode, text: str, rng: np.random.Generator, one_line: float = 0.0,
                line_cuts: float = 0.5, spm: float = 0.5) -> tuple[list[int], int]:
    """SPM with probability `spm`, else PSM; each part encoded separately, as a request's prompt
    and suffix are -> (ids, n): the last n ids are the middle."""
    lo, hi = fim_cuts(text, rng, one_line, line_cuts)
    prefix, middle, suffix = encode(text[:lo]), encode(text[lo:hi]), encode(text[hi:])
    if rng.random() < 1.0 - spm:  # at the default, PSM on the draws that gave PSM in the shipped runs
        return [FIM_PREFIX, *prefix, FIM_SUFFIX, *suffix, FIM_MIDDLE, *middle], len(middle)
    return [FIM_PREFIX, FIM_SUFFIX, *suffix, FIM_MIDDLE, *prefix, *middle], len(middle)


def token_stream(encode, pieces: list[str]) -> np.ndarray:
    """Pieces (in the given order) -> one int32 stream, each piece followed by <|endoftext|>."""
    return fim_stream(encode, pieces)[0]


def fim_stream(encode, pieces: list[str], *, fim_rate: float = 0.0, rng: np.random.Generator | None = None,
               one_line: float = 0.0, line_cuts: float = 0.5, spm: float = 0.5,
               middle_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pieces (in the given order), a share `fim_rate` of them as FIM examples -> (int32 stream,
    each piece followed by <|endoftext|>; float32 loss weight of each token as a target:
    `middle_weight` for a FIM example's middle and the <|endoftext|> that ends it, 1 elsewhere)."""
    out, weights = [], []
    for piece in pieces:
        if fim_rate and rng.random() < fim_rate:
            ids, n = fim_example(encode, piece, rng, one_line, line_cuts, spm)
        else:
            ids, n = encode(piece), 0
        w = np.ones(len(ids) + 1, np.float32)
        if n:
            w[-n - 1:] = middle_weight  # the middle and its <|endoftext|>
        out.extend([*ids, EOS_ID])
        weights.append(w)
    return np.asarray(out, np.int32), np.concatenate(weights) if weights else np.zeros(0, np.float32)


def epoch_rows(encode, pieces: list[str], seq_len: int, *, epoch: int, seed: int, fim_rate: float,
               one_line: float = 0.0, line_cuts: float = 0.5, spm: float = 0.5,
               middle_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One shuffled, FIM-transformed, packed pass -> (i32[rows, seq_len + 1], rows overlap by one
    token, so every token is a target once; the tail that does not fill a row is dropped;
    f32[rows, seq_len]: the loss weights of the targets rows[:, 1:])."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(pieces))
    stream, weights = fim_stream(encode, [pieces[i] for i in order], fim_rate=fim_rate, rng=rng,
                                 one_line=one_line, line_cuts=line_cuts, spm=spm, middle_weight=middle_weight)
    at = row_windows(len(stream), seq_len)
    return stream[at], weights[at[:, 1:]]
