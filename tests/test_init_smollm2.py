"""QWHA initialisation on the real SmolLM2-135M (4-bit and 2-bit, group 64, RTN), on gensim's Lee corpus.

QWHA init (AdaAlloc + top-k + refinement) must lower the held-out relative output error of every target layer and
the held-out perplexity versus the quantized model without adapter; random-selection init must lower them less.
"""

import pytest

from qwha_export.init_study import StudyConfig, compare_initialisations

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(smollm2):
    model, tok = smollm2
    cfg = StudyConfig(bits=(4, 2), group_size=64, rank=16, calib_tokens=1024, heldout_tokens=1024, seq_len=256)
    result = compare_initialisations(model, tok, cfg)
    print("\nperplexity:", {k: round(v, 2) for k, v in result["ppl"].items()})
    print("summary:", result["summary"])
    return result


@pytest.mark.parametrize("bits", [4, 2])
def test_qwha_init_lowers_every_layer_error(study, bits):
    reports = study["layers"][f"q{bits}+adaalloc"]
    assert len(reports) == 30 * 7
    worse = [n for n, r in reports.items() if not r["rel_err_after_heldout"] < r["rel_err_before_heldout"]]
    assert not worse, f"layers whose held-out error did not drop: {worse[:5]}"


@pytest.mark.parametrize("bits", [4, 2])
def test_qwha_init_lowers_perplexity_more_than_random(study, bits):
    ppl = study["ppl"]
    q, qwha, rnd = ppl[f"q{bits}"], ppl[f"q{bits}+adaalloc"], ppl[f"q{bits}+random"]
    assert ppl["fp"] < qwha < q, ppl
    assert qwha < rnd, ppl
    s = study["summary"]
    assert s[f"q{bits}+adaalloc"]["mean_rel_err_after"] < s[f"q{bits}+random"]["mean_rel_err_after"]
