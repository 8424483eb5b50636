"""Input generators shared by the fuzz tests: protobuf messages with hostile field values, and raw wire bytes.

One generator serves two drivers through :class:`Chooser`: the conduit fuzzer's attacking process draws from a
seeded :class:`random.Random` (reproducible from the printed seed, no Hypothesis in a process that runs as
uid 65534), the gRPC fuzzer from Hypothesis (so failures shrink to a minimal request). Everything is driven
by the message descriptors, so a new RPC, message or field is fuzzed without touching this file; field
*names* only steer which hostile values are likely (entry names, page tokens, label selectors, tokens).

Imports nothing beyond the standard library and protobuf: the attacking process loads it as another uid.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

T = TypeVar("T")

INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT64 = (0, 2**64 - 1)

# The protobuf well-known types' valid ranges (google/protobuf/duration.proto, timestamp.proto).
DURATION_MAX_SECONDS = 315_576_000_000
TIMESTAMP_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
TIMESTAMP_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
NANOS_MAX = 999_999_999

DURATION_SECONDS_EDGES = (
    0,
    1,
    -1,
    2,
    60,
    3600,
    86_400,
    86_401,
    10**9,
    10**10,
    TIMESTAMP_MAX_SECONDS - 1_700_000_000,  # about what still fits in a Timestamp when added to now
    DURATION_MAX_SECONDS,
    DURATION_MAX_SECONDS + 1,
    -DURATION_MAX_SECONDS,
    -DURATION_MAX_SECONDS - 1,
    2**53,
    2**62,
    INT64[1],
    INT64[0],
)
TIMESTAMP_SECONDS_EDGES = (
    0,
    1,
    -1,
    1_700_000_000,
    TIMESTAMP_MIN_SECONDS,
    TIMESTAMP_MIN_SECONDS - 1,
    TIMESTAMP_MAX_SECONDS,
    TIMESTAMP_MAX_SECONDS + 1,
    INT64[1],
    INT64[0],
)
NANOS_EDGES = (0, 1, -1, 100_000_000, NANOS_MAX, NANOS_MAX + 1, -NANOS_MAX, -NANOS_MAX - 1, *INT32)
UINT_EDGES = (0, 1, 2, 63, 64, 65, 253, 254, 1000, 1024, 1025, 10_000, 10_001, 20_000, 20_001, 65_536)
NESTING_DEPTHS = (1, 2, 50, 900, 999, 1000, 1001, 3000, 10_000, 100_000)

NAME_CHARS = "ABCXYZabcxyz0189._-"
TOKEN_BYTES = 32

# Entry names a client might send: the edges of the grammar in fdbroker.names, and what is just past them.
EDGE_NAMES = (
    "",
    "a",
    "a" * 255,
    "a" * 256,
    "a/" * 127 + "a",
    "a/" * 127 + "ab",
    "/a",
    "a/",
    "a//b",
    ".",
    "..",
    "a/./b",
    "a/../b",
    "../etc/passwd",
    "a:b",
    " a",
    "a b",
    "a\x00b",
    "a\nb",
    "\u00e4",
    "\u202ea",
    "\U0001f600",
    "a" * 70_000,
    "*",
    "**",
    "a/*",
)
EDGE_SELECTORS = (
    "",
    ",",
    "=",
    "!",
    "!=",
    "a",
    "a=",
    "=b",
    "a=b,",
    ",a=b",
    "a==b",
    "a!=b",
    "!a",
    "!a=b",
    "a=b,c!=d,!e,f",
    "a=" + "v" * 300,
    "k" * 64 + "=v",
    "a=b," * 5000,
    "\u00e4=\u00f6",
    "a=\x00",
)


class Chooser(Protocol):
    """Where the generators get their decisions from (a seeded RNG or Hypothesis)."""

    def integer(self, lo: int, hi: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def chance(self, p: float) -> bool: ...

    def binary(self, max_size: int) -> bytes: ...

    def text(self, max_size: int, alphabet: str | None = None) -> str: ...


class RandomChooser:
    """Decisions from a seeded :class:`random.Random`: the same seed gives the same inputs."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        # Half the time small magnitudes: most interesting values are near zero or near an edge.
        if hi - lo > 1000 and self.rng.random() < 0.5:
            return self.rng.randint(max(lo, -100), min(hi, 1000))
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def binary(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))

    def text(self, max_size: int, alphabet: str | None = None) -> str:
        n = self.rng.randint(0, max_size)
        if alphabet is not None:
            return "".join(self.rng.choices(alphabet, k=n))
        out = []
        for _ in range(n):
            c = self.rng.choice((0x20, 0x7F, 0x100, 0x3000, 0x10FFFF))
            cp = self.rng.randint(0, c)
            if 0xD800 <= cp <= 0xDFFF:  # surrogates cannot be UTF-8 encoded into a protobuf string
                cp = 0xFFFD
            out.append(chr(cp))
        return "".join(out)


