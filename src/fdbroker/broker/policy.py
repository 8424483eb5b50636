"""Who may do what: identities, actions, the policy file (TOML) and per-uid limits.

Evaluation (see docs/policy.md for the file format and examples), for ``allows(identity, action, name,
owner_uid)``:

1. Anonymous (``identity is None``): only the actions in ``[anonymous] allow`` (default: info, list, stat,
   watch), on names matching ``[anonymous] names`` (default: all). Anonymous callers never get an action that
   moves a descriptor or changes the registry; a file that tries is rejected.
2. uid 0 and the broker's own uid: everything, always (the administrator cannot lock itself out).
3. **Deny overrides allow**: if any rule matching the identity and the name denies the action, it is denied.
4. If any matching rule allows it, it is allowed.
5. Built-in session rules: any session may info/list/stat/watch anything, put a new name (``owner_uid`` None),
   and do anything to entries its uid owns (``owner_uid == uid``).
6. Otherwise denied.

Rules are therefore order-independent. A rule matches an identity when its uid is in ``uids`` or its gid is
in ``gids`` (a rule with neither matches every session). A rule's ``names`` globs (``*`` within one segment,
``**`` across segments, ``?`` one character) restrict it to entries; an action not about one entry
(``name=""``: the ``GetInfo`` call, a whole ``List`` call) is decided by the rules without ``names`` and the
built-ins only; the broker filters the entries of a listing or a watch per entry with
``allows(identity, "list"/"watch", name, owner)``.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fdbroker.errors import BrokerError, InvalidArgument, PermissionDenied, Unauthenticated
from fdbroker.protocol import SESSION_METADATA_KEY

ACTIONS: tuple[str, ...] = ("info", "list", "stat", "watch", "put", "get", "take", "delete", "lease")
READ_ACTIONS: frozenset[str] = frozenset({"info", "list", "stat", "watch"})
# Actions that move a descriptor over the conduit: they need a session (UNAUTHENTICATED without one).
MOVING_ACTIONS: frozenset[str] = frozenset({"put", "get", "take", "lease"})
_ALL = frozenset(ACTIONS)


class Identity(NamedTuple):
    """Kernel-verified credentials of a session's conduit connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


class PolicyError(InvalidArgument):
    """A policy file that cannot be used; the message names the file and the place in it."""


@dataclass(slots=True)
class Limits:
    """Per-uid quotas (``[limits]`` in the policy file). Exceeding one is RESOURCE_EXHAUSTED."""

    max_entries_per_uid: int = 4096
    max_sessions_per_uid: int = 256
    max_pending_tokens_per_uid: int = 4096
    # Speculative prefetch tokens have a pool of their own: a full one only means fewer prefetched tokens, never
    # an error, and it never eats into max_pending_tokens_per_uid.
    max_prefetch_tokens_per_uid: int = 4096
    max_watchers_per_uid: int = 64
    max_anonymous_watchers: int = 64  # anonymous watch streams in all (gRPC cannot tell their uid apart)
    # Descriptors a uid has in flight on the conduit: held in its incomplete frames plus waiting in the closer.
    # At the limit the broker stops reading that uid's connections (no error: it just waits), see
    # docs/conduit-protocol.md.
    max_fds_in_flight_per_uid: int = 1024
    # Leases a uid holds at once, and its Lease requests queued (waiting) at once, over all its sessions.
    max_leases_per_uid: int = 1024
    max_lease_waiters_per_uid: int = 256

    def __post_init__(self) -> None:
        # A cap of 0 would stop every read: refused here as in a policy file. The native reader counts on a cap
        # of at least 1 (with nothing in flight, a full read: see listener.FdsInFlight.accounts).
        if self.max_fds_in_flight_per_uid < 1:
            raise PolicyError(
                f"max_fds_in_flight_per_uid must be a positive integer, got {self.max_fds_in_flight_per_uid!r}"
            )


