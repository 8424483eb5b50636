"""fdbroker.broker.policy: the default policy, the TOML format, deny-overrides, anonymous limits, load errors."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdbroker.broker.policy import (
    ACTIONS,
    MOVING_ACTIONS,
    READ_ACTIONS,
    Identity,
    Limits,
    Policy,
    PolicyError,
    glob_to_regex,
)
from fdbroker.errors import Code, InvalidArgument, PermissionDenied, Unauthenticated
from fdbroker.protocol import SESSION_METADATA_KEY

BROKER_UID = 999
ROOT = Identity(1, 0, 0)
BROKER = Identity(2, BROKER_UID, BROKER_UID)
ALICE = Identity(100, 1000, 1000)
BOB = Identity(200, 1001, 1001)
NOBODY = Identity(300, 65534, 65534)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(text)
    return p


# --- the default policy


def test_default_anonymous_is_read_only() -> None:
    pol = Policy.default(BROKER_UID)
    assert pol.source == "<default>"
    for action in READ_ACTIONS:
        assert pol.allows(None, action, "web/https", owner_uid=0)
    for action in set(ACTIONS) - READ_ACTIONS:
        assert not pol.allows(None, action, "web/https", owner_uid=0)
        assert not pol.allows(None, action, "web/https")


def test_default_superusers_do_everything() -> None:
    pol = Policy.default(BROKER_UID)
    for ident in (ROOT, BROKER):
        for action in ACTIONS:
            assert pol.allows(ident, action, "x", owner_uid=ALICE.uid)
    assert not pol.allows(ROOT, "fly", "x")  # unknown action: never


def test_default_session_uids() -> None:
    pol = Policy.default(BROKER_UID)
    for action in ACTIONS:
        assert pol.allows(ALICE, action, "mine", owner_uid=ALICE.uid)  # own entries: everything
    for action in READ_ACTIONS:
        assert pol.allows(ALICE, action, "bobs", owner_uid=BOB.uid)
    for action in set(ACTIONS) - READ_ACTIONS:
        assert not pol.allows(ALICE, action, "bobs", owner_uid=BOB.uid)
    assert pol.allows(ALICE, "put", "new")  # a new name
    for action in ("get", "take", "delete", "lease"):
        assert not pol.allows(ALICE, action, "new")  # no owner: nothing to act on but put
    assert pol.limits == Limits(4096, 256, 4096)


def test_check_errors_name_entry_identity_and_action() -> None:
    pol = Policy.default(BROKER_UID)
    with pytest.raises(PermissionDenied) as ei:
        pol.check(ALICE, "take", "db/primary", owner_uid=BOB.uid)
    msg = str(ei.value)
    assert (
        "uid 1000" in msg and "pid 100" in msg and "take 'db/primary'" in msg and "owned by uid 1001" in msg
    )
    assert "docs/policy.md" in msg
    assert ei.value.name == "db/primary"
    assert ei.value.code == Code.PERMISSION_DENIED
    for action in MOVING_ACTIONS:
        with pytest.raises(Unauthenticated) as ua:
            pol.check(None, action, "web")
        assert "needs a session" in str(ua.value)
        assert ua.value.code == Code.UNAUTHENTICATED
        # the key clients actually send, named once (not "metadata 'fdbroker-session' metadata")
        assert ua.value.message.endswith(f"as metadata {SESSION_METADATA_KEY!r}"), ua.value.message
        assert ua.value.message.count("metadata") == 1
    with pytest.raises(PermissionDenied) as pd:
        pol.check(None, "delete", "web", owner_uid=0)
    assert "anonymous callers may not delete 'web'" in str(pd.value)
    pol.check(None, "list")
    pol.check(ALICE, "put", "new")
    with pytest.raises(PermissionDenied):
        pol.check(ROOT, "fly")


# --- the file format


SIDECAR = """
# The sidecar case: the unprivileged app (uid 65534) may get and lease what the sidecar deposited under web/.
[[rule]]
uids = [65534]
names = ["web/*"]
allow = ["get", "lease", "stat"]
"""


def test_sidecar_example(tmp_path: Path) -> None:
    pol = Policy.load(write(tmp_path, SIDECAR), BROKER_UID)
    assert pol.source == str(tmp_path / "policy.toml")
    assert pol.allows(NOBODY, "get", "web/https", owner_uid=0)
    assert pol.allows(NOBODY, "lease", "web/https", owner_uid=0)
    assert not pol.allows(NOBODY, "take", "web/https", owner_uid=0)  # not granted
    assert not pol.allows(NOBODY, "get", "web/admin/https", owner_uid=0)  # * does not cross /
    assert not pol.allows(NOBODY, "get", "db/primary", owner_uid=0)
    assert not pol.allows(ALICE, "get", "web/https", owner_uid=0)  # another uid
    assert not pol.allows(None, "get", "web/https", owner_uid=0)  # anonymous: never
    pol.check(NOBODY, "get", "web/https", owner_uid=0)


def test_deny_overrides_allow_and_builtins(tmp_path: Path) -> None:
    text = """
