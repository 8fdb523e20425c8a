"""A small, offline, multi-domain character corpus for the language-model chapters.

Three domains, all from what every Python install ships (nothing is downloaded):

* ``prose`` (0) - English from the Python reference manual (``pydoc_data.topics``), with the
  indented code examples and the heading underlines removed;
* ``code`` (1) - Python source of a fixed, sorted list of pure-Python standard-library modules;
* ``math`` (2) - generated arithmetic lines such as ``12+7=19``.

Every character keeps its domain label, so routing can be scored against it. Characters are
mapped to a fixed 96-symbol vocabulary (newline plus printable ASCII), so token ids mean the
same thing whatever text is loaded. Each domain is cut into a train part and a validation part
(the last ``val_fraction`` of it), so validation text is never seen in training.
"""
from __future__ import annotations

import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._validate import check_int, check_positive_float

__all__ = [
    "DOMAINS", "CHAR_CLASSES", "VOCAB", "VOCAB_SIZE", "CODE_MODULES",
    "encode", "decode", "char_classes", "prose_text", "code_text", "arithmetic_text", "check_arithmetic",
    "TextSplit", "Corpus", "build_corpus", "sample_batch", "eval_windows",
]

DOMAINS = ("prose", "code", "math")
CHAR_CLASSES = ("lower", "upper", "digit", "space", "newline", "punct")
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # 96 symbols
VOCAB_SIZE = len(VOCAB)
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
_UNKNOWN = _INDEX["?"]
_ASCII_FOLD = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...",
                             "\u2014": "--", "\u2013": "-", "\t": "    "})

# Pure-Python modules present in every CPython 3.9+ install; sorted so the choice is fixed.
CODE_MODULES = (
    "bisect", "calendar", "colorsys", "fnmatch", "fractions", "glob", "heapq", "keyword", "netrc",
    "numbers", "operator", "queue", "quopri", "random", "sched", "shlex", "statistics", "string",
    "textwrap", "tokenize",
)


def encode(text: str) -> torch.Tensor:
    """A string -> (len,) int64 token ids; characters outside the vocabulary become '?'."""
    if not isinstance(text, str):
        raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
    text = text.translate(_ASCII_FOLD)
    return torch.tensor([_INDEX.get(ch, _UNKNOWN) for ch in text], dtype=torch.long)


def decode(tokens) -> str:
    """Token ids (any int sequence or 1-D tensor) -> string."""
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    bad = [i for i in ids if not 0 <= int(i) < VOCAB_SIZE]
    if bad:
        raise ValueError(f"decode: token id {bad[0]} is outside the vocabulary 0..{VOCAB_SIZE - 1}")
    return "".join(VOCAB[int(i)] for i in ids)


_CLASS_OF = torch.tensor([
    0 if ch.islower() else 1 if ch.isupper() else 2 if ch.isdigit() else 3 if ch == " " else 4 if ch == "\n" else 5
    for ch in VOCAB
])