@dataclass
class FuzzContext:
    """Values worth reusing: names that exist, tokens and lease ids that were real, page tokens the broker
    made. Generators mix them with made-up values so requests reach past the first check."""

    names: list[str] = field(default_factory=list)
    tokens: list[bytes] = field(default_factory=list)
    lease_ids: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)


# -- values --------------------------------------------------------------------------------------------------
#
# Every generator has a plausible branch (what a correct client sends: names that exist or are valid, small
# valid durations, page tokens the broker made) and a hostile one (edges and garbage). A request is plausible
# but for a few hostile fields, so it gets past the first check and the hostile value reaches deep code; with
# Hypothesis, shrinking turns hostile fields plausible until only the ones that matter are left.


def gen_int(ch: Chooser, bounds: tuple[int, int], edges: Sequence[int] = ()) -> int:
    lo, hi = bounds
    pool = [e for e in (*edges, lo, hi, 0, 1, lo + 1, hi - 1) if lo <= e <= hi]
    if ch.chance(0.5):
        return ch.choice(pool)
    return ch.integer(lo, hi)


def valid_name(ch: Chooser, ctx: FuzzContext) -> str:
    if ctx.names and ch.chance(0.6):
        return ch.choice(ctx.names)
    segs = [ch.text(12, NAME_CHARS) or "x" for _ in range(ch.integer(1, 4))]
    return "/".join(s if s not in (".", "..") else s + "x" for s in segs)


def gen_name(ch: Chooser, ctx: FuzzContext, hostile: bool) -> str:
    if not hostile:
        return valid_name(ch, ctx)
    return ch.choice(EDGE_NAMES) if ch.chance(0.8) else ch.text(40)


def nested_json(depth: int, opener: str = "[") -> str:
    if opener == "{":
        return '{"a":' * depth + "0" + "}" * depth
    return "[" * depth + "]" * depth


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def gen_page_token(ch: Chooser, ctx: FuzzContext, hostile: bool) -> str:
    if not hostile:
        return ch.choice(["", *ctx.page_tokens])
    kind = ch.integer(0, 11)
    if kind <= 3:  # nesting: a decoder that recurses falls over somewhere around 1000
        return b64(nested_json(ch.choice(NESTING_DEPTHS), ch.choice("[{")).encode())
    if kind == 4:
        # The right shape with the wrong contents: other prefix/selector, wrong types, extra items.
        shape = ch.choice(
            (
                ["a", "", ""],
                ["a", "x", ""],
                [1, "", ""],
                [None, None, None],
                ["a", "", "", ""],
                ["a"],
                [],
                {"a": 1, "b": 2, "c": 3},
                "abc",
                12,
                ["\ud800", "", ""],
                ["a" * 100_000, "", ""],
            )
        )
        return b64(json.dumps(shape).encode())
    if kind == 5:
        return b64(ch.binary(64))
    if kind == 6:
        return b64(b"1e999999" if ch.chance(0.5) else b"9" * 100_000)
    if kind == 7:
        return ch.text(64, "ABCabc0189-_=+/")
    if kind == 8:
        return ch.text(16) or "\u00e4"  # not ASCII: not base64 at all
    if kind == 9:
        return "A" * ch.choice((4, 1000, 100_000, 1_000_000))
    if kind == 10:
        return b64(b"\xff\xfe" + ch.binary(16))  # not UTF-8 inside
    return b64(ch.text(40).encode())