[[rule]]
gids = [1000]
names = ["shared/**"]
allow = ["*"]

[[rule]]
uids = [1000]
names = ["shared/secret/*"]
deny = ["get", "take"]

[[rule]]
names = ["frozen/**"]
deny = ["put", "delete"]
"""
    pol = Policy.load(write(tmp_path, text), BROKER_UID)
    # gid 1000 gets everything under shared/, at any depth.
    assert pol.allows(ALICE, "take", "shared/a/b/c", owner_uid=BOB.uid)
    assert pol.allows(Identity(5, 4242, 1000), "delete", "shared/x", owner_uid=BOB.uid)
    # ... except what a deny rule takes away, whatever the order of the rules.
    assert not pol.allows(ALICE, "get", "shared/secret/key", owner_uid=BOB.uid)
    assert pol.allows(ALICE, "stat", "shared/secret/key", owner_uid=BOB.uid)
    # A deny rule without uids/gids applies to every session, and overrides the built-in owner rule...
    assert not pol.allows(ALICE, "put", "frozen/a")
    assert not pol.allows(ALICE, "delete", "frozen/a", owner_uid=ALICE.uid)
    assert pol.allows(ALICE, "get", "frozen/a", owner_uid=ALICE.uid)
    # ... but not root nor the broker's uid.
    assert pol.allows(ROOT, "delete", "frozen/a", owner_uid=ALICE.uid)
    assert pol.allows(BROKER, "put", "frozen/a")
    # Reversing the file's rule order changes nothing (deny-overrides is order-independent).
    blocks = text.strip().split("\n\n")
    rev = Policy.load(write(tmp_path, "\n\n".join(reversed(blocks))), BROKER_UID)
    for ident in (ALICE, BOB, NOBODY, Identity(5, 4242, 1000)):
        for action in ACTIONS:
            for name in ("shared/a/b", "shared/secret/key", "frozen/a", "other"):
                for owner in (None, ALICE.uid, BOB.uid):
                    assert pol.allows(ident, action, name, owner) == rev.allows(ident, action, name, owner)


def test_deny_read_actions_hides_entries_per_name(tmp_path: Path) -> None:
    pol = Policy.load(
        write(tmp_path, '[[rule]]\nnames = ["secret/**"]\ndeny = ["list", "stat", "watch"]\n'), 0
    )
    assert not pol.allows(ALICE, "list", "secret/a", owner_uid=BOB.uid)
    assert not pol.allows(ALICE, "stat", "secret/a", owner_uid=BOB.uid)
    assert pol.allows(ALICE, "list", "public/a", owner_uid=BOB.uid)
    assert pol.allows(ALICE, "list")  # the List call itself: not about one entry


def test_user_and_group_names(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    pol = Policy.load(
        write(tmp_path, f'[[rule]]\nuids = ["{me}", 1234]\ngids = ["root"]\nallow = ["take"]\n'), 7
    )
    rule = pol.rules[0]
    assert rule.uids == {os.getuid(), 1234}
    assert rule.gids == {0}
    assert rule.line == 1


def test_anonymous_section(tmp_path: Path) -> None:
    closed = Policy.load(write(tmp_path, "[anonymous]\nallow = []\n"), BROKER_UID)
    for action in ACTIONS:
        assert not closed.allows(None, action, "x", owner_uid=0)
    with pytest.raises(PermissionDenied) as ei:
        closed.check(None, "list")
    assert "allows them: nothing" in str(ei.value)
    narrow = Policy.load(write(tmp_path, '[anonymous]\nallow = ["info", "list"]\nnames = ["public/**"]\n'), 0)
    assert narrow.allows(None, "info")
    assert narrow.allows(None, "list", "public/a/b", owner_uid=0)
    assert not narrow.allows(None, "list", "private/a", owner_uid=0)
    assert not narrow.allows(None, "stat", "public/a", owner_uid=0)


@pytest.mark.parametrize("action", ["get", "put", "take", "lease", "delete", "*"])
def test_anonymous_may_never_move_descriptors(tmp_path: Path, action: str) -> None:
    allow = '"*"' if action == "*" else f'["list", "{action}"]'
    with pytest.raises(PolicyError) as ei:
        Policy.load(write(tmp_path, f"[anonymous]\nallow = {allow}\n"), BROKER_UID)
    assert "anonymous callers have no verified identity" in str(ei.value)
    assert str(tmp_path / "policy.toml") in str(ei.value)


def test_limits(tmp_path: Path) -> None:
    pol = Policy.load(
        write(tmp_path, "[limits]\nmax_entries_per_uid = 10\nmax_pending_tokens_per_uid = 3\n"), 0
    )
    assert pol.limits == Limits(
        max_entries_per_uid=10, max_sessions_per_uid=256, max_pending_tokens_per_uid=3
    )
    for bad in ("0", "-1", "true", '"10"', "1.5"):
        with pytest.raises(PolicyError) as ei:
            Policy.load(write(tmp_path, f"[limits]\nmax_sessions_per_uid = {bad}\n"), 0)
        assert "max_sessions_per_uid must be a positive integer" in str(ei.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[rule]]\nallow = [", "invalid TOML"),
        ("[rules]\n", "unknown section or key rules"),
        ('[[rule]]\nallow = ["gett"]\n', "unknown action 'gett'"),
        ('[[rule]]\nallow = ["get"]\nname = ["x"]\n', "unknown key name"),
        ("[[rule]]\nuids = [1]\n", "needs 'allow' or 'deny'"),
        ('[[rule]]\nallow = ["get"]\nuids = ["no-such-user-fdbroker"]\n', "no such user or group"),
        ('[[rule]]\nallow = ["get"]\nuids = [-1]\n', "negative"),
        ('[[rule]]\nallow = ["get"]\nuids = 5\n', "must be a list"),
        ('[[rule]]\nallow = ["get"]\nnames = ["a b"]\n', "bad name glob"),
        ('[[rule]]\nallow = ["get"]\nnames = [""]\n', "bad name glob"),
        ('[anonymous]\nallow = ["info"]\nuids = [1]\n', "unknown key uids"),
        ("[limits]\nmax_things = 1\n", "unknown key max_things"),
    ],
)
def test_load_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as ei:
        Policy.load(write(tmp_path, text), BROKER_UID)
    assert fragment in str(ei.value)
    assert str(tmp_path / "policy.toml") in str(ei.value)
    assert isinstance(ei.value, InvalidArgument)


def test_load_error_points_at_the_rule_line(tmp_path: Path) -> None:
    text = '# comment\n\n[[rule]]\nallow = ["get"]\n\n[[rule]]\nallow = ["fly"]\n'
    with pytest.raises(PolicyError) as ei:
        Policy.load(write(tmp_path, text), BROKER_UID)
    assert f"{tmp_path / 'policy.toml'}:6: rule 2" in str(ei.value)


def test_load_missing_and_binary(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as ei:
        Policy.load(tmp_path / "nope.toml", BROKER_UID)
    assert "cannot read policy file" in str(ei.value)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError) as ei:
        Policy.load(tmp_path / "bin.toml", BROKER_UID)
    assert "not UTF-8" in str(ei.value)


def test_reload_keeps_old_on_error(tmp_path: Path) -> None:
    # What the broker does on SIGHUP: load again; on PolicyError keep the policy it has.
    path = write(tmp_path, SIDECAR)
    current = Policy.load(path, BROKER_UID)
    path.write_text(SIDECAR.replace('"web/*"', '"api/*"'))
    current = Policy.load(path, BROKER_UID)
    assert current.allows(NOBODY, "get", "api/x", owner_uid=0)
    assert not current.allows(NOBODY, "get", "web/x", owner_uid=0)
    path.write_text("[[rule]]\nallow = [\n")
    try:
        current = Policy.load(path, BROKER_UID)
    except PolicyError:
        pass
    assert current.allows(NOBODY, "get", "api/x", owner_uid=0)


def test_docs_examples_load(tmp_path: Path) -> None:
    # Every ```toml block in docs/policy.md is a loadable policy.
    doc = Path(__file__).resolve().parent.parent / "docs" / "policy.md"
    blocks = doc.read_text().split("```toml\n")[1:]
    assert blocks, "docs/policy.md has no toml examples"
    for i, block in enumerate(blocks):
        text = block.split("```", 1)[0]
        p = tmp_path / f"example{i}.toml"
        p.write_text(text.replace('"www-data"', "33"))
        Policy.load(p, BROKER_UID)


# --- globs, against an independent oracle


def oracle_glob(pattern: str, name: str) -> bool:
    """Recursive matcher written from the documented semantics."""
    if not pattern:
        return not name
    if pattern.startswith("**"):
        return any(oracle_glob(pattern[2:], name[i:]) for i in range(len(name) + 1))
    if pattern[0] == "*":
        for i in range(len(name) + 1):
            if "/" in name[:i]:
                break
            if oracle_glob(pattern[1:], name[i:]):
                return True
        return False
    if not name:
        return False
    if pattern[0] == "?":
        return name[0] != "/" and oracle_glob(pattern[1:], name[1:])
    return pattern[0] == name[0] and oracle_glob(pattern[1:], name[1:])


@given(st.text(alphabet="ab/*?.", max_size=8), st.text(alphabet="ab/.", max_size=10))
def test_glob_matches_oracle(pattern: str, name: str) -> None:
    if not pattern:
        return
    assert (glob_to_regex([pattern]).fullmatch(name) is not None) == oracle_glob(pattern, name)


def test_glob_examples() -> None:
    rx = glob_to_regex(["web/*", "db/**", "q?"])
    assert rx.fullmatch("web/https")
    assert not rx.fullmatch("web/a/b")
    assert rx.fullmatch("db/a/b/c")
    assert not rx.fullmatch("db")
    assert rx.fullmatch("q1")
    assert not rx.fullmatch("q12")
    assert not glob_to_regex(["a.b"]).fullmatch("axb")  # '.' is literal
