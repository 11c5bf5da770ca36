"""Typed, frozen configuration: the model's shape, the training run, presets and TOML loading.

No torch at module level: ``minillm --help`` must stay instant.

Resolution order (later wins): preset defaults -> a TOML file's ``[model]``/``[train]`` tables
(which may name their base with ``preset = "small"``) -> explicit command-line flags.
Every problem found is gathered into one ``UsageError`` that names the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.errors import UsageError

TRAIN, FINETUNE = "train", "finetune"


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, *, cli: tuple[str, ...] = (TRAIN, FINETUNE),
       short: str | None = None, finetune_help: str | None = None, duration: bool = False) -> Any:
    """A config field and its one declaration: ``help`` (the --help line and the key's meaning in TOML),
    ``choices``, ``cli``: the commands with a flag for it (``()``: a TOML-only key), ``short``: a short flag,
    ``finetune_help``: finetune's help where it differs, ``duration``: the flag takes 90s / 2m / 1h."""
    meta: dict[str, Any] = {"help": help, "cli": cli}
    for key, value in (("choices", choices), ("short", short), ("finetune_help", finetune_help), ("duration", duration)):
        if value:
            meta[key] = value
    return field(default=default, metadata=meta)


def _m(default: Any, help: str, choices: tuple[str, ...] | None = None, *, cli: tuple[str, ...] = (TRAIN,),
       finetune_help: str | None = None) -> Any:
    """A ``ModelConfig`` field: a ``train`` flag only unless said, as finetune keeps the base model's shape."""
    return _f(default, help, choices, cli=cli, finetune_help=finetune_help)


@dataclass(frozen=True)
class ModelConfig:
    """The transformer's shape. Defaults follow the Llama family (pre-norm RMSNorm, SwiGLU, RoPE)."""

    vocab_size: int = _m(0, "Vocabulary size; always taken from the tokenizer, padded to a multiple of 64.", cli=())
    block_size: int = _m(256, "Context length in tokens (the longest sequence the model sees).")
    n_layer: int = _m(6, "Number of transformer blocks.")
    n_head: int = _m(4, "Attention heads (query heads).")
    n_kv_head: int = _m(0, "Key/value heads (grouped-query attention); 0 = n_head (plain multi-head).")
    n_embd: int = _m(256, "Model width (embedding size); must be divisible by n_head.")
    mlp: str = _m("swiglu", "Feed-forward type: swiglu (Llama) or gelu (GPT-2, 4x wide).", ("swiglu", "gelu"), cli=())
    norm: str = _m("rmsnorm", "Normalization layer: rmsnorm (Llama) or layernorm (GPT-2).", ("rmsnorm", "layernorm"),
                   cli=())
    rope_theta: float = _m(10000.0, "RoPE base frequency.", cli=())
    dropout: float = _m(0.0, "Dropout on attention and MLP outputs (0 for short runs, 0.1 for many epochs).",
                        cli=(TRAIN, FINETUNE), finetune_help="Model dropout during fine-tuning (default: the base's).")
    bias: bool = _m(False, "Biases in linear layers and norms (off in the Llama family).", cli=())
    norm_weight: bool = _m(True, "Learn each norm's per-channel gain; false: parameter-free norms (gain fixed at 1, "
                                 "as modded-nanogpt and nanochat), no gain gradients to reduce.", cli=())
    tie_embeddings: bool = _m(True, "Share the input embedding and output layer weights.", cli=())
    qk_norm: bool = _m(False, "RMS-normalize queries and keys per head before attention (exports as Qwen3).", cli=())
    gradient_checkpointing: bool = _m(False, "Recompute activations in the backward pass to save memory.",
                                      cli=(TRAIN, FINETUNE))
    attention: str = _m(
        "auto",
        "Attention kernel: auto (fastest available), flash, cudnn, efficient, math; does not change the weights.",
        ("auto", "flash", "cudnn", "efficient", "math"),
    )
    loss_chunk: int = _m(0, "Rows per chunk of the fused output layer + loss (never holds all logits); 0 = all at once; "
                            "does not change the weights.", cli=())
    loss_kernel: str = _m(
        "torch",
        "Output layer + loss: torch (compiled PyTorch), or liger (liger-kernel's fused Triton linear + cross-entropy: "
        "less memory; CUDA training only; pip install 'minillm[kernels]'); does not change the weights.",
        ("torch", "liger"),
    )

    @property
    def kv_heads(self) -> int:
        """The effective number of key/value heads."""
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLP: 4x for GELU; for SwiGLU 8/3x rounded to a multiple of 64, so the
        MLP holds about 8 * n_embd**2 parameters either way."""
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return max(64, int(round(8 * self.n_embd / 3 / 64)) * 64)


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, optimizer, schedule, precision, evaluation and logging."""

    batch_size: int = _f(32, "Micro-batch size (windows per forward pass).", short="-b",
                         finetune_help="Micro-batch size (default: the base run's).")
    accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.")
    lr: float = _f(1e-3, "Peak learning rate.",
                   finetune_help="Peak learning rate (default: a tenth of the base run's; with LoRA the base run's).")
    min_lr: float = _f(-1.0, "Final learning rate of the cosine decay (default lr/10; a negative value means the same).")
    warmup_steps: int = _f(100, "Linear warmup steps (capped at a tenth of the run).")
    max_steps: int = _f(0, "Stop after this many optimizer steps, or at --epochs if that comes first (0 = no step limit).")
    epochs: float = _f(1.0, "Passes over the training windows; the run ends at whichever of --epochs / --max-steps comes "
                            "first (0 = no epoch limit).",
                       finetune_help="Passes over the training windows / examples (default 1; 0 = no epoch limit); the "
                                     "run ends at whichever of --epochs / --max-steps comes first.")
    max_time: float = _f(0.0, "Wall-clock budget for the whole run, e.g. 90s, 2m, 1h (in TOML: seconds; 0 = none).",
                         duration=True)
    weight_decay: float = _f(0.1, "AdamW weight decay (never on norms, biases and embeddings).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    grad_clip: float = _f(1.0, "Gradient-norm clip (0 disables).")
    optimizer: str = _f("adamw", "adamw, or muon for the 2-D hidden matrices with AdamW for the rest.", ("adamw", "muon"))
    muon_lr: float = _f(0.02, "Muon learning rate for hidden matrices (with --optimizer muon).", cli=(TRAIN,))
    eval_every: int = _f(0, "Evaluate every N steps (0 = about 10 per run).")
    eval_batches: int = _f(20, "Validation batches per evaluation.")
    patience: int = _f(0, "Stop after N evaluations without improvement (0 = off).")
    log_every: int = _f(10, "Progress line every N steps.")
    precision: str = _f("auto", "auto (bf16 on capable GPUs, fp16 on older ones, fp32 on CPU), bf16, fp16 or fp32.",
                        ("auto", "bf16", "fp16", "fp32"))
    compile: str = _f("auto", "torch.compile for training: auto (on for CUDA, in the background while the first steps run; off for "
                               "CPU, and for a --max-time under 60 s until the compile cache has this model's kernels), on (each block and the output "
                               "head, compiled once and reused: a short start), model (the whole model in one graph, the "
                               "longer start of earlier versions), off.", ("auto", "on", "model", "off"))
    device: str = _f("auto", "auto (CUDA, else Apple's MPS, when present), cpu, cuda, cuda:N or mps.")
    seed: int = _f(1337, "Random seed (initialization, data order, split, dropout).",
                   finetune_help="Random seed (data order, split, dropout, adapter init).")
    num_workers: int = _f(1, "Background threads preparing batches ahead of the GPU (0 = inline).")
    stride: int = _f(0, "Step between windows of a long document (0 = block size: no overlap).",
                     finetune_help="continue: step between windows (default block size).")
    val_fraction: float = _f(0.05, "Fraction of documents held out for validation (at least one document).",
                             finetune_help="Fraction of documents / examples held out for validation.")
    doc_masking: bool = _f(False, "Restart positions and block attention at document boundaries.",
                           finetune_help="Restart positions and block attention at document boundaries (default: the "
                                         "base run's).")

# Presets are defined here once. configs/*.toml mirror them (tests/test_config.py checks they agree).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": dict(block_size=64, n_layer=2, n_head=4, n_embd=64),
        "train": dict(batch_size=16, lr=3e-3, warmup_steps=20, max_steps=300, eval_batches=8, log_every=25),
    },
    # small and medium: the recipe measured best per GPU-second on an H100 (docs/BENCHMARKS.md, issue 13):
    # Muon on the hidden matrices, AdamW at 2e-3 for embeddings and norms, short warmup, dropout 0.1, QK-norm
    # (they export in the Qwen3 layout).
    "small": {
        "model": dict(block_size=256, n_layer=6, n_head=4, n_embd=256, dropout=0.1, qk_norm=True),
        "train": dict(batch_size=128, optimizer="muon", muon_lr=0.02, lr=2e-3, warmup_steps=50),
    },
    "medium": {
        "model": dict(block_size=512, n_layer=8, n_head=6, n_embd=384, dropout=0.1, qk_norm=True),
        "train": dict(batch_size=64, optimizer="muon", muon_lr=0.02, lr=2e-3, warmup_steps=50),
    },
    "large": {
        "model": dict(block_size=1024, n_layer=10, n_head=10, n_embd=640),
        "train": dict(batch_size=16, lr=6e-4, warmup_steps=200),
    },
    "gpt2-124m": {
        "model": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768),
        "train": dict(batch_size=16, lr=6e-4, warmup_steps=200),
    },
}


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round a vocabulary size up to a multiple of 64 (faster matmuls)."""
    return int(math.ceil(n / multiple) * multiple)


def _base_type(tp: Any) -> type:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _check_value(cls: type, key: str, value: Any, where: str) -> str | None:
    """Return a problem description, or None when ``value`` suits field ``key`` of ``cls``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    f = fields[key]
    tp = _base_type(typing.get_type_hints(cls)[key])
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        return f"{where}{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}"
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        return f"{where}{key}: {value!r} is not one of {', '.join(choices)}"
    return None


