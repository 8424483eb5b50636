"""The API file is the documentation: every message, field, enum value and RPC of proto/fdbroker/v1 carries a
leading comment, every RPC lists its status codes, and every response reports the revision the same way.

The .proto files are compiled with ``grpc_tools.protoc --include_source_info`` into a descriptor set in a temporary
directory (the generated ``_pb2`` modules keep no comments), and the source locations are walked by their
descriptor paths (google/protobuf/descriptor.proto: ``SourceCodeInfo.Location.path``).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
FILES = ("fdbroker/v1/broker.proto", "fdbroker/v1/conduit.proto", "fdbroker/v1/handover.proto")

# Field numbers in descriptor.proto, the steps of a SourceCodeInfo path.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2

STATUS_CODES = frozenset(
    [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ]
)
# Any RPC can meet these: a request that does not decode, a session id that names no live session, a bug, and no
# broker at the socket. Each RPC's list names them, so a reader of one RPC needs nothing else.
EVERY_RPC = frozenset({"INVALID_ARGUMENT", "UNAUTHENTICATED", "INTERNAL", "UNAVAILABLE"})
# RPCs after which a descriptor crosses the conduit: the client reports ABORTED when the conduit closes first.
MOVES_A_DESCRIPTOR = frozenset({"Put", "BatchPut", "Get", "BatchGet", "Take", "Lease", "Release"})
HEADER_COMMENT = "The registry revision this response reflects (see ResponseHeader)."

Files = dict[str, descriptor_pb2.FileDescriptorProto]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    spec = importlib.util.find_spec(
        "grpc_tools"
    )  # grpcio-tools, a test dependency; it ships the well-known types
    assert spec is not None and spec.origin is not None, "grpcio-tools is not installed"
    include = Path(spec.origin).parent / "_proto"
    out = tmp_path_factory.mktemp("proto") / "descriptor_set.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *FILES,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {f.name: f for f in fds.file}


class Element:
    """One documented element: its kind, full name, descriptor path and leading comment."""

    def __init__(self, kind: str, name: str, path: tuple[int, ...], comment: str) -> None:
        self.kind, self.name, self.path, self.comment = kind, name, path, comment

    def __repr__(self) -> str:
        return f"{self.kind} {self.name}"


def elements(f: descriptor_pb2.FileDescriptorProto) -> Iterator[Element]:
    """Every message, field, oneof, enum, enum value, service and RPC of ``f``, with its leading comment."""
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}

    def el(kind: str, name: str, path: tuple[int, ...]) -> Element:
        return Element(kind, name, path, comments.get(path, ""))

    def enum(e: descriptor_pb2.EnumDescriptorProto, scope: str, path: tuple[int, ...]) -> Iterator[Element]:
        yield el("enum", f"{scope}{e.name}", path)
        for i, v in enumerate(e.value):
            yield el("enum value", f"{scope}{e.name}.{v.name}", (*path, ENUM_VALUE, i))

    def message(m: descriptor_pb2.DescriptorProto, scope: str, path: tuple[int, ...]) -> Iterator[Element]:
        full = f"{scope}{m.name}"
        yield el("message", full, path)
        for i, fld in enumerate(m.field):
            yield el("field", f"{full}.{fld.name}", (*path, MESSAGE_FIELD, i))
        for i, o in enumerate(m.oneof_decl):
            yield el("oneof", f"{full}.{o.name}", (*path, MESSAGE_ONEOF, i))
        for i, n in enumerate(m.nested_type):
            if not n.options.map_entry:  # map<k, v> fields are documented on the field itself
                yield from message(n, f"{full}.", (*path, MESSAGE_NESTED, i))
        for i, e in enumerate(m.enum_type):
            yield from enum(e, f"{full}.", (*path, MESSAGE_ENUM, i))

    for i, m in enumerate(f.message_type):
        yield from message(m, "", (FILE_MESSAGE, i))
    for i, e in enumerate(f.enum_type):
        yield from enum(e, "", (FILE_ENUM, i))
    for i, s in enumerate(f.service):
        yield el("service", s.name, (FILE_SERVICE, i))
        for j, method in enumerate(s.method):
            yield el("rpc", f"{s.name}.{method.name}", (FILE_SERVICE, i, SERVICE_METHOD, j))


def all_elements(files: Files) -> list[Element]:
    return [e for name in FILES for e in elements(files[name])]


def rpc_codes(comment: str) -> set[str]:
    """The status codes named in the "Errors:" paragraph that ends an RPC's comment. A word in capitals with an
    underscore that is not a status code (a misspelt one) is returned too, so the caller can refuse it."""
    _, sep, errors = comment.partition("Errors:")
    if not sep:
        return set()
    words = set(re.findall(r"\b[A-Z][A-Z_]*[A-Z]\b", errors))
    return {w for w in words if w in STATUS_CODES or "_" in w}


def file_comment(f: descriptor_pb2.FileDescriptorProto) -> str:
    """The comment at the top of a file: the one before its ``syntax`` statement."""
    syntax = (12,)  # FileDescriptorProto.syntax
    for loc in f.source_code_info.location:
        if tuple(loc.path) == syntax:
            return "\n".join([*loc.leading_detached_comments, loc.leading_comments])
    return ""


def test_every_element_has_a_leading_comment(files: Files) -> None:
    els = all_elements(files)
    missing = [e for e in els if not e.comment]
    assert not missing, f"{len(missing)} of {len(els)} elements have no leading comment: {missing}"


def test_the_proto_is_not_trivially_small(files: Files) -> None:
    # Guards the walk above: a path mistake that finds nothing would pass the completeness test vacuously.
    kinds: dict[str, int] = {}
    for e in all_elements(files):
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    assert kinds["rpc"] >= 13 and kinds["field"] >= 190 and kinds["enum value"] >= 46, kinds


def test_every_file_says_what_it_holds(files: Files) -> None:
    for name in FILES:
        assert len(file_comment(files[name])) > 100, f"{name}: no file comment before `syntax`"


def test_every_rpc_lists_its_status_codes(files: Files) -> None:
    for e in all_elements(files):
        if e.kind != "rpc":
            continue
        codes = rpc_codes(e.comment)
        assert codes, f"{e}: no 'Errors:' paragraph"
        assert codes <= STATUS_CODES, f"{e}: not status codes: {sorted(codes - STATUS_CODES)}"
        assert codes >= EVERY_RPC, f"{e}: missing {sorted(EVERY_RPC - codes)}"
        if e.name.split(".")[1] in MOVES_A_DESCRIPTOR:
            assert "ABORTED" in codes, f"{e}: moves a descriptor but does not say when ABORTED is reported"


def test_the_header_lists_every_code_an_rpc_names(files: Files) -> None:
    header = file_comment(files[FILES[0]])
    listed = {m.group(1) for m in re.finditer(r"^ +([A-Z_]+) {2,}", header, re.MULTILINE)}
    assert listed <= STATUS_CODES and len(listed) >= 12, listed
    named = set().union(*(rpc_codes(e.comment) for e in all_elements(files) if e.kind == "rpc"))
    assert named <= listed, f"named by an RPC but not explained in the file header: {sorted(named - listed)}"


def test_the_wire_constants_are_named_in_the_proto(files: Files) -> None:
    from fdbroker.protocol import OLDEST_REVISION_KEY, SESSION_METADATA_KEY

    text = (PROTO_DIR / FILES[0]).read_text()
    assert f"`{SESSION_METADATA_KEY}`" in text
    watch = next(e for e in all_elements(files) if e.name == "FdBroker.Watch")
    assert OLDEST_REVISION_KEY in watch.comment and "OUT_OF_RANGE" in watch.comment


def test_every_response_reports_its_revision_the_same_way(files: Files) -> None:
    responses = [
        (e, f)
        for f in (files[n] for n in FILES)
        for e in elements(f)
        if e.kind == "message" and e.name.endswith("Response")
    ]
    assert len(responses) == 13
    for e, f in responses:
        m = next(m for m in f.message_type if m.name == e.name)
        header = [fld for fld in m.field if fld.name == "header"]
        assert header and header[0].number == 99 and header[0].type_name == ".fdbroker.v1.ResponseHeader", e
        doc = next(x for x in elements(f) if x.name == f"{e.name}.header")
        assert doc.comment == HEADER_COMMENT, f"{doc}: {doc.comment!r}"


def test_the_documented_limits_are_the_enforced_ones(files: Files) -> None:
    """The numbers written in the proto are the ones the code enforces (a change to one must change the other)."""
    from fdbroker import limits, names

    docs = {e.name: e.comment for e in all_elements(files)}

    def says(name: str, *numbers: str) -> None:
        for n in numbers:
            assert n in docs[name], f"{name} should say {n!r}: {docs[name]!r}"

    assert (limits.MIN_LEASE_TTL, limits.MAX_LEASE_TTL) == (0.1, 24 * 3600)
    says("LeaseRequest.ttl", "100 ms to 24 h", "Required")
    assert (limits.MIN_ENTRY_TTL, limits.MAX_ENTRY_TTL) == (0.001, 366 * 24 * 3600)
    says("EntryOptions.ttl", "1 ms to 366 days")
    assert (limits.MAX_PAGE_SIZE, limits.DEFAULT_PAGE_SIZE, limits.MAX_PAGE_TOKEN) == (20_000, 1000, 1024)
    says("ListRequest.page_size", "20,000", "1,000")
    says("ListRequest.page_token", "1,024")
    assert (limits.MAX_PREFETCH, limits.MAX_BATCH_PREFETCH, limits.MAX_BATCH) == (1024, 64, 10_000)
    says("GetRequest.prefetch", "1,024")
    says("BatchGetRequest.prefetch", "64", "253")
    says("BatchGetRequest.names", "10,000")
    says("BatchPutRequest.requests", "10,000")
    assert names.MAX_NAME_BYTES == 255 and names.MAX_LABELS == 32
    assert (names.MAX_LABEL_KEY_BYTES, names.MAX_LABEL_VALUE_BYTES) == (63, 255)
    says("Entry.name", "1-255 bytes of [A-Za-z0-9._/-]")
    says("EntryOptions.labels", "32", "1-63 bytes", "0-255 bytes")
    says("LeaseRequest.mode", "exclusive")
    says("WatchRequest.start_revision", "current revision + 1")


# -- docs/conduit-protocol.md, the conduit's specification ----------------------------------------------------------

CONDUIT_DOC = ROOT / "docs" / "conduit-protocol.md"


def test_the_conduit_doc_describes_every_client_frame(files: Files) -> None:
    """Every body a client meets on conduit.sock has a row in the table of §3.5."""
    conduit = files["fdbroker/v1/conduit.proto"]
    frame = next(m for m in conduit.message_type if m.name == "ConduitFrame")
    bodies = {f.type_name.rsplit(".", 1)[1] for f in frame.field if f.name != "fd_count"}
    client_bodies = {b for b in bodies if not b.startswith("Handover")}
    table = CONDUIT_DOC.read_text().split("### 3.5", 1)[1].split("### 3.6", 1)[0]
    rows = set(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE))
    assert rows == client_bodies, (
        f"missing {sorted(client_bodies - rows)}, unknown {sorted(rows - client_bodies)}"
    )


def test_the_worked_example_is_what_the_encoder_sends() -> None:
    from fdbroker.conduit.frames import encode_frame
    from fdbroker.v1 import conduit_pb2 as cpb

    doc = CONDUIT_DOC.read_text()
    assert "00 00 00 04            length N = 4\n52 02 08 01" in doc
    assert encode_frame(cpb.ConduitFrame(ping=cpb.Ping(nonce=1))) == bytes.fromhex("00000004 52020801")
    token = b"\xaa" * 32
    deposit = encode_frame(cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[token])), 1)
    assert "00 00 00 26            length N = 38" in doc and "iov (42 bytes)" in doc
    assert deposit == bytes.fromhex("00000026 0801 1a22 0a20") + token


def test_the_conduit_doc_lists_every_code_the_proto_says_the_conduit_uses(files: Files) -> None:
    """The codes named on `Error.code` are the rows of the table of §3.6."""
    error = next(e for e in all_elements(files) if e.name == "Error.code")
    named = {int(n) for n in re.findall(r"\b(\d+) [A-Z_]+", error.comment)}
    table = CONDUIT_DOC.read_text().split("### 3.6", 1)[1].split("\n## ", 1)[0]
    rows = {int(n) for n in re.findall(r"^\| (\d+) \| `[A-Z_]+` \|", table, re.MULTILINE)}
    assert named == rows and rows, (named, rows)


def test_the_go_receive_example_does_not_pass_flags_to_read_msg_unix() -> None:
    """ReadMsgUnix takes no flags (Go passes MSG_CMSG_CLOEXEC itself); the example checks MSG_CTRUNC."""
    go = "\n".join(re.findall(r"```go\n(.*?)```", CONDUIT_DOC.read_text(), re.DOTALL))
    assert re.search(r"\.ReadMsgUnix\(buf, oob\)", go)
    assert "flags&syscall.MSG_CTRUNC" in go and "syscall.ParseUnixRights" in go
    assert 'grpc.NewClient("passthrough:///unix"' in go and "grpc.WithContextDialer(" in go
    assert (
        "insecure.NewCredentials()" in go
        and '"fdbroker-session"' in go
        and '"fdbroker-oldest-revision"' in go
    )
