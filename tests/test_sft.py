"""SFT data (minillm.data.sft): the template for both JSONL formats, the loss mask carried by the rows and
decoded by the model's pre-hook (prompt tokens carry no loss), bad JSONL lines, the split and the loader."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from minillm.config import ModelConfig, TrainConfig
from minillm.data import sft
from minillm.errors import MiniLLMError
from minillm.model.gpt import GPT
from minillm.tokenizer import DOC, load_tokenizer, pad_id
from minillm.train.finetune import decode_masked_inputs

PROMPT = "### Instruction:\nsuma 3 y 4\n\n### Response:\n"


class _Recorder(nn.Module):
    """A stand-in model that keeps what its forward receives (after the pre-hooks)."""

    def forward(self, idx, targets=None, seg_ids=None):
        self.seen = (idx, targets, seg_ids)
        return idx.sum()


def test_template_for_both_formats():
    ex = sft.format_example({"instruction": "di hola", "input": "en voz alta", "response": "hola"})
    assert ex.segments == (("### Instruction:\ndi hola\n\n### Input:\nen voz alta\n\n### Response:\n", False),
                           ("hola", True))
    assert sft.format_example({"instruction": "x", "response": "y"}).segments[0][0] == sft.format_prompt("x")
    chat = sft.format_example({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                                            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                                            {"role": "assistant", "content": "A2"}]})
    assert [t for t, trained in chat.segments if trained] == ["A1", "A2"]
    assert "".join(t for t, _ in chat.segments) == ("### System:\nS\n\n### Instruction:\nU1\n\n### Response:\nA1\n\n"
                                                   "### Instruction:\nU2\n\n### Response:\nA2")
    for bad, msg in (([1], "JSON object"), ({"instruction": "x"}, 'missing "response"'),
                     ({"instruction": 3, "response": "y"}, '"instruction" must be a string'),
                     ({"messages": [{"role": "user", "content": "u"}]}, "last message"),
                     ({"messages": [{"role": "assistant", "content": "a"}]}, "must follow a user"),
                     ({"messages": [{"role": "bot", "content": "a"}]}, "messages\\[0\\]")):
        with pytest.raises(ValueError, match=msg):
            sft.format_example(bad)


def test_sft_targets_mask_the_prompt(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    doc = tok.token_to_id(DOC)
    ex = sft.format_example({"instruction": "suma 3 y 4", "response": "siete"})
    ids, tgt = sft.encode_example(tok, ex, doc)
    n_prompt = len(tok.encode(PROMPT, add_special_tokens=False).ids)
    n_resp = len(tok.encode("siete", add_special_tokens=False).ids)
    assert ids[0] == doc and ids[-1] == doc and len(ids) == 1 + n_prompt + n_resp + 1
    assert tgt == [False] * (1 + n_prompt) + [True] * (n_resp + 1)  # response + the final <|doc|>
    rows, info = sft.encode_rows(tok, [ex], 64, pad=0)
    assert rows.shape == (1, 65) and info["target_tokens"] == n_resp + 1
    model = _Recorder()  # what the model sees of a batch once the pre-hook has decoded it
    decode_masked_inputs(model, doc)
    rows_t = torch.from_numpy(rows)
    model(rows_t[:, :-1], rows_t[:, 1:], seg_ids=torch.zeros(1, 64, dtype=torch.long))
    x, targets, seg = model.seen
    assert x[0, : len(ids)].tolist() == ids and (x >= 0).all()
    assert (targets[0, : n_prompt] == -1).all() and targets[0, n_prompt : n_prompt + n_resp + 1].tolist() == ids[1 + n_prompt :]
    assert (targets[0, n_prompt + n_resp + 1 :] == -1).all()  # padding
    assert seg[0, : len(ids) - 1].tolist() == [1] * (len(ids) - 1)  # from the decoded tokens: one document


def test_changing_a_prompt_label_does_not_change_the_loss(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32))
    ex = sft.format_example({"instruction": "suma 3 y 4", "response": "siete"})
    rows = torch.from_numpy(sft.encode_rows(tok, [ex], 64, pad=0)[0])
    handle = decode_masked_inputs(model, tok.token_to_id(DOC))
    x, y = rows[:, :-1], rows[:, 1:]
    loss = model(x, y)
    n_prompt = len(tok.encode(PROMPT, add_special_tokens=False).ids)
    y2 = y.clone()
    y2[0, 3] = ~((~y2[0, 3] + 1) % 300)  # another label for a prompt position (still masked)
    assert y2[0, 3] != y[0, 3]
    assert torch.equal(model(x, y2), loss)
    y3 = y.clone()
    y3[0, n_prompt] = (y3[0, n_prompt] + 1) % 300  # a response label: the loss must move
    assert not torch.equal(model(x, y3), loss)
    handle.remove()
    tokens = torch.where(rows < 0, ~rows, rows)
    full = model(tokens[:, :-1], tokens[:, 1:])  # no mask: prompt tokens would count
    assert not torch.allclose(full, loss)


def test_bad_jsonl_lines_are_reported_or_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "response": "b"})
    p.write_text("\n".join([good, "{not json", good, "", json.dumps({"instruction": "x"}), good, "[1, 2]"]) + "\n")
    with pytest.raises(MiniLLMError) as e:
        sft.read_jsonl(p)
    msg = str(e.value)
    assert "3 malformed line(s)" in msg and "line 2: not valid JSON" in msg and 'line 5: missing "response"' in msg
    assert "line 7: expected a JSON object" in msg and "--skip-bad-lines" in msg
    logs = []
    examples, bad = sft.read_jsonl(p, skip_bad_lines=True, log=logs.append)
    assert (len(examples), bad) == (3, 3) and "skipped 3" in logs[0]


def _jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"suma {i} y 1", "response": f"{i + 1}"}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


def test_sft_data_splits_by_example_and_the_loader_reads_one_row_per_window(tmp_path, tokenizer_path):
    files = SimpleNamespace(data=_jsonl(tmp_path / "d.jsonl", 30), val_file=None, skip_bad_lines=False)
    tcfg = TrainConfig(batch_size=4, eval_batches=2, val_fraction=0.2, seed=3)
    data = sft.sft_data(files, tokenizer_path, 64, tcfg, print)
    tok = load_tokenizer(tokenizer_path)
    rows = sft.encode_rows(tok, sft.read_jsonl(files.data)[0], 64, pad_id(tok))[0]
    val = set(data.val_doc_ids)
    assert val and len(val) < 30 and data.meta["train_examples"] == 30 - len(val)
    seen = np.concatenate([data.loader.next_batch() for _ in range(-(-(30 - len(val)) // 4))])
    train_rows = {bytes(r) for i, r in enumerate(rows) if i not in val}
    assert {bytes(r) for r in seen} <= train_rows and len({bytes(r) for r in seen}) == len(train_rows)
    assert all(bytes(r) in {bytes(rows[i]) for i in val} for b in data.val_batches for r in b)
