"""Entry names, labels and label selectors (fdbroker.names)."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fdbroker.errors import Code, InvalidArgument
from fdbroker.names import parse_label_selector, validate_label_key, validate_labels, validate_name

# --- an independent oracle for the name language, written from the design text, not from the implementation


def oracle_name_ok(name: str) -> bool:
    allowed = set(string.ascii_letters + string.digits + "._/-")
    if not 1 <= len(name.encode("utf-8", "surrogatepass")) <= 255:
        return False
    if any(c not in allowed for c in name):
        return False
    return all(seg not in ("", ".", "..") for seg in name.split("/"))


NAME_ALPHABET = string.ascii_letters + string.digits + "._/-:" + " \x00\n\té€/.."


@given(st.text(alphabet=NAME_ALPHABET, max_size=300))
@example("a/b")
@example("./a")
@example("a/..")
@example("a" * 255)
@example("a" * 256)
@example("a/./b")
@example("...")
@example("a:b")
@example("a\n")
def test_validate_name_matches_oracle(name: str) -> None:
    expected = oracle_name_ok(name)
    try:
        validate_name(name)
        got = True
    except InvalidArgument as e:
        got = False
        assert e.name == name
        assert e.code == Code.INVALID_ARGUMENT
        assert "1-255 bytes" in e.message  # says what is allowed
    assert got == expected


@given(
    st.lists(
        st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=20), min_size=1
    )
)
def test_generated_valid_names_accepted(segments: list[str]) -> None:
    name = "/".join(segments)
    if oracle_name_ok(name):
        validate_name(name)
    else:
        with pytest.raises(InvalidArgument):
            validate_name(name)


@given(st.text(max_size=300))
def test_validate_name_any_unicode_matches_oracle(name: str) -> None:
    expected = oracle_name_ok(name)
    try:
        validate_name(name)
        got = True
    except InvalidArgument:
        got = False
    assert got == expected


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "empty"),
        ("a" * 256, "256 bytes"),
        ("web:https", "':'"),
        ("web https", "' '"),
        ("/web", "starts with '/'"),
        ("web/", "ends with '/'"),
        ("web//x", "empty segment"),
        ("web/../etc", "'..' segment"),
        ("./web", "'.' segment"),
        ("wéb", "'é'"),
    ],
)
def test_validate_name_messages_say_what_is_wrong(name: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        validate_name(name)
    assert fragment in str(ei.value)
    assert ei.value.name == name


@pytest.mark.parametrize(
    "name", ["web", "web/https", "db/primary", "a.b-c_d/E.9", "..a", "a..", ".hidden", "x" * 255]
)
def test_validate_name_accepts(name: str) -> None:
    validate_name(name)


def test_labels_ok() -> None:
    validate_labels({})
    validate_labels({"app": "web", "tier/x.y-z_": "", "k": "a value with spaces and é"})
    validate_labels({f"k{i}": "v" for i in range(32)})
    validate_labels({"k" * 63: "v" * 255})


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ({f"k{i}": "v" for i in range(33)}, "too many labels"),
        ({"": "v"}, "empty"),
        ({"k" * 64: "v"}, "64 bytes"),
        ({"a b": "v"}, "' '"),
        ({"a:b": "v"}, "':'"),
        ({"k": "v" * 256}, "256 bytes"),
        ({"k": "é" * 128}, "256 bytes"),
        ({"k": "a,b"}, "','"),
        ({"k": "a=b"}, "'='"),
        ({"k": "a\nb"}, "'\\n'"),
        ({"k": "a\x7f"}, "'\\x7f'"),
        ({"k": "\ud800"}, "'\\ud800'"),
    ],
)
def test_labels_bad(labels: dict[str, str], fragment: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        validate_labels(labels)
    assert fragment in str(ei.value)


def test_label_key_alone() -> None:
    validate_label_key("a/b")
    with pytest.raises(InvalidArgument):
        validate_label_key("=")


# --- selectors


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        ("", {"a": "1"}, True),
        ("app=web", {"app": "web"}, True),
        ("app=web", {"app": "db"}, False),
        ("app=web", {}, False),
        ("app=", {"app": ""}, True),
        ("app=", {"app": "x"}, False),
        ("app=web,tier=front", {"app": "web", "tier": "front"}, True),
        ("app=web,tier=front", {"app": "web", "tier": "back"}, False),
        ("app", {"app": ""}, True),
        ("app", {"other": "x"}, False),
        ("!app", {"other": "x"}, True),
        ("!app", {"app": "x"}, False),
        ("app!=web", {"app": "db"}, True),
        ("app!=web", {"app": "web"}, False),
        ("app!=web", {}, True),
        ("app,!canary,tier!=back", {"app": "x", "tier": "front"}, True),
        ("app,!canary,tier!=back", {"app": "x", "canary": "1"}, False),
        ("v=with space", {"v": "with space"}, True),
    ],
)
def test_selector_matches(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_label_selector(selector).matches(labels) is expected


@pytest.mark.parametrize(
    "selector",
    [
        ",",
        "a=b,",
        ",a",
        "a,,b",
        "=v",
        "!=v",
        "!",
        "!a=b",
        "a==b",
        "a=b=c",
        "a b",
        "k=\n",
        "a!=b,c=d,e f",
        "a:b",
    ],
)
def test_selector_bad_syntax(selector: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_label_selector(selector)
    assert "selector" in str(ei.value)
    assert "'k=v'" in str(ei.value)  # says what is allowed


label_keys = st.text(alphabet=string.ascii_lowercase + "./-_", min_size=1, max_size=8)
label_values = st.text(alphabet=string.ascii_lowercase + " é", max_size=8)


@given(st.dictionaries(label_keys, label_values, max_size=6), st.data())
def test_selector_roundtrip_and_semantics(labels: dict[str, str], data: st.DataObject) -> None:
    # Build a selector from terms and check it against a direct evaluation of those terms.
    terms = data.draw(
        st.lists(
            st.tuples(st.sampled_from(["=", "!=", "exists", "absent"]), label_keys, label_values), max_size=5
        )
    )
    text_terms = []
    expected = True
    for op, k, v in terms:
        if op == "=":
            text_terms.append(f"{k}={v}")
            expected &= labels.get(k) == v
        elif op == "!=":
            text_terms.append(f"{k}!={v}")
            expected &= labels.get(k) != v
        elif op == "exists":
            text_terms.append(k)
            expected &= k in labels
        else:
            text_terms.append("!" + k)
            expected &= k not in labels
    selector = ",".join(text_terms)
    parsed = parse_label_selector(selector)
    assert parsed.matches(labels) is expected
    assert str(parsed) == selector