def gen_selector(ch: Chooser, hostile: bool) -> str:
    if not hostile:
        return ch.choice(("", "a=b", "k", "!k", "a!=b", "a=b,k"))
    if ch.chance(0.5):
        return ch.choice(EDGE_SELECTORS)
    terms = []
    for _ in range(ch.integer(1, 4)):
        k = ch.text(8, NAME_CHARS + "!=, ")
        op = ch.choice(("", "=", "!=", "!"))
        v = ch.text(8, NAME_CHARS + "=,\x00 ")
        terms.append(f"!{k}" if op == "!" else f"{k}{op}{v}" if op else k)
    return ",".join(terms)


def gen_label_key(ch: Chooser, hostile: bool) -> str:
    if not hostile:
        return ch.choice(("a", "k", "app", "tier/x")) + ch.text(4, NAME_CHARS)
    return ch.choice(("", "k" * 63, "k" * 64, "a=b", "a,b", "\u00e4", " ", "!", ch.text(10)))


def gen_label_value(ch: Chooser, hostile: bool) -> str:
    if not hostile:
        return ch.text(8, NAME_CHARS)
    return ch.choice(
        ("v" * 255, "v" * 256, "a,b", "a=b", "\x00", "\x7f", "\u0085", "\U0001f600", ch.text(12))
    )


def gen_token(ch: Chooser, ctx: FuzzContext, hostile: bool) -> bytes:
    if not hostile:
        if ctx.tokens and ch.chance(0.7):
            return ch.choice(ctx.tokens)
        return random.Random(ch.integer(0, 2**32)).randbytes(TOKEN_BYTES)
    return ch.choice(
        (b"", b"\x00", b"\x00" * TOKEN_BYTES, b"\xff" * (TOKEN_BYTES + 1), b"short", ch.binary(100))
    )


def gen_string(ch: Chooser, ctx: FuzzContext, fname: str, hostile: bool) -> str:
    if fname in ("name", "names", "prefix") or fname.endswith("_name"):
        if fname == "prefix" and not hostile:
            return ch.choice(("", "fz/", "a", *ctx.names))
        return gen_name(ch, ctx, hostile)
    if "page_token" in fname:
        return gen_page_token(ch, ctx, hostile)
    if "selector" in fname:
        return gen_selector(ch, hostile)
    if "lease_id" in fname:
        if not hostile:
            return ch.choice(ctx.lease_ids) if ctx.lease_ids else ch.text(32, "0123456789abcdef")
        return ch.choice(("", "x", "0" * 32, "x" * 10_000, ch.text(20)))
    if not hostile:
        return ch.text(12, NAME_CHARS)
    return ch.choice(("", ch.text(20), "x" * 10_000))


# -- messages ------------------------------------------------------------------------------------------------

_SCALAR_BOUNDS = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_UINT32: UINT32,
    FieldDescriptor.TYPE_FIXED32: UINT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_FIXED64: UINT64,
}


def descriptor_of(msg: Message | type[Message]) -> Descriptor:
    """``msg.DESCRIPTOR``, typed as the public descriptor class. The stubs type it as that or upb's C class; at
    run time it is the C class, which ``isinstance()`` counts as the public one."""
    desc = msg.DESCRIPTOR
    assert isinstance(desc, Descriptor)
    return desc


def is_repeated(f: FieldDescriptor) -> bool:
    # ``is_repeated`` since protobuf 6.31 (our floor); 7 dropped the ``label`` it replaced.
    return f.is_repeated


