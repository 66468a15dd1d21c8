"""Model sources without sockets: parsing, canonical spelling, which files a repository means
for each backend, the catalog, and placement that prefers workers holding a model."""

from __future__ import annotations

import re

import pytest

from modelfleet.catalog import CatalogError, load_catalog, parse_size
from modelfleet.controller.models_api import apply_catalog
from modelfleet.controller.scheduler import GiB, Placed, Unplaced, capacities, place_replica, replica_need
from modelfleet.errors import ApiError
from modelfleet.models import DeploymentSpec, Placement, Resources, WorkerRecord
from modelfleet.sources import (
    AmbiguousSource,
    RemoteFile,
    SourceError,
    canonical_source,
    gguf_quant_matches,
    parse_source,
    select_files,
    with_quant,
)

SHA = "ab" * 32


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF", "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF@main"),
        ("hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m", "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M@main"),
        ("hf://org/repo/sub/dir/model.gguf@v1.0", "hf://org/repo/sub/dir/model.gguf@v1.0"),
        ("hf://org/repo@refs/pr/3", "hf://org/repo@refs/pr/3"),
        (
            "modelscope://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M",
            "modelscope://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M@master",
        ),
        ("https://example.org/m.gguf", "https://example.org/m.gguf"),
        (f"HTTPS://example.org/m.gguf#sha256={SHA.upper()}", f"HTTPS://example.org/m.gguf#sha256={SHA}"),
        ("/models/qwen.gguf", "/models/qwen.gguf"),  # local: unchanged
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),  # bundled: unchanged
    ],
)
def test_canonical_spelling(text: str, canonical: str) -> None:
    assert canonical_source(text) == canonical
    assert canonical_source(canonical) == canonical  # idempotent


def test_parsed_fields() -> None:
    s = parse_source("hf://org/repo/a/b.gguf@abc")
    assert (s.scheme, s.repo, s.file, s.revision, s.quant, s.rev) == ("hf", "org/repo", "a/b.gguf", "abc", None, "abc")
    u = parse_source(f"https://h/x/m.gguf#sha256={SHA}")
    assert (u.scheme, u.url, u.sha256, u.display) == ("https", "https://h/x/m.gguf", SHA, "https://h/x/m.gguf")
    assert parse_source("~/models/m") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hf://org", "expected hf://ORG/REPO"),
        ("hf://org/re po", "bad repository"),
        ("hf://org/repo:Q4/file.gguf", "a file or a quantization, not both"),
        ("hf://org/repo/../../etc/passwd", "bad file path"),
        ("hf://org/repo@", "bad revision"),
        ("hf://org/repo@../x", "bad revision"),
        ("s3://bucket/m.gguf", "unknown source scheme s3://"),
        ("https://host", "must name a file"),
        ("https://host/m.gguf#md5=00", "#sha256="),
        ("https://host/m.gguf#sha256=xyz", "#sha256="),
    ],
)
def test_bad_sources_say_why(text: str, message: str) -> None:
    with pytest.raises(SourceError, match=re.escape(message)):
        parse_source(text)


def test_quant_flag() -> None:
    assert with_quant("hf://org/repo", "q8_0") == "hf://org/repo:Q8_0@main"
    with pytest.raises(SourceError, match=r"not both|already chosen"):
        with_quant("hf://org/repo/m.gguf", "Q8_0")
    with pytest.raises(SourceError, match="applies to hf://"):
        with_quant("/models/m.gguf", "Q8_0")


# ---------------------------------------------------------------------------- which files

QWEN = [
    RemoteFile(p, n)
    for p, n in [
        (".gitattributes", 1500),
        ("LICENSE", 11000),
        ("README.md", 5000),
        ("qwen2.5-0.5b-instruct-fp16.gguf", 1_270_000_000),
        ("qwen2.5-0.5b-instruct-q4_k_m.gguf", 491_400_032),
        ("qwen2.5-0.5b-instruct-q4_k_s.gguf", 385_000_000),
        ("qwen2.5-0.5b-instruct-q8_0.gguf", 531_000_000),
        ("mmproj-model-f16.gguf", 100_000_000),
    ]
]
SPLIT = [RemoteFile(f"big-Q4_K_M-0000{i}-of-00003.gguf", 10) for i in (1, 2, 3)] + [RemoteFile("big-Q8_0.gguf", 30)]
MINILM = [
    RemoteFile(p, 10)
    for p in [
        ".gitattributes",
        "1_Pooling/config.json",
        "README.md",
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "onnx/model.onnx",
        "openvino/openvino_model.xml",
        "tf_model.h5",
        "rust_model.ot",
        "tokenizer.json",
        "vocab.txt",
        "modules.json",
    ]
]


