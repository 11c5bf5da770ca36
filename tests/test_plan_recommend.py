"""analyze-corpus recommends what `minillm plan` plans (one function): the same shape, vocabulary, block size,
stride and dropout for the same corpus, tokenizer, device and budget."""

from __future__ import annotations

import json

import pytest

from minillm.corpus.stats import analyze, summary_lines
from minillm.plan.devices import DEVICES
from minillm.plan.recommend import recommend
from tests.conftest import make_corpus


@pytest.mark.parametrize("device, budget", [("cpu", "5m"), ("h100", "2m")])
def test_analyze_corpus_and_plan_agree(tmp_path, runner, tokenizer_path, device, budget):
    from minillm.cli import app

    c = make_corpus(tmp_path / "c.txt", n_docs=300)
    common = ["-c", str(c), "-t", str(tokenizer_path), "--device", device, "--budget", budget, "--json"]
    r = runner.invoke(app, ["analyze-corpus", *common])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)["recommendations"]
    r = runner.invoke(app, ["plan", *common])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert (rec["preset"], rec["vocab_size"], rec["block_size"], rec["stride"], rec["dropout"]) == (
        p["shape"], p["vocab_size"], p["model"]["block_size"], p["train"]["stride"], p["model"]["dropout"])
    assert (rec["n_layer"], rec["n_embd"], rec["n_head"]) == (p["model"]["n_layer"], p["model"]["n_embd"],
                                                              p["model"]["n_head"])
    assert rec["device"] == device and rec["budget_s"] == p["budget_s"]
    assert set(rec["reasons"]) >= {"model", "epochs", "block_size", "stride", "vocab_size", "windows"}


def test_recommend_without_a_tokenizer_recommends_a_vocabulary(tmp_path):
    s = analyze(make_corpus(tmp_path / "c.txt", n_docs=300))
    rec = recommend(s, DEVICES["cpu"], 300)
    assert rec.vocab_size == 2048 and "one entry per" in rec.reasons["vocab_size"]
    assert rec.epochs > 1 and rec.stride == rec.block_size // 2  # a tiny corpus: many passes, overlapping windows


def test_summary_lines_es_en(tmp_path):
    s = analyze(make_corpus(tmp_path / "c.txt", n_docs=300))
    r = recommend(s, DEVICES["cpu"], 300)
    es = summary_lines(s, r, "es")
    assert es[0].startswith("Tokens totales: ") and "Documentos encontrados: 300" in es[0]
    assert es[1].startswith("Longitud promedio: ") and "mínima" in es[1] and "máxima" in es[1]
    assert es[2].startswith(f"Block size sugerido: {r.block_size}   Stride sugerido: {r.stride}")
    assert summary_lines(s, r, "en")[0].startswith("Total tokens: ")
