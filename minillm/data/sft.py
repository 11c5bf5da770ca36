"""SFT data: instruction examples from JSONL, the prompt template, and the encoded rows the trainer reads.

The template (``format_example``). ``{"instruction", "input"?, "response"}`` becomes::

    <|doc|>### Instruction:
    {instruction}

    ### Input:            <- only when "input" is present and not empty
    {input}

    ### Response:
    {response}<|doc|>

and ``{"messages": [{"role": "system"|"user"|"assistant", "content"}...]}`` becomes ``### System:\\n{c}\\n\\n``
for a system message, ``### Instruction:\\n{c}\\n\\n### Response:\\n`` for each user message and ``{c}`` for each
assistant message (``\\n\\n`` between turns). The loss counts only the response (assistant) tokens and the
final ``<|doc|>``, so the model learns to answer and then stop; at generation time give the prompt part,
ending in ``### Response:\\n`` (``generate`` puts the first ``<|doc|>`` itself and stops at the next).

Rows carry their loss mask in the sign (``encode_rows``): a value ``~t`` (< 0) is token ``t`` that is no
target. The trainer's step sees ordinary ``(B, T+1)`` int64 batches; a forward pre-hook on the model
(``train.finetune.decode_masked_inputs``) decodes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from minillm.config import TrainConfig
from minillm.data.loader import Loader, RunData, Source
from minillm.data.windows import split_documents
from minillm.errors import MiniLLMError
from minillm.io import sha256_file
from minillm.tokenizer import doc_id, load_tokenizer, pad_id

INSTRUCTION, INPUT, RESPONSE, SYSTEM = "### Instruction:\n", "### Input:\n", "### Response:\n", "### System:\n"


@dataclass(frozen=True)
class Example:
    """An instruction example as text segments, each with whether its tokens carry loss."""

    segments: tuple[tuple[str, bool], ...]


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt part of the template (what to give ``generate --prompt``)."""
    body = INSTRUCTION + instruction + "\n\n"
    if input:
        body += INPUT + input + "\n\n"
    return body + RESPONSE


def _str(obj: dict, key: str, required: bool = True) -> str:
    v = obj.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise ValueError(f'"{key}" must be a string' if key in obj else f'missing "{key}"')
    return v


def format_example(obj: Any) -> Example:
    """One parsed JSONL value -> an ``Example``; ``ValueError`` says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
        segs: list[tuple[str, bool]] = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                    "system", "user", "assistant"):
                raise ValueError(f'messages[{i}] must be {{"role": "system"|"user"|"assistant", "content": string}}')
            if segs and segs[-1][1]:
                segs.append(("\n\n", False))
            role, c = m["role"], m["content"]
            if role == "system":
                segs.append((SYSTEM + c + "\n\n", False))
            elif role == "user":
                segs.append((INSTRUCTION + c + "\n\n" + RESPONSE, False))
            else:
                if not segs or not segs[-1][0].endswith(RESPONSE):
                    raise ValueError(f"messages[{i}]: an assistant message must follow a user message")
                segs.append((c, True))
        if not segs[-1][1]:
            raise ValueError("the last message must be the assistant's (the response to learn)")
        return Example(tuple(segs))
    instruction, response = _str(obj, "instruction"), _str(obj, "response")
    return Example(((format_prompt(instruction, _str(obj, "input", required=False)), False), (response, True)))


def read_jsonl(path: Path, skip_bad_lines: bool = False, log: Callable[[str], None] | None = None) -> tuple[list[Example], int]:
    """Parse an SFT JSONL file: ``(examples, bad_lines)``. A malformed line raises an error naming its line
    number (all of them, up to 10) unless ``skip_bad_lines``, which skips and counts them."""
    if not Path(path).is_file():
        raise MiniLLMError(f"--data: {path} does not exist")
    examples, bad = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    examples.append(format_example(json.loads(line)))
                except json.JSONDecodeError as e:
                    bad.append(f"line {n}: not valid JSON ({e.msg} at column {e.colno})")
                except RecursionError:
                    bad.append(f"line {n}: nested too deeply to read (arrays or objects inside each other "
                               f"hundreds of levels deep); an example is one object of strings")
                except ValueError as e:
                    bad.append(f"line {n}: {e}")
    except UnicodeDecodeError as e:
        raise MiniLLMError(f"--data: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if bad and not skip_bad_lines:
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise MiniLLMError(f"--data {path}: {len(bad)} malformed line(s):\n  " + "\n  ".join(bad[:10]) + more
                           + '\neach line must be {"instruction", "input"?, "response"} or {"messages": [...]}; '
                             + ("fix them or pass --skip-bad-lines to skip them" if examples else
                                "no line is an example: for plain text use --mode continue"))
    if bad and log:
        log(f"--skip-bad-lines: skipped {len(bad)} malformed line(s) of {path} (first: {bad[0]})")
    if not examples:
        raise MiniLLMError(f"--data: {path} holds no usable examples")
    return examples, len(bad)


def encode_example(tok, ex: Example, doc: int) -> tuple[list[int], list[bool]]:
    """Token ids ``<|doc|> + segments + <|doc|>`` and, per position, whether it is a loss target
    (response tokens and the final ``<|doc|>``). Segments are encoded one by one, as generation sees them."""
    ids, target = [doc], [False]
    for text, trained in ex.segments:
        seg = tok.encode(text, add_special_tokens=False).ids
        ids += seg
        target += [trained] * len(seg)
    return ids + [doc], target + [True]


def encode_rows(tok, examples: list[Example], block_size: int, pad: int) -> tuple[np.ndarray, dict[str, int]]:
    """One row of ``block_size + 1`` per example (B, T+1) int64: a token that is a loss target as itself, any
    other as ``~token`` (negative); padded with ``~pad``. Longer examples are cut at the end (counted);
    one with no target left is dropped (counted)."""
    span = block_size + 1
    doc = doc_id(tok)
    rows, truncated, dropped, targets = [], 0, 0, 0
    for ex in examples:
        ids, tgt = encode_example(tok, ex, doc)
        if len(ids) > span:
            truncated += 1
            ids, tgt = ids[:span], tgt[:span]
        if not any(tgt):
            dropped += 1
            continue
        row = np.full(span, ~pad, dtype=np.int64)
        a, m = np.asarray(ids, dtype=np.int64), np.asarray(tgt)
        row[: len(ids)] = np.where(m, a, ~a)
        rows.append(row)
        targets += int(m.sum())
    out = np.stack(rows) if rows else np.zeros((0, span), dtype=np.int64)
    return out, {"examples": len(rows), "truncated": truncated, "dropped": dropped, "target_tokens": targets}


def _too_long(flag: str, path: Path, tok, examples: list[Example], block_size: int) -> MiniLLMError:
    """No example leaves a response token inside the block: say how long they are and what to do."""
    doc = doc_id(tok)
    lens = sorted(len(encode_example(tok, ex, doc)[0]) for ex in examples)
    span = f"{lens[0]} to {lens[-1]}" if lens[0] < lens[-1] else f"{lens[0]}"
    return MiniLLMError(
        f"{flag} {path}: every example is too long for the base model's block of {block_size} tokens: its prompt "
        f"alone fills the block, leaving no response token to learn (the {len(lens)} example(s) are {span} tokens "
        f"long); shorten the instructions and inputs to well under {block_size} tokens, or "
        f"fine-tune a base model trained with a larger --block-size (finetune keeps the base's block size)")


class SFTFiles(Protocol):
    """Where a fine-tuning run's SFT examples come from (``train.finetune.FinetuneSpec`` is one)."""

    @property
    def data(self) -> Path: ...  # the training JSONL file

    @property
    def val_file(self) -> Path | None: ...  # a validation JSONL file instead of a split

    @property
    def skip_bad_lines(self) -> bool: ...  # skip malformed lines (counted) instead of failing


