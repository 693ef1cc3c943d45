"""stream_merge keeps one layer of the adapter directory in memory, not the whole quantized base or all spectra.

``safe_open`` maps the whole file; every page a tensor touched stays resident (and counts in RSS) while the handle
is open or any tensor read through it is alive. The test reads, from ``/proc/self/smaps``, how much of
``quantized_base.safetensors`` and ``adapter_model.safetensors`` is resident in this process each time a layer is
written, and requires that to stay near one layer's bytes while the files hold several layers' worth.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qwha_export.converters import checkpoint_writer as CW
from qwha_export.converters import merge as M
from qwha_export.converters.quantize import QuantizedWeight

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")

def _resident_kib(path: Path) -> int:
    """Resident KiB of every mapping of ``path`` in this process."""
    total, inside = 0, False
    target = str(path.resolve())
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(None, 5)
            if len(head) >= 5 and "-" in head[0] and not line.endswith("kB\n"):
                inside = len(head) == 6 and head[5].strip() == target
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def _adapter_dir(root: Path, n_layers: int, d: int, per_row: int) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A base checkpoint of ``n_layers`` ``d x d`` float16 linears (no model class needed), a random 4-bit g64
    quantized base and a ``per_row``-entries-per-channel spectrum for each; returns the adapter dir and each layer's
    bytes in ``quantized_base.safetensors`` and in ``adapter_model.safetensors``."""
    base, adir = root / "base", root / "adapter"
    base.mkdir()
    adir.mkdir()
    gen = torch.Generator().manual_seed(0)
    weights = {"model.norm.weight": torch.ones(d, dtype=torch.float16)}
    qtensors, spectra, sizes = {}, {}, {}
    for i in range(n_layers):
        name = f"model.layers.{i}.mlp.up_proj"
        weights[f"{name}.weight"] = torch.randn(d, d, generator=gen).mul_(0.02).half()
        q = QuantizedWeight(
            codes=torch.randint(0, 16, (d, d), dtype=torch.uint8, generator=gen),
            scales=torch.rand(d, d // 64, generator=gen).mul_(0.002).add_(5e-4).half(),
            zeros=torch.randint(0, 16, (d, d // 64), dtype=torch.uint8, generator=gen),
            bits=4,
            group_size=64,
        ).to_dict(prefix=f"{name}.")
        cols = (torch.randint(0, d, (d, 1), generator=gen) + torch.arange(per_row) * (d // per_row)) % d
        key = f"base_model.model.{name}"
        sp = {
            f"{key}.qwha_spectrum": torch.randn(d * per_row, generator=gen),
            f"{key}.qwha_indices": torch.stack([torch.arange(d).repeat_interleave(per_row), cols.reshape(-1)]),
            f"{key}.qwha_shape": torch.tensor([d, d]),
        }
        qtensors.update(q)
        spectra.update(sp)
        sizes[name] = sum(t.nbytes for t in q.values()), sum(t.nbytes for t in sp.values())
    save_file(weights, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": d}))
    save_file(qtensors, str(adir / "quantized_base.safetensors"))
    save_file(spectra, str(adir / "adapter_model.safetensors"))
    (adir / "adapter_config.json").write_text(json.dumps({"peft_type": "QWHA", "scale": 1.0}))
    (adir / "qwha_base.json").write_text(json.dumps({"base_model": str(base), "quantized_layers": sorted(sizes)}))
    return adir, sizes


def test_stream_merge_keeps_one_layer_of_the_adapter_dir_resident(tmp_path, monkeypatch):
    # layers of several MB: the kernel maps cached file pages in folios of up to 2 MB, so residency is only
    # meaningful well above that granularity
    adir, sizes = _adapter_dir(tmp_path, n_layers=16, d=2048, per_row=64)
    qfile, afile = adir / "quantized_base.safetensors", adir / "adapter_model.safetensors"
    seen: list[tuple[int, int]] = []
    real = CW.ShardWriter  # the engine's shard writer: add_many runs once per layer

    class Probe(real):
        def add_many(self, tensors):  # once per merged layer, while that layer's inputs are still alive
            seen.append((_resident_kib(qfile), _resident_kib(afile)))
            return super().add_many(tensors)

    monkeypatch.setattr(CW, "ShardWriter", Probe)
    report = M.stream_merge(adir, tmp_path / "out", bits=16, group_size=None, requant="rtn", fmt="dense")
    assert report["total"]["n_adapted"] == len(sizes) == len(seen) == 16

    total_q = sum(q for q, _ in sizes.values()) / 1024
    total_a = sum(a for _, a in sizes.values()) / 1024
    assert total_q > 60_000 and total_a > 40_000  # KiB: 16 layers of ~4 MB (codes) and ~2.6 MB (spectrum)
    worst_q, worst_a = max(q for q, _ in seen), max(a for _, a in seen)
    # one handle for the whole merge (or all spectra held) leaves the whole file resident by the last layer
    assert worst_q < total_q / 3, f"{worst_q} KiB of the {total_q:.0f} KiB quantized base resident at once"
    assert worst_a < total_a / 3, f"{worst_a} KiB of the {total_a:.0f} KiB adapter file resident at once"
    assert seen[-1][0] > 0  # the probe does see the current layer's pages


def test_lazy_spectra_equal_eager_and_validate_up_front(tmp_path):
    from qwha_export.converters.adapter_source import LazySpectra

    adir, sizes = _adapter_dir(tmp_path, n_layers=4, d=256, per_row=8)
    eager = M.read_adapter_spectra(adir)
    lazy = LazySpectra(adir)
    assert sorted(lazy) == sorted(eager) == sorted(sizes) and len(lazy) == len(eager)
    name = sorted(sizes)[3]
    assert name in lazy and "model.nope" not in lazy and lazy.get("model.nope") is None
    for layer, (v, r, c, s) in eager.items():
        lv, lr, lc, ls = lazy[layer]
        assert torch.equal(lv, v) and torch.equal(lr, r) and torch.equal(lc, c) and ls == s
    # a NaN in one layer is found when the mapping is built (before any merge work), naming the layer
    key = f"base_model.model.{name}.qwha_spectrum"
    from safetensors.torch import load_file

    tensors = load_file(str(adir / "adapter_model.safetensors"))
    tensors[key] = tensors[key].clone()
    tensors[key][7] = float("nan")
    save_file(tensors, str(adir / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=f"{name}: spectrum has 1 NaN"):
        LazySpectra(adir)
