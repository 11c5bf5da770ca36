"""The planner: a pure function of the corpus figures, the device figures and the time budget to a ``Plan``
(model shape, vocabulary, windows, batch, optimizer, dropout, the expected cost and quality), every choice
with a one-line reason. The thresholds are fitted to the sweeps in docs/BENCHMARKS.md, "Planning the run
(issue 21)"; each constant names the table it came from."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from minillm.config import PRESETS, ModelConfig, pad_vocab
from minillm.corpus.stats import expected_windows, training_tokens
from minillm.errors import MiniLLMError
from minillm.model.memory import param_count
from minillm.plan.devices import Device, interpolate

# --- the fitted rule (docs/BENCHMARKS.md, "Planning the run (issue 21)") ---------------------------------
# A model needs at least DATA_RATIO distinct corpus tokens per non-embedding parameter: on an 8.5 MB Spanish
# corpus (issue 21's text, H200, 2 min, 32k vocabulary) medium at 0.15 lost to small at 0.45, and on
# en_techdocs medium at 0.56 beat small ("Quality per GPU-second"); the GPU side is not swept (no GPU sweep ran).
DATA_RATIO = 0.3
# ... and the budget must train at least COMPUTE_RATIO tokens per non-embedding parameter: the CPU sweep (c1,
# 5 min on 4 MB) had 4 x 128 best at 3.7 and 4 x 192 0.20 bits per byte worse at 1.0, 4 x 256 worse still at 0.34
COMPUTE_RATIO = 2.0
# vocabulary: about one entry per this many corpus bytes, 2,048 to 32,768. 2,048 beat 8,192 on 4 MB (CPU sweep
# c1, 4 x 128: 2.257 against 2.389 bits per byte) and 32,000 on 8.5 MB (issue 21's text, small: 0.928 against 1.038)
BYTES_PER_VOCAB_ENTRY = 2000
MIN_VOCAB, MAX_VOCAB = 2048, 32768
# (epochs below, dropout): "Quality per GPU-second", session 2 (3.7 epochs: 0.1 beat 0) and session 3 "Many
# epochs" (11.6 epochs: 0.2 beat 0.1 by 0.016)
DROPOUT_BY_EPOCHS = ((2.0, 0.0, "at most two passes leave little to overfit"),
                     (8.0, 0.1, "0.1 beat 0 at 3.7 epochs (docs/BENCHMARKS.md)"),
                     (math.inf, 0.2, "0.2 beat 0.1 at 11.6 epochs (docs/BENCHMARKS.md)"))
# early stopping when the budget reads the corpus many times: in every run of the held-out GPU check (docs/
# BENCHMARKS.md, "Planning the run (issue 21)", es_bible, 2 minutes, 37-152 epochs) the held-out loss was best
# after 3-8 epochs and rose at each later evaluation to the end (the plan's run: best at step 542 of 2,642);
# stopping 3 evaluations after the best keeps that same best checkpoint and ends the run well before the budget
PATIENCE_EPOCHS, PATIENCE = 16.0, 3
MEMORY_MARGIN = 0.85  # plan at most this share of the device's memory
# bytes per token of a byte-level BPE by vocabulary: trained on 1.6 MB of en_techdocs and of tiny_es_fortunes,
# their mean up to 8,192 (2.46-2.76, 2.77-3.14, 3.03-3.46); 32,768: the whole en_techdocs (3.954, issue 13)
BYTES_PER_TOKEN = ((2048, 2.6), (4096, 2.95), (8192, 3.25), (16384, 3.6), (32768, 3.95))
# Expected held-out bits per byte of a planned run, by corpus size: (bytes, bits per byte) per device kind.
# cuda: issue 21's text (8.5 MB of Spanish, small, 2k vocabulary, 2 min on an H200: 0.928) and "Quality per
# GPU-second" (en_techdocs, 32 MB, medium: 1.088 in 60 s, 1.122 in 130 s on an H200; 1.138 in 60 s on an H100);
# es_bible_rv1909's training split, 3.8 MB, the plan's own run on an H100 (the held-out check of "Planning the run
# (issue 21)", added after it: the table had expected 0.93 there).
# cpu: the CPU sweep's planned runs on the tuning corpora' training splits ("Planning the run (issue 21)",
# 5 min, one thread): tiny_es_fortunes 0.94 MB, en4m 3.8 MB (4 x 128 at 2k, the plan's shape and vocabulary),
# en_techdocs 30.7 MB.
EXPECTED_BPB = {"cuda": ((3.77e6, 1.227), (8.5e6, 0.928), (32.3e6, 1.11)),
                "cpu": ((0.94e6, 1.673), (3.83e6, 2.257), (30.7e6, 2.178))}

MIN_WINDOWS = 2000  # a block size is halved until the corpus gives at least this many windows
MIN_BLOCK = 64


@dataclass(frozen=True)
class Shape:
    """A model the planner may choose: a preset's, or a custom shape (``name`` "custom") trained with the
    recipe of tiny on a CPU and of small on a GPU (``CUSTOM_BASE``)."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int

    def base(self, kind: str) -> str:
        """The preset whose recipe (optimizer, learning rates, batch, other model settings) it takes."""
        return self.name if self.name != "custom" else CUSTOM_BASE[kind]


