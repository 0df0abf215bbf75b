"""Committed generated protobuf code: matches the .proto files, imports, keeps its contract."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
FEATURES_PROTO = PROTO_ROOT / "fedpatchcore" / "v1" / "features.proto"
FEDERATION_PROTO = PROTO_ROOT / "fedpatchcore" / "v1" / "federation.proto"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "generate_protos", ROOT / "scripts" / "generate_protos.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_protos = _load_script()

PINNED_TOOLS_INSTALLED = generate_protos.installed_grpcio_tools() == (
    generate_protos.PINNED_GRPCIO_TOOLS
)
needs_pinned_tools = pytest.mark.skipif(
    not PINNED_TOOLS_INSTALLED,
    reason=f"byte-exact check needs grpcio-tools {generate_protos.PINNED_GRPCIO_TOOLS} (CI has it "
    f"via dev.py); {generate_protos.installed_grpcio_tools()} is installed, so only the "
    "stamp-masked check runs",
)


def _committed_generated() -> set[Path]:
    return {
        path.relative_to(PROTO_ROOT)
        for pattern in ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
        for path in PROTO_ROOT.rglob(pattern)
    }


@needs_pinned_tools
def test_committed_code_matches_fresh_generation(tmp_path: Path) -> None:
    generated = generate_protos.generate(tmp_path)
    fresh = {path.relative_to(tmp_path) for path in generated}
    assert Path("fedpatchcore/v1/features_pb2.py") in fresh
    assert Path("fedpatchcore/v1/federation_pb2.py") in fresh
    assert Path("fedpatchcore/v1/federation_pb2_grpc.py") in fresh
    assert fresh == _committed_generated(), "run scripts/generate_protos.py"
    for relative in sorted(fresh):
        assert (PROTO_ROOT / relative).read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} is stale: run scripts/generate_protos.py"
        )


def test_committed_code_matches_the_protos_under_any_grpcio_tools(tmp_path: Path) -> None:
    """Whatever grpcio-tools is installed, the code it generates differs from the committed
    code only in the version stamps: a .proto edited without regenerating fails here too."""
    generated = generate_protos.generate(tmp_path, any_tools=True)
    fresh = {path.relative_to(tmp_path) for path in generated}
    assert fresh == _committed_generated()
    for relative in sorted(fresh):
        committed = (PROTO_ROOT / relative).read_text()
        assert generate_protos.mask_version_stamps(committed) == (
            generate_protos.mask_version_stamps((tmp_path / relative).read_text())
        ), f"{relative} is stale: run scripts/generate_protos.py"
    # The masking hides only the stamps: the serialized descriptors are compared in full.
    federation = (PROTO_ROOT / "fedpatchcore/v1/federation_pb2.py").read_text()
    masked = generate_protos.mask_version_stamps(federation)
    assert "AddSerializedFile(b'" in masked and "<masked>" in masked
    edited = federation.replace("\\x12\\x0f", "\\x12\\x0e", 1)  # one byte of the descriptor
    assert edited != federation
    assert generate_protos.mask_version_stamps(edited) != masked


def test_pins_agree_and_the_committed_code_is_protobuf_6_gencode() -> None:
    """pyproject, constraints.txt and the committed code name the same grpcio-tools, and its
    gencode is 6.x so that flwr's protobuf < 7 and protobuf 7 both load it."""
    tools = generate_protos.PINNED_GRPCIO_TOOLS
    gencode = generate_protos.GENCODE_PROTOBUF
    assert f'"grpcio-tools=={tools}"' in (ROOT / "pyproject.toml").read_text()
    assert f"\ngrpcio-tools=={tools}\n" in (ROOT / "constraints.txt").read_text()
    assert f'"protobuf>={gencode},<8"' in (ROOT / "pyproject.toml").read_text()
    assert gencode.startswith("6.")
    v1 = PROTO_ROOT / "fedpatchcore" / "v1"
    for name in ("features_pb2.py", "federation_pb2.py"):
        text = (v1 / name).read_text()
        assert f"# Protobuf Python Version: {gencode}\n" in text, name
        major, minor, patch = gencode.split(".")
        assert f"PUBLIC,\n    {major},\n    {minor},\n    {patch},\n" in text, name
    for name in ("features_pb2_grpc.py", "federation_pb2_grpc.py"):
        assert f"GRPC_GENERATED_VERSION = '{tools}'\n" in (v1 / name).read_text(), name


