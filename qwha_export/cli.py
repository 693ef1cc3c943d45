"""The ``qwha-export`` command line. Each command is a thin wrapper over one typed library function.

Bad input (a ``ValueError`` from the library, a missing file, a corrupt safetensors file, a full disk) prints one
line, ``Error: ...``, and exits with code 2; no traceback.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .cli_errors import cli_words, exit_cleanly_on_sigterm, friendly_errors
from .cli_options import ACCURACY_LEVEL, MAX_SHARD_SIZE, OVERWRITE, QUIET, VERIFY_TOKENS
from .converters.quant_methods import BASE_QUANTIZERS, MERGE_REQUANT
from .formats.export_format import FUSED_BASE_FORMATS, ExportFormat


def _echo_parity(parity) -> None:
    """One line with the parity numbers stored in the manifest (or why the check was skipped)."""
    if not parity:
        return
    if "skipped" in parity:
        click.echo(f"parity check skipped: {parity['skipped']}", err=True)
        return
    click.echo(
        f"parity on {parity['tokens']} held-out tokens: top-1 agreement {parity['top1_agreement']:.4f}, "
        f"KL/token {parity['kl_per_token']:.3g}, max |logit diff| {parity['max_abs_logit_diff']:.3g}, "
        f"perplexity {parity['ppl_export']:.3f} (training-time model {parity['ppl_reference']:.3f})"
    )


def _echo_onnx_parity(parity) -> None:
    """One line: ONNX logits against the PyTorch model that was exported (``export_onnx``'s ``parity``)."""
    if parity:
        click.echo(
            f"ONNX vs PyTorch on {parity['tokens']} tokens: top-1 agreement {parity['top1_agreement']:.4f}, "
            f"KL/token {parity['kl_per_token']:.3g}, max |logit diff| {parity['max_abs_logit_diff']:.3g}"
            + (f", qwha ops: {parity['qwha_ops']}" if parity.get("qwha_ops", "none") != "none" else ""),
            err=True,
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qwha-export")
def main() -> None:
    """Take a QWHA fine-tuned LLM (quantized base + Walsh-Hadamard spectral adapter) to deployment."""
    exit_cleanly_on_sigterm()


@main.command("init")
@click.argument("model", type=str)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Adapter directory to write.")
@click.option("--bits", default=4, show_default=True, type=int, help="Quantization bits: 2, 3, 4 or 8.")
@click.option("--group-size", default=64, show_default=True, type=int, help="32, 64, 128, or -1 per channel.")
@click.option(
    "--quantizer",
    default="rtn",
    show_default=True,
    type=click.Choice(BASE_QUANTIZERS),
    help="rtn: min/max grid per group; gptq: on the calibration activations.",
)
@click.option("--rank", default=64, show_default=True, type=int, help="Budget per layer p = rank*(d_in+d_out).")
@click.option(
    "--init",
    "init_method",
    default="adaalloc",
    show_default=True,
    type=click.Choice(["adaalloc", "random", "zeros"]),
    help="adaalloc (QWHA), random support + refinement, or zeros (plain WHA).",
)
@click.option(
    "--scale", default=None, type=float, help="Adapter scale s (default 256: on LoRA's learning-rate grid; README)."
)
@click.option("--calib", type=click.Path(), default=None, help="Calibration text or JSONL (default: Lee corpus).")
@click.option("--calib-tokens", default=4096, show_default=True, type=int)
@click.option("--heldout-tokens", default=2048, show_default=True, type=int)
@click.option("--seq-len", default=512, show_default=True, type=int)
@click.option(
    "--target-modules",
    default=None,
    help="Comma-separated linear-layer names to quantize and adapt [default: the architecture's: "
    "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; Phi-3: qkv_proj,o_proj,gate_up_proj,down_proj].",
)
@OVERWRITE
@QUIET
@friendly_errors
def init_cmd(
    model,
    out,
    bits,
    group_size,
    quantizer,
    rank,
    init_method,
    scale,
    calib,
    calib_tokens,
    heldout_tokens,
    seq_len,
    target_modules,
    overwrite,
    quiet,
):
    """Quantize MODEL and initialise QWHA adapters into --out.

    MODEL is a local Hugging Face folder of a supported architecture (llama, mistral, qwen2, qwen3, gemma2,
    gemma3_text, phi3), or `smollm2` / `gemma3-270m` for the embedded SmolLM2-135M-Instruct / Gemma 3 270M.

    Example: qwha-export init smollm2 --bits 4 --group-size 64 --quantizer gptq --rank 64 --out runs/q4
    """
    from .converters.quantize import QuantConfig
    from .converters.qwha_init import InitConfig
    from .initialise import InitJob, init_qwha

    job = InitJob(
        model=model,
        out=out,
        quant=QuantConfig(bits=bits, group_size=group_size, method=quantizer),
        init=InitConfig(rank=rank, method=init_method, **({} if scale is None else {"scale": scale})),
        calib=calib,
        calib_tokens=calib_tokens,
        heldout_tokens=heldout_tokens,
        seq_len=seq_len,
        target_modules=tuple(m.strip() for m in (target_modules or "").split(",") if m.strip()) or None,
        overwrite=overwrite,
        quiet=quiet,
    )
    report = init_qwha(job)
    if not quiet:
        click.echo(json.dumps(report["total"], indent=2))
    click.echo(f"wrote {out}")


@main.command("train")
@click.argument("adapter_dir", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help='JSONL of {"prompt","response"} or {"text"} records.')
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Adapter directory to write.")
@click.option("--max-steps", default=100, show_default=True, type=int, help="<= 0: train --epochs instead.")
@click.option("--epochs", default=1.0, show_default=True, type=float)
@click.option("--lr", default=2e-3, show_default=True, type=float)
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--grad-accum", default=1, show_default=True, type=int)
@click.option("--max-len", default=512, show_default=True, type=int)
@click.option("--warmup-ratio", default=0.05, show_default=True, type=float)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--logging-steps", default=10, show_default=True, type=int, help="Log the loss every N steps.")
@click.option("--save-steps", default=0, show_default=True, type=int, help="Checkpoint every N steps (0: never).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint.")
@click.option("--seed", default=0, show_default=True, type=int)
@OVERWRITE
@QUIET
@friendly_errors
def train_cmd(
    adapter_dir,
    data,
    out,
    max_steps,
    epochs,
    lr,
    batch_size,
    grad_accum,
    max_len,
    warmup_ratio,
    gradient_checkpointing,
    logging_steps,
    save_steps,
    resume,
    seed,
    overwrite,
    quiet,
):
    """Fine-tune the spectrum of ADAPTER_DIR (from `init`) on --data; write the trained adapter to --out."""
    from .training import TrainConfig, train_qwha

    report = train_qwha(
        TrainConfig(
            adapter_dir=adapter_dir,
            data=data,
            out=out,
            max_steps=max_steps,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            max_len=max_len,
            warmup_ratio=warmup_ratio,
            gradient_checkpointing=gradient_checkpointing,
            logging_steps=logging_steps,
            save_steps=save_steps,
            resume=resume,
            seed=seed,
            overwrite=overwrite,
            quiet=quiet,
        )
    )
    click.echo(f"loss {report['first_loss']:.4f} -> {report['final_loss']:.4f} in {report['steps']} steps; wrote {out}")


@main.command("import-published")
@click.argument("src", type=click.Path())
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=click.Path(),
    help="Adapter directory from `init` whose quantized base the published adapter was trained on.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@friendly_errors
def import_cmd(src, base_dir, out):
    """Convert an adapter saved by the published QWHA code (qhft_* keys) into our adapter files."""
    from .pipeline import import_published

    import_published(src, base_dir, out)
    click.echo(f"wrote {out}")


@main.command("merge")
@click.argument("adapter_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
@click.option("--bits", default=4, show_default=True, type=int, help="2, 3, 4, 8, or 16 for a dense merged model.")
@click.option("--group-size", default=None, type=int, help="Group size of the re-quantization (default: the base's).")
@click.option(
    "--requant",
    default="rtn",
    show_default=True,
    type=click.Choice(MERGE_REQUANT),
    help="rtn: min/max; gptq: on calibration activations; grid: keep the base's scales and zeros; auto: the base's "
    "grid where a layer keeps its bits and group size, else rtn; "
    "refit: auto re-quantization plus a freshly fitted adapter, written as a "
    "fused checkpoint.",
)
@click.option(
    "--format",
    "fmt",
    default=None,
    type=click.Choice([f.value for f in ExportFormat]),
    help="[default: gptq_v2 for --bits 2/3/4/8, dense for --bits 16] fused = keep the adapter beside the "
    "untouched quantized base (same as `fuse`); onnx = merge to gptq_v2 (dense with --bits 16) and export that with "
    "`export-onnx`.",
)
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "bfloat16", "float32"]))
@click.option(
    "--calib-tokens",
    default=None,
    type=int,
    help="Calibration tokens for gptq, refit and the error report [default: 4096 for refit, else 1024].",
)
@VERIFY_TOKENS
@ACCURACY_LEVEL
@MAX_SHARD_SIZE
@OVERWRITE
@QUIET
@friendly_errors
def merge_cmd(
    adapter_dir,
    out,
    bits,
    group_size,
    requant,
    fmt,
    dtype,
    calib_tokens,
    verify_tokens,
    accuracy_level,
    max_shard_bytes,
    overwrite,
    quiet,
):
    """Merge the adapter of ADAPTER_DIR into its base (inverse WHT), re-quantize, and write a checkpoint."""
    from .pipeline import MergeJob, merge_qwha

    fmt = fmt or ("dense" if bits == 16 else "gptq_v2")  # a re-quantized model is stored packed, not in 16 bits
    to_onnx = fmt == "onnx"  # merge to gptq_v2 (dense for --bits 16) in a temporary folder, then export-onnx
    job = MergeJob(
        adapter_dir=adapter_dir,
        out=out,
        bits=bits,
        group_size=group_size,
        requant=requant,
        format=("dense" if bits == 16 else "gptq_v2") if to_onnx else fmt,
        dtype=dtype,
        calib_tokens=calib_tokens if calib_tokens is not None else (4096 if requant == "refit" else 1024),
        overwrite=overwrite,
        quiet=quiet,
        verify_tokens=verify_tokens,
        max_shard_bytes=max_shard_bytes,
    )
    if to_onnx:
        from .onnx_export import merge_to_onnx

        report = merge_to_onnx(job, accuracy_level=accuracy_level)
        _echo_parity((report.get("merge") or {}).get("parity"))
        _echo_onnx_parity(report.get("parity"))
        click.echo(f"wrote {out}")
        return
    report = merge_qwha(job)
    if not quiet and report.get("total"):
        click.echo(json.dumps(report["total"], indent=2))
    advice = (report.get("adapter_gain") or {}).get("advice")
    if advice and not quiet:
        click.echo(f"Warning: {advice}", err=True)
    _echo_parity(report.get("parity"))
    click.echo(f"wrote {out}")


