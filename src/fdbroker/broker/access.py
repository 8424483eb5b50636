"""Deciding an operation on one entry by name, so that a refusal tells nothing about whether the name exists.

The rule (docs/policy.md, threat model): a caller learns whether a name exists only if the policy lets it
``stat`` that name, or do the very action it asked for on it. Everyone else gets the same refusal, word for word,
for a name that exists and for one that does not.

So every by-name operation (``Stat``, ``Get``, ``BatchGet``, ``Take``, ``Delete``, ``Lease``, ``Put`` and the
conduit's ``Query``) decides in this order:

1. the policy, as far as it can decide without the entry (:meth:`Policy.verdict`: anonymous callers, root and the
   broker's uid, every rule, the built-in read access) — a refusal here is made before the registry is asked;
2. the entry: absent is NOT_FOUND for a caller who may ``stat`` the name or was allowed the action in 1, and the
   refusal of 1 (naming no owner) for anyone else;
3. the built-in rules that depend on the owner (own entries): a refusal names the owner only to a caller who may
   ``stat`` the name.

``Put`` cannot hide whether a name is taken (a new name is stored, a taken one is refused): see
:func:`check_put`.
"""

from __future__ import annotations

from fdbroker.broker.policy import Identity, Policy
from fdbroker.broker.registry import Entry, Registry
from fdbroker.errors import NotFound
from fdbroker.names import validate_name


def entry_for(policy: Policy, registry: Registry, identity: Identity | None, action: str, name: str) -> Entry:
    """The entry ``name`` if ``identity`` may do ``action`` on it; else :class:`PermissionDenied` or
    :class:`Unauthenticated` (from the policy, reported to its ``on_denied``), or :class:`NotFound` only for a
    caller the rule above lets learn that the name does not exist. :class:`InvalidArgument` for a bad name."""
    validate_name(name)
    verdict = policy.verdict(identity, action, name)
    if verdict is False:
        raise policy.refuse(identity, action, name)
    e = registry.find(name)
    may_see = verdict is True or policy.allows(identity, "stat", name)
    if e is None:
        if may_see:
            raise NotFound(f"no entry named {name!r}; see `fdbroker ls` for what is held", name=name)
        raise policy.refuse(identity, action, name)
    if verdict is None and not policy.allows(identity, action, name, e.owner.uid):
        raise policy.refuse(identity, action, name, e.owner.uid if may_see else None)
    return e


def check_put(policy: Policy, identity: Identity, name: str, old: Entry | None) -> None:
    """Whether ``identity`` may put ``name`` (``old``: the entry it would replace, None for a new name). A put
    shows whether a name is taken — it stores a new one and refuses (or replaces) a taken one, whatever the
    broker answers — so the only thing kept back is the owner of a taken name from a caller who may not ``stat``
    it."""
    verdict = policy.verdict(identity, "put", name)
    if verdict is False:
        raise policy.refuse(identity, "put", name)
    if verdict is None and not policy.allows(identity, "put", name, None if old is None else old.owner.uid):
        shown = old is not None and policy.allows(identity, "stat", name)
        raise policy.refuse(identity, "put", name, old.owner.uid if shown and old is not None else None)