def test_generating_with_another_grpcio_tools_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(generate_protos, "installed_grpcio_tools", lambda: "1.85.1")
    with pytest.raises(generate_protos.ToolsVersionError, match=r"grpcio-tools==1\.81\.1"):
        generate_protos.generate(tmp_path)
    with pytest.raises(generate_protos.ToolsVersionError):
        generate_protos.write()
    assert generate_protos.main(["--check"]) == 2
    assert "1.85.1 is installed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert generate_protos.main(["--check", "--any-tools"]) == 0


def test_check_mode_passes_now_and_reports_drift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if PINNED_TOOLS_INSTALLED:
        assert generate_protos.main(["--check"]) == 0
    assert generate_protos.main(["--check", "--any-tools"]) == 0
    # A copy of protos/ with one edited, one deleted and one orphaned generated file.
    copy = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    v1 = copy / "fedpatchcore" / "v1"
    (v1 / "features_pb2.py").write_text("# hand-edited\n")
    (v1 / "features_pb2.pyi").unlink()
    (v1 / "removed_pb2.py").write_text("# from a deleted .proto\n")
    problems = "\n".join(generate_protos.stale_files(copy, exact=PINNED_TOOLS_INSTALLED))
    assert "features_pb2.py: differs" in problems
    assert "features_pb2.pyi: missing" in problems
    assert "removed_pb2.py: no .proto generates it" in problems
    assert "features_pb2_grpc.py" not in problems
    if PINNED_TOOLS_INSTALLED:  # write() repairs the copy (only the pinned tools may write)
        generate_protos.write(copy)
        assert generate_protos.stale_files(copy) == []
    capsys.readouterr()


def test_generated_modules_import() -> None:
    features = importlib.import_module("fedpatchcore.v1.features_pb2")
    importlib.import_module("fedpatchcore.v1.features_pb2_grpc")
    assert features.DESCRIPTOR.package == "fedpatchcore.v1"
    assert features.DESCRIPTOR.name == "fedpatchcore/v1/features.proto"
    message = features.FeatureChunk(site_id="a", round=1, sequence=2)
    assert features.FeatureChunk.FromString(message.SerializeToString()) == message


# Field numbers and types are the wire contract: changing one breaks every deployed peer.
EXPECTED_FIELDS = {
    "UploadFeaturesRequest": [("summary", 1, "message"), ("chunk", 2, "message")],
    "CodecConfig": [
        ("value_type", 1, "enum"), ("byte_shuffle", 2, "bool"), ("zstd_level", 3, "uint32"),
        ("checksum_type", 4, "enum"),
    ],
    "EncodedMatrix": [
        ("rows", 1, "uint64"), ("cols", 2, "uint32"), ("value_type", 3, "enum"),
        ("byte_shuffle", 4, "bool"), ("zstd_level", 5, "uint32"), ("decoded_size", 6, "uint64"),
        ("quant_scale", 7, "bytes"), ("quant_offset", 8, "bytes"), ("checksum_type", 9, "enum"),
        ("checksum", 10, "fixed64"), ("payload", 11, "bytes"),
    ],
    "FeatureChunk": [
        ("site_id", 1, "string"), ("round", 2, "uint32"), ("sequence", 3, "uint64"),
        ("row_offset", 4, "uint64"), ("last", 5, "bool"), ("features", 6, "message"),
    ],
    "SiteSummary": [
        ("site_id", 1, "string"), ("round", 2, "uint32"), ("num_images", 3, "uint64"),
        ("num_patches", 4, "uint64"), ("coreset_rows", 5, "uint64"),
        ("coverage_radius", 6, "double"), ("feature_dim", 7, "uint32"), ("backbone", 8, "string"),
        ("layers", 9, "string"), ("codec", 10, "message"), ("feature_fingerprint", 11, "string"),
    ],
    "BankChunk": [
        ("round", 1, "uint32"), ("sequence", 2, "uint64"), ("row_offset", 3, "uint64"),
        ("last", 4, "bool"), ("features", 5, "message"), ("server_coverage_radius", 6, "double"),
        ("max_site_coverage_radius", 7, "double"),
    ],
}


