"""Pipeline stage ``train``: fine-tune the QWHA spectrum of an adapter directory with the Hugging Face ``Trainer``.

Only the spectrum values (``qwha_spectrum``) are trained; the quantized base and the spectrum's support (indices)
stay fixed. The loss is the causal-LM loss on response tokens for ``{"prompt", "response"}`` records and on all
tokens for ``{"text"}`` records (see :func:`qwha_export.data.encode_records`). Because training goes through
``Trainer``, the same code runs single-process on CPU/GPU and multi-GPU (DDP, FSDP) under ``accelerate launch``.

Output layout and atomicity
---------------------------
Training happens in the **work folder** ``<out>.partial/`` next to ``out``::

    <out>.partial/checkpoints/checkpoint-<step>/   Trainer checkpoints (adapter + optimizer/scheduler/RNG state)

When training ends, the final adapter (``adapter_config.json``, ``adapter_model.safetensors``), copies of the input's
``qwha_base.json`` / ``quantized_base.safetensors`` (and ``init_report.json``) and ``train_report.json`` are written
into the work folder, which is then renamed onto ``out`` in one step. So ``out`` only ever exists complete -- a
self-contained adapter directory that :func:`qwha_export.pipeline.load_qwha_model` loads, with its checkpoints in
``out/checkpoints/checkpoint-<step>/`` -- and an interrupted run leaves only ``<out>.partial/``.

Checkpoints and the adapter are safetensors (``Trainer``'s ``save_safetensors``, always on in transformers 5);
``Trainer``'s pickled ``training_args.bin`` is dropped from the final folder (``train_report.json`` has the config).
The input's files are copied, not hard-linked, so a later in-place write to one folder cannot reach the other.

Resume
------
``resume=True`` continues from the newest checkpoint of ``<out>.partial/checkpoints`` (an interrupted run) or, when
there is none, of ``out/checkpoints`` (a finished run trained further, e.g. with a larger ``max_steps``; its
checkpoints are copied into a new work folder and the finished ``out`` is replaced only at the end). ``resume=<path>``
continues from that checkpoint folder. The optimizer, scheduler, RNG and step counter come back through
``Trainer.train(resume_from_checkpoint=...)``. ``Trainer``'s own adapter loading (``PeftModel.load_adapter``) does
work for the registered QWHA type (checked: it restores the checkpoint's spectra exactly, in place), but it only logs
a warning when keys do not match; :class:`QWHATrainer` therefore loads the checkpoint's ``adapter_model.safetensors``
itself through ``peft.set_peft_model_state_dict`` (the same path) and raises when a trainable spectrum has no entry or
the file has spectra the model lacks, so a resumed run can never silently restart from the initial spectrum. (Under
FSDP/DeepSpeed ``Trainer``'s own loading is used.) A resumed run reproduces the uninterrupted one (same data order,
RNG, optimizer and schedule state).

A leftover work folder without ``resume`` is refused (pass ``resume=True`` to continue or ``overwrite=True`` to
start over), as is an existing ``out`` without ``overwrite``/``resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .data import encode_records, read_jsonl
from .formats.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FILE, BASE_META, REPORT_FILE
from .pipeline import load_qwha_model

__all__ = [
    "PadCollator",
    "QWHATrainer",
    "TrainConfig",
    "load_adapter_checkpoint",
    "train_qwha",
    "train_qwha_model",
    "work_dir_for",
]

TRAIN_REPORT = "train_report.json"
CHECKPOINTS = "checkpoints"
SPECTRUM_KEY = "qwha_spectrum"
_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


@dataclass(frozen=True)
class TrainConfig:
    """Inputs of ``qwha-export train``.

    ``max_steps > 0`` fixes the number of optimizer steps; ``max_steps <= 0`` trains ``epochs`` epochs instead.
    One optimizer step sees ``batch_size * grad_accum`` records per process. ``bf16=None`` means auto: bf16 autocast
    on a CUDA device that supports it, float32 otherwise. ``save_steps=0`` writes no checkpoints. ``resume`` is
    ``False``, ``True`` (newest checkpoint, see the module docstring) or a checkpoint folder.
    """

    adapter_dir: str
    data: str
    out: str
    max_steps: int = 100
    epochs: float = 1.0
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 512
    gradient_checkpointing: bool = False
    seed: int = 0
    bf16: bool | None = None
    logging_steps: int = 10
    save_steps: int = 0
    save_total_limit: int | None = None
    resume: bool | str = False
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("adapter_dir", "data", "out"):
            v = getattr(self, name)
            if not isinstance(v, (str, os.PathLike)) or not str(v):
                raise ValueError(f"{name} must be a path, got {v!r}")
            object.__setattr__(self, name, str(v))
        if not _is_int(self.max_steps):
            raise ValueError(f"max_steps must be an integer (<= 0 to train by epochs), got {self.max_steps!r}")
        if self.max_steps <= 0 and not (_is_num(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be > 0 when max_steps <= 0, got {self.epochs!r}")
        if not (_is_num(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (_is_num(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (_is_num(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.lr_scheduler not in _SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {_SCHEDULERS}, got {self.lr_scheduler!r}")
        for name in ("batch_size", "grad_accum", "logging_steps"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not _is_int(self.max_len) or self.max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2, got {self.max_len!r}")
        if not _is_int(self.save_steps) or self.save_steps < 0:
            raise ValueError(f"save_steps must be an integer >= 0 (0 = no checkpoints), got {self.save_steps!r}")
        if self.save_total_limit is not None and (not _is_int(self.save_total_limit) or self.save_total_limit < 1):
            raise ValueError(f"save_total_limit must be a positive integer or None, got {self.save_total_limit!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be True, False or None (auto), got {self.bf16!r}")
        if isinstance(self.resume, os.PathLike):
            object.__setattr__(self, "resume", str(self.resume))
        if not isinstance(self.resume, (bool, str)) or self.resume == "":
            raise ValueError(f"resume must be True/False or a checkpoint folder, got {self.resume!r}")
        for name in ("gradient_checkpointing", "overwrite", "quiet"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if Path(self.out).resolve() == Path(self.adapter_dir).resolve():
            raise ValueError(f"out ({self.out}) must differ from adapter_dir; the input adapter is never overwritten")

    @property
    def use_bf16(self) -> bool:
        if self.bf16 is not None:
            return self.bf16
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def work_dir_for(out: str | Path) -> Path:
    """The work folder ``<out>.partial`` where a run trains before it is renamed onto ``out``."""
    p = Path(out)
    return p.with_name(p.name + ".partial")


# ----------------------------------------------------------------------------------------------------------------------
# data


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


@dataclass(frozen=True)
class PadCollator:
    """Right-pad ``input_ids``/``labels`` lists to the longest in the batch: ``pad_id`` / ``-100``, plus a mask."""

    pad_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.tensor(b["labels"], dtype=torch.long)
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _encode(
    tokenizer: Any, records: list[dict[str, Any]], config: TrainConfig
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    examples = encode_records(tokenizer, records, config.max_len)  # warns about records dropped by max_len
    # a position is trained only if it has a label and a predecessor (the causal shift drops position 0)
    examples = [e for e in examples if any(x != -100 for x in e["labels"][1:])]
    if not examples:
        raise ValueError(
            f"max_len={config.max_len} is too small for every record of {config.data}: no record keeps a response "
            "token to train on; raise max_len"
        )
    stats = {
        "records": len(records),
        "examples": len(examples),
        "dropped": len(records) - len(examples),
        "label_tokens": sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples),
        "tokens": sum(len(e["input_ids"]) for e in examples),
    }
    return examples, stats


# ----------------------------------------------------------------------------------------------------------------------
# trainer


class LossOnBarCallback(TrainerCallback):
    """Show the latest logged loss on Trainer's progress bar (next to the step count)."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or self.trainer is None:
            return
        for cb in self.trainer.callback_handler.callbacks:
            if isinstance(cb, ProgressCallback) and cb.training_bar is not None:
                cb.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


