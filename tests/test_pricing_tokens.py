"""Offline token estimation: shipped BPE files, tiktoken's own counts, the network blocked."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiktoken_ext.openai_public as openai_public
from hypothesis import given, settings
from hypothesis import strategies as st

from ecu_sidecar.pricing import tokens
from ecu_sidecar.pricing.tokens import ChatMessage, count_messages, count_text

NAMES = sorted(tokens.ENCODINGS)

CORPUS = [
    "",
    "hello world",
    "tiktoken is great!",
    "Grüße aus Köln — 東京で会いましょう 🙂 مرحبا بالعالم",
    "def f(x):\n    return x ** 2  # squares\n\n\n\tindented\r\n",
    "iPhone camelCase HTTPServer don't WE'LL 12345678 3.14159",
    "special tokens as text: <|endoftext|> <|endofprompt|> <|fim_prefix|>",
    "   leading and trailing spaces   ",
    "a" * 5000,
    "The quick brown fox jumps over the lazy dog. " * 200,
    # Long enough to be cut and counted in parallel threads (tokens.PARALLEL_MIN_CHARS).
    "Judge the answer.\n  Score 1-5; don't explain 42 times!\r\n#Rubric: tone, ÉTÉ. " * 2_000,
]

#: The OpenAI cookbook's example chat ("How to count tokens with tiktoken"), whose prompt the
#: OpenAI API counted as 129 tokens on cl100k_base models and 124 on o200k_base models.
COOKBOOK_MESSAGES = [
    ChatMessage(
        "system",
        "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    ),
    ChatMessage("system", "New synergies will help drive top-line growth.", "example_user"),
    ChatMessage(
        "system", "Things working well together will increase revenue.", "example_assistant"
    ),
    ChatMessage(
        "system",
        "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
        "example_user",
    ),
    ChatMessage(
        "system",
        "Let's talk later when we're less busy about how to do better.",
        "example_assistant",
    ),
    ChatMessage(
        "user",
        "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    ),
]


class _Captured(Exception):
    pass


def official(name: str) -> tuple[str, str]:
    """(blob path, expected SHA-256) that tiktoken's own constructor for ``name`` would load."""

    def capture(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        raise _Captured(blobpath, expected_hash)

    original = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = capture
    try:
        openai_public.ENCODING_CONSTRUCTORS[name]()
    except _Captured as captured:
        return captured.args
    finally:
        openai_public.load_tiktoken_bpe = original
    raise AssertionError("the constructor loaded no BPE file")


@pytest.mark.parametrize("name", NAMES)
def test_shipped_file_is_the_official_one(name: str) -> None:
    _, expected_hash = official(name)
    assert tokens.ENCODINGS[name].sha256 == expected_hash
    assert hashlib.sha256(tokens.bpe_file_bytes(name)).hexdigest() == expected_hash


@pytest.mark.parametrize("name", NAMES)
def test_pattern_and_special_tokens_match_tiktoken(name: str, monkeypatch) -> None:
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {b"x": 0})
    theirs = openai_public.ENCODING_CONSTRUCTORS[name]()
    ours = tokens.ENCODINGS[name]
    assert ours.pat_str == theirs["pat_str"]
    assert dict(ours.special_tokens) == theirs["special_tokens"]
    assert tokens.get_encoding(name).special_tokens_set == set(theirs["special_tokens"])


def test_known_token_ids() -> None:
    # Published in tiktoken's documentation and the OpenAI cookbook.
    assert tokens.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert tokens.get_encoding("cl100k_base").encode("tiktoken is great!") == [
        83,
        1609,
        5963,
        374,
        2294,
        0,
    ]
    assert tokens.get_encoding("o200k_base").encode("tiktoken is great!") == [
        83,
        8251,
        2488,
        382,
        2212,
        0,
    ]


def test_chat_overhead_matches_the_cookbook_figures() -> None:
    assert count_messages(COOKBOOK_MESSAGES, "cl100k_base") == 129
    assert count_messages(COOKBOOK_MESSAGES, "o200k_base") == 124


def test_chat_overhead_constants() -> None:
    enc = "o200k_base"
    one = [ChatMessage("user", "hi")]
    assert count_messages([], enc) == tokens.REPLY_PRIMING_TOKENS
    assert count_messages(one, enc) == (
        tokens.REPLY_PRIMING_TOKENS + tokens.TOKENS_PER_MESSAGE + count_text("user", enc) + 1
    )
    named = [ChatMessage("user", "hi", name="bob")]
    assert count_messages(named, enc) - count_messages(one, enc) == (
        count_text("bob", enc) + tokens.TOKENS_PER_NAME
    )


