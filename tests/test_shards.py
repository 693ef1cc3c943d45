"""qwha_export.formats' safetensors layer: the size-sharded writer, the checked reader (truncated, corrupted and
missing shards named in one line), and the one-line JSON errors of ``formats.jsonfile``."""

from __future__ import annotations

import json

import pytest
import torch

from qwha_export.formats import ShardWriter, iter_checkpoint_tensors
from qwha_export.formats.shards import validate_safetensors_file

# ----------------------------------------------------------------------------------------------------------------------
# shards
# ----------------------------------------------------------------------------------------------------------------------


def _tensors(n=7):
    g = torch.Generator().manual_seed(0)
    out = {f"layer.{i}.weight": torch.randn(10, 20 + i, generator=g) for i in range(n)}  # ~800-1000 bytes each
    out["ints"] = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    out["half"] = torch.randn(5, generator=g).to(torch.float16)
    out["big"] = torch.randn(40, 40, generator=g)  # 6400 bytes > limit: a shard of its own
    return out


def test_shard_writer_shards_by_size_and_reads_back(tmp_path):
    tensors = _tensors()
    limit = 2500
    with ShardWriter(tmp_path, max_shard_bytes=limit) as sw:
        for k, v in tensors.items():
            sw.add(k, v)
            assert sw.buffered_bytes <= max(limit, v.nbytes)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.iterdir())
    n = len(files) - 1
    assert n > 3
    assert files[:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert files[-1] == "model.safetensors.index.json"
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and list(index["weight_map"]) == sorted(tensors)
    assert set(index["weight_map"].values()) == set(files[:-1])
    # the big tensor is alone in its shard; no shard above the limit unless it holds a single tensor
    from safetensors import safe_open

    for f in files[:-1]:
        with safe_open(str(tmp_path / f), "pt") as h:
            keys = list(h.keys())
            size = sum(h.get_tensor(k).nbytes for k in keys)
            assert h.metadata() == {"format": "pt"}
        assert size <= limit or len(keys) == 1
    back = dict(iter_checkpoint_tensors(tmp_path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


@pytest.mark.parametrize("limit", [2500, 10**6])
def test_shard_writer_holds_one_buffer_and_writes_the_same_bytes(tmp_path, limit):
    """With a buffer smaller than the shard, tensors go to piece files as they come (memory: the buffer plus one
    tensor) and the joined shards hold the same tensors, metadata and index as shards written from one buffer."""
    tensors = _tensors(30)
    big_buffer, pieces = tmp_path / "one", tmp_path / "pieces"
    with ShardWriter(big_buffer, max_shard_bytes=limit) as sw:
        sw.add_many(tensors)
    seen_pieces = 0
    with ShardWriter(pieces, max_shard_bytes=limit, buffer_bytes=1500) as sw:
        for k, v in tensors.items():
            sw.add(k, v)
            assert sw.held_bytes <= 1500, (k, sw.held_bytes)
            seen_pieces = max(seen_pieces, len(list(pieces.glob(".*piece*"))))
    assert seen_pieces >= 1  # the pieces really were written
    assert sorted(p.name for p in pieces.iterdir()) == sorted(p.name for p in big_buffer.iterdir())  # none left
    from safetensors import safe_open

    for f in big_buffer.iterdir():
        if f.suffix == ".json":
            assert (pieces / f.name).read_text() == f.read_text()
            continue
        with safe_open(str(f), "pt") as a, safe_open(str(pieces / f.name), "pt") as b:
            assert a.metadata() == b.metadata() == {"format": "pt"}
            names = sorted(a.keys())
            assert names == sorted(b.keys())
            for k in names:
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    assert dict(iter_checkpoint_tensors(pieces)).keys() == tensors.keys()


def test_shard_writer_abort_removes_pieces(tmp_path):
    sw = ShardWriter(tmp_path, max_shard_bytes=10**6, buffer_bytes=1000)
    sw.add_many(_tensors(5))
    assert list(tmp_path.glob(".*piece*"))
    sw.abort()
    assert list(tmp_path.iterdir()) == []


def test_shard_writer_single_file_views_and_errors(tmp_path):
    base = torch.arange(20, dtype=torch.float32)
    sw = ShardWriter(tmp_path)
    sw.add("a", base[:5])  # view into a larger storage -> cloned
    sw.add("b", base[5:10])
    sw.add("c", base.view(4, 5).t())  # non-contiguous
    with pytest.raises(ValueError, match="duplicate"):
        sw.add("a", base)
    index = sw.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert index["weight_map"] == {k: "model.safetensors" for k in ("a", "b", "c")}
    back = dict(iter_checkpoint_tensors(tmp_path))
    assert torch.equal(back["a"], base[:5]) and torch.equal(back["c"], base.view(4, 5).t())
    with pytest.raises(ValueError, match="closed"):
        sw.add("d", base)
    # rewriting the folder as shards removes the now stale single file (and vice versa)
    with ShardWriter(tmp_path, max_shard_bytes=20) as sw:
        sw.add_many({"a": base[:5].clone(), "b": base[5:10].clone()})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    # an exception inside the context removes the temporary shards
    d2 = tmp_path / "aborted"
    with pytest.raises(RuntimeError), ShardWriter(d2, max_shard_bytes=10) as sw2:
        sw2.add("x", torch.zeros(10))
        sw2.add("y", torch.zeros(10))
        raise RuntimeError("boom")
    assert list(d2.iterdir()) == []


def _write_sharded(tmp_path):
    tensors = _tensors(4)
    with ShardWriter(tmp_path, max_shard_bytes=2000) as sw:
        sw.add_many(tensors)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    return shards


def test_reader_truncated_shard_names_file(tmp_path):
    shards = _write_sharded(tmp_path)
    victim = shards[1]
    data = victim.read_bytes()
    victim.write_bytes(data[:-7])
    with pytest.raises(ValueError, match="truncated") as e:
        list(iter_checkpoint_tensors(tmp_path))
    assert victim.name in str(e.value) and "\n" not in str(e.value)


def test_reader_corrupted_header_names_file(tmp_path):
    shards = _write_sharded(tmp_path)
    victim = shards[0]
    data = bytearray(victim.read_bytes())
    data[8:12] = b"{{{{"
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted") as e:
        list(iter_checkpoint_tensors(tmp_path))
    assert victim.name in str(e.value) and "\n" not in str(e.value)
    # absurd header length
    data[:8] = (10**12).to_bytes(8, "little")
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=victim.name):
        validate_safetensors_file(victim)


def test_reader_missing_shard_and_missing_tensor(tmp_path):
    shards = _write_sharded(tmp_path)
    shards[-1].unlink()
    with pytest.raises(ValueError, match="missing") as e:
        list(iter_checkpoint_tensors(tmp_path))
    assert shards[-1].name in str(e.value) and "\n" not in str(e.value)
    # index claims a tensor that its shard does not hold
    d = tmp_path / "second"
    shards = _write_sharded(d)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = shards[0].name
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="ghost.weight") as e:
        list(iter_checkpoint_tensors(d))
    assert shards[0].name in str(e.value)
    index_path.write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        list(iter_checkpoint_tensors(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no model.safetensors"):
        list(iter_checkpoint_tensors(empty))


def test_read_json_object_one_line_errors(tmp_path):
    from qwha_export.formats.jsonfile import read_json_object

    p = tmp_path / "cfg.json"
    with pytest.raises(ValueError, match=r"no cfg\.json; run init"):
        read_json_object(p, hint="run init")
    with pytest.raises(ValueError, match="custom message"):
        read_json_object(p, missing="custom message")
    p.write_text('{"a": 1')
    with pytest.raises(ValueError, match=r"cfg\.json: manifest is not valid JSON \(") as exc:
        read_json_object(p, what="manifest")
    assert "\n" not in str(exc.value)
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json_object(p)
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_json_object(p)
    p.write_text('{"a": 1}')
    assert read_json_object(p) == {"a": 1}


def test_concat_safetensors_joins_parts_in_bounded_chunks(tmp_path):
    from safetensors.torch import load_file, save_file

    from qwha_export.formats.shards import concat_safetensors

    gen = torch.Generator().manual_seed(0)
    a = {"x.codes": torch.randint(0, 15, (7, 5), dtype=torch.uint8, generator=gen), "x.scales": torch.randn(7, 2)}
    a["x.scales"] = a["x.scales"].half()
    b = {"y.idx": torch.arange(6).reshape(2, 3), "y.v": torch.randn(3, generator=gen), "y.b": torch.tensor([True])}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file({}, str(tmp_path / "empty.safetensors"))
    parts = [tmp_path / n for n in ("a.safetensors", "empty.safetensors", "b.safetensors")]
    assert concat_safetensors(parts, tmp_path / "out.safetensors") == 5
    header = validate_safetensors_file(tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(out) == sorted({**a, **b})
    for k, v in {**a, **b}.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    starts = {k: h["data_offsets"][0] for k, h in header.items() if k != "__metadata__"}
    assert starts["y.idx"] % 8 == 0 and min(starts, key=starts.get) == "y.idx"  # widest dtype first: aligned
    with pytest.raises(ValueError, match=r"tensor 'x\.\w+' is in two parts"):
        concat_safetensors([parts[0], parts[0]], tmp_path / "dup.safetensors")


def test_checkpoint_reader_reopens_its_handle_every_few_bytes(tmp_path, monkeypatch):
    """The reader opens a file again after ``READ_HANDLE_BYTES`` (a long-lived handle keeps every page read
    resident), and still yields every tensor once, in order, unchanged."""
    import qwha_export.formats.shards as S

    tensors = _tensors(12)
    with ShardWriter(tmp_path, max_shard_bytes=10**6) as sw:
        sw.add_many(tensors)
    whole = list(iter_checkpoint_tensors(tmp_path, natural_order=True))
    opened = []
    real = S._open_checked

    def spy(path):
        opened.append(path)
        return real(path)

    monkeypatch.setattr(S, "_open_checked", spy)
    monkeypatch.setattr(S, "READ_HANDLE_BYTES", 1)  # a handle per tensor
    small = list(iter_checkpoint_tensors(tmp_path, natural_order=True))
    assert [n for n, _ in small] == [n for n, _ in whole] and len(small) == len(tensors)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(small, whole, strict=True))
    assert len(opened) == len(tensors)