# Fields only a TOML file sets (no flag); every other field is also a ``train`` flag (tests check both ways).
TOML_ONLY = frozenset(f.name for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls) if not f.metadata["cli"])


def flag_name(key: str) -> str:
    """The command-line flag of field ``key``."""
    return "--" + key.replace("_", "-")


def key_name(key: str) -> str:
    """How a user sets field ``key``: its ``train`` flag, or its key in a TOML ``[model]`` / ``[train]`` table."""
    for table, cls in (("model", ModelConfig), ("train", TrainConfig)):
        for f in dataclasses.fields(cls):
            if f.name == key and not f.metadata["cli"]:
                return f"[{table}] {key}"
    return flag_name(key)


_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")

# Every numeric field's allowed values: (test, the range in words). NaN fails every test.
RANGES: dict[str, tuple[Any, str]] = {
    "vocab_size": _AT_LEAST_0, "block_size": _AT_LEAST_1, "n_layer": _AT_LEAST_1, "n_head": _AT_LEAST_1,
    "n_kv_head": _AT_LEAST_0, "n_embd": _AT_LEAST_1, "rope_theta": _POSITIVE, "dropout": _UNIT,
    "loss_chunk": _AT_LEAST_0,
    "batch_size": _AT_LEAST_1, "accumulation_steps": _AT_LEAST_1, "lr": _POSITIVE,
    "min_lr": (math.isfinite, "a finite number (negative means lr / 10)"), "warmup_steps": _AT_LEAST_0,
    "max_steps": _AT_LEAST_0, "epochs": _NON_NEGATIVE,
    "max_time": (_NON_NEGATIVE[0], "a finite number of seconds >= 0 (0: no limit)"),
    "weight_decay": _NON_NEGATIVE, "beta1": _UNIT, "beta2": _UNIT,
    "grad_clip": (_NON_NEGATIVE[0], "a finite number >= 0 (0 disables clipping)"), "muon_lr": _POSITIVE,
    "eval_every": _AT_LEAST_0, "eval_batches": _AT_LEAST_1, "patience": _AT_LEAST_0, "log_every": _AT_LEAST_1,
    "seed": (lambda v: 0 <= v < 2**64, "in [0, 2**64 - 1]"), "num_workers": _AT_LEAST_0, "stride": _AT_LEAST_0,
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
}