class QWHATrainer(Trainer):
    """``Trainer`` whose checkpoint loading of the QWHA adapter is strict (see the module docstring)."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_adapter_checkpoint(model, resume_from_checkpoint)


def load_adapter_checkpoint(model, checkpoint: str | Path, adapter: str = "default") -> None:
    """Load a checkpoint's ``adapter_model.safetensors`` into a QWHA ``PeftModel`` in place, strictly.

    ``ValueError`` when the file is missing, or when a trainable spectrum of the model has no entry in it or the file
    has spectrum entries the model lacks (an adapter for another model or target set).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(checkpoint) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ValueError(f"checkpoint {checkpoint} has no {ADAPTER_WEIGHTS}; not a QWHA training checkpoint")
    state = load_file(str(path), device="cpu")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    missing = sorted(k for k in result.missing_keys if k in trainable)
    unexpected = sorted(k for k in result.unexpected_keys if SPECTRUM_KEY in k)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        n = len(missing) + len(unexpected)
        raise ValueError(f"checkpoint {checkpoint} does not match the model ({n} spectrum key(s), e.g. {what})")


def _training_arguments(config: TrainConfig, output_dir: Path) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.lr,
        "weight_decay": config.weight_decay,
        "warmup_steps": config.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers >= 5)
        "lr_scheduler_type": config.lr_scheduler,
        "optim": "adamw_torch",
        "max_steps": config.max_steps if config.max_steps > 0 else -1,
        "num_train_epochs": float(config.epochs),
        "logging_strategy": "steps",
        "logging_steps": config.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if config.save_steps > 0 else "no",
        "save_steps": config.save_steps if config.save_steps > 0 else 500,
        "save_total_limit": config.save_total_limit,
        "seed": config.seed,
        "data_seed": config.seed,
        "bf16": config.use_bf16,
        "gradient_checkpointing": config.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if config.gradient_checkpointing else None,
        "report_to": [],
        "disable_tqdm": config.quiet,
        "log_level": "warning" if config.quiet else "passive",
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "use_cpu": not cuda,
        "dataloader_pin_memory": cuda,
        "ddp_find_unused_parameters": False,  # every spectrum is used in every forward
        "save_safetensors": True,  # dropped below where the field no longer exists (always on in transformers 5)
    }
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in names:  # transformers >= 5.x renamed gradient_checkpointing*
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
        kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
    kwargs = {k: v for k, v in kwargs.items() if k in names}
    return TrainingArguments(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# folders


def _check_adapter_dir(d: Path) -> None:
    if not d.is_dir():
        raise ValueError(f"adapter_dir {d} does not exist; create it with `qwha-export init`")
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_META, BASE_FILE) if not (d / f).is_file()]
    if missing:
        raise ValueError(f"{d} is not a qwha-export adapter directory (missing {', '.join(missing)})")


