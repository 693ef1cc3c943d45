"""perplexity / logits_for / compare_logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwha_export.metrics import compare_logits, extract_logits, logits_for, perplexity


def test_compare_identical_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    stats = compare_logits(logits, logits.clone())
    assert stats["tokens"] == 10
    assert stats["max_abs_logit_diff"] == 0.0 and stats["mean_abs_logit_diff"] == 0.0
    assert stats["kl_per_token"] == pytest.approx(0.0, abs=1e-15)
    assert stats["top1_agreement"] == 1.0


def test_compare_constant_shift_changes_nothing_but_diff():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 7, dtype=torch.float64)
    stats = compare_logits(logits, logits + 2.5)
    assert stats["max_abs_logit_diff"] == pytest.approx(2.5)
    assert stats["mean_abs_logit_diff"] == pytest.approx(2.5)
    assert stats["kl_per_token"] == pytest.approx(0.0, abs=1e-12)
    assert stats["top1_agreement"] == 1.0


def test_compare_known_perturbation():
    # two tokens over a 2-word vocabulary: p = softmax([0, 0]) = (1/2, 1/2); q = softmax([0, log 3]) = (1/4, 3/4)
    ref = torch.zeros(2, 2)
    test = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    stats = compare_logits(ref, test, block_rows=1)
    kl_first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert stats["kl_per_token"] == pytest.approx(kl_first / 2, rel=1e-6)
    assert stats["max_abs_logit_diff"] == pytest.approx(math.log(3.0), rel=1e-6)
    assert stats["mean_abs_logit_diff"] == pytest.approx(math.log(3.0) / 4, rel=1e-6)
    # argmax of [0, 0] is index 0; of [0, log 3] is 1 -> only the second token agrees
    assert stats["top1_agreement"] == 0.5


def test_compare_matches_torch_kl_div():
    torch.manual_seed(2)
    ref, test = torch.randn(64, 33), torch.randn(64, 33)
    expected = F.kl_div(
        F.log_softmax(test.double(), -1), F.log_softmax(ref.double(), -1), log_target=True, reduction="batchmean"
    ).item()
    assert compare_logits(ref, test, block_rows=10)["kl_per_token"] == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(ref, test[:3])


def test_perplexity_of_uniform_model_is_vocab_size():
    vocab = 37

    def uniform(ids):
        return torch.zeros(*ids.shape, vocab)

    chunks = torch.randint(0, vocab, (5, 9))
    assert perplexity(uniform, chunks, batch_size=2) == pytest.approx(vocab, rel=1e-6)


def test_perplexity_matches_hf_loss(tiny_llama):
    torch.manual_seed(3)
    chunks = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        loss = tiny_llama(input_ids=chunks, labels=chunks).loss.item()
    assert perplexity(tiny_llama, chunks, batch_size=2) == pytest.approx(math.exp(loss), rel=1e-5)


def test_logits_for_module_and_callable(tiny_llama):
    torch.manual_seed(4)
    chunks = torch.randint(0, 256, (3, 8))
    ref = logits_for(tiny_llama, chunks, batch_size=2)
    assert ref.shape == (3, 8, 256) and ref.dtype == torch.float32
    via_callable = logits_for(lambda ids: tiny_llama(ids), chunks, batch_size=3)
    stats = compare_logits(ref, via_callable)
    assert stats["max_abs_logit_diff"] < 1e-4 and stats["top1_agreement"] == 1.0
    assert tiny_llama.training is False


def test_extract_logits_variants():
    t = torch.ones(1, 2, 3)
    assert extract_logits(t) is t
    assert extract_logits((t, None)) is t
    assert extract_logits({"logits": t}) is t
    with pytest.raises(TypeError):
        extract_logits(42)
