"""Block-streamed calibration grams (GPTQ Catcher pattern) and their square roots."""

from __future__ import annotations

import copy

import pytest
import torch

from qwha_export.converters.calibration import (
    TARGET_MODULES_DEFAULT,
    collect_grams,
    find_decoder_layers,
    gram_to_root,
    iter_block_grams,
)


def _reference_grams(model, input_ids, batch_size):
    """X^T X of every target linear's input, from plain forward hooks on full-model forwards."""
    grams, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES_DEFAULT:

            def hook(_m, args, _out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for s in range(0, input_ids.shape[0], batch_size):
                model(input_ids=input_ids[s : s + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return grams


@pytest.fixture(scope="module")
def calib_ids():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 256, (6, 24), generator=g)


def test_find_decoder_layers(tiny_llama):
    layers = find_decoder_layers(tiny_llama)
    assert len(layers) == 2 and layers[0] is tiny_llama.model.layers[0]
    assert find_decoder_layers(tiny_llama.model)[1] is tiny_llama.model.layers[1]
    with pytest.raises(ValueError, match="model.model.layers"):
        find_decoder_layers(torch.nn.Linear(2, 2))


def test_block_grams_equal_full_model_hooks(tiny_llama, calib_ids):
    ref = _reference_grams(tiny_llama, calib_ids, batch_size=4)
    assert len(ref) == 14
    seen = {}
    for index, block, grams in iter_block_grams(tiny_llama, calib_ids, batch_size=4):
        assert block is tiny_llama.model.layers[index]
        assert len(grams) == 7 and all(name.startswith(f"model.layers.{index}.") for name in grams)
        assert grams.n_tokens == 6 * 24
        assert all(count == 6 * 24 for count in grams.token_counts.values())
        seen.update(grams)
    assert set(seen) == set(ref)
    for name, g in seen.items():
        assert g.dtype == torch.float64 and g.shape == ref[name].shape
        torch.testing.assert_close(g, ref[name], rtol=1e-9, atol=1e-9 * ref[name].abs().max().item(), msg=name)
    # q/k/v (and gate/up) share their input, so they share one Gram tensor (held once: read-only); others do not
    ptr = {name.split(".", 3)[3]: g.data_ptr() for name, g in seen.items() if name.startswith("model.layers.0.")}
    assert ptr["self_attn.q_proj"] == ptr["self_attn.k_proj"] == ptr["self_attn.v_proj"]
    assert ptr["mlp.gate_proj"] == ptr["mlp.up_proj"]
    assert len({ptr["self_attn.q_proj"], ptr["self_attn.o_proj"], ptr["mlp.gate_proj"], ptr["mlp.down_proj"]}) == 4
    assert seen["model.layers.1.mlp.down_proj"].shape == (96, 96)


def test_collect_grams_and_batch_size_independence(tiny_llama, calib_ids):
    all_at_once = collect_grams(tiny_llama, calib_ids, batch_size=6)
    small = collect_grams(tiny_llama, calib_ids, target_modules=("o_proj",), batch_size=1)
    assert set(small) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    for name, g in small.items():
        torch.testing.assert_close(g, all_at_once[name], rtol=1e-5, atol=1e-5 * g.abs().max().item())
    assert all_at_once.n_tokens == 6 * 24


def test_transform_block_runs_before_next_block_inputs(tiny_llama, calib_ids):
    model = copy.deepcopy(tiny_llama)
    untouched = {n: g for _, _, grams in iter_block_grams(model, calib_ids, batch_size=3) for n, g in grams.items()}
    calls = []

    def zero_o_proj(index, block, grams):
        calls.append((index, sorted(grams)[0]))
        if index == 0:
            block.self_attn.o_proj.weight.data.zero_()

    changed = {}
    for _, _, grams in iter_block_grams(model, calib_ids, batch_size=3, transform_block=zero_o_proj):
        changed.update(grams)
    assert [c[0] for c in calls] == [0, 1]
    # block 0's own grams were taken before the transform; block 1's inputs come from the modified block 0
    torch.testing.assert_close(changed["model.layers.0.self_attn.o_proj"], untouched["model.layers.0.self_attn.o_proj"])
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        a, b = changed[f"model.layers.1.{name}"], untouched[f"model.layers.1.{name}"]
        assert (a - b).abs().max() > 1e-3 * b.abs().max(), name
    # the grams of the modified model equal plain hooks on the modified model's full forward
    ref = _reference_grams(model, calib_ids, batch_size=3)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        torch.testing.assert_close(changed[name], ref[name], rtol=1e-9, atol=1e-9 * ref[name].abs().max().item())


def test_modifying_block_inside_loop_body_propagates(tiny_llama, calib_ids):
    base = {n: g for _, _, gr in iter_block_grams(tiny_llama, calib_ids) for n, g in gr.items()}
    model = copy.deepcopy(tiny_llama)
    got = {}
    for index, block, grams in iter_block_grams(model, calib_ids):
        got.update(grams)
        if index == 0:
            block.mlp.down_proj.weight.data.mul_(3.0)
    name = "model.layers.1.self_attn.v_proj"
    assert not torch.allclose(got[name], base[name])

    # sequential=False: outputs come from the unmodified block, so the change does not propagate
    model = copy.deepcopy(tiny_llama)
    got = {}
    for index, block, grams in iter_block_grams(model, calib_ids, sequential=False):
        got.update(grams)
        if index == 0:
            block.mlp.down_proj.weight.data.mul_(3.0)
    torch.testing.assert_close(got[name], base[name])


def test_early_exit_removes_hooks(tiny_llama, calib_ids):
    gen = iter_block_grams(tiny_llama, calib_ids[:2])
    next(gen)
    gen.close()
    for module in tiny_llama.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_gram_to_root():
    torch.manual_seed(6)
    x = torch.randn(50, 8, dtype=torch.float64)
    x[:, 3] = x[:, 2]  # rank deficient
    xtx = x.T @ x
    r = gram_to_root(xtx, damp_ratio=1e-4)
    assert r.dtype == torch.float64
    torch.testing.assert_close(r, r.T)
    damped = xtx + 1e-4 * xtx.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(r @ r, damped, rtol=1e-10, atol=1e-10)
    assert torch.linalg.eigvalsh(r).min() > 0
    zero = gram_to_root(torch.zeros(4, 4))
    assert torch.isfinite(zero).all()
    with pytest.raises(ValueError, match="square"):
        gram_to_root(torch.zeros(2, 3))


@pytest.mark.slow
def test_smollm2_block_grams_first_block(smollm2):
    model, tokenizer = smollm2
    from qwha_export.data import lee_corpus_text, token_chunks

    ids = token_chunks(tokenizer, lee_corpus_text(), seq_len=64, max_tokens=128)
    gen = iter_block_grams(model, ids, batch_size=2)
    index, block, grams = next(gen)
    gen.close()
    assert index == 0 and len(grams) == 7
    assert grams["model.layers.0.self_attn.q_proj"].shape == (576, 576)
    assert grams["model.layers.0.mlp.down_proj"].shape == (1536, 1536)
    assert grams.n_tokens == 128
    for g in grams.values():
        assert torch.isfinite(g).all() and g.diagonal().min() >= 0
    torch.testing.assert_close(grams["model.layers.0.self_attn.q_proj"], grams["model.layers.0.self_attn.v_proj"])
