"""The embedded model's corpus: the standard library's own documentation, built offline.

Every Python installation carries two kinds of documentation: the Language Reference
sections that `help()` shows (`pydoc_data.topics.topics`) and the docstrings of its
modules, classes and functions. This module turns both into *documents* (one per topic,
one per module), splits the documents into train and validation by a hash of their
name, and cuts each document into *pieces* of at most MAX_PIECE_CHARS characters, the
unit that training shuffles, (half of the time) turns into a fill-in-the-middle example,
and packs into rows.

Modules are rendered like the library reference: each documented public function, class,
method and property (and private or `__dunder__` Python functions with a docstring of
their own) as a heading line with its signature, then its docstring, in definition order.
Paragraphs are flush left, prose is unwrapped, and one newline separates paragraphs
(`flush_left`, `stdlib_documents`: the reasons are the tokenizer's):

    class json.decoder.JSONDecoder(object)
    Simple JSON <https://json.org> decoder ...
    json.decoder.JSONDecoder.decode(self, s, _w=<built-in method match of re.Pattern object>)
    Return the Python representation of ``s`` (a ``str`` instance containing a JSON document).

Everything here is deterministic for a given Python build: modules are visited in
sorted order, addresses are scrubbed from reprs, and nothing depends on a clock or on
the order of a set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import pkgutil
import re
import sys
import textwrap
import warnings

import numpy as np

from pgpt_jax.config import EOS_ID, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

# Modules that open windows, print, start a REPL or a test run on import, exist only on
# other platforms, or hold tests rather than documentation.
SKIP_TOP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "distutils",  # setuptools may shim it, so its text would depend on the venv
    "msilib", "msvcrt", "nt", "winreg", "winsound", "_winapi", "pydoc_data",
}
SKIP_PARTS = {"__main__", "test", "tests", "idle_test"}
MAX_PIECE_CHARS = 800  # ~240 tokens: most pieces, FIM ones included, fit one 256-token row
MAX_SIGNATURE_CHARS = 160
VALID_BUCKETS = 16  # a document is held out when its hash falls in bucket 0: about 1/16 of them


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # "topic:<key>" or "module:<dotted name>"
    pieces: tuple[str, ...]

    @property
    def split(self) -> str:
        return "valid" if is_validation(self.name) else "train"


def is_validation(name: str) -> bool:
    """Hash-based held-out split: stable across runs, machines and corpus additions."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "little") % VALID_BUCKETS == 0


# ---------------------------------------------------------------------------------------
# Rendering


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _clean(text: str) -> str:
    return _ADDRESS.sub("", text)


def _docstring(obj) -> str | None:
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return flush_left(_clean(inspect.cleandoc(doc)))


def flush_left(text: str) -> str:
    """Dedent each paragraph (blank-line separated) on its own, and unwrap prose paragraphs.

    The GPT-2 tokenizer has no tokens for runs of spaces (an 8-space indent is 7 tokens of
    " ") and the docs are hard-wrapped at ~72 columns: left as they were, indentation and
    line breaks were a third of the corpus, and a model this small learnt to answer most
    prompts with spaces or newlines. Paragraphs with structure (code, lists, tables,
    indented lines) keep their lines and relative indentation.
    """
    paragraphs = re.split(r"\n[ \t]*\n", text.strip("\n"))
    out = []
    for p in paragraphs:
        if not p.strip():
            continue
        p = textwrap.dedent(p).strip("\n")
        lines = p.splitlines()
        if len(lines) > 1 and not any(_STRUCTURED.match(line) for line in lines):
            p = " ".join(line.strip() for line in lines)
        out.append(p)
    return "\n\n".join(out)


# A line that is code, a list item, a table row, a heading underline or indented.
_STRUCTURED = re.compile(r"\s|>>>|\.\.\.|[-*+•|=~^#]|\d+[.)]\s|\S*\s{2,}|.*[{};]\s*$|.*:\s*$")