def test_wire_contract_field_numbers_and_types() -> None:
    from google.protobuf.descriptor import FieldDescriptor

    features = importlib.import_module("fedpatchcore.v1.features_pb2")
    type_names = {
        value: name.removeprefix("TYPE_").lower()
        for name, value in vars(FieldDescriptor).items()
        if name.startswith("TYPE_")
    }
    assert set(features.DESCRIPTOR.message_types_by_name) == set(EXPECTED_FIELDS)
    for message_name, expected in EXPECTED_FIELDS.items():
        descriptor = features.DESCRIPTOR.message_types_by_name[message_name]
        actual = [(f.name, f.number, type_names[f.type]) for f in descriptor.fields]
        assert actual == expected, message_name
    enums = features.DESCRIPTOR.enum_types_by_name
    assert [(v.name, v.number) for v in enums["ValueType"].values] == [
        ("VALUE_TYPE_UNSPECIFIED", 0), ("VALUE_TYPE_FLOAT32", 1), ("VALUE_TYPE_FLOAT16", 2),
        ("VALUE_TYPE_BFLOAT16", 3), ("VALUE_TYPE_INT8", 4), ("VALUE_TYPE_INT4", 5),
    ]
    assert [(v.name, v.number) for v in enums["ChecksumType"].values] == [
        ("CHECKSUM_TYPE_UNSPECIFIED", 0), ("CHECKSUM_TYPE_XXH64", 1),
    ]


@pytest.mark.parametrize(
    ("proto", "minimum"), [(FEATURES_PROTO, 40), (FEDERATION_PROTO, 80)], ids=lambda p: str(p)
)
def test_every_message_field_and_enum_value_is_documented(proto: Path, minimum: int) -> None:
    """Each service, rpc, message, enum, field and enum value has a // comment right above it."""
    declaration = re.compile(
        r"^\s*(service \w+|rpc \w+|message \w+|enum \w+"
        r"|(repeated )?[\w.]+ \w+ = \d+;|[A-Z0-9_]+ = \d+;)"
    )
    lines = proto.read_text().splitlines()
    undocumented = []
    for index, line in enumerate(lines):
        if declaration.match(line):
            previous = lines[index - 1].strip() if index else ""
            if not previous.startswith("//"):
                undocumented.append(f"line {index + 1}: {line.strip()}")
    assert sum(1 for line in lines if declaration.match(line)) > minimum  # the regex sees them
    assert not undocumented


# The service contract: rpc names, request/response types and which side streams.
EXPECTED_RPCS = {
    "JoinRound": ("JoinRoundRequest", "JoinRoundResponse", False, False),
    "UploadFeatures": ("UploadFeaturesRequest", "UploadFeaturesResponse", True, False),
    "QueryUploadStatus": ("QueryUploadStatusRequest", "QueryUploadStatusResponse", False, False),
    "DownloadBank": ("DownloadBankRequest", "DownloadBankResponse", False, True),
    "WatchRound": ("WatchRoundRequest", "RoundStatus", False, True),
}