def sft_data(fs: SFTFiles, tok_path: Path, block_size: int, tcfg: TrainConfig, log: Callable[[str], None]) -> RunData:
    """The SFT rows as a ``RunData``: a seeded split by example (or ``--val-file``), the trainer's
    ``Loader`` over the training rows, fixed validation batches."""
    tok = load_tokenizer(tok_path)
    examples, bad = read_jsonl(fs.data, fs.skip_bad_lines, log)
    rows, info = encode_rows(tok, examples, block_size, pad_id(tok))
    if len(rows) == 0:
        raise _too_long("--data", fs.data, tok, examples, block_size)
    if fs.val_file is not None:
        vex, vbad = read_jsonl(fs.val_file, fs.skip_bad_lines, log)
        val, vinfo = encode_rows(tok, vex, block_size, pad_id(tok))
        train, val_ids = rows, np.zeros(0, dtype=np.int64)
        if len(val) == 0:
            raise _too_long("--val-file", fs.val_file, tok, vex, block_size)
    else:
        if len(rows) < 2:
            dropped = f" ({info['dropped']} more too long for the block of {block_size} tokens)" if info["dropped"] else ""
            raise MiniLLMError(f"--data {fs.data}: {len(rows)} usable example(s){dropped}; a validation split needs "
                               f"at least 2 (or pass --val-file)")
        val_ids = split_documents(len(rows), tcfg.val_fraction, tcfg.seed)
        train, val = np.delete(rows, val_ids, axis=0), rows[val_ids]
    if info["truncated"] or info["dropped"]:
        log(f"{info['truncated']} example(s) longer than block_size + 1 = {block_size + 1} tokens were cut at the end"
            + (f"; {info['dropped']} with no response token left were dropped" if info["dropped"] else ""))
    span = block_size + 1
    loader = Loader(None, None, block_size, tcfg.batch_size, tcfg.seed,
                    sources=[Source(str(fs.data), train.reshape(-1), np.arange(len(train), dtype=np.int64) * span)])
    val = val[: tcfg.batch_size * tcfg.eval_batches]
    val_batches = [val[i : i + tcfg.batch_size] for i in range(0, len(val), tcfg.batch_size)]
    meta = {"corpus": str(fs.data), "corpus_sha256": sha256_file(fs.data), "format": "sft-jsonl",
            "val_file": str(fs.val_file) if fs.val_file else None, "bad_lines": bad, **info,
            "train_examples": len(train), "val_examples": len(val), "train_tokens": int(train.size)}
    return RunData(loader, val_batches, tok.get_vocab_size(), doc_id(tok), val_ids.tolist(), meta)

