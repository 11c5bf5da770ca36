"""Shared fixtures: tiny corpora, a tokenizer trained in-process, the CLI runner."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "minillm" / "data" / "sample_es.txt"

WORDS = ("el la los las de del y en que a por con para una un su sus se lo como mas pero sus fue dijo "
         "tierra cielo agua luz dia noche hombre mujer casa camino rey pueblo ciudad monte rio mar").split()


def make_corpus(path: Path, n_docs: int = 40, words_per_doc: tuple[int, int] = (30, 120), seed: int = 0) -> Path:
    """A small synthetic corpus in the design's format (documents separated by <|doc|> lines)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        n = rng.randint(*words_per_doc)
        body = " ".join(rng.choice(WORDS) for _ in range(n))
        docs.append(f"Documento {i}\n\n{body.capitalize()}.")
    path.write_text("\n<|doc|>\n".join(docs) + "\n", encoding="utf-8")
    return path



def events(text: str, kind: str = "step") -> list[dict]:
    """The ``--log-format json`` events of one kind (step, eval, run, done, ...) in a stderr text."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if ev.get("event") == kind:
                out.append(ev)
    return out


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests' tiny ops gain nothing from threads, and on a busy 2-core machine OpenMP stalls dominate."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_plots(request, monkeypatch):
    """curves.png costs 0.1-0.5 s per evaluation; only tests named ``*artifacts*`` draw it."""
    if "artifacts" not in request.node.name:
        monkeypatch.setattr("minillm.train.plots.plot_curves", lambda *a, **k: None)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def tokenizer_path(tmp_path: Path, corpus: Path) -> Path:
    from minillm.corpus.read import iter_documents
    from minillm.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(iter_documents(corpus), 300)
    out = tmp_path / "tokenizer.json"
    save_tokenizer(tok, out)
    return out


def make_runner():
    """typer's CLI runner with stdout and stderr apart (click >= 8.2 always separates them)."""
    from typer.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


@pytest.fixture
def runner():
    return make_runner()


def wait_for_step(proc, step: int, timeout: float = 120) -> list[str]:
    """Read a ``--log-format json`` train subprocess's stderr until its step event reaches ``step``; the lines read.
    Kills the process and fails if it ends or the timeout passes first."""
    import time

    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("{") and (ev := json.loads(line)).get("event") == "step" and ev["step"] >= step:
            return lines
    proc.kill()
    raise AssertionError(f"train never reached step {step}:\n" + "".join(lines))


@pytest.fixture(autouse=True)
def _model_levers_restored():
    """``train.step.apply_model_levers`` sets class-wide switches of the model (CUDA's defaults when a test hands
    ``maybe_compile`` a CUDA device): each test starts and ends with the CPU's (the fused norm, separate
    projections, the plain loss), so that no test runs on another's levers."""
    from minillm.model import loss
    from minillm.model.gpt import Attention, RMSNorm

    saved = RMSNorm.explicit, RMSNorm.half_weight, Attention.concat_projections
    triton_loss = loss.TRITON_LOSS
    inductor = sys.modules.get("torch._inductor.config")  # MINILLM_TUNE's switch, where inductor is imported
    tuning = inductor.coordinate_descent_tuning if inductor else False
    mix = getattr(inductor.triton, "mix_order_reduction", None) if inductor else None
    yield
    RMSNorm.explicit, RMSNorm.half_weight, Attention.concat_projections = saved
    loss.TRITON_LOSS = triton_loss
    if "torch._inductor.config" in sys.modules:
        sys.modules["torch._inductor.config"].coordinate_descent_tuning = tuning
        if mix is not None:
            sys.modules["torch._inductor.config"].triton.mix_order_reduction = mix