_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _CKPT.match(p.name)) and p.is_dir() and (p / "trainer_state.json").is_file()
    ]
    return max(found)[1] if found else None


@dataclass(frozen=True)
class _FolderPlan:
    work: Path  # the work folder <out>.partial
    checkpoint: str | None  # what Trainer resumes from (inside ``work`` once ``copy_checkpoints`` ran)
    wipe_work: bool  # overwrite: remove a stale work folder first
    copy_checkpoints: Path | None  # resume of a finished run: copy these checkpoints into work/checkpoints


def _plan_folders(config: TrainConfig) -> _FolderPlan:
    """Check ``out`` / the work folder against ``resume``/``overwrite`` (no side effects; ``ValueError`` if refused)."""
    out = Path(config.out)
    work = work_dir_for(out)
    ckpts = work / CHECKPOINTS
    if not config.resume:
        if out.exists() and not config.overwrite:
            raise ValueError(f"output folder {out} already exists; pass --overwrite or choose another --out")
        if work.exists() and not config.overwrite:
            raise ValueError(
                f"{work} holds an interrupted run; pass --resume to continue it or --overwrite to start over"
            )
        return _FolderPlan(work, None, work.exists(), None)

    if isinstance(config.resume, str):
        ckpt = Path(config.resume)
        if not (ckpt / "trainer_state.json").is_file() or not (ckpt / ADAPTER_WEIGHTS).is_file():
            raise ValueError(
                f"checkpoint {config.resume!r} to resume from is not a training checkpoint (needs trainer_state.json + "
                f"{ADAPTER_WEIGHTS})"
            )
    else:
        ckpt = _latest_checkpoint(ckpts) or _latest_checkpoint(out / CHECKPOINTS)
        if ckpt is None:
            raise ValueError(f"--resume: there is no checkpoint in {ckpts} or {out / CHECKPOINTS} to continue from")
    copy_from = None
    if not ckpts.is_dir() and (out / CHECKPOINTS).is_dir():
        # a finished run trained further: carry its checkpoints into the work folder (``out`` is replaced at the end)
        copy_from = out / CHECKPOINTS
        if ckpt.resolve().is_relative_to(copy_from.resolve()):  # else: an explicit checkpoint somewhere else
            ckpt = ckpts / ckpt.resolve().relative_to(copy_from.resolve())
    return _FolderPlan(work, str(ckpt), False, copy_from)


