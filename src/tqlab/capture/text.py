"""Real English text for capture, split by document so fitting never sees evaluation text.

Sources: the English-Wikipedia excerpt shipped in gensim's test data (105 articles, offline), WikiText-2
through `datasets` (needs a hub), or a user's text file (documents separated by blank lines).
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import hashlib
import random
from pathlib import Path

from .models import _package_dir, sha256_file

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Document:
    title: str
    text: str


@functools.lru_cache(maxsize=2)
def wiki_documents(min_chars: int = 500) -> tuple[Document, ...]:
    """The gensim Wikipedia excerpt: articles (redirects and stubs under `min_chars` skipped), markup removed."""
    base = _package_dir("gensim")
    if base is None:
        raise FileNotFoundError("data=wiki needs the PyPI package gensim (pip install gensim==4.4.0)")
    path = base / WIKI_FILE
    if sha256_file(path) != WIKI_SHA256:
        raise ValueError(f"{path} does not have the expected sha256 {WIKI_SHA256}; reinstall gensim==4.4.0")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    docs = []
    with bz2.open(path, "rb") as f:
        for title, text, _ in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = filter_wiki(text).strip()
            if len(clean) >= min_chars:
                docs.append(Document(title, clean))
    return tuple(docs)


def text_file_identity(path: str | Path) -> dict:
    """How captures name a text file: by its name and content, never by its (absolute) path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r} is not a file")
    return {"name": path.name, "sha256": sha256_file(path)}


def text_file_documents(path: str | Path, sha256: str | None = None) -> list[Document]:
    """The file's documents (separated by blank lines); with `sha256`, only if its bytes still hash to it
    (the capture's identity was taken before the model loaded, which can take minutes)."""
    path = Path(path)
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"data.path={str(path)!r} changed while the capture started (sha256 {sha256[:16]}… when the "
            "capture was named); run it again"
        )
    chunks = [c.strip() for c in data.decode("utf-8").split("\n\n")]
    return [Document(f"{path.name}#{i}", c) for i, c in enumerate(chunks) if c]


def wikitext2_splits() -> dict[str, list[Document]]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("data=wikitext2 needs `pip install datasets` and a reachable hub") from err
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
    return {s: [Document(f"wikitext2-{s}", "".join(ds[s]["text"]))] for s in SPLITS}


def split_documents(
    docs: list[Document] | tuple[Document, ...], fractions: tuple[float, float, float], seed: int
) -> dict[str, list]:
    """Shuffle documents with `seed` and cut them into train / validation / test by document count."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) <= 0:
        raise ValueError(
            f"data.split_fractions={list(fractions)} must be three positive numbers summing to 1"
        )
    if len(docs) < 3:
        raise ValueError(f"need at least 3 documents to split, got {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_train = max(1, round(fractions[0] * len(docs)))
    n_val = max(1, round(fractions[1] * len(docs)))
    cuts = {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    if not cuts["test"]:
        raise ValueError(f"{len(docs)} documents leave no test split with fractions {list(fractions)}")
    return {s: [docs[i] for i in sorted(idx)] for s, idx in cuts.items()}


@dataclasses.dataclass(frozen=True)
class Window:
    """seq_len tokens of one document: its tokens i*n .. (i+1)*n-1 for `window` i, after the BOS token when
    the tokenizer starts texts with one (n = seq_len - 1), else alone (n = seq_len)."""

    ids: list[int]
    document: int  # the document's index within its split
    title: str
    window: int


def leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every text with it (Gemma's, Llama-2's), else None: a window then
    starts with BOS too, since models whose attention sinks on BOS attend differently without it."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else None


def token_windows(
    tokenizer, docs: list[Document], seq_len: int, n: int, per_document: int | None = 1
) -> list[Window]:
    """Up to n windows of seq_len tokens, at most `per_document` (None: any number) from each document, taken
    from the documents in order. Windows never cross a document boundary, so windows of different documents
    are as independent as the documents; within a document they are consecutive from its start, and a
    document shorter than a window's text gives none. Each window starts the way the tokenizer starts a text
    (see leading_bos). Fewer than n windows come back only when the documents run out."""
    bos = leading_bos(tokenizer)
    prefix, length = ([], seq_len) if bos is None else ([bos], seq_len - 1)
    windows: list[Window] = []
    for d, doc in enumerate(docs):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        count = len(ids) // length if per_document is None else min(per_document, len(ids) // length)
        for i in range(min(count, n - len(windows))):
            windows.append(Window(prefix + ids[i * length : (i + 1) * length], d, doc.title, i))
        if len(windows) == n:
            break
    return windows


def hash_tokens(windows: list[list[int]]) -> str:
    return hashlib.sha256(repr(windows).encode()).hexdigest()