def _scalar(ch: Chooser, ctx: FuzzContext, f: FieldDescriptor, hostile: bool) -> Any:
    t = f.type
    if t in _SCALAR_BOUNDS:
        lo, hi = _SCALAR_BOUNDS[t]
        if not hostile:  # zero (a field left at its default) or small
            return ch.choice((0, ch.integer(max(lo, 0), 10)))
        return gen_int(ch, (lo, hi), UINT_EDGES if lo == 0 else (-1, -2, *UINT_EDGES))
    if t == FieldDescriptor.TYPE_BOOL:
        return ch.chance(0.5)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if not hostile:
            return float(ch.integer(0, 100))
        return ch.choice((-1.0, 1e-9, 1e308, float("inf"), float("-inf"), float("nan")))
    if t == FieldDescriptor.TYPE_STRING:
        return gen_string(ch, ctx, f.name, hostile)
    if t == FieldDescriptor.TYPE_BYTES:
        return gen_token(ch, ctx, hostile) if "token" in f.name else ch.binary(64 if hostile else 8)
    if t == FieldDescriptor.TYPE_ENUM:
        assert f.enum_type is not None  # an enum field
        known = [v.number for v in f.enum_type.values]
        return ch.choice(known) if not hostile else gen_int(ch, INT32)  # open enums take any int32
    raise TypeError(f"no generator for field type {t} ({f.full_name})")


def fill_time(ch: Chooser, msg: Message, hostile: bool) -> None:
    """Seconds and nanos of a Duration or Timestamp: plausible, or (hostile) at and past the valid range."""
    duration = msg.DESCRIPTOR.full_name == "google.protobuf.Duration"
    if not hostile:
        seconds = ch.integer(1, 3600) if duration else int(time.time()) + ch.integer(-3600, 3600)
        nanos = ch.choice((0, ch.integer(0, NANOS_MAX)))
    elif duration:
        seconds = gen_int(ch, INT64, DURATION_SECONDS_EDGES)
        if ch.chance(0.3) and seconds != INT64[0]:
            seconds = -seconds
        nanos = gen_int(ch, INT32, NANOS_EDGES)
    else:
        seconds = gen_int(ch, INT64, TIMESTAMP_SECONDS_EDGES)
        nanos = gen_int(ch, INT32, NANOS_EDGES)
    msg.seconds = seconds  # type: ignore[attr-defined]
    msg.nanos = nanos  # type: ignore[attr-defined]


_WELL_KNOWN_TIMES = ("google.protobuf.Duration", "google.protobuf.Timestamp")


def fill_message(
    ch: Chooser, ctx: FuzzContext, msg: Message, depth: int = 3, *, hostility: float = 0.25
) -> Message:
    """Sets a random subset of ``msg``'s fields (recursing ``depth`` levels into message fields), each one a
    plausible value or, with probability ``hostility``, a hostile one. At most one field of each oneof is set.
    Returns ``msg``."""
    desc = descriptor_of(msg)
    if desc.full_name in _WELL_KNOWN_TIMES:  # times are prime suspects (overflow): hostile more often
        fill_time(ch, msg, ch.chance(max(hostility, 0.5)))
        return msg
    oneof_pick = {o.name: ch.choice([None, *o.fields]) for o in desc.oneofs if not o.name.startswith("_")}
    for f in desc.fields:
        o = f.containing_oneof
        if o is not None and o.name in oneof_pick:
            if oneof_pick[o.name] is not f:
                continue
        elif not ch.chance(0.85):
            continue
        _fill_field(ch, ctx, msg, f, depth, hostility)
    return msg


