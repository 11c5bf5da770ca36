"""Text in, text out: ``complete`` (prompts, several samples per prompt, stop strings, streaming that never
splits a character, ``TextStream``) and the ``generate`` command's inputs and output (request checks, prompt
files, the rendered samples)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from minillm.corpus.read import DOC_JOIN  # between samples in text output (the corpus format)
from minillm.errors import MiniLLMError, UsageError
from minillm.generation.decoder import generate_batch
from minillm.generation.sampling import Sampling


class TextStream:
    """Decodes one completion as it grows. ``push(token)`` returns the newly printable text: never the
    start of a multi-byte character still being completed (a trailing U+FFFD is held back), nor what
    may be the start of a stop string. ``text`` is the completion so far, cut before the first stop
    string; ``stopped`` says one appeared; ``finish()`` returns whatever was held back."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, text = True, text[: min(hits)]
            safe = len(text)
        else:
            safe = len(text.rstrip("\ufffd"))
            for s in self.stops:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        self.text = text
        new = text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return new

    def finish(self) -> str:
        rest, self.emitted = self.text[self.emitted:], len(self.text)
        return rest


def complete(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int, *, sampling: Sampling = Sampling(),
             num_samples: int = 1, batch_size: int = 1, stops: Sequence[str] = (),
             generator: torch.Generator | None = None, stream: Callable[[str], None] | None = None,
             warn: Callable[[str], None] | None = None, mode: str = "eager", chunk: int = 1,
             fused: bool = False) -> list[dict]:
    """Continue text prompts: ``num_samples`` per prompt, ``batch_size`` rows decoded together, ``chunk`` decode
    steps per read-back and ``fused`` projections (``generate_batch``). With ``stream`` (batch size 1 only) each sample's prompt and text go
    to ``stream`` as produced (a chunk at a time), samples joined by ``DOC_JOIN``. Returns one record per sample:
    prompt, completion, tokens, seconds (wall time of its batch), finish_reason (doc, length or stop)."""

    from minillm.tokenizer import doc_id

    if stream is not None and batch_size != 1:
        raise UsageError("--stream prints one sample at a time; drop --batch-generate")
    block, d = model.cfg.block_size, doc_id(tok)
    jobs = []
    for i, p in enumerate(prompts):
        ids = [d, *tok.encode(p, add_special_tokens=False).ids]
        if len(ids) > block:
            if warn:
                warn(f"prompt {i + 1} is {len(ids)} tokens with <|doc|>, longer than the context of {block}: "
                     f"keeping its last {block} tokens")
            ids = ids[-block:]
        jobs += [(p, ids)] * num_samples
    records = []
    for s in range(0, len(jobs), batch_size):
        batch = jobs[s:s + batch_size]
        texts = [TextStream(tok.decode, stops) for _ in batch]
        if stream:
            stream((DOC_JOIN if s else "") + batch[0][0])

        def on_token(row: int, t: int, texts: list[TextStream] = texts) -> bool:
            new = texts[row].push(t)
            if stream and new:
                stream(new)
            return texts[row].stopped

        t0 = time.perf_counter()
        comps = generate_batch(model, [ids for _, ids in batch], max_new_tokens, sampling=sampling, stop_id=d,
                               generator=generator, on_token=on_token if stops or stream else None, mode=mode,
                               chunk=chunk, fused=fused, warn=warn)
        seconds = time.perf_counter() - t0
        for (p, _), ts, c in zip(batch, texts, comps, strict=True):
            if stream:
                stream(ts.finish())
            text = ts.text if stops or stream else tok.decode(c.tokens)
            records.append({"prompt": p, "completion": text, "tokens": len(c.tokens), "seconds": round(seconds, 4),
                            "finish_reason": c.reason})
    return records


# ---------------------------------------------------------------- the generate command's inputs and output


def not_utf8(flag: str, text: str | None) -> str | None:
    """A problem line when a command-line text holds bytes that are not UTF-8 (Python keeps each as a lone
    surrogate, which the tokenizer cannot take)."""
    try:
        (text or "").encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        c = ord(e.object[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        return (f"{flag} holds {what} at character {e.start + 1}, which is not UTF-8 text; set the terminal to UTF-8 "
                f"(e.g. LANG=C.UTF-8) or put the text in a UTF-8 file and pass --prompt-file")


def check_request(*, prompt: str | None, prompt_file: Path | None, max_tokens: int, num_samples: int,
                  batch_size: int | None, batch_generate: bool, stream: bool, as_json: bool, output: Path | None,
                  stops: Sequence[str]) -> None:
    """Raise one ``UsageError`` naming every problem among the options of ``generate``."""
    problems = [m for bad, m in (
        (prompt is not None and prompt_file is not None, "give --prompt or --prompt-file, not both"),
        (max_tokens < 0, "--max-tokens must be >= 0"), (num_samples < 1, "--num-samples must be >= 1"),
        (batch_size is not None and not batch_generate, "--batch-size needs --batch-generate"),
        (batch_size is not None and batch_size < 1, "--batch-size must be >= 1"),
        (stream and batch_generate, "--stream prints one sample at a time; drop --batch-generate"),
        (stream and (as_json or output is not None), "--stream prints text to the terminal; drop --json / --output"),
    ) if bad]
    problems += [m for m in (not_utf8("--prompt", prompt), *(not_utf8("--stop", s) for s in stops)) if m]
    if problems:
        raise UsageError("; ".join(problems))


def read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    """The prompts to continue: the non-blank lines of ``prompt_file`` (UTF-8), else ``[prompt or ""]``."""
    if prompt_file is None:
        return [prompt or ""]
    from minillm.corpus.read import check_input_file

    check_input_file(prompt_file, "--prompt-file", "give a UTF-8 text file with one prompt per line")
    try:
        text = prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MiniLLMError(f"--prompt-file: {prompt_file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                           f"offset {e.start}); re-encode it, e.g. `iconv -f latin1 -t utf-8 {prompt_file} > "
                           f"prompts.txt` (or `minillm prepare-corpus`, which reads cp1252)") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MiniLLMError(f"--prompt-file: {prompt_file} holds no prompts (one per line)")
    return prompts


def check_output(output: Path | None, ckpt: Path, prompt_file: Path | None, tokenizer: Path | None) -> None:
    """Refuse an ``--output`` that is one of the files generate reads."""
    inputs = (ckpt, prompt_file, tokenizer, *(ckpt / n for n in ("ckpt_best.pt", "ckpt_last.pt", "tokenizer.json")))
    if output is not None and any(output.resolve() == p.resolve() for p in inputs if p):
        raise UsageError(f"--output {output} is also an input; write the samples to another file")


def render_samples(records: Sequence[dict], as_json: bool) -> str:
    """The output of ``complete``'s records: JSON lines, or the texts joined by ``<|doc|>`` lines."""
    import json

    if as_json:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return DOC_JOIN.join(r["prompt"] + r["completion"] for r in records) + "\n"