def test_encodings_are_cached() -> None:
    assert tokens.get_encoding("cl100k_base") is tokens.get_encoding("cl100k_base")


def test_special_token_text_is_counted_as_text() -> None:
    text = "<|endoftext|>"
    assert count_text(text, "cl100k_base") > 1  # not the single special token, no exception


def test_unknown_encoding() -> None:
    with pytest.raises(tokens.EncodingDataError, match="unknown encoding 'p50k_base'"):
        tokens.get_encoding("p50k_base")


def test_a_100k_token_prompt_counts() -> None:
    text = "evaluation " * 100_000
    assert count_text(text, "o200k_base") >= 100_000


# ------------------------------------------------------------------ cutting and parallel counts

#: Characters that stress the pre-tokenizers around the cut places: newlines and other
#: whitespace, ASCII and non-ASCII letters, combining marks, digits, apostrophes for the
#: contractions, punctuation that takes trailing newlines, CJK, and a special-token string.
_PIECES = [
    "\n", "\r", " ", "  ", "\t", "\u00a0", "\u2028", "a", "b", "Z", "E", "é", "\u0301",
    "ß", "1", "23", "'", "'s", "'LL", ".", "/", "#", "-", "?", "東", "\U0001f642",
    "<|endoftext|>", "word", "Word", "don't",
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=40), st.sampled_from(NAMES))
def test_every_cut_place_keeps_the_count(parts: list[str], name: str) -> None:
    text = "".join(parts)
    enc = tokens.get_encoding(name)
    whole = len(enc.encode_ordinary(text))
    for m in tokens._CUT.finditer(text):
        p = m.start()
        left, right = enc.encode_ordinary(text[:p]), enc.encode_ordinary(text[p:])
        assert len(left) + len(right) == whole, (text, p)


def test_the_cut_places_and_an_unsafe_cut() -> None:
    # The property above could fail: a cut inside a word changes the count. The rule offers
    # only the space between the words and the place after each newline.
    enc = tokens.get_encoding("cl100k_base")
    assert len(enc.encode_ordinary("hel")) + len(enc.encode_ordinary("lo world")) != len(
        enc.encode_ordinary("hello world")
    )
    assert [m.start() for m in tokens._CUT.finditer("hello world")] == [5]
    assert [m.start() for m in tokens._CUT.finditer("a.\n\nB c\n 1\n2")] == [4, 5, 11]


def test_cut_points_are_balanced_and_bounded() -> None:
    text = "Score the answer.\n" * 10_000  # 180,000 characters
    cuts = tokens.cut_points(text, 3, min_part=1_000)
    assert len(cuts) == 2 and cuts == sorted(cuts)
    bounds = [0, *cuts, len(text)]
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    assert max(sizes) - min(sizes) <= 2 * tokens._CUT_WINDOW
    assert all(tokens._CUT.match(text, c) for c in cuts)
    assert tokens.cut_points(text, 3, min_part=100_000) == []  # parts would be too small
    assert tokens.cut_points("東" * 300_000, 4) == []  # no cut place: one part
    assert tokens.cut_points(text, 1) == []


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("name", NAMES)
def test_parallel_count_is_the_count(name: str, threads: int, monkeypatch) -> None:
    text = CORPUS[-1] * 2
    assert len(text) >= 4 * tokens.PART_MIN_CHARS
    seen: list[str] = []
    count = tokens.count_part

    def recording(enc, part):
        import threading

        seen.append(threading.current_thread().name)
        return count(enc, part)

    monkeypatch.setattr(tokens, "count_part", recording)
    tokens.set_threads(threads)
    try:
        assert count_text(text, name) == len(tokens.get_encoding(name).encode_ordinary(text))
    finally:
        tokens.set_threads(2)
    assert len(seen) == threads  # one part per thread: the text is long enough for 4
    assert sum(n.startswith("ecu-tokens") for n in seen) == threads - 1


def test_count_matches_encode_ordinary_on_the_corpus() -> None:
    for name in NAMES:
        enc = tokens.get_encoding(name)
        for text in CORPUS:
            assert count_text(text, name) == len(enc.encode_ordinary(text)), text[:40]