@dataclass(slots=True, frozen=True)
class Rule:
    """One ``[[rule]]`` of the policy file."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    names: tuple[str, ...] = ()  # the globs as written; empty: every name
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()
    line: int = 0
    _pattern: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def matches_identity(self, ident: Identity) -> bool:
        if not self.uids and not self.gids:
            return True
        return ident.uid in self.uids or ident.gid in self.gids

    def matches_name(self, name: str) -> bool:
        # A rule scoped by `names` is about entries: it does not apply to a check that is not about one entry.
        if self._pattern is None:
            return True
        return bool(name) and self._pattern.fullmatch(name) is not None


def glob_to_regex(patterns: Iterable[str]) -> re.Pattern[str]:
    """Compiles name globs into one regex: ``**`` any characters, ``*`` any within a segment, ``?`` one
    non-``/`` character; everything else literal."""
    alternatives = []
    for pat in patterns:
        out = []
        i = 0
        while i < len(pat):
            if pat.startswith("**", i):
                out.append(".*")
                i += 2
            elif pat[i] == "*":
                out.append("[^/]*")
                i += 1
            elif pat[i] == "?":
                out.append("[^/]")
                i += 1
            else:
                out.append(re.escape(pat[i]))
                i += 1
        alternatives.append("".join(out))
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


_GLOB_CHARS_RE = re.compile(r"[A-Za-z0-9._/*?-]+")


class Policy:
    """An immutable, loaded policy. Build with :meth:`default` or :meth:`load`; swap whole on reload."""

    limits: Limits
    source: str

    def __init__(
        self,
        broker_uid: int,
        *,
        rules: Sequence[Rule] = (),
        anonymous_allow: Iterable[str] = READ_ACTIONS,
        anonymous_names: Sequence[str] = (),
        limits: Limits | None = None,
        source: str = "<default>",
    ) -> None:
        self.broker_uid = broker_uid
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.anonymous_allow = frozenset(anonymous_allow)
        bad = self.anonymous_allow - READ_ACTIONS
        if bad:
            raise PolicyError(
                f"{source}: [anonymous] allow contains {', '.join(sorted(bad))}: anonymous callers have no "
                f"verified identity and may only be given {', '.join(sorted(READ_ACTIONS))}"
            )
        self.anonymous_names = tuple(anonymous_names)
        self._anonymous_pattern = glob_to_regex(anonymous_names) if anonymous_names else None
        self.limits = limits if limits is not None else Limits()
        self.source = source
        self._rules_for: dict[tuple[int, int], tuple[Rule, ...]] = {}
        #: Called with (identity, action, name, error) for every refusal :meth:`check` raises (the broker
        #: counts and audits them); set by whoever puts the policy in force.
        self.on_denied: Callable[[Identity | None, str, str, BrokerError], object] | None = None

    def __repr__(self) -> str:
        return f"Policy(source={self.source!r}, rules={len(self.rules)}, broker_uid={self.broker_uid})"

    @classmethod
    def default(cls, broker_uid: int) -> Policy:
        """The built-in policy: anonymous read-only, root and ``broker_uid`` everything, other uids their own
        entries, new names, and read access (see the module docstring)."""
        return cls(broker_uid)

    @classmethod
    def load(cls, path: str | os.PathLike[str], broker_uid: int) -> Policy:
        """Reads a policy file. Raises :class:`PolicyError` naming the file and the rule (with its line) for
        any problem: TOML syntax, unknown keys or actions, unknown users or groups, bad globs, bad limits, or
        descriptor-moving actions for anonymous callers. On SIGHUP the broker calls this again and keeps the
        old policy if it raises."""
        source = os.fspath(path)
        try:
            with open(source, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise PolicyError(f"cannot read policy file {source}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
            doc = tomllib.loads(text)
        except UnicodeDecodeError as e:
            raise PolicyError(f"{source}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{source}: invalid TOML: {e}") from None
        return _build(doc, text, source, broker_uid)

    # -- decisions

    def verdict(self, identity: Identity | None, action: str, name: str = "") -> bool | None:
        """What the policy says about ``action`` on ``name`` before anyone looks at the entry: True (allowed),
        False (refused), or None when it depends on who owns the entry (the built-in rules for entries: a new
        name may be put, an owned entry may be used). Anonymous callers, root and the broker's uid, every rule
        and the built-in read access decide without the entry: the broker asks this first, so that a refusal
        says nothing about whether the name exists."""
        if identity is None:
            if action not in self.anonymous_allow:
                return False
            return (
                not name
                or self._anonymous_pattern is None
                or self._anonymous_pattern.fullmatch(name) is not None
            )
        uid = identity.uid
        if uid == 0 or uid == self.broker_uid:
            return action in _ALL
        allowed = False
        if self.rules:
            key = (uid, identity.gid)
            rules = self._rules_for.get(key)
            if rules is None:
                rules = tuple(r for r in self.rules if r.matches_identity(identity))
                if len(self._rules_for) > 4096:
                    self._rules_for.clear()
                self._rules_for[key] = rules
            for rule in rules:
                if (action in rule.deny or action in rule.allow) and rule.matches_name(name):
                    if action in rule.deny:
                        return False
                    allowed = True
        if allowed or action in READ_ACTIONS:
            return True
        if action not in _ALL:
            return False
        return None

    def allows(
        self, identity: Identity | None, action: str, name: str = "", owner_uid: int | None = None
    ) -> bool:
        """Whether ``identity`` may do ``action`` on entry ``name`` (owned by ``owner_uid``; None for a name
        that does not exist yet). Unknown actions are never allowed."""
        v = self.verdict(identity, action, name)
        if v is not None:
            return v
        if owner_uid is None:
            return action == "put"
        return identity is not None and owner_uid == identity.uid

    def check(
        self, identity: Identity | None, action: str, name: str = "", owner_uid: int | None = None
    ) -> None:
        """Raises unless :meth:`allows`: :class:`Unauthenticated` for an anonymous caller and a
        descriptor-moving action, else :class:`PermissionDenied`. The message names the entry, the identity
        and the action, and says what to do. :attr:`on_denied` hears of every refusal before it is raised."""
        if self.allows(identity, action, name, owner_uid):
            return
        raise self.refuse(identity, action, name, owner_uid)

    def refuse(
        self, identity: Identity | None, action: str, name: str = "", owner_uid: int | None = None
    ) -> PermissionDenied | Unauthenticated:
        """The refusal :meth:`check` raises (``owner_uid`` None: the message names no owner), reported to
        :attr:`on_denied`; the caller raises it."""
        err = self._refusal(identity, action, name, owner_uid)
        if self.on_denied is not None:
            self.on_denied(identity, action, name, err)
        return err

    def _refusal(
        self, identity: Identity | None, action: str, name: str, owner_uid: int | None
    ) -> PermissionDenied | Unauthenticated:
        what = f"{action} {name!r}" if name else action
        if action not in _ALL:
            return PermissionDenied(f"unknown action {action!r}; actions are {', '.join(ACTIONS)}", name=name)
        if identity is None:
            if action in MOVING_ACTIONS:
                return Unauthenticated(
                    f"{what} needs a session: descriptors never move for anonymous callers; connect to the "
                    "conduit first (fdbroker.Client does this) and send the session id as metadata "
                    f"{SESSION_METADATA_KEY!r}",
                    name=name,
                )
            allowed = ", ".join(a for a in ACTIONS if a in self.anonymous_allow) or "nothing"
            return PermissionDenied(
                f"anonymous callers may not {what} (policy {self.source} allows them: {allowed}); "
                "connect to the conduit and use a session",
                name=name,
            )
        owner = "" if owner_uid is None else f" (owned by uid {owner_uid})"
        return PermissionDenied(
            f"policy {self.source} does not allow uid {identity.uid} (gid {identity.gid}, "
            f"pid {identity.pid}) to {what}{owner}; use entries your uid owns, or ask the broker's "
            "administrator for a rule (see docs/policy.md)",
            name=name,
        )


# -- loading

_TOP_KEYS = {"rule", "anonymous", "limits"}
_RULE_KEYS = {"uids", "gids", "names", "allow", "deny"}
_ANON_KEYS = {"allow", "names"}


def _build(doc: dict[str, Any], text: str, source: str, broker_uid: int) -> Policy:
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise PolicyError(
            f"{source}: unknown section or key {', '.join(sorted(unknown))}; "
            "expected [[rule]], [anonymous], [limits]"
        )
    rule_lines = [i + 1 for i, line in enumerate(text.splitlines()) if line.strip().startswith("[[rule]]")]
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise PolicyError(f"{source}: 'rule' must be an array of tables ([[rule]])")
    rules = []
    for i, raw in enumerate(raw_rules):
        line = rule_lines[i] if i < len(rule_lines) else 0
        where = f"{source}:{line}: rule {i + 1}" if line else f"{source}: rule {i + 1}"
        rules.append(_build_rule(raw, where, line))

    anon = doc.get("anonymous", {})
    if not isinstance(anon, dict):
        raise PolicyError(f"{source}: [anonymous] must be a table")
    _no_unknown(anon, _ANON_KEYS, f"{source}: [anonymous]")
    anon_allow = _actions(anon.get("allow", sorted(READ_ACTIONS)), f"{source}: [anonymous] allow")
    anon_names = _globs(anon.get("names", []), f"{source}: [anonymous] names")

    limits = Limits()
    raw_limits = doc.get("limits", {})
    if not isinstance(raw_limits, dict):
        raise PolicyError(f"{source}: [limits] must be a table")
    _no_unknown(raw_limits, set(Limits.__dataclass_fields__), source)
    for key, value in raw_limits.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PolicyError(f"{source}: [limits] {key} must be a positive integer, got {value!r}")
        setattr(limits, key, value)

    return Policy(
        broker_uid,
        rules=rules,
        anonymous_allow=anon_allow,
        anonymous_names=anon_names,
        limits=limits,
        source=source,
    )


def _build_rule(raw: Any, where: str, line: int) -> Rule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: must be a table")
    _no_unknown(raw, _RULE_KEYS, where)
    allow = _actions(raw.get("allow", []), f"{where}: allow")
    deny = _actions(raw.get("deny", []), f"{where}: deny")
    if not allow and not deny:
        raise PolicyError(
            f"{where}: a rule needs 'allow' or 'deny' (a list of actions: {', '.join(ACTIONS)})"
        )
    uids = frozenset(_ids(raw.get("uids", []), f"{where}: uids", _uid_of))
    gids = frozenset(_ids(raw.get("gids", []), f"{where}: gids", _gid_of))
    names = _globs(raw.get("names", []), f"{where}: names")
    pattern = glob_to_regex(names) if names else None
    return Rule(uids, gids, tuple(names), allow, deny, line, pattern)


def _no_unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise PolicyError(
            f"{where}: unknown key {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}"
        )


def _list_of(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list, got {value!r}")
    return value


def _actions(value: Any, where: str) -> frozenset[str]:
    if value == "*" or value == ["*"]:
        return _ALL
    out = set()
    for a in _list_of(value, where):
        if a not in _ALL:
            raise PolicyError(f'{where}: unknown action {a!r}; actions are {", ".join(ACTIONS)} (or "*")')
        out.add(a)
    return frozenset(out)


def _globs(value: Any, where: str) -> list[str]:
    globs = _list_of(value, where)
    for g in globs:
        if not isinstance(g, str) or not g or _GLOB_CHARS_RE.fullmatch(g) is None:
            raise PolicyError(
                f"{where}: bad name glob {g!r}; use name characters [A-Za-z0-9._/-] with * ** ?"
            )
    return globs


def _ids(value: Any, where: str, resolve: Any) -> list[int]:
    out = []
    for v in _list_of(value, where):
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise PolicyError(f"{where}: {v!r} is neither a number nor a name")
        if isinstance(v, int):
            if v < 0:
                raise PolicyError(f"{where}: {v} is negative")
            out.append(v)
        else:
            resolved = resolve(v)
            if resolved is None:
                raise PolicyError(f"{where}: no such user or group {v!r} on this host")
            out.append(resolved)
    return out


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