def char_classes(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (any shape) -> the same shape of class ids, indexing ``CHAR_CLASSES``."""
    return _CLASS_OF.to(tokens.device)[tokens]


def prose_text() -> str:
    """English prose from the Python reference manual, topics in sorted order.

    Indented blocks (code examples, grammar rules) and heading underlines are dropped so the
    domain is mostly running English text.
    """
    import pydoc_data.topics as topics

    keep = []
    for name in sorted(topics.topics):
        for line in topics.topics[name].splitlines():
            stripped = line.strip()
            if line.startswith("   ") or (stripped and set(stripped) <= set("*=-^~")):
                continue
            keep.append(line)
    text = "\n".join(keep).translate(_ASCII_FOLD)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text


def code_text(modules=CODE_MODULES) -> str:
    """The source files of ``modules`` (standard-library names), concatenated in the given order.

    The files are read from the standard library's own folder (``sysconfig``), not found through
    ``sys.path``, so a local file that happens to share a module's name cannot slip in. Modules
    this interpreter lacks are skipped; at least one must be found.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in modules:
        path = stdlib / f"{name}.py"
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8"))
    if not parts:
        raise ValueError(f"code_text: none of modules={list(modules)!r} has a .py file in {stdlib}")
    return "\n".join(parts).translate(_ASCII_FOLD)


def arithmetic_text(num_chars: int, seed: int = 0, max_operand: int = 99) -> str:
    """Lines like ``12+7=19`` (+, - and *, operands 0..max_operand), at least ``num_chars`` long."""
    check_int("num_chars", num_chars, low=1, where="arithmetic_text")
    check_int("max_operand", max_operand, low=1, where="arithmetic_text")
    rng = random.Random(seed)
    lines, n = [], 0
    while n < num_chars:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        line = f"{a}{op}{b}={value}\n"
        lines.append(line)
        n += len(line)
    return "".join(lines)


_EQUATION = re.compile(r"^(-?\d{1,3})([+*-])(-?\d{1,3})=(-?\d{1,6})$")


def check_arithmetic(text: str) -> dict:
    """Score generated arithmetic: of the complete lines shaped like ``a+b=c`` (operators + - *),
    how many are true. Returns ``{"lines": complete lines, "well_formed": n, "correct": n}``.

    The first and last lines are skipped (they may be a prompt fragment or cut off mid-way).
    """
    if not isinstance(text, str):
        raise TypeError(f"check_arithmetic: text must be a str, got {type(text).__name__}")
    lines = text.split("\n")[1:-1]
    well_formed = correct = 0
    for line in lines:
        m = _EQUATION.match(line)
        if not m:
            continue
        well_formed += 1
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        correct += (a + b if op == "+" else a - b if op == "-" else a * b) == c
    return {"lines": len(lines), "well_formed": well_formed, "correct": correct}


@dataclass
class TextSplit:
    """One split of the corpus: ``tokens`` (N,) int64, ``domains`` (N,) int64 and, per domain,
    the ``[start, end)`` span it occupies in ``tokens`` (the domains are stored one after another)."""

    tokens: torch.Tensor
    domains: torch.Tensor
    spans: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def text(self, domain: int, max_chars: int = 300) -> str:
        start, end = self.spans[domain]
        return decode(self.tokens[start:min(end, start + max_chars)])


@dataclass
class Corpus:
    train: TextSplit
    val: TextSplit
    domain_names: tuple = DOMAINS
    info: str = ""


def build_corpus(chars_per_domain: int = 150_000, val_fraction: float = 0.1, seed: int = 0,
                 max_operand: int = 99) -> Corpus:
    """The three-domain corpus, ``chars_per_domain`` characters from each domain.

    ``max_operand`` bounds the arithmetic's operands (see :func:`arithmetic_text`): 99 gives sums
    and products a small model cannot learn in minutes, 20 gives a table it can.

    Deterministic given ``seed`` (it drives the arithmetic and which stretch of the prose and code
    is used when there is more text than needed). Each domain's last ``val_fraction`` is validation.
    """
    where = "build_corpus"
    check_int("chars_per_domain", chars_per_domain, low=200, where=where)
    check_positive_float("val_fraction", val_fraction, where=where)
    if not val_fraction < 0.5:
        raise ValueError(f"{where}: val_fraction={val_fraction} is not allowed; use 0 < val_fraction < 0.5")
    check_int("seed", seed, low=0, where=where)
    rng = random.Random(seed)
    texts = []
    for name, text in (("prose", prose_text()), ("code", code_text()),
                       ("math", arithmetic_text(chars_per_domain, seed=seed, max_operand=max_operand))):
        if len(text) > chars_per_domain:
            start = rng.randrange(len(text) - chars_per_domain + 1)
            text = text[start:start + chars_per_domain]
        texts.append(text)
    parts = {"train": [], "val": []}
    for d, text in enumerate(texts):
        ids = encode(text)
        cut = len(ids) - max(1, int(round(len(ids) * val_fraction)))
        parts["train"].append((d, ids[:cut]))
        parts["val"].append((d, ids[cut:]))

    def join(pieces):
        spans, pos = [], 0
        for _, ids in pieces:
            spans.append((pos, pos + len(ids)))
            pos += len(ids)
        tokens = torch.cat([ids for _, ids in pieces])
        domains = torch.cat([torch.full((len(ids),), d, dtype=torch.long) for d, ids in pieces])
        return TextSplit(tokens, domains, spans)

    sizes = ", ".join(f"{DOMAINS[d]} {len(t):,}" for d, t in enumerate(texts))
    info = (f"offline corpus from this Python install (chars per domain: {sizes}; seed {seed}; "
            f"operands 0..{max_operand})")
    return Corpus(join(parts["train"]), join(parts["val"]), DOMAINS, info)


def _domain_weights(weights, num_domains: int, where: str) -> torch.Tensor:
    if weights is None:
        return torch.ones(num_domains) / num_domains
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != num_domains or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{where}: domain_weights={weights!r} must be {num_domains} non-negative numbers, not all 0")
    return (w / w.sum()).float()


def sample_batch(split: TextSplit, batch_size: int, context: int, generator: torch.Generator | None = None,
                 domain_weights=None):
    """Random windows, each inside one domain: (tokens, targets, domains), each (B, context) int64.

    ``targets`` are the tokens shifted by one; ``domains`` labels every target position.
    ``domain_weights`` (one number per domain) sets how often each domain is drawn; default uniform.
    """
    where = "sample_batch"
    check_int("batch_size", batch_size, low=1, where=where)
    check_int("context", context, low=1, where=where)
    w = _domain_weights(domain_weights, len(split.spans), where)
    short = [d for d, (s, e) in enumerate(split.spans) if w[d] > 0 and e - s < context + 1]
    if short:
        raise ValueError(f"{where}: context={context} is longer than domain {short[0]}'s text in this split")
    doms = torch.multinomial(w, batch_size, replacement=True, generator=generator)
    starts = torch.empty(batch_size, dtype=torch.long)
    for i, d in enumerate(doms.tolist()):
        s, e = split.spans[d]
        starts[i] = s + torch.randint(e - s - context, (1,), generator=generator)
    offsets = torch.arange(context + 1)
    idx = starts[:, None] + offsets
    window = split.tokens[idx]
    return window[:, :-1], window[:, 1:], split.domains[idx[:, 1:]]


def eval_windows(split: TextSplit, context: int, max_windows: int | None = None, domain: int | None = None):
    """Non-overlapping windows in order (deterministic), for validation: (tokens, targets, domains)."""
    where = "eval_windows"
    check_int("context", context, low=1, where=where)
    domains = range(len(split.spans)) if domain is None else [check_int("domain", domain, low=0,
                                                                         high=len(split.spans) - 1, where=where)]
    starts = []
    for d in domains:
        s, e = split.spans[d]
        ds = list(range(s, e - context, context))
        starts += ds[:max_windows] if max_windows is not None else ds
    if not starts:
        raise ValueError(f"{where}: context={context} leaves no full window in this split")
    idx = torch.tensor(starts)[:, None] + torch.arange(context + 1)
    window = split.tokens[idx]
    return window[:, :-1], window[:, 1:], split.domains[idx[:, 1:]]
