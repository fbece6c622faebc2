"""One-dimensional PostgreSQL arrays in binary, for the bulk inserts of the PostgreSQL backend.

``Tx.insert`` sends every column of a batch as one array (``unnest``). psycopg dumps a Python
list element by element in Python (a frame and a ``struct.pack`` per element: a third of the
flusher's write CPU at 2,000 events per batch). :func:`packed` writes the same wire format
(PostgreSQL's ``array_send``) with the per-element work in C (``map``, ``b"".join``), and
:func:`register` teaches a connection to send the result as an array of its element type.

A column whose values do not fit its kind (an integer beyond int8, a text that is not valid
UTF-8) is left to psycopg (:func:`packed` returns None), so that what the database refuses is
refused as before, with the database's own error.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import chain, repeat
from typing import Any

__all__ = ["KINDS", "Packed", "packed", "register"]

_HEADER = struct.Struct(">iiIii")  # ndim, has-null flag, element oid, length, lower bound
_LENGTH = struct.Struct(">i")
_INT8 = struct.Struct(">iq")  # element length 8, value
_NULL = _LENGTH.pack(-1)
_BOOLS = {False: _LENGTH.pack(1) + b"\x00", True: _LENGTH.pack(1) + b"\x01"}


class Packed:
    """An array already in PostgreSQL's binary format (one subclass per array type)."""

    __slots__ = ("data",)
    oid = 0

    def __init__(self, data: bytes) -> None:
        self.data = data


class _TextArray(Packed):
    __slots__ = ()
    oid = 1009


class _Int8Array(Packed):
    __slots__ = ()
    oid = 1016


class _BoolArray(Packed):
    __slots__ = ()
    oid = 1000


#: Column kind -> (element oid, the array's class). JSON travels as text, cast in the SQL.
KINDS: dict[str, tuple[int, type[Packed]]] = {
    "text": (25, _TextArray),
    "json": (25, _TextArray),
    "bigint": (20, _Int8Array),
    "bool": (16, _BoolArray),
}


def packed(kind: str, values: Sequence[Any]) -> Packed | None:
    """``values`` as a binary array of ``kind`` (see KINDS); None when a value does not fit
    (psycopg dumps that column instead)."""
    elem_oid, cls = KINDS[kind]
    has_null = None in values
    try:
        if kind == "bigint":
            if has_null:
                body = b"".join([_NULL if v is None else _INT8.pack(8, v) for v in values])
            else:
                body = b"".join(map(_INT8.pack, repeat(8, len(values)), values))
        elif kind == "bool":
            # Only True and False (1 and 0 would find them too): psycopg sends other values as
            # another array type, which the SQL's cast refuses.
            if not all(v is None or type(v) is bool for v in values):
                return None
            body = b"".join([_NULL if v is None else _BOOLS[v] for v in values])
        elif has_null:
            body = b"".join(
                [_NULL if v is None else _LENGTH.pack(len(t := v.encode())) + t for v in values]
            )
        else:
            texts = list(map(str.encode, values))
            lengths = map(_LENGTH.pack, map(len, texts))
            body = b"".join(chain.from_iterable(zip(lengths, texts, strict=True)))
    except (struct.error, TypeError, AttributeError, KeyError, UnicodeEncodeError):
        return None
    return cls(_HEADER.pack(1, has_null, elem_oid, len(values), 1) + body)


def register(adapters: Any) -> None:
    """Let a psycopg connection (its ``adapters``) send :class:`Packed` values as they are."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    for cls in {cls for _, cls in KINDS.values()}:

        class PackedDumper(Dumper):
            format = Format.BINARY
            oid = cls.oid

            def dump(self, obj: Packed) -> bytes:
                return obj.data

        adapters.register_dumper(cls, PackedDumper)