EXPECTED_FEDERATION_FIELDS = {
    "UploadStatus": [
        ("site_id", 1, "string"), ("round", 2, "uint32"), ("summary_committed", 3, "bool"),
        ("committed_sequence", 4, "uint64"), ("committed_rows", 5, "uint64"),
        ("complete", 6, "bool"),
    ],
    "DownloadBankRequest": [
        ("site_id", 1, "string"), ("version", 2, "uint64"), ("have_version", 3, "uint64"),
    ],
    "DownloadBankResponse": [
        ("header", 1, "message"), ("removed", 2, "message"), ("chunk", 3, "message"),
    ],
    "BankHeader": [
        ("version", 1, "uint64"), ("round", 2, "uint32"), ("base_version", 3, "uint64"),
        ("total_rows", 4, "uint64"), ("feature_dim", 5, "uint32"),
        ("rows_in_stream", 6, "uint64"), ("rows_removed", 7, "uint64"),
        ("bank_checksum", 8, "fixed64"), ("server_coverage_radius", 9, "double"),
        ("max_site_coverage_radius", 10, "double"), ("value_type", 11, "enum"),
        ("federation_id", 12, "string"),
    ],
    "RoundConfig": [
        ("round", 1, "uint32"), ("feature_fingerprint", 2, "string"),
        ("extractor", 3, "message"), ("codec", 4, "message"), ("max_chunk_bytes", 5, "uint32"),
        ("global_bank_size", 6, "uint64"), ("max_rows_per_site", 7, "uint64"),
        ("feature_dim", 8, "uint32"), ("deadline", 9, "message"),
        ("expected_sites", 10, "uint32"), ("quorum", 11, "uint32"),
        ("novelty_threshold", 12, "double"), ("base_bank_version", 13, "uint64"),
        ("federation_id", 14, "string"), ("full_coreset", 15, "bool"),
    ],
}

#: OperatorService (operator.proto): name -> (request, response, client stream, server stream).
EXPECTED_OPERATOR_RPCS = {
    "AddSite": ("AddSiteRequest", "AddSiteResponse", False, False),
    "RevokeSite": ("RevokeSiteRequest", "RevokeSiteResponse", False, False),
    "WithdrawSite": ("WithdrawSiteRequest", "WithdrawSiteResponse", False, False),
    "OpenRound": ("OpenRoundRequest", "OpenRoundResponse", False, False),
    "ListSites": ("ListSitesRequest", "ListSitesResponse", False, False),
}


def test_operator_service_contract() -> None:
    operator = importlib.import_module("fedpatchcore.v1.operator_pb2")
    grpc_module = importlib.import_module("fedpatchcore.v1.operator_pb2_grpc")
    assert hasattr(grpc_module, "OperatorServiceStub")
    service = operator.DESCRIPTOR.services_by_name["OperatorService"]
    actual = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert actual == EXPECTED_OPERATOR_RPCS
    assert service.full_name == "fedpatchcore.v1.OperatorService"


def test_federation_service_contract() -> None:
    from google.protobuf.descriptor import FieldDescriptor

    federation = importlib.import_module("fedpatchcore.v1.federation_pb2")
    grpc_module = importlib.import_module("fedpatchcore.v1.federation_pb2_grpc")
    assert hasattr(grpc_module, "FederationServiceStub")
    assert hasattr(grpc_module, "add_FederationServiceServicer_to_server")
    service = federation.DESCRIPTOR.services_by_name["FederationService"]
    actual = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert actual == EXPECTED_RPCS
    # The upload stream reuses features.proto's message: one definition of a chunk.
    upload = service.methods_by_name["UploadFeatures"].input_type
    assert upload.full_name == "fedpatchcore.v1.UploadFeaturesRequest"
    assert upload.file.name == "fedpatchcore/v1/features.proto"
    type_names = {
        value: name.removeprefix("TYPE_").lower()
        for name, value in vars(FieldDescriptor).items()
        if name.startswith("TYPE_")
    }
    for message_name, expected in EXPECTED_FEDERATION_FIELDS.items():
        descriptor = federation.DESCRIPTOR.message_types_by_name[message_name]
        fields = [(f.name, f.number, type_names[f.type]) for f in descriptor.fields]
        assert fields == expected, message_name
    chunk = federation.DESCRIPTOR.message_types_by_name["DownloadBankResponse"].fields_by_name[
        "chunk"
    ]
    assert chunk.message_type.full_name == "fedpatchcore.v1.BankChunk"
    states = federation.DESCRIPTOR.enum_types_by_name["RoundState"]
    assert [(v.name, v.number) for v in states.values] == [
        ("ROUND_STATE_UNSPECIFIED", 0), ("ROUND_STATE_COLLECTING", 1),
        ("ROUND_STATE_SELECTING", 2), ("ROUND_STATE_READY", 3), ("ROUND_STATE_FAILED", 4),
    ]
