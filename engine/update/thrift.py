"""Thrift's compact protocol, read into a tree that keeps every field (known or not) and written
back byte for byte, for the Parquet footer and page index that ``engine update`` splices.

Hand-written because no thrift library on PyPI reads pyarrow 26's footer without loss: the only
parquet.thrift shipped there (fastparquet's) predates SizeStatistics and the page-index
histograms, so thriftpy2 and fastparquet both drop those fields. A schema-less tree keeps them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)


class ThriftError(ValueError):
    """The bytes are not a compact-protocol struct."""


@dataclass
class Struct:
    """A struct's fields in wire order: [field id, compact type, value]."""

    fields: list[list[Any]] = field(default_factory=list)

    def get(self, fid: int, default: Any = None) -> Any:
        for f in self.fields:
            if f[0] == fid:
                return f[2]
        return default

    def set(self, fid: int, value: Any) -> None:
        """Replace an existing field's value (its type stays); a missing field is an error."""
        for f in self.fields:
            if f[0] == fid:
                f[2] = value
                return
        raise KeyError(fid)

    def has(self, fid: int) -> bool:
        return any(f[0] == fid for f in self.fields)

    def copy(self) -> Struct:
        return Struct([[f[0], f[1], _copy(f[2])] for f in self.fields])


@dataclass
class List:
    """A list or set: the compact element type and the values."""

    etype: int
    values: list[Any]
    kind: int = LIST


@dataclass
class Map:
    ktype: int
    vtype: int
    items: list[tuple[Any, Any]]


def _copy(value: Any) -> Any:
    if isinstance(value, Struct):
        return value.copy()
    if isinstance(value, List):
        return List(value.etype, [_copy(v) for v in value.values], value.kind)
    if isinstance(value, Map):
        return Map(value.ktype, value.vtype, [(_copy(k), _copy(v)) for k, v in value.items])
    return value


# ---- reading ------------------------------------------------------------------------------------


def loads(data: bytes | memoryview) -> tuple[Struct, int]:
    """One struct from the start of ``data``; returns it and the number of bytes it took."""
    try:
        return _Reader(bytes(data)).struct()
    except (IndexError, struct.error) as exc:
        raise ThriftError(f"truncated thrift struct: {exc}") from None


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def varint(self) -> int:
        buf, pos = self.buf, self.pos
        b = buf[pos]
        pos += 1
        result, shift = b & 0x7F, 7
        while b & 0x80:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
        self.pos = pos
        return result

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def struct(self) -> tuple[Struct, int]:
        out, last = Struct(), 0
        fields = out.fields
        buf = self.buf
        while True:
            head = buf[self.pos]
            self.pos += 1
            ctype = head & 0x0F
            if ctype == STOP:
                return out, self.pos
            delta = head >> 4
            fid = last + delta if delta else self.zigzag()
            last = fid
            if ctype <= FALSE:
                fields.append([fid, ctype, ctype == TRUE])
            elif ctype <= I64:
                n = self.varint()
                fields.append([fid, ctype, (n >> 1) ^ -(n & 1)])
            else:
                fields.append([fid, ctype, self.value(ctype)])

    def value(self, ctype: int) -> Any:
        if ctype in (I16, I32, I64):
            return self.zigzag()
        if ctype in (BYTE, TRUE, FALSE):  # a bool inside a list or map: one byte
            b = self.buf[self.pos]
            self.pos += 1
            return b
        if ctype == DOUBLE:
            (v,) = struct.unpack_from("<d", self.buf, self.pos)
            self.pos += 8
            return v
        if ctype == BINARY:
            n = self.varint()
            v = self.buf[self.pos : self.pos + n]
            if len(v) != n:
                raise IndexError("binary past the end")
            self.pos += n
            return v
        if ctype in (LIST, SET):
            head = self.buf[self.pos]
            self.pos += 1
            size = head >> 4
            if size == 15:
                size = self.varint()
            etype = head & 0x0F
            return List(etype, [self.value(etype) for _ in range(size)], ctype)
        if ctype == MAP:
            size = self.varint()
            if size == 0:
                return Map(0, 0, [])
            kv = self.buf[self.pos]
            self.pos += 1
            kt, vt = kv >> 4, kv & 0x0F
            return Map(kt, vt, [(self.value(kt), self.value(vt)) for _ in range(size)])
        if ctype == STRUCT:
            value, _ = self.struct()
            return value
        raise ThriftError(f"unknown compact type {ctype}")


# ---- writing ------------------------------------------------------------------------------------


def dumps(value: Struct) -> bytes:
    out = bytearray()
    _struct(out, value)
    return bytes(out)


def _varint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(out: bytearray, n: int) -> None:
    _varint(out, n << 1 if n >= 0 else (-n << 1) - 1)


def _struct(out: bytearray, s: Struct) -> None:
    last = 0
    for fid, ctype, value in s.fields:
        if ctype in (TRUE, FALSE):
            ctype = TRUE if value else FALSE
        delta = fid - last
        if 0 < delta <= 15:
            out.append(delta << 4 | ctype)
        else:
            out.append(ctype)
            _zigzag(out, fid)
        last = fid
        if ctype not in (TRUE, FALSE):
            _value(out, ctype, value)
    out.append(STOP)


def _value(out: bytearray, ctype: int, value: Any) -> None:
    if ctype in (I16, I32, I64):
        _zigzag(out, value)
    elif ctype in (BYTE, TRUE, FALSE):
        out.append(value & 0xFF)
    elif ctype == DOUBLE:
        out += struct.pack("<d", value)
    elif ctype == BINARY:
        _varint(out, len(value))
        out += value
    elif ctype in (LIST, SET):
        n = len(value.values)
        if n < 15:
            out.append(n << 4 | value.etype)
        else:
            out.append(0xF0 | value.etype)
            _varint(out, n)
        for v in value.values:
            _value(out, value.etype, v)
    elif ctype == MAP:
        _varint(out, len(value.items))
        if value.items:
            out.append(value.ktype << 4 | value.vtype)
            for k, v in value.items:
                _value(out, value.ktype, k)
                _value(out, value.vtype, v)
    elif ctype == STRUCT:
        _struct(out, value)
    else:
        raise ThriftError(f"unknown compact type {ctype}")