def test_gguf_repo_needs_a_choice_and_the_error_lists_the_files() -> None:
    src = parse_source("hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF")
    with pytest.raises(AmbiguousSource) as err:
        select_files(src, QWEN, "llama.cpp")
    msg = str(err.value)
    assert "has 4 GGUF files" in msg  # the projector is not a model
    assert "qwen2.5-0.5b-instruct-q4_k_m.gguf (468.6 MiB)" in msg and "--quant" in msg
    assert "mmproj" not in msg


def test_quant_picks_one_file_and_a_split_model_comes_whole() -> None:
    files, model = select_files(parse_source("hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"), QWEN, "llama.cpp")
    assert [f.path for f in files] == ["qwen2.5-0.5b-instruct-q4_k_m.gguf"] and model == files[0].path
    files, model = select_files(parse_source("hf://o/big:q4_k_m"), SPLIT, "llama.cpp")
    assert [f.path for f in files] == [f"big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert model == "big-Q4_K_M-00001-of-00003.gguf"  # llama.cpp finds the other parts beside it
    with pytest.raises(SourceError, match=r"no GGUF file for quantization Q5_K_M"):
        select_files(parse_source("hf://o/big:Q5_K_M"), SPLIT, "llama.cpp")


def test_quant_matches_whole_tokens_only() -> None:
    assert gguf_quant_matches("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M")
    assert not gguf_quant_matches("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K")
    assert gguf_quant_matches("Model.Q8_0.gguf", "q8_0")
    assert gguf_quant_matches("big-Q4_K_M-00001-of-00003.gguf", "Q4_K_M")


def test_a_single_gguf_needs_no_choice_and_a_file_is_taken_as_named() -> None:
    files, model = select_files(
        parse_source("hf://o/r"), [RemoteFile("a.gguf", 5), RemoteFile("README.md", 1)], "llama.cpp"
    )
    assert model == "a.gguf" and len(files) == 1
    files, model = select_files(parse_source("hf://o/r/qwen2.5-0.5b-instruct-q8_0.gguf"), QWEN, "llama.cpp")
    assert model == "qwen2.5-0.5b-instruct-q8_0.gguf"
    with pytest.raises(SourceError, match=r"has no file 'nope\.gguf'"):
        select_files(parse_source("hf://o/r/nope.gguf"), QWEN, "llama.cpp")


def test_snapshot_leaves_out_weights_no_runner_loads() -> None:
    files, model = select_files(
        parse_source("hf://sentence-transformers/all-MiniLM-L6-v2"), MINILM, "sentence-transformers"
    )
    assert model == ""  # the snapshot folder
    assert sorted(f.path for f in files) == [
        "1_Pooling/config.json",
        "README.md",
        "config.json",
        "model.safetensors",
        "modules.json",
        "tokenizer.json",
        "vocab.txt",
    ]
    # Without safetensors, pytorch_model.bin is the weights and stays.
    old = [f for f in MINILM if f.path != "model.safetensors"]
    assert "pytorch_model.bin" in [f.path for f in select_files(parse_source("hf://o/r"), old, "transformers")[0]]
    with pytest.raises(SourceError, match=r"has no config\.json"):
        select_files(parse_source("hf://o/r"), [RemoteFile("a.gguf", 1)], "transformers")
    with pytest.raises(SourceError, match="only means something for a GGUF model"):
        select_files(parse_source("hf://o/r:Q4_K_M"), MINILM, "sentence-transformers")


def test_pull_without_backend_recognises_a_gguf_repo() -> None:
    files, _ = select_files(parse_source("hf://o/r:Q8_0"), QWEN, None)
    assert [f.path for f in files] == ["qwen2.5-0.5b-instruct-q8_0.gguf"]
    files, model = select_files(parse_source("hf://o/r"), MINILM, None)
    assert model == "" and "config.json" in [f.path for f in files]


# ---------------------------------------------------------------------------- catalog


def test_builtin_catalog_has_the_bundled_and_real_hub_models() -> None:
    c = load_catalog()
    assert c["smollm2-135m-instruct"].source == "smollm2-135m-instruct"  # bundled
    q = c["qwen2.5-0.5b-instruct"]
    assert (q.backend, q.size) == ("llama.cpp", 491_400_032)
    assert parse_source(q.source).quant == "Q4_K_M"
    assert c["bge-small-en-v1.5"].kind == "embedding"
    assert all(e.origin == "built-in" for e in c.values())


def test_operator_catalog_adds_and_overrides(tmp_path) -> None:
    f = tmp_path / "cat.yaml"
    f.write_text(
        "models:\n"
        "  - {name: mine, source: 'hf://me/mine-GGUF:Q8_0', backend: llama.cpp,"
        "     size: 1.5 GiB, memory: 2GiB}\n"
        "  - {name: bge-small-en-v1.5, source: /models/bge, backend: sentence-transformers,"
        "     kind: embedding}\n"
    )
    c = load_catalog(f)
    assert c["mine"].size == int(1.5 * GiB) and c["mine"].memory == 2 * GiB and c["mine"].origin == str(f)
    assert c["bge-small-en-v1.5"].source == "/models/bge"
    f.write_text("models:\n  - {name: broken, source: 'hf://only-org', backend: llama.cpp}\n")
    with pytest.raises(CatalogError, match=r"entry broken: source: .*expected hf://ORG/REPO"):
        load_catalog(f)
    f.write_text("nothing: here\n")
    with pytest.raises(CatalogError, match="top-level `models:` list"):
        load_catalog(f)
    assert parse_size("500MB") == 500_000_000 and parse_size(7) == 7


def test_deploying_a_catalog_name_fills_what_the_request_leaves_out() -> None:
    cat = load_catalog()
    body = DeploymentSpec.model_validate({"name": "qwen2.5-0.5b-instruct", "replicas": 2, "params": {"n_ctx": 8192}})
    filled, entry = apply_catalog(body, cat)
    assert entry is not None and (filled.backend, filled.source) == ("llama.cpp", entry.source)
    assert filled.params == {"n_ctx": 8192}  # the request's own value wins
    assert filled.placement.memory == entry.memory and filled.replicas == 2
    other = apply_catalog(DeploymentSpec.model_validate({"name": "chat", "catalog": "smollm2-360m-instruct"}), cat)[0]
    assert other.name == "chat" and other.source.endswith("smollm2-360m-instruct-q8_0.gguf")
    with pytest.raises(ApiError, match="no source, and no catalog entry is called 'nothing'"):
        apply_catalog(DeploymentSpec.model_validate({"name": "nothing"}), cat)
    given = DeploymentSpec.model_validate({"name": "qwen2.5-0.5b-instruct", "source": "/m/q.gguf"})
    assert apply_catalog(given, cat)[0].source == "/m/q.gguf"  # a source given: no catalog


# ---------------------------------------------------------------------------- placement


def worker(wid: str, cached: list[str] | None = None, disk_free: int | None = None) -> WorkerRecord:
    return WorkerRecord(
        id=wid,
        name=wid,
        address="10.0.0.1",
        port=8200,
        heartbeat_age=0.5,
        resources=Resources(
            cpu_cores=8, memory_total=16 * GiB, memory_free=16 * GiB, cached_models=cached or [], disk_free=disk_free
        ),
    )


def test_placement_prefers_a_worker_holding_the_model() -> None:
    source = "hf://org/smol-GGUF:Q4_1@main"
    need = replica_need("llama.cpp", "hf://org/smol-GGUF:q4_1", Placement(), remote_bytes=100 << 20)
    assert need.model == source and need.download == 100 << 20
    # "a" wins every other tie-break (id); "c" holds the file.
    ws = [worker("a"), worker("b"), worker("c", cached=[source])]
    caps = capacities(ws, {w.id for w in ws}, [], {})
    assert place_replica("d", need, Placement(), caps) == Placed("c")
    # Spreading comes first: a second replica does not pile onto the holder.
    caps[2].replicas_of["d"] = 1
    assert place_replica("d", need, Placement(), caps) == Placed("a")
    assert place_replica("d", need, Placement(policy="binpack"), caps) == Placed("c")


def test_a_worker_without_disk_space_for_the_download_does_not_fit() -> None:
    need = replica_need("llama.cpp", "hf://org/big:Q8_0", Placement(), remote_bytes=5 * GiB)
    ws = [worker("a", disk_free=2 * GiB), worker("b", disk_free=50 * GiB)]
    assert place_replica("d", need, Placement(), capacities(ws, {"a", "b"}, [], {})) == Placed("b")
    alone = capacities([worker("a", disk_free=2 * GiB)], {"a"}, [], {})
    r = place_replica("d", need, Placement(), alone)
    assert isinstance(r, Unplaced)
    assert "needs 5.0 GiB of disk to download hf://org/big:Q8_0@main, 2.0 GiB free" in r.reason
    # A worker that already holds it needs no disk; an unknown size is not checked.
    held = capacities([worker("a", cached=["hf://org/big:Q8_0@main"], disk_free=1)], {"a"}, [], {})
    assert place_replica("d", need, Placement(), held) == Placed("a")
    unknown = replica_need("llama.cpp", "hf://org/big:Q8_0", Placement())
    assert unknown.download == 0 and unknown.memory > 2 * GiB  # the 2 GiB default, estimated