CUSTOM_BASE = {"cpu": "tiny", "cuda": "small"}  # tiny's AdamW learns on CPU; small's Muon recipe is the GPU's


def _preset_shape(name: str) -> Shape:
    m = PRESETS[name]["model"]
    return Shape(name, m["n_layer"], m["n_embd"], m["n_head"], m["block_size"])


# smallest to largest; the custom shapes fill the CPU range between tiny and small
SHAPES: tuple[Shape, ...] = (
    _preset_shape("tiny"),
    Shape("custom", 2, 128, 4, 128),
    Shape("custom", 4, 128, 4, 128),
    Shape("custom", 4, 192, 6, 128),
    Shape("custom", 4, 256, 4, 256),
    _preset_shape("small"),
    _preset_shape("medium"),
    _preset_shape("large"),
)


@dataclass(frozen=True)
class CorpusFigures:
    """What the planner knows of a corpus: its size, document lengths in bytes (all, or a sample), and the
    tokenizer it is planned for (vocabulary and measured bytes per token), if one is given."""

    bytes: int
    documents: int
    doc_bytes: Sequence[float]  # bytes per document
    vocab_size: int | None = None  # the given tokenizer's vocabulary; None: the plan recommends one
    bytes_per_token: float | None = None  # measured with that tokenizer
    doc_tokens: Sequence[int] | None = None  # tokens per document when counted (analyze-corpus --tokenizer)

    def tokens_per_byte(self, vocab: int) -> float:
        if self.bytes_per_token:
            return 1.0 / self.bytes_per_token
        return 1.0 / interpolate(BYTES_PER_TOKEN, vocab)

    def training_tokens(self, vocab: int) -> int:
        """Tokens ``train`` reads: the text's and one ``<|doc|>`` per document."""
        if self.doc_tokens is not None:
            return training_tokens(self.doc_tokens)
        return int(self.bytes * self.tokens_per_byte(vocab)) + self.documents

    def lengths(self, vocab: int) -> list[int]:
        """Tokens per document: counted, or estimated from its bytes."""
        if self.doc_tokens is not None:
            return list(self.doc_tokens)
        tpb = self.tokens_per_byte(vocab)
        return [max(1, round(b * tpb)) for b in self.doc_bytes]


@dataclass(frozen=True)
class Candidate:
    """One shape as the planner weighed it."""

    shape: str
    params: int  # non-embedding parameters
    vocab_size: int
    tokens_per_s: float
    tokens: int  # training tokens the budget gives
    corpus_tokens: int
    memory: int  # bytes at the plan's batch size
    fits: bool

    @property
    def data_ratio(self) -> float:
        return self.corpus_tokens / self.params

    @property
    def compute_ratio(self) -> float:
        return self.tokens / self.params


