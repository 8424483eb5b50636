"""Entry names, labels and label selectors.

Names are exported to child processes through ``LISTEN_FDNAMES`` (``:``-separated) and shown in paths, logs
and tables, so the language is deliberately small:

* 1-255 bytes of ``[A-Za-z0-9._/-]``;
* ``/``-separated segments, none empty (no leading, trailing or double ``/``);
* no ``.`` or ``..`` segment;
* no ``:`` (the ``LISTEN_FDNAMES`` separator).

Labels are ``key=value`` pairs on an entry: at most 32; keys 1-63 bytes of ``[A-Za-z0-9._/-]``; values 0-255
bytes with no control characters, ``,`` or ``=`` (so that a selector can always express them).

Every check raises :class:`fdbroker.errors.InvalidArgument` with a message saying what is wrong and what is
allowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from fdbroker.errors import InvalidArgument

MAX_NAME_BYTES = 255
MAX_LABELS = 32
MAX_LABEL_KEY_BYTES = 63
MAX_LABEL_VALUE_BYTES = 255

_NAME_CHARS = "A-Za-z0-9._/-"
# ASCII only: re's [A-Za-z0-9] with no re.UNICODE surprises since the class is explicit.
_NAME_RE = re.compile(r"[A-Za-z0-9._/-]+")
_BAD_NAME_CHAR_RE = re.compile(r"[^A-Za-z0-9._/-]")
_KEY_RE = _NAME_RE
# C0 controls, DEL, C1 controls, lone surrogates (not encodable as UTF-8), and the selector metacharacters.
_BAD_VALUE_CHAR_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff,=]")

_NAME_RULES = (
    "names are 1-255 bytes of [A-Za-z0-9._/-] in '/'-separated non-empty segments, "
    "with no '.' or '..' segment and no ':'"
)


def validate_name(name: str) -> None:
    """Checks an entry name; raises :class:`InvalidArgument` (``name=name``) saying what is wrong."""
    # Fast path: the common, valid case costs one regex match and a few comparisons.
    if (
        0 < len(name) <= MAX_NAME_BYTES
        and _NAME_RE.fullmatch(name) is not None
        and name[0] != "/"
        and name[-1] != "/"
        and "//" not in name
        and not _has_dot_segment(name)
    ):
        return
    raise InvalidArgument(f"invalid entry name {name!r}: {_name_problem(name)}; {_NAME_RULES}", name=name)


def _has_dot_segment(name: str) -> bool:
    if "." not in name:
        return False
    return any(seg in (".", "..") for seg in name.split("/"))


def _name_problem(name: str) -> str:
    if not name:
        return "it is empty"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"it is {size} bytes long"
    if ":" in name:
        return "it contains ':' (the LISTEN_FDNAMES separator)"
    bad = _BAD_NAME_CHAR_RE.search(name)
    if bad is not None:
        return f"it contains {bad.group()!r} at offset {bad.start()}"
    if name.startswith("/"):
        return "it starts with '/'"
    if name.endswith("/"):
        return "it ends with '/'"
    if "//" in name:
        return "it contains an empty segment ('//')"
    for seg in name.split("/"):
        if seg in (".", ".."):
            return f"it contains a {seg!r} segment"
    return "it is not a valid name"  # pragma: no cover - unreachable if the checks above are complete


def validate_label_key(key: str) -> None:
    """Checks one label key; raises :class:`InvalidArgument`."""
    if 0 < len(key) <= MAX_LABEL_KEY_BYTES and _KEY_RE.fullmatch(key) is not None:
        return
    if not key:
        problem = "it is empty"
    elif _KEY_RE.fullmatch(key) is None:
        bad = _BAD_NAME_CHAR_RE.search(key)
        problem = f"it contains {bad.group()!r}" if bad else "it has a bad character"
    else:
        problem = f"it is {len(key)} bytes long"
    raise InvalidArgument(
        f"invalid label key {key!r}: {problem}; label keys are 1-63 bytes of [{_NAME_CHARS}]"
    )


def validate_label_value(key: str, value: str) -> None:
    """Checks one label value; raises :class:`InvalidArgument`."""
    bad = _BAD_VALUE_CHAR_RE.search(value)
    if bad is None and len(value) <= MAX_LABEL_VALUE_BYTES:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size <= MAX_LABEL_VALUE_BYTES:
            return
        problem = f"it is {size} bytes long"
    elif bad is not None:
        problem = f"it contains {bad.group()!r}"
    else:
        problem = f"it is {len(value.encode('utf-8', 'surrogatepass'))} bytes long"
    raise InvalidArgument(
        f"invalid value for label {key!r}: {problem}; "
        "label values are 0-255 bytes with no control characters, ',' or '='"
    )


def validate_labels(labels: Mapping[str, str]) -> None:
    """Checks an entry's labels (count, keys, values); raises :class:`InvalidArgument`."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)}); an entry has at most {MAX_LABELS} labels")
    for key, value in labels.items():
        validate_label_key(key)
        validate_label_value(key, value)


@dataclass(frozen=True, slots=True)
class Requirement:
    """One term of a selector: ``op`` is ``"="``, ``"!="``, ``"exists"`` or ``"absent"``."""

    key: str
    op: str
    value: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "=":
            return labels.get(self.key) == self.value
        if self.op == "!=":
            # Kubernetes semantics: an absent key satisfies k!=v.
            return labels.get(self.key) != self.value
        if self.op == "exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A parsed label selector: all requirements must hold (an empty selector matches everything)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        parts = []
        for r in self.requirements:
            if r.op == "exists":
                parts.append(r.key)
            elif r.op == "absent":
                parts.append("!" + r.key)
            else:
                parts.append(f"{r.key}{r.op}{r.value}")
        return ",".join(parts)


_SELECTOR_SYNTAX = (
    "a selector is comma-separated terms: 'k=v', 'k!=v', 'k' (key present) or '!k' (key absent)"
)


def parse_label_selector(selector: str) -> LabelSelector:
    """Parses ``k=v,k2!=v2,k3,!k4``; the empty string selects everything.

    Terms are not trimmed: spaces are part of keys (which makes them invalid) and values. ``k!=v`` also
    matches entries without ``k``. Raises :class:`InvalidArgument` on bad syntax, keys or values.
    """
    if selector == "":
        return LabelSelector()
    reqs: list[Requirement] = []
    for term in selector.split(","):
        if not term:
            raise InvalidArgument(f"invalid label selector {selector!r}: empty term; {_SELECTOR_SYNTAX}")
        try:
            req = _parse_term(term)
        except InvalidArgument as e:
            raise InvalidArgument(
                f"invalid label selector {selector!r}: {e.message}; {_SELECTOR_SYNTAX}"
            ) from None
        reqs.append(req)
    return LabelSelector(tuple(reqs))


def _parse_term(term: str) -> Requirement:
    if term.startswith("!"):
        key = term[1:]
        if "=" in key:
            raise InvalidArgument(f"term {term!r} mixes '!k' and '='")
        validate_label_key(key)
        return Requirement(key, "absent")
    ne = term.find("!=")
    if ne >= 0:
        key, value = term[:ne], term[ne + 2 :]
        validate_label_key(key)
        validate_label_value(key, value)
        return Requirement(key, "!=", value)
    eq = term.find("=")
    if eq >= 0:
        key, value = term[:eq], term[eq + 1 :]
        validate_label_key(key)
        validate_label_value(key, value)
        return Requirement(key, "=", value)
    validate_label_key(term)
    return Requirement(term, "exists")