def _fill_field(
    ch: Chooser, ctx: FuzzContext, msg: Message, f: FieldDescriptor, depth: int, hostility: float
) -> None:
    holder = getattr(msg, f.name)
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        sub = f.message_type
        assert sub is not None  # a message field
        if sub.GetOptions().map_entry:
            kf, vf = sub.fields_by_name["key"], sub.fields_by_name["value"]
            hostile = ch.chance(hostility)
            for _ in range(ch.integer(0, 40 if hostile else 3)):
                h = hostile and ch.chance(0.5)
                if kf.type == FieldDescriptor.TYPE_STRING:
                    key = gen_label_key(ch, h)
                else:
                    key = _scalar(ch, ctx, kf, h)
                if vf.type == FieldDescriptor.TYPE_MESSAGE:
                    fill_message(ch, ctx, holder[key], depth - 1, hostility=hostility)
                elif vf.type == FieldDescriptor.TYPE_STRING:
                    holder[key] = gen_label_value(ch, h)
                else:
                    holder[key] = _scalar(ch, ctx, vf, h)
            return
        if sub.full_name not in _WELL_KNOWN_TIMES and depth <= 0:
            return
        if is_repeated(f):
            for _ in range(ch.integer(1, 3)):
                fill_message(ch, ctx, holder.add(), depth - 1, hostility=hostility)
        else:
            fill_message(ch, ctx, holder, depth - 1, hostility=hostility)
            if not holder.ListFields():
                holder.SetInParent()  # present but empty: a different case from absent
        return
    hostile = ch.chance(hostility)
    if is_repeated(f):
        n = ch.integer(1, 3) if not hostile else ch.choice((0, 1, 5, 300, ch.integer(0, 20)))
        holder.extend(_scalar(ch, ctx, f, hostile and ch.chance(0.5)) for _ in range(n))
        return
    setattr(msg, f.name, _scalar(ch, ctx, f, hostile))


def malformed_times(msg: Message, path: str = "") -> list[str]:
    """Paths of the Duration/Timestamp fields set in ``msg`` that the protobuf spec says are invalid
    (seconds or nanos out of range, or a Duration whose seconds and nanos have different signs)."""
    out: list[str] = []
    name = msg.DESCRIPTOR.full_name
    if name == "google.protobuf.Duration":
        s, n = msg.seconds, msg.nanos  # type: ignore[attr-defined]
        if abs(s) > DURATION_MAX_SECONDS or abs(n) > NANOS_MAX or (s > 0 > n) or (s < 0 < n):
            out.append(f"{path or name}=Duration(seconds={s}, nanos={n})")
        return out
    if name == "google.protobuf.Timestamp":
        s, n = msg.seconds, msg.nanos  # type: ignore[attr-defined]
        if not TIMESTAMP_MIN_SECONDS <= s <= TIMESTAMP_MAX_SECONDS or not 0 <= n <= NANOS_MAX:
            out.append(f"{path or name}=Timestamp(seconds={s}, nanos={n})")
        return out
    for f, value in msg.ListFields():
        if f.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        p = f"{path}.{f.name}" if path else f.name
        sub = f.message_type
        assert sub is not None  # a message field
        if sub.GetOptions().map_entry:
            values = value.values() if sub.fields_by_name["value"].message_type else []
        else:
            values = value if is_repeated(f) else [value]
        for i, v in enumerate(values):
            out.extend(malformed_times(v, f"{p}[{i}]" if is_repeated(f) else p))
    return out


