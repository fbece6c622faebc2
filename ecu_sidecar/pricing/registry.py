"""Every rate card version this process has loaded, and the one that prices new work.

A new card is validated completely before it replaces the current one by a single reference
swap; a bad card raises ``RateCardError`` and the old card keeps serving. Versions are
immutable: a file that reuses a loaded version string with different content is refused.
Earlier versions stay retrievable with ``get`` so a commit is priced with the version its
reservation pinned.

Safe for one asyncio process and its worker threads: loads are serialized by a lock; readers
take ``current`` (or ``get``) without locking and keep the card they got, which never changes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass

from ecu_sidecar.errors import EcuError
from ecu_sidecar.pricing import tokens
from ecu_sidecar.pricing.ratecard import RateCard, RateCardError, parse_rate_card

__all__ = ["NoRateCard", "RateCardRegistry", "UnknownRateCardVersion"]


class UnknownRateCardVersion(EcuError):
    """A reservation pinned a rate card version this process has not loaded."""

    reason = "RATE_CARD_VERSION_UNKNOWN"

    def __init__(self, version: str, known: tuple[str, ...]) -> None:
        super().__init__(
            f"rate card version {version!r} is not loaded (loaded: {', '.join(known) or 'none'})",
            version=version,
        )
        self.version = version


class NoRateCard(EcuError):
    """No rate card has been loaded yet."""

    reason = "RATE_CARD_UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class _Seen:
    """The last state of the watched file: its stat signature and content hash."""

    signature: tuple[int, ...] | None
    sha256: str


class RateCardRegistry:
    """Rate card versions by version string, and the current one."""

    def __init__(self, *, warm_encodings: bool = True) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, RateCard] = {}
        self._current: RateCard | None = None
        self._path: str | None = None
        self._seen: _Seen | None = None
        self._warm = warm_encodings
        self.reloads_ok = 0
        """Card files loaded successfully (the first load included)."""
        self.reloads_failed = 0
        """Card files refused; the card before them kept serving."""
        self.last_error: RateCardError | None = None
        """Why the most recent failed load failed (None once a load succeeds)."""

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, warm_encodings: bool = True
    ) -> RateCardRegistry:
        """A registry serving the card at ``path`` (raises RateCardError if it is invalid)."""
        registry = cls(warm_encodings=warm_encodings)
        registry.load(path)
        return registry

    @property
    def current(self) -> RateCard:
        """The card that prices new previews and reservations."""
        card = self._current
        if card is None:
            raise NoRateCard("no rate card is loaded")
        return card

    @property
    def path(self) -> str | None:
        """The file ``reload`` and ``maybe_reload`` read."""
        return self._path

    def versions(self) -> tuple[str, ...]:
        """Every loaded version, in load order."""
        return tuple(self._versions)

    def get(self, version: str) -> RateCard:
        """The card of one version (the version a reservation pinned)."""
        card = self._versions.get(version)
        if card is None:
            raise UnknownRateCardVersion(version, self.versions())
        return card

    def load(self, path: str | os.PathLike[str]) -> RateCard:
        """Validate the card at ``path``, make it current, and watch that file from now on."""
        file = os.fspath(path)
        with self._lock:
            signature, data = self._read(file)
            card = self._accept(file, data, make_current=True)
            self._path = file
            self._seen = _Seen(signature, hashlib.sha256(data).hexdigest())
            return card

    def register(self, path: str | os.PathLike[str]) -> RateCard:
        """Validate and keep a card version retrievable by ``get`` without making it current.

        For archived cards: after a restart, commits pinned to an older version still price.
        """
        file = os.fspath(path)
        with self._lock:
            _, data = self._read(file)
            return self._accept(file, data, make_current=False)

    def reload(self) -> RateCard:
        """Re-read the watched file now (SIGHUP); raises RateCardError if it is invalid."""
        if self._path is None:
            raise NoRateCard("no rate card file to reload")
        return self.load(self._path)

    def maybe_reload(self) -> RateCard | None:
        """Reload the watched file if it changed; cheap enough to call every few seconds.

        Compares the file's (mtime, size, inode, device) with the last look, and on a change
        its SHA-256. Returns the new current card when one was swapped in, None when nothing
        changed. A changed but invalid file raises RateCardError once; the same bad content is
        not reported again until the file changes.
        """
        path = self._path
        if path is None:
            return None
        with self._lock:
            try:
                signature = _signature(path)
            except OSError as exc:
                self._report_once(_Seen(None, ""), path, exc)
                return None
            seen = self._seen
            if seen is not None and seen.signature == signature:
                return None
            try:
                signature, data = _read(path)
            except OSError as exc:
                self._report_once(_Seen(None, ""), path, exc)
                return None
            digest = hashlib.sha256(data).hexdigest()
            self._seen = _Seen(signature, digest)
            if seen is not None and seen.sha256 == digest:
                return None
            before = self._current
            card = self._accept(path, data, make_current=True)
            return card if card is not before else None

    # -- internals ---------------------------------------------------------------------------

    def _report_once(self, marker: _Seen, path: str, exc: OSError) -> None:
        """Count and raise an unreadable file, unless the last look already reported it."""
        if self._seen == marker:
            return
        self._seen = marker
        raise self._failed(_unreadable(path, exc)) from exc

    def _read(self, file: str) -> tuple[tuple[int, ...], bytes]:
        try:
            return _read(file)
        except OSError as exc:
            raise self._failed(_unreadable(file, exc)) from exc

    def _failed(self, error: RateCardError) -> RateCardError:
        self.reloads_failed += 1
        self.last_error = error
        return error

    def _accept(self, file: str, data: bytes, *, make_current: bool) -> RateCard:
        try:
            card = self._validate(file, data)
        except RateCardError as exc:
            raise self._failed(exc) from None
        card = self._versions.setdefault(card.version, card)  # same content: keep the first
        if make_current:
            self._current = card
        self.reloads_ok += 1
        self.last_error = None
        return card

    def _validate(self, file: str, data: bytes) -> RateCard:
        card = parse_rate_card(data, file)
        loaded = self._versions.get(card.version)
        if loaded is not None and loaded.fingerprint != card.fingerprint:
            raise RateCardError(
                file,
                "version",
                f"version {card.version!r} is already loaded with different content "
                f"(from {loaded.source}); versions are immutable: give the changed card a new "
                "version",
            )
        if self._warm:
            try:
                tokens.warm(sorted(card.encodings()))
            except tokens.EncodingDataError as exc:
                raise RateCardError(file, "", f"cannot load a token encoding: {exc}") from exc
        return card


def _unreadable(path: str, exc: OSError) -> RateCardError:
    return RateCardError(path, "", f"cannot read the file: {exc.strerror or exc}")


def _read(path: str) -> tuple[tuple[int, ...], bytes]:
    with open(path, "rb") as fh:
        signature = _stat_signature(os.fstat(fh.fileno()))
        return signature, fh.read()


def _stat_signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _signature(path: str) -> tuple[int, ...]:
    return _stat_signature(os.stat(path))