def test_set_threads_refuses_zero() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        tokens.set_threads(0)


# ----------------------------------------------------------------------------- the network off

SITECUSTOMIZE = '''
"""Test-only: every network connection attempt in this interpreter fails."""
import socket

class NetworkBlocked(OSError):
    pass

def _blocked(*args, **kwargs):
    raise NetworkBlocked("network access is blocked in this test")

socket.socket.connect = _blocked
socket.socket.connect_ex = _blocked
socket.create_connection = _blocked
socket.getaddrinfo = _blocked
'''

CHILD = """
import hashlib, json, os, sys

import socket
try:
    socket.create_connection(("127.0.0.1", 9))
except OSError as exc:
    assert type(exc).__name__ == "NetworkBlocked", exc
else:
    raise SystemExit("the network is not blocked")

with open(sys.argv[1], encoding="utf-8") as fh:
    args = json.load(fh)
corpus, messages = args["corpus"], args["messages"]

# 1. The project's estimator: no network, an empty TIKTOKEN_CACHE_DIR.
from ecu_sidecar.pricing import tokens
ours = {}
for name in args["names"]:
    enc = tokens.get_encoding(name)
    ours[name] = {
        "text": [tokens.count_text(t, name) for t in corpus],
        "ids": [enc.encode_ordinary(t) for t in corpus],
        "chat": tokens.count_messages([tokens.ChatMessage(**m) for m in messages], name),
    }
assert os.listdir(os.environ["TIKTOKEN_CACHE_DIR"]) == [], "the estimator used the cache dir"

# 2. tiktoken's own registry with the same empty cache fails: it would need the network.
import tiktoken
try:
    tiktoken.get_encoding(args["names"][0])
except Exception as exc:
    blocked = repr(exc)
else:
    raise SystemExit("tiktoken loaded an encoding without its files: the test proves nothing")

# 3. The reference: tiktoken's own constructors (its pattern, its special tokens, its hash
#    check), reading the shipped files from a cache dir seeded the way tiktoken names them.
os.environ["TIKTOKEN_CACHE_DIR"] = args["seeded_cache"]
reference = {}
for name in args["names"]:
    enc = tiktoken.get_encoding(name)
    reference[name] = {
        "text": [len(enc.encode(t, disallowed_special=())) for t in corpus],
        "ids": [enc.encode(t, disallowed_special=()) for t in corpus],
    }
print(json.dumps({"ours": ours, "reference": reference, "blocked": blocked}))
"""


def test_estimation_works_with_the_network_blocked(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    empty_cache = tmp_path / "empty-cache"
    empty_cache.mkdir()
    seeded_cache = tmp_path / "seeded-cache"
    seeded_cache.mkdir()
    for name in NAMES:
        blobpath, _ = official(name)
        key = hashlib.sha1(blobpath.encode()).hexdigest()
        (seeded_cache / key).write_bytes(tokens.bpe_file_bytes(name))

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TIKTOKEN_", "DATA_GYM_", "PYTHON"))
    }
    env["PYTHONPATH"] = str(blocker)
    env["TIKTOKEN_CACHE_DIR"] = str(empty_cache)
    messages = [{"role": m.role, "content": m.content, "name": m.name} for m in COOKBOOK_MESSAGES]
    argument = tmp_path / "arguments.json"
    argument.write_text(
        json.dumps(
            {
                "names": NAMES,
                "corpus": CORPUS,
                "messages": messages,
                "seeded_cache": str(seeded_cache),
            }
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(argument)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "network access is blocked" in out["blocked"], out["blocked"]
    for name in NAMES:
        assert out["ours"][name]["text"] == out["reference"][name]["text"], name
        assert out["ours"][name]["ids"] == out["reference"][name]["ids"], name
    assert out["ours"]["cl100k_base"]["chat"] == 129
    assert out["ours"]["o200k_base"]["chat"] == 124


def test_tokenizer_threads_setting_is_checked_and_applied() -> None:
    from ecu_sidecar.server import SidecarServer
    from ecu_sidecar.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="ECU_TOKENIZER_THREADS"):
        Settings.from_env({"ECU_TOKENIZER_THREADS": "0"})
    SidecarServer(Settings.from_env({"ECU_TOKENIZER_THREADS": "3"}))
    try:
        assert tokens.threads() == 3
    finally:
        tokens.set_threads(2)