def _apply_plan(plan: _FolderPlan) -> None:
    if plan.wipe_work and plan.work.exists():
        shutil.rmtree(plan.work)
    if plan.copy_checkpoints is not None:
        plan.work.mkdir(parents=True, exist_ok=True)
        shutil.copytree(plan.copy_checkpoints, plan.work / CHECKPOINTS)


def _final_path(path: str | None, work: Path, out: Path) -> str | None:
    """Where ``path`` (inside the work folder) lives once the work folder is renamed onto ``out``."""
    if path is None or not Path(path).resolve().is_relative_to(work.resolve()):
        return path
    return str(out / Path(path).resolve().relative_to(work.resolve()))


def _finalise(config: TrainConfig, work: Path, report: dict[str, Any]) -> None:
    """Complete the work folder into an adapter directory and rename it onto ``out`` (main process only)."""
    src = Path(config.adapter_dir)
    for name in (BASE_META, BASE_FILE, REPORT_FILE):
        if not (src / name).is_file():
            continue
        shutil.copy2(src / name, work / name)
    ckpts = work / CHECKPOINTS
    if ckpts.is_dir() and not any(ckpts.iterdir()):
        ckpts.rmdir()  # Trainer creates its output folder even when it saves no checkpoint
    (work / "training_args.bin").unlink(missing_ok=True)  # Trainer's pickled arguments: the report has them
    (work / TRAIN_REPORT).write_text(json.dumps(report, indent=2))
    out = Path(config.out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(out)


# ----------------------------------------------------------------------------------------------------------------------
# entry points


def train_qwha_model(config: TrainConfig):
    """Train and write ``config.out`` (see the module docstring); returns ``(peft_model, tokenizer, report)``.

    The model is the in-memory trained model (unwrapped, on the training device); the report is also written to
    ``out/train_report.json``.
    """
    from accelerate import PartialState

    t0 = time.time()
    _check_adapter_dir(Path(config.adapter_dir))
    records = read_jsonl(config.data)  # ValueError for a missing/empty/malformed file, before any loading
    args = _training_arguments(config, work_dir_for(config.out) / CHECKPOINTS)  # also sets up the distributed state
    state = PartialState()
    plan = _plan_folders(config)
    state.wait_for_everyone()  # every rank has planned from the same folders before the main process changes them
    model, tokenizer = load_qwha_model(config.adapter_dir)
    _make_trainable(model)
    examples, data_stats = _encode(tokenizer, records, config)
    if state.is_main_process:
        _apply_plan(plan)
    state.wait_for_everyone()
    work, ckpt = plan.work, plan.checkpoint
    if config.gradient_checkpointing:
        model.config.use_cache = False

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar_cb = LossOnBarCallback()
    trainer = QWHATrainer(
        model=model,
        args=args,
        train_dataset=_ListDataset(examples),
        data_collator=PadCollator(int(pad)),
        callbacks=[bar_cb],
    )
    bar_cb.trainer = trainer
    if config.quiet:
        trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=ckpt)
    trainer.save_model(str(work))  # adapter_config.json + adapter_model.safetensors (gathers under FSDP/DeepSpeed)

    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = {
        "out": config.out,
        "config": asdict(config),
        "bf16": config.use_bf16,
        "device": str(args.device),
        "world_size": args.world_size,
        "data": data_stats,
        "trainable_parameters": trainable,
        "resumed_from": _final_path(ckpt, work, Path(config.out)),
        "losses": losses,
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs": trainer.state.epoch,
        "seconds": time.time() - t0,
    }
    if trainer.is_world_process_zero():
        _finalise(config, work, report)
    state.wait_for_everyone()
    return trainer.accelerator.unwrap_model(trainer.model), tokenizer, report


def train_qwha(config: TrainConfig) -> dict[str, Any]:
    """Fine-tune the QWHA spectrum of ``config.adapter_dir`` on ``config.data``; write the adapter to ``config.out``.

    Returns the training report (``first_loss``, ``final_loss``, ``losses``, ``steps``, ``seconds``, data and config).
    """
    return train_qwha_model(config)[2]


def _make_trainable(model) -> None:
    """Train exactly the spectrum values (``load_qwha_model`` loads the adapter frozen, for inference)."""
    for name, p in model.named_parameters():
        p.requires_grad_(SPECTRUM_KEY in name)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError("the adapter has no spectrum values to train (no QWHA layer with entries)")
    for cfg in getattr(model, "peft_config", {}).values():
        cfg.inference_mode = False