# -- wire format ---------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def gen_wire(ch: Chooser, desc: Descriptor, depth: int = 2) -> bytes:
    """Bytes that look like a serialized ``desc`` to a varying degree: real field numbers with wrong wire
    types, overlong or truncated varints, lengths that overrun, strings that are not UTF-8, unmatched groups,
    nested garbage; or just noise. Much of it does not parse; some does (unknown fields are legal)."""
    out = bytearray()
    numbers = [f.number for f in desc.fields] or [1]
    for _ in range(ch.integer(0, 6)):
        num = (
            ch.choice(numbers)
            if ch.chance(0.8)
            else ch.choice((0, 1, 19000, 2**29 - 1, ch.integer(1, 2**29 - 1)))
        )
        wt = ch.integer(0, 7)
        out += varint((num << 3) | wt)
        if wt == 0:
            v = ch.choice((0, 1, 2**63, 2**64 - 1, ch.integer(0, 2**64 - 1)))
            enc = varint(v)
            if ch.chance(0.15):
                enc = b"\xff" * ch.integer(10, 12) + b"\x01"  # longer than 10 bytes
            if ch.chance(0.1):
                enc = enc[:-1] + bytes([enc[-1] | 0x80])  # never terminated
            out += enc
        elif wt == 1:
            out += ch.binary(8) if ch.chance(0.3) else ch.binary(0) + bytes(8)
        elif wt == 2:
            f = desc.fields_by_number.get(num)
            sub = f.message_type if f is not None and f.type == FieldDescriptor.TYPE_MESSAGE else None
            if sub is not None and depth > 0 and ch.chance(0.5):
                payload = gen_wire(ch, sub, depth - 1)
            elif ch.chance(0.4):
                payload = ch.choice((b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"a\xfe", b"\xf4\x90\x80\x80"))
            else:
                payload = ch.binary(40)
            n = len(payload) + ch.choice((0, 0, 0, 1, -1, 1000, 2**31, 2**63))
            out += varint(max(0, n)) + payload
        elif wt == 5:
            out += ch.binary(4) if ch.chance(0.3) else bytes(4)
        # 3, 4 (groups) and 6, 7 (invalid) carry nothing: what follows is whatever comes next
    if ch.chance(0.2):
        out += ch.binary(32)
    return bytes(out)


def mutate(ch: Chooser, data: bytes) -> bytes:
    """A valid serialization, damaged: truncated, bit-flipped, or with bytes inserted."""
    b = bytearray(data)
    for _ in range(ch.integer(1, 4)):
        kind = ch.integer(0, 2)
        if kind == 0 and b:
            del b[ch.integer(0, len(b) - 1) :]
        elif kind == 1 and b:
            i = ch.integer(0, len(b) - 1)
            b[i] ^= 1 << ch.integer(0, 7)
        else:
            i = ch.integer(0, len(b))
            b[i:i] = ch.binary(8)
    return bytes(b)


def unknown_fields(ch: Chooser) -> bytes:
    """Well-formed fields with numbers no message here uses: a correct receiver ignores them."""
    out = bytearray()
    for _ in range(ch.integer(1, 3)):
        num = ch.choice((1000, 5000, 19_999, 2**29 - 1))
        if ch.chance(0.5):
            out += varint(num << 3) + varint(ch.integer(0, 2**64 - 1))
        else:
            payload = ch.binary(20)
            out += varint((num << 3) | 2) + varint(len(payload)) + payload
    return bytes(out)


# -- conduit frames ------------------------------------------------------------------------------------------

PREFIX = struct.Struct(">I")


def prefix(n: int) -> bytes:
    return PREFIX.pack(n & 0xFFFFFFFF)


def describe_frame(msg: Message, limit: int = 300) -> str:
    """A one-line rendering of a message for a reproducer (long values cut)."""
    from google.protobuf import text_format

    text = text_format.MessageToString(msg, as_one_line=True, as_utf8=False)
    return text if len(text) <= limit else text[:limit] + f"...(+{len(text) - limit} chars)"


class Stopwatch:
    """Worst and count of timed operations (latency, reported, never asserted)."""

    def __init__(self) -> None:
        self.count = 0
        self.worst = 0.0
        self.worst_what = ""
        self.total = 0.0
        self.samples: list[float] = []

    def time(self, what: str, fn: Callable[[], T]) -> T:
        t = time.monotonic()
        try:
            return fn()
        finally:
            dt = time.monotonic() - t
            self.count += 1
            self.total += dt
            self.samples.append(dt)
            if dt > self.worst:
                self.worst, self.worst_what = dt, what

    def percentile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(q * len(s)))]
