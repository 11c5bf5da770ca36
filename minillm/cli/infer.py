"""Inference commands: generate (text), evaluate (loss, perplexity, bits per byte), merge (a LoRA adapter into
its base) and export (Hugging Face, safetensors or GGUF)."""

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from minillm.errors import MiniLLMError, UsageError


def generate(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint (ckpt_best.pt / ckpt_last.pt) or run directory."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer (default: the run's tokenizer.json)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue; empty (the default) starts a new document."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="UTF-8 file with one prompt per line (blank lines skipped)."),
    max_tokens: int = typer.Option(200, "--max-tokens", help="Maximum new tokens per sample."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(50, "--top-k", help="Keep the k most likely tokens (0 disables)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling threshold in (0, 1]."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="CTRL repetition penalty (1 disables); default 1.1, or 1.3 with --temperature 0 (greedy text loops at 1.1)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop when this text appears (not printed); repeatable."),
    num_samples: int = typer.Option(1, "--num-samples", "-n", help="Samples per prompt."),
    batch_generate: bool = typer.Option(False, "--batch-generate", help="Decode prompts and samples together in batches of --batch-size."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per batch with --batch-generate (default 8)."),
    stream: bool = typer.Option(False, "--stream", help="Print text as it is produced (one sample at a time)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results to this file instead of stdout."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines, one per sample: prompt, completion, tokens, seconds, finish_reason."),
    seed: int = typer.Option(1337, "--seed", help="Random seed: the same seed gives the same text."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps."),
    compile: str = typer.Option("auto", "--compile", help="Decode step: auto (a CUDA graph on CUDA, in bf16 through Triton kernels; plain on CPU), on (each decode step, sampling included, compiled by torch.compile into fused kernels, inside the CUDA graph; the first run compiles for tens of seconds, minutes with --batch-generate's batches, later runs reuse the kernels cached under ~/.cache/minillm), background (auto's decoder while on's compiles on a background thread, then on's: no wait; with --dtype bf16 the text then depends on when the switch came), off (plain PyTorch)."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights and KV cache: auto (bf16 on a CUDA GPU that supports it, fp32 elsewhere), bf16 (decoded with each layer's q/k/v and gate/up projections concatenated: fewer kernels) or fp32 (the tokens of the fp32 decoder, exactly)."),
    decode_chunk: int = typer.Option(16, "--decode-chunk", help="Tokens decoded per CUDA-graph replay, sampled on the GPU and read back together (--stream prints that many at a time); 1 = one at a time. The text does not depend on it."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the checkpoint's."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A LoRA adapter.pt (from finetune --lora-rank) to apply on top of --ckpt, which must be the base it was trained on."),
) -> None:
    """Generate text from a trained checkpoint. Samples are separated by a <|doc|> line in text output."""
    import torch

    from minillm.generation import (
        Sampling,
        check_output,
        check_request,
        check_sampling,
        complete,
        decode_dtype,
        decode_mode,
        default_penalty,
        read_prompts,
        render_samples,
    )
    from minillm.model.load import load_model, resolve_tokenizer
    from minillm.tokenizer import load_tokenizer
    from minillm.train.run import resolve_device

    if repetition_penalty is None:
        repetition_penalty = default_penalty(temperature)
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    check_request(prompt=prompt, prompt_file=prompt_file, max_tokens=max_tokens, num_samples=num_samples,
                  batch_size=batch_size, batch_generate=batch_generate, stream=stream, as_json=as_json, output=output,
                  stops=stop or ())
    prompts = read_prompts(prompt, prompt_file)
    check_output(output, ckpt, prompt_file, tokenizer)
    if decode_chunk < 1:
        raise UsageError(f"--decode-chunk must be >= 1 (1 decodes one token at a time); got {decode_chunk}")
    dev = resolve_device(device)
    mode = decode_mode(dev, compile)
    if mode in ("compiled", "background"):  # the compiled kernels outlive the run: the next one starts warm
        from minillm.train.step import use_compile_cache

        cache = use_compile_cache()
    if mode == "compiled":
        typer.echo("compiling the decode step (--compile on): 10-30 s in a first run, minutes for a batch of many "
                   "prompts; later runs reuse the kernels cached in " + cache, err=True)
    weights = decode_dtype(dev, dtype)
    model, state = load_model(ckpt, str(dev))
    if adapter is not None:  # merged into the weights: same logits, no extra cost per token
        from minillm.lora import attach_adapter

        attach_adapter(model, state, adapter)
    model = model.to(weights)  # the KV cache takes the weights' dtype
    tok = load_tokenizer(resolve_tokenizer(state, tokenizer, force_tokenizer))
    g = torch.Generator(device=dev).manual_seed(seed)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    records = complete(model, tok, prompts, max_tokens, sampling=Sampling(temperature, top_k, top_p, repetition_penalty),
                       num_samples=num_samples, batch_size=(batch_size or 8) if batch_generate else 1, stops=stop or (),
                       generator=g, stream=write if stream else None, warn=lambda m: typer.secho(f"warning: {m}", fg="yellow", err=True),
                       mode=mode, chunk=decode_chunk, fused=weights != torch.float32)
    if stream:
        write("\n")
    elif output is None:
        write(render_samples(records, as_json))
    else:
        from minillm.io import atomic_write_text

        atomic_write_text(output, render_samples(records, as_json))
        typer.echo(f"wrote {len(records)} sample(s) to {output}", err=True)


def evaluate(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint or run directory."),
    test_file: Optional[Path] = typer.Option(None, "--test-file", help="Corpus file to score (documents separated by <|doc|> lines)."),
    split: Optional[str] = typer.Option(None, "--split", help="val: score exactly the run's validation documents (from RUN/config.json)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer (default: the run's tokenizer.json)."),
    stride: int = typer.Option(0, "--stride", help="Sliding-window stride in tokens (default half the block)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per forward pass (does not change the result)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the checkpoint's."),
) -> None:
    """Score a checkpoint on whole documents: loss, perplexity and bits per byte."""
    from minillm.cli.data import plural
    from minillm.evaluation import eval_texts, evaluate_texts
    from minillm.model.load import load_model, resolve_tokenizer
    from minillm.tokenizer import load_tokenizer
    from minillm.train.run import resolve_device

    if (test_file is None) == (split is None):
        raise UsageError("give --test-file FILE or --split val (one of them)")
    if split is not None and split != "val":
        raise UsageError(f"--split: {split!r} is not supported; use --split val or --test-file")
    if test_file is not None:
        from minillm.corpus.read import check_input_file

        check_input_file(test_file, "--test-file", "give a corpus file")
    if stride < 0 or batch_size < 1:
        raise UsageError("--stride must be >= 0 (0 = half the block) and --batch-size >= 1")
    dev = resolve_device(device)
    model, state = load_model(ckpt, str(dev))
    tok = load_tokenizer(resolve_tokenizer(state, tokenizer, force_tokenizer))
    texts, source = eval_texts(test_file, Path(state["path"]).parent)
    res = evaluate_texts(model, tok, texts, source, stride, batch_size, show_progress=sys.stderr.isatty())
    if as_json:
        typer.echo(json.dumps(res, indent=2, ensure_ascii=False))
    else:
        typer.echo(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  bits/byte {res['bits_per_byte']:.4f}  "
                   f"({plural(res['tokens'], 'token')}, {plural(res['documents'], 'document')})")


def merge(
    ckpt: Path = typer.Option(..., "--ckpt", help="The base checkpoint the adapter was trained on."),
    adapter: Path = typer.Option(..., "--adapter", help="adapter.pt from a LoRA finetune run."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged checkpoint to write (generate / evaluate / export load it; tokenizer.json is put beside it)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer (default: the base run's tokenizer.json)."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the checkpoint's."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Merge a LoRA adapter into its base checkpoint, writing one plain checkpoint."""
    from minillm.lora import merge_checkpoint

    if out.exists() and not overwrite:
        raise MiniLLMError(f"--out {out} already exists; add --overwrite to replace it or choose another file")
    res = merge_checkpoint(ckpt, adapter, out, tokenizer, force_tokenizer)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        typer.echo(f"wrote {res['out']}: {res['base']} + {res['adapter']} (rank {res['rank']}, "
                   f"{','.join(res['targets'])}); tokenizer {res['tokenizer']}")


def export(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint, run directory, or an earlier export to convert."),
    out: Path = typer.Option(..., "--out", "-o", help="hf: the directory to create; safetensors: the *.safetensors file to write; gguf: the *.gguf file."),
    format: str = typer.Option("hf", "--format", help="hf (a Hugging Face directory, Llama or Qwen3 format), safetensors (weights alone, config as metadata) or gguf (one file for llama.cpp / Ollama)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer to ship (default: the run's tokenizer.json)."),
    dtype: str = typer.Option("auto", "--dtype", help="Weight dtype: auto (the checkpoint's own), fp32, bf16 or fp16; q8_0 too with --format gguf."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing, non-empty --out."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the checkpoint's."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A LoRA adapter.pt to merge into --ckpt (its base) before exporting."),
) -> None:
    """Export a model to a Hugging Face directory (transformers loads it offline), a safetensors file or a GGUF file (llama.cpp)."""
    import tempfile

    from minillm.export import export as run_export

    with tempfile.TemporaryDirectory(prefix="minillm-merge-") as tmp:
        if adapter is not None:  # merge first, then export the merged checkpoint (with the base's tokenizer)
            from minillm.lora import merge_checkpoint

            ckpt = Path(merge_checkpoint(ckpt, adapter, Path(tmp) / "merged.pt", tokenizer, force_tokenizer)["out"])
        res = run_export(ckpt, out, format, tokenizer=tokenizer, force_tokenizer=force_tokenizer,
                         overwrite=overwrite, dtype=dtype)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        arch = f" ({res['architecture']})" if "architecture" in res else ""
        typer.echo(f"wrote {res['out']}{arch}: {res['params']:,} parameters in {res['tensors']} tensors, "
                   f"{res['dtype']}; files: {', '.join(res['files'])}")