@dataclass(frozen=True)
class Plan:
    """A run planned for a corpus, a device and a budget: the ``train`` settings (``preset`` plus the
    ``model`` and ``train`` keys that differ from it) and what the run is expected to give."""

    device: str
    budget_s: float
    preset: str  # the base preset of the written config
    shape: str  # the shape's name: a preset or "custom"
    model: dict[str, Any]
    train: dict[str, Any]
    vocab_size: int
    tokenizer_given: bool
    params: int  # all parameters (tied embeddings once)
    params_non_embedding: int
    memory_bytes: int
    tokens_per_s: float
    train_s: float  # seconds of steps the budget leaves
    steps: int
    epochs: float
    windows: int  # training windows of the whole corpus (data.windows' rule; about, when tokens are estimated)
    bpb: tuple[float, float, float]  # expected held-out bits per byte: low, expected, high
    reasons: dict[str, str]
    candidates: tuple[Candidate, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = [{**asdict(c), "data_ratio": round(c.data_ratio, 3), "compute_ratio": round(c.compute_ratio, 3)}
                           for c in self.candidates]
        return d


def pow2_round(x: float) -> int:
    """The power of two nearest ``x`` in log scale."""
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def choose_vocab(corpus: CorpusFigures, shape: Shape) -> tuple[int, str]:
    """The vocabulary: the tokenizer's when given; else one entry per ``BYTES_PER_VOCAB_ENTRY`` bytes of text
    (2,048 to 32,768), at most as many embedding parameters as the blocks hold."""
    if corpus.vocab_size:
        return corpus.vocab_size, f"the tokenizer's {corpus.vocab_size:,} tokens (a new tokenizer would change the plan)"
    by_data = min(max(pow2_round(corpus.bytes / BYTES_PER_VOCAB_ENTRY), MIN_VOCAB), MAX_VOCAB)
    body = 12 * shape.n_layer * shape.n_embd**2
    by_model = max(MIN_VOCAB, 1 << int(math.log2(max(body // shape.n_embd, 1))))
    vocab = min(by_data, by_model)
    why = f"{corpus.bytes / 1e6:.1f} MB of text: about one entry per {BYTES_PER_VOCAB_ENTRY:,} bytes gives {by_data:,}"
    if vocab < by_data:
        why += f"; {vocab:,} keeps the embeddings ({vocab:,} x {shape.n_embd}) no larger than the blocks"
    return vocab, why


def model_config(shape: Shape, kind: str, vocab: int, block_size: int, dropout: float) -> ModelConfig:
    """The ``ModelConfig`` of ``shape`` (its base preset's other model settings) at this vocabulary and block."""
    base = dict(PRESETS[shape.base(kind)]["model"])
    base.update(n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head, block_size=block_size,
                dropout=dropout, vocab_size=pad_vocab(vocab))
    return ModelConfig(**base)


def weigh(shape: Shape, corpus: CorpusFigures, device: Device, budget_s: float) -> Candidate:
    """A shape's cost on the device and what the corpus and the budget give it, at its recipe's batch."""
    vocab, _ = choose_vocab(corpus, shape)
    cfg = model_config(shape, device.kind, vocab, shape.block_size, 0.0)
    recipe = PRESETS[shape.base(device.kind)]["train"]
    optimizer = recipe.get("optimizer", "adamw")
    batch = fit_batch(cfg, recipe["batch_size"], optimizer, device)[0]
    speed = device.tokens_per_s(cfg, optimizer, recipe["batch_size"] * cfg.block_size)
    memory = device.memory_needed(cfg, batch, optimizer)
    body = param_count(cfg) - cfg.vocab_size * cfg.n_embd
    return Candidate(shape.name if shape.name != "custom" else f"custom {shape.n_layer}x{shape.n_embd}", body, vocab,
                     speed, int(speed * device.steady_seconds(budget_s)), corpus.training_tokens(vocab), memory,
                     memory <= MEMORY_MARGIN * device.memory)


def fit_batch(cfg: ModelConfig, batch: int, optimizer: str, device: Device) -> tuple[int, int]:
    """(micro-batch, accumulation steps): ``batch`` windows a step, the micro-batch halved (and accumulation
    doubled) until it fits ``MEMORY_MARGIN`` of the device's memory."""
    accumulation = 1
    while batch > 1 and device.memory_needed(cfg, batch, optimizer) > MEMORY_MARGIN * device.memory:
        batch //= 2
        accumulation *= 2
    return batch, accumulation


def choose_shape(cands: Sequence[Candidate]) -> tuple[int, str]:
    """Index of the largest candidate that fits the device, that the corpus can feed (``DATA_RATIO``) and the
    budget can train (``COMPUTE_RATIO``); the smallest that fits when none can; and the reason."""
    fitting = [i for i, c in enumerate(cands) if c.fits]
    if not fitting:
        raise MiniLLMError("no model the planner knows fits this device's memory; give more --gpu-memory")
    good = [i for i in fitting if cands[i].data_ratio >= DATA_RATIO and cands[i].compute_ratio >= COMPUTE_RATIO]
    if good:
        i = good[-1]
        c = cands[i]
        why = (f"the largest model the corpus and the budget both feed: {c.corpus_tokens / 1e6:.2f}M corpus tokens are "
               f"{c.data_ratio:.2f} per parameter (>= {DATA_RATIO}) and the budget trains {c.compute_ratio:.1f} "
               f"tokens per parameter (>= {COMPUTE_RATIO})")
        if i + 1 < len(cands):
            n = cands[i + 1]
            short = "data" if n.data_ratio < DATA_RATIO else "time" if n.compute_ratio < COMPUTE_RATIO else "memory"
            why += f"; the next size ({n.shape}) lacks {short}"
        return i, why
    i = fitting[0]
    c = cands[i]
    lack = "data" if c.data_ratio < DATA_RATIO else "time"
    return i, (f"the smallest model: even it lacks {lack} ({c.data_ratio:.2f} corpus tokens and "
               f"{c.compute_ratio:.1f} budget tokens per parameter)")


def block_for(doc_tokens: Sequence[float], corpus_tokens: int, cap: int) -> tuple[int, str]:
    """A power of two covering 90% of documents, at most the shape's ``cap``, halved while the corpus gives
    fewer than ``MIN_WINDOWS`` windows (the rule analyze-corpus has always used)."""
    import numpy as np

    p90 = int(np.percentile(np.asarray(doc_tokens, dtype=np.float64), 90)) + 1
    want = 1 << max(0, math.ceil(math.log2(max(p90, 1))))
    block = min(max(want, MIN_BLOCK), cap)
    why = (f"smallest power of two >= the 90th-percentile document ({p90:,} tokens)" if want <= cap and want >= MIN_BLOCK
           else f"the shape's context ({cap}); the 90th-percentile document is {p90:,} tokens" if want > cap
           else f"documents are short (90th percentile {p90} tokens); {MIN_BLOCK} packs several per window")
    while block > MIN_BLOCK and corpus_tokens / block < MIN_WINDOWS:
        block //= 2
        why = f"halved to {block} so {corpus_tokens:,} training tokens give at least {MIN_WINDOWS:,} windows"
    return block, why


def dropout_for(epochs: float) -> tuple[float, str]:
    for below, p, why in DROPOUT_BY_EPOCHS:
        if epochs < below:
            return p, f"{epochs:.1f} epochs in the budget: {why}"
    raise AssertionError("DROPOUT_BY_EPOCHS ends at infinity")


def patience_for(epochs: float) -> tuple[int, str]:
    """``--patience`` for a run of ``epochs`` passes: early stopping where the budget reads the corpus many times."""
    if epochs < PATIENCE_EPOCHS:
        return 0, f"{epochs:.1f} epochs: the run uses its whole budget"
    return PATIENCE, (f"{epochs:.0f} epochs: in the held-out runs the loss was best after 3-8 and rose after; stop "
                      f"{PATIENCE} evaluations after the best (its checkpoint is kept), well before the budget ends")


def held_out_error(points: Sequence[tuple[float, float]]) -> float:
    """The largest relative error of predicting each point of the table (two or more) from the others (leave
    one out): how far a new corpus may land from the table's figure."""
    errors = [abs(interpolate(tuple(points[:i] + points[i + 1:]), x) / y - 1) for i, (x, y) in enumerate(points)]
    return max(errors)


def expected_bpb(kind: str, corpus_bytes: int) -> tuple[float, float, float]:
    """(low, expected, high) held-out bits per byte: the table interpolated in log size, +- its held-out error."""
    points = EXPECTED_BPB[kind]
    mid, err = interpolate(points, corpus_bytes), held_out_error(list(points))
    return round(mid * (1 - err), 2), round(mid, 2), round(mid * (1 + err), 2)


def plan(corpus: CorpusFigures, device: Device, budget_s: float) -> Plan:
    """Plan a ``--max-time budget_s`` run on ``corpus`` and ``device`` (pure: same inputs, same plan)."""
    if corpus.bytes <= 0 or corpus.documents <= 0:
        raise MiniLLMError("the corpus holds no documents; nothing to plan")
    if budget_s <= 0:
        raise MiniLLMError("the budget must be more than 0 seconds")
    reasons: dict[str, str] = {}
    cands = tuple(weigh(s, corpus, device, budget_s) for s in SHAPES)
    i, reasons["model"] = choose_shape(cands)
    shape, cand = SHAPES[i], cands[i]
    vocab, reasons["vocab_size"] = choose_vocab(corpus, shape)
    lengths = corpus.lengths(vocab)
    block, reasons["block_size"] = block_for(lengths, cand.corpus_tokens, shape.block_size)
    passes = cand.tokens / max(cand.corpus_tokens, 1)
    stride = block // 2 if passes > 1 else block
    reasons["stride"] = (f"the budget reads the corpus {passes:.1f} times: 50% overlap gives more distinct contexts"
                         if stride < block else f"the budget reads {passes:.0%} of the corpus: no overlap")
    windows = expected_windows(lengths, block, stride)
    reasons["windows"] = f"{corpus.documents:,} documents cut into {block + 1}-token windows, stride {stride}"
    base = shape.base(device.kind)
    cfg = model_config(shape, device.kind, vocab, block, 0.0)  # dropout changes neither speed nor memory
    recipe = dict(PRESETS[base]["train"])
    optimizer = recipe.get("optimizer", "adamw")
    batch, accumulation = fit_batch(cfg, recipe["batch_size"], optimizer, device)
    memory = device.memory_needed(cfg, batch, optimizer)
    speed = device.tokens_per_s(cfg, optimizer, recipe["batch_size"] * block)
    train_s = device.train_seconds(budget_s)
    steps = int(speed * device.steady_seconds(budget_s) / (batch * accumulation * block))
    epochs = steps * batch * accumulation / max(windows, 1)
    eager = (f" (worth {device.steady_seconds(budget_s):.0f} s: "
             + ("all eager on a cold compile cache" if device.trains_eagerly(budget_s)
                else "the first run eagerly while compiling") + ")") if device.eager_s else ""
    reasons["epochs"] = (f"{train_s:.0f} s of steps{eager} at {speed:,.0f} tokens/s are {epochs:.2g} passes over the "
                         f"windows; --max-time ends the run")
    dropout, reasons["dropout"] = dropout_for(epochs)
    patience, reasons["patience"] = patience_for(epochs)
    reasons["batch_size"] = (f"{base}'s {recipe['batch_size']} windows a step" +
                             (f", as {batch} x {accumulation} accumulated to fit {MEMORY_MARGIN:.0%} of the memory"
                              if accumulation > 1 else "") + f": {memory / 2**30:.2f} GiB of {device.memory / 2**30:.0f}")
    reasons["optimizer"] = (f"{base}'s recipe: " + ("Muon for the hidden matrices, AdamW for the rest"
                            if optimizer == "muon" else f"AdamW at lr {recipe['lr']:g}") + " (measured best per second)")
    reasons["max_time"] = (f"the budget; {train_s:.0f} s of it are steps ({device.startup_s:.0f} s of start-up"
                           f"{' and compilation' if device.compiled else ''}, evaluations and checkpoints take the "
                           "rest); the best checkpoint is kept")
    train = {**{k: v for k, v in recipe.items() if k not in ("max_steps", "eval_batches", "log_every")},
             "optimizer": optimizer, "batch_size": batch, "accumulation_steps": accumulation, "stride": stride,
             "epochs": 0.0, "max_steps": 0, "max_time": float(budget_s), "patience": patience}
    model = {"n_layer": shape.n_layer, "n_embd": shape.n_embd, "n_head": shape.n_head, "block_size": block,
             "dropout": dropout}
    bpb = expected_bpb(device.kind, corpus.bytes)
    reasons["expected"] = (f"measured on {len(EXPECTED_BPB[device.kind])} corpora of other sizes (docs/PLANNING.md); "
                           f"the range is how far each was from the others' figure")
    return Plan(device.name, float(budget_s), base, shape.name, model, train, vocab, bool(corpus.vocab_size),
                param_count(cfg), cand.params, memory, speed, train_s, steps, round(epochs, 2), windows, bpb, reasons,
                cands)