def _signature(obj) -> str:
    try:
        sig = _clean(str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return "(...)"
    return sig if len(sig) <= MAX_SIGNATURE_CHARS else "(...)"


def _entry(head: str, doc: str | None) -> str | None:
    """A heading line and its docstring; nothing for an undocumented object."""
    return f"{head}\n\n{doc}\n" if doc else None


def _documented(attr: str, value) -> bool:
    """Public names; private ones (`_x`) and Python-level dunders (`__init__`) when they have
    their own docstring. C slot wrappers ("Return self==value.") are left out: they repeat."""
    if not attr.startswith("_"):
        return True
    fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    if attr.startswith("__") and not inspect.isfunction(fn):
        return False
    return (inspect.isfunction(fn) or inspect.isclass(fn)) and _docstring(fn) is not None


def _class_entries(qualname: str, cls) -> list[str]:
    """The class with its docstring, then one entry per public method or property."""
    bases = [b.__name__ for b in getattr(cls, "__bases__", ()) if b is not object]
    entries = [_entry(f"class {qualname}({', '.join(bases)})" if bases else f"class {qualname}",
                      _docstring(cls))]
    for attr, value in list(vars(cls).items()):
        if not _documented(attr, value):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            fn = value.__func__
            entries.append(_entry(f"{type(value).__name__} {qualname}.{attr}{_signature(fn)}", _docstring(fn)))
        elif isinstance(value, property):
            entries.append(_entry(f"property {qualname}.{attr}", _docstring(value)))
        elif inspect.isroutine(value):
            entries.append(_entry(f"{qualname}.{attr}{_signature(value)}", _docstring(value)))
    return entries


def _module_pieces(name: str, module) -> list[str]:
    """Entries in definition order, packed into pieces of at most MAX_PIECE_CHARS."""
    entries = [_entry(f"Module {name}", _docstring(module))]
    for attr, value in list(vars(module).items()):
        if not _documented(attr, value) or getattr(value, "__module__", None) != name:
            continue
        if inspect.isclass(value):
            entries.extend(_class_entries(f"{name}.{attr}", value))
        elif inspect.isroutine(value):
            entries.append(_entry(f"{name}.{attr}{_signature(value)}", _docstring(value)))
    pieces, buf = [], ""
    for entry in filter(None, entries):
        for chunk in _chunks(entry):
            if buf and len(buf) + len(chunk) + 1 > MAX_PIECE_CHARS:
                pieces.append(buf)
                buf = ""
            buf = f"{buf}\n{chunk}" if buf else chunk
    return pieces + [buf] if buf else pieces


def _chunks(text: str, limit: int = MAX_PIECE_CHARS) -> list[str]:
    """Split at blank lines into chunks of at most `limit` characters (longer paragraphs at lines)."""
    paragraphs = re.split(r"\n\s*\n", text.strip("\n"))
    units = []
    for para in paragraphs:
        if len(para) <= limit:
            units.append(para)
            continue
        line_buf = ""
        for line in para.splitlines():
            if line_buf and len(line_buf) + len(line) + 1 > limit:
                units.append(line_buf)
                line_buf = ""
            line_buf = f"{line_buf}\n{line}" if line_buf else line[:limit]
        if line_buf:
            units.append(line_buf)
    chunks, buf = [], ""
    for unit in units:
        if buf and len(buf) + len(unit) + 2 > limit:
            chunks.append(buf + "\n")
            buf = ""
        buf = f"{buf}\n\n{unit}" if buf else unit
    if buf:
        chunks.append(buf + "\n")
    return chunks


# ---------------------------------------------------------------------------------------
# Collecting


def stdlib_module_names() -> list[str]:
    """Public stdlib modules and their submodules, sorted, without the SKIP_* ones."""
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_TOP:
            continue
        module = _import(top)
        if module is None:
            continue
        names.append(top)
        if hasattr(module, "__path__") and top != "encodings":
            for info in pkgutil.iter_modules(module.__path__, top + "."):
                names.extend(_walk(info.name, info.ispkg))
    return sorted(set(names))


def _walk(name: str, ispkg: bool) -> list[str]:
    parts = name.split(".")
    if any(p in SKIP_PARTS or p.startswith("_") for p in parts[1:]):
        return []
    module = _import(name)
    if module is None:
        return []
    names = [name]
    if ispkg:
        for info in pkgutil.iter_modules(module.__path__, name + "."):
            names.extend(_walk(info.name, info.ispkg))
    return names


def _import(name: str):
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - a module that fails to import is just skipped
        return None


def stdlib_documents() -> list[Document]:
    """Every topic and module document, sorted by name."""
    import pydoc_data.topics

    docs = [Document(f"topic:{key}", tuple(_chunks(flush_left(_clean(text)))))
            for key, text in sorted(pydoc_data.topics.topics.items())]
    for name in stdlib_module_names():
        pieces = _module_pieces(name, sys.modules[name])
        if pieces:
            docs.append(Document(f"module:{name}", tuple(pieces)))
    # One newline between paragraphs: with blank lines, "\n" after "\n" was the commonest
    # pair in the corpus, and greedy decoding got stuck printing newlines.
    docs = [dataclasses.replace(d, pieces=tuple(re.sub(r"\n\s*\n", "\n", p) for p in d.pieces)) for d in docs]
    # A literal special-token string in the text would be read as the token itself.
    docs = [dataclasses.replace(d, pieces=tuple(p for p in d.pieces if "<|" not in p)) for d in docs]
    return sorted((d for d in docs if d.pieces), key=lambda d: d.name)


def split_pieces(docs: list[Document]) -> tuple[list[str], list[str]]:
    """-> (train pieces, validation pieces), each in document order."""
    train = [p for d in docs if d.split == "train" for p in d.pieces]
    valid = [p for d in docs if d.split == "valid" for p in d.pieces]
    return train, valid


# ---------------------------------------------------------------------------------------
# Token streams


def fim_example(encode, text: str, rng: np.random.Generator) -> list[int]:
    """Prefix-suffix-middle: <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle.

    The two cut points are uniform over character positions, so a part may be empty or
    end inside a word, as it may in a request.
    """
    lo, hi = sorted(rng.integers(0, len(text) + 1, size=2))
    prefix, middle, suffix = text[:lo], text[lo:hi], text[hi:]
    return ([FIM_PREFIX] + encode(prefix) + [FIM_SUFFIX] + encode(suffix)
            + [FIM_MIDDLE] + encode(middle))


def token_stream(encode, pieces: list[str], *, fim_rate: float = 0.0,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Pieces (in the given order) -> one int32 stream, each piece followed by <|endoftext|>."""
    out = []
    for piece in pieces:
        if fim_rate and rng.random() < fim_rate:
            out.extend(fim_example(encode, piece, rng))
        else:
            out.extend(encode(piece))
        out.append(EOS_ID)
    return np.asarray(out, np.int32)


def epoch_rows(encode, pieces: list[str], seq_len: int, *, epoch: int, seed: int,
               fim_rate: float) -> np.ndarray:
    """One pass over the training pieces: shuffled, FIM-transformed, packed -> i32[rows, seq_len + 1].

    Rows overlap by one token so that every token is a target exactly once; the tail
    that does not fill a row is dropped (a different tail each epoch).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(pieces))
    stream = token_stream(encode, [pieces[i] for i in order], fim_rate=fim_rate, rng=rng)
    return stream[row_windows(len(stream), seq_len)]


def row_windows(n_tokens: int, seq_len: int) -> np.ndarray:
    """Indices i64[rows, seq_len + 1] of a stream of `n_tokens` packed into rows that overlap by
    one token (each row's inputs [:-1], targets [1:]: every token is a target once); the tail
    that does not fill a row is dropped."""
    n = (n_tokens - 1) // seq_len
    return np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]


def unigram_cross_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Nats per token of `eval_tokens` under the add-one-smoothed unigram of `train_tokens`."""
    counts = np.bincount(train_tokens, minlength=vocab_size)[:vocab_size].astype(np.float64) + 1.0
    logp = np.log(counts) - np.log(counts.sum())
    return float(-logp[eval_tokens].mean())