@main.command("fuse")
@click.argument("adapter_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option(
    "--base-format", default="gptq_v2", show_default=True, type=click.Choice(FUSED_BASE_FORMATS)
)
@VERIFY_TOKENS
@MAX_SHARD_SIZE
@OVERWRITE
@QUIET
@friendly_errors
def fuse_cmd(adapter_dir, out, base_format, verify_tokens, max_shard_bytes, overwrite, quiet):
    """Keep the adapter: write the untouched quantized base plus the spectrum (qwha_adapter.safetensors)."""
    from .pipeline import fuse_qwha

    report = fuse_qwha(
        adapter_dir,
        out,
        base_format=base_format,
        overwrite=overwrite,
        verify_tokens=verify_tokens,
        max_shard_bytes=max_shard_bytes,
        quiet=quiet,
    )
    _echo_parity(report.get("parity"))
    click.echo(f"wrote {out}")


@main.command("export-onnx")
@click.argument("src", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="ONNX folder to write.")
@ACCURACY_LEVEL
@click.option("--parity-tokens", default=64, show_default=True, type=int, help="Parity check tokens (0: skip).")
@click.option("--bundle-ops", is_flag=True, help="Copy the native qwha ops library into OUT (for onnxruntime-genai).")
@click.option(
    "--head-bits",
    type=click.Choice(["8", "4"]),
    default=None,
    help="Quantize the embedding and the LM head (RTN, blocks of 32; for large vocabularies). Default: float32.",
)
@OVERWRITE
@QUIET
@friendly_errors
def export_onnx_cmd(src, out, accuracy_level, parity_tokens, bundle_ops, head_bits, overwrite, quiet):
    """Export SRC (a merged gptq/gptq_v2/compressed-tensors folder, a fused folder, or a dense HF folder) as an
    ONNX causal LM with a KV cache (model.onnx + model.onnx.data, genai_config.json, tokenizer)."""
    import warnings

    from .onnx_export import export_onnx

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        report = export_onnx(
            src,
            out,
            accuracy_level=accuracy_level,
            overwrite=overwrite,
            quiet=quiet,
            parity_tokens=parity_tokens,
            bundle_ops=bundle_ops,
            head_bits=None if head_bits is None else int(head_bits),
        )
    for w in caught:
        if "accuracy_level" in str(w.message):
            click.echo(f"Warning: {cli_words(str(w.message))}", err=True)
    _echo_onnx_parity(report.get("parity"))
    click.echo(f"wrote {out}")