def _out_of_range(cfg: Any) -> dict[str, str]:
    """Each numeric field of ``cfg`` outside its ``RANGES`` entry -> the problem, naming its flag or TOML key."""
    p = {}
    for f in dataclasses.fields(cfg):
        if f.name in RANGES:
            ok, words = RANGES[f.name]
            v = getattr(cfg, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not ok(v):
                p[f.name] = f"{key_name(f.name)} must be {words} (got {v!r})"
    return p


def validate(model: ModelConfig, train: TrainConfig) -> list[str]:
    """Every field's range and the cross-field checks; returns every problem found (empty when all is well).
    A cross-field check runs only when its fields are in range."""
    bad = {**_out_of_range(model), **_out_of_range(train)}
    p = list(bad.values())

    def fine(*keys: str) -> bool:
        return not any(k in bad for k in keys)

    if fine("n_embd", "n_head"):
        if model.n_embd % model.n_head:
            ok = [h for h in range(1, 33) if model.n_embd % h == 0]
            p.append(f"n_embd ({model.n_embd}) must be divisible by n_head ({model.n_head}); n_head could be one of {ok}")
        elif model.head_dim % 2:
            p.append(f"head size n_embd/n_head = {model.head_dim} must be even for RoPE")
    if fine("n_head", "n_kv_head") and model.n_kv_head and model.n_head % model.n_kv_head:
        ok = [h for h in range(1, model.n_head + 1) if model.n_head % h == 0]
        p.append(f"n_head ({model.n_head}) must be divisible by n_kv_head ({model.n_kv_head}); n_kv_head could be one of {ok}")
    if fine("lr", "min_lr") and train.min_lr > train.lr:
        p.append(f"--min-lr ({train.min_lr:g}) must be at most --lr ({train.lr:g}); a negative --min-lr means lr / 10")
    if fine("epochs", "max_steps", "max_time") and train.epochs == 0 and train.max_steps == 0 and train.max_time == 0:
        p.append("the run has no end: set epochs, max_steps or max_time")
    if fine("stride", "block_size") and train.stride > model.block_size:
        p.append(f"stride ({train.stride}) must be <= block_size ({model.block_size}), or tokens are skipped")
    if not (train.device in ("auto", "cpu", "cuda", "mps") or str(train.device).startswith("cuda:")):
        p.append(f"device: {train.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return p


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``overrides`` (None values left out) split into ModelConfig fields, TrainConfig fields, and a problem line
    per unknown key."""
    mkeys = {f.name for f in dataclasses.fields(ModelConfig)}
    tkeys = {f.name for f in dataclasses.fields(TrainConfig)}
    m, t, problems = {}, {}, []
    for k, v in overrides.items():
        if v is None:
            continue
        if k in mkeys:
            m[k] = v
        elif k in tkeys:
            t[k] = v
        else:
            problems.append(f"unknown key {k!r}")
    return m, t, problems


def load_toml(path: Path) -> tuple[str | None, dict[str, Any], dict[str, Any], list[str]]:
    """Read a config TOML file: ``preset = "..."`` plus ``[model]`` and ``[train]`` tables."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config: cannot read {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config: {path} is not valid TOML: {e}") from e
    problems: list[str] = []
    preset = data.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        problems.append(f"preset: expected a string, one of {', '.join(PRESETS)}")
        preset = None
    tables: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in data.items():
        if key in tables and isinstance(value, dict):
            tables[key] = value
        else:
            problems.append(f"unknown key {key!r} (allowed at the top level: preset, [model], [train])")
    for name, cls in (("model", ModelConfig), ("train", TrainConfig)):
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in list(tables[name]):
            if key not in allowed:
                problems.append(f"[{name}] unknown key {key!r}; allowed: {', '.join(allowed)}")
                del tables[name][key]
    return preset, tables["model"], tables["train"], problems


def resolve(config: str = "tiny", overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Build the model and training configs from a preset name or TOML file plus explicit overrides.

    Raises ``UsageError`` listing every problem at once.
    """
    problems: list[str] = []
    file_model: dict[str, Any] = {}
    file_train: dict[str, Any] = {}
    if config in PRESETS:
        preset = config
    elif config.endswith(".toml") or Path(config).is_file():
        path = Path(config)
        if not path.is_file():
            raise UsageError(f"--config: file {config} does not exist; give a preset ({', '.join(PRESETS)}) or a TOML file")
        preset, file_model, file_train, problems = load_toml(path)
        if preset is not None and preset not in PRESETS:
            problems.append(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
            preset = None
    else:
        raise UsageError(f"--config: unknown preset {config!r}; choose one of {', '.join(PRESETS)} or a .toml file")
    om, ot, extra = split_overrides(overrides or {})
    problems += extra
    base = PRESETS.get(preset or "", {"model": {}, "train": {}})
    mvals = {**base["model"], **file_model, **om}
    tvals = {**base["train"], **file_train, **ot}
    for cls, vals, where in ((ModelConfig, mvals, "[model] "), (TrainConfig, tvals, "[train] ")):
        for k in list(vals):
            prob = _check_value(cls, k, vals[k], where)
            if prob:
                problems.append(prob)
                del vals[k]
            elif _base_type(typing.get_type_hints(cls)[k]) is float:
                vals[k] = float(vals[k])
    model, train = ModelConfig(**mvals), TrainConfig(**tvals)  # the bad values left out, so all problems show
    problems += validate(model, train)
    if problems:
        raise UsageError("invalid config:\n  " + "\n  ".join(problems))
    return model, train


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def model_from_dict(d: dict[str, Any]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in names})


def train_from_dict(d: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})


def parse_duration(text: str) -> float:
    """Parse ``90``, ``90s``, ``2m``, ``1h30m`` or ``1.5h`` into seconds."""
    import re

    s = text.strip().lower()
    if not s:
        raise UsageError("--max-time: empty duration; write e.g. 90s, 2m or 1h")
    try:
        return float(s)
    except ValueError:
        pass
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?", s)
    if not parts or not any(parts.groups()):
        raise UsageError(f"--max-time: cannot read {text!r}; write e.g. 90s, 2m, 1h or 1h30m")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + sec