@main.command("build-ops")
@click.option(
    "--headers",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="onnxruntime C/C++ API headers (default: ORT_INCLUDE_DIR, /usr/include/onnxruntime, cache, else Debian's).",
)
@click.option("--force", is_flag=True, help="Rebuild even when the cache holds a valid library.")
@QUIET
@friendly_errors
def build_ops_cmd(headers, force, quiet):
    """Build the native qwha ops library for this onnxruntime into the per-user cache and print its path.

    Without headers on the machine it fetches Debian's libonnxruntime-dev with apt (own state and cache dirs)."""
    from .ortops import OrtOpsError, build_library

    try:
        path = build_library(headers=headers, fetch=True, force=force, say=lambda m: quiet or click.echo(m, err=True))
    except OrtOpsError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    click.echo(str(path))


@main.command("verify")
@click.argument("export_dir", type=click.Path())
@click.option(
    "--against",
    "adapter_dir",
    required=True,
    type=click.Path(),
    help="The reference: the adapter directory the export came from (its training-time model), or another export "
    "folder (e.g. the merged folder an ONNX export was made from).",
)
@click.option("--text", type=click.Path(), default=None, help="Text file to evaluate on (default: Lee corpus).")
@click.option("--tokens", default=2048, show_default=True, type=int)
@click.option("--seq-len", default=256, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@QUIET
@friendly_errors
def verify_cmd(export_dir, adapter_dir, text, tokens, seq_len, as_json, quiet):
    """Compare an exported model with its reference on the same tokens: the training-time QWHA model of an adapter
    directory, or another export folder (for example the merged folder an ONNX export was made from)."""
    from pathlib import Path

    from .verify import verify_export

    body = None
    if text is not None:
        if not Path(text).is_file():
            raise ValueError(f"text file {text} does not exist")
        body = Path(text).read_text(encoding="utf-8", errors="replace")
    result = verify_export(export_dir, adapter_dir, text=body, tokens=tokens, seq_len=seq_len, quiet=quiet)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for k, v in result.items():
            click.echo(f"{k:20} {v}")


@main.command("eval")
@click.argument("src", type=click.Path())
@click.option("--tasks", default="all", show_default=True,
              help="Comma-separated: boolq,piqa,siqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa, or all.")
@click.option("--limit", type=int, default=None, help="Score only the first N questions of each task.")
@click.option("--part", default="all", show_default=True, type=click.Choice(["all", "test"]),
              help="all: the whole shipped validation set; test: the test part of the seeded split (paper_table).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the train/test split (--part test).")
@click.option("--batch-tokens", default=4096, show_default=True, type=int, help="Padded tokens per forward.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with per-question predictions).")
@QUIET
@friendly_errors
def eval_cmd(src, tasks, limit, part, seed, batch_tokens, as_json, quiet):
    """Zero-shot multiple-choice accuracy (lm-eval style) of an adapter directory or an export folder."""
    from .mc_eval import evaluate_source, format_report

    report = evaluate_source(src, tasks, limit=limit, part=part, seed=seed, batch_tokens=batch_tokens, quiet=quiet)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(format_report(report))
    click.echo(f"{report['kind']} {src}: {report['seconds']:.0f} s")


@main.command("generate")
@click.argument("onnx_dir", type=click.Path())
@click.option("--prompt", "prompts", required=True, multiple=True, help="A prompt; repeat for a batch.")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--greedy/--sample", default=True, show_default=True, help="Argmax decoding, or sampling.")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="Sampling temperature (> 0).")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass, in (0, 1].")
@click.option("--top-k", default=0, show_default=True, type=int, help="Sample among the k most likely (0: all).")
@click.option("--seed", default=None, type=int, help="Seed of the sampler (reproducible output).")
@click.option("--no-chat-template", is_flag=True, help="Tokenize the prompt as is, without the chat template.")
@click.option("--provider", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--quiet", is_flag=True, help="Only the generated text (no timing line).")
@friendly_errors
def generate_cmd(
    onnx_dir, prompts, max_new_tokens, greedy, temperature, top_p, top_k, seed, no_chat_template, provider, quiet
):
    """Generate text with an exported ONNX folder in onnxruntime (one prompt streams as it is produced).

    Example: qwha-export generate runs/q4-onnx --prompt "What is a Hadamard matrix?" --sample --top-p 0.9 --seed 0
    """
    from .serving import GenerationConfig, OnnxCausalLM

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )
    lm = OnnxCausalLM.from_folder(onnx_dir, provider=provider)
    single = len(prompts) == 1

    def stream(_: int, piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    out = lm.generate(list(prompts), config, stream=stream if single else None, chat_template=not no_chat_template)
    if single:
        click.echo()
    else:
        for i, text in enumerate(out.texts):
            click.echo(f"--- prompt {i + 1} ---\n{text}")
    if not quiet:
        n = sum(len(t) for t in out.token_ids)
        ops = f", qwha ops {lm.qwha_ops}" if lm.qwha_ops != "none" else ""
        click.echo(
            f"[{lm.device}{ops}] prefill {out.prefill_seconds * 1000:.0f} ms ({max(out.prompt_lengths)} tokens x "
            f"{len(prompts)}), {n} new tokens, decode {out.decode_tokens_per_second:.1f} steps/s",
            err=True,
        )


@main.command("push")
@click.argument("folder", type=click.Path())
@click.option("--repo-id", required=True, help="Hub model repo ORG/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing). Default: main.")
@click.option("--token", default=None, help="Hub token. Default: HF_TOKEN or the saved login. Never printed.")
@click.option("--commit-message", default=None, help="Default: 'Upload <format> export made with qwha-export'.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--base-model-id", default=None, help="Hub id of the base model for the card (ORG/NAME).")
@click.option("--quiet", is_flag=True, help="No progress display.")
@friendly_errors
def push_cmd(folder, repo_id, private, revision, token, commit_message, create_pr, base_model_id, quiet):
    """Check an exported FOLDER, add a model card (README.md) if it has none, and upload it to the Hub.

    The endpoint is HF_ENDPOINT (default huggingface.co). A folder that is not a complete export is refused
    before any request (exit code 2); a failed upload exits with code 1.

    Example: qwha-export push runs/q4-gptq --repo-id my-org/SmolLM2-135M-QWHA-int4 --private
    """
    from .hub import HubPushError, push_folder

    try:
        result = push_folder(
            folder,
            repo_id,
            private=private,
            revision=revision,
            token=token,
            commit_message=commit_message,
            create_pr=create_pr,
            quiet=quiet,
            base_model_id=base_model_id,
        )
    except HubPushError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if result["model_card"] == "generated":
        click.echo(f"wrote model card {folder.rstrip('/')}/README.md")
    where = result["pr_url"] or result["commit_url"]
    click.echo(f"pushed {len(result['files'])} files to {result['repo_id']} ({result['revision']}): {where}")


@main.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--train-steps", default=8, show_default=True, type=int, help="Fine-tuning steps (batch 2).")
@click.option("--prompt", default=None, help="Question answered by the exported ONNX model at the end.")
@OVERWRITE
@click.option("--quiet", is_flag=True, help="No progress bars (the final table is still printed).")
@friendly_errors
def demo_cmd(out, train_steps, prompt, overwrite, quiet):
    """The whole pipeline on the embedded SmolLM2-135M-Instruct, offline, in about 10 minutes on 2 CPU cores.

    Quantize (4-bit g64) -> QWHA init on real text -> short fine-tune on MMLU chain-of-thought examples -> merge
    (int4 GPTQ v2) and fuse -> export ONNX -> verify parity -> generate an answer with onnxruntime. Prints a table
    (stage, time, perplexity, KL, top-1, size); every export folder under --out can be pushed with `push`.

    Example: qwha-export demo --out runs/demo
    """
    from .demo import DEFAULT_PROMPT, DemoConfig, format_table, run_demo

    report = run_demo(
        DemoConfig(
            out=out, train_steps=train_steps, prompt=prompt or DEFAULT_PROMPT, overwrite=overwrite, quiet=quiet
        )
    )
    click.echo(format_table(report))
    click.echo(f"wrote {out} (push an export with: qwha-export push {out}/onnx-fused --repo-id ORG/NAME)")


if __name__ == "__main__":
    main()
