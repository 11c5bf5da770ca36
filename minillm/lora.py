"""LoRA (Hu et al., 2021): low-rank adapters on the model's linear layers, applied from outside the model.

``apply_lora(model, cfg)`` swaps each targeted ``nn.Linear`` for a ``LoRALinear`` that keeps the very same
``weight``/``bias`` tensors (so the base's state-dict keys are unchanged) and adds ``lora_A`` (r, in) and
``lora_B`` (out, r)::

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

``B`` starts at zero, so a freshly wrapped model computes exactly what the base did. Only ``lora_A`` and
``lora_B`` train; everything else is frozen. ``merge`` folds ``(alpha / r) B A`` into ``W`` (and
``unmerge`` takes it out again); ``merged_state_dict`` gives plain GPT weights without touching the model.

An adapter file (``adapter.pt``) holds only the adapter tensors, the LoRA config, the base model's config
and the sha256 of the base checkpoint file it was trained on; ``attach_adapter`` refuses any other base.
It loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError, UsageError

ADAPTER_FORMAT = 1
ADAPTER_KIND = "minillm-lora-adapter"
# --lora-targets short name -> module path inside a Block
TARGETS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LoRAConfig:
    """Which linear layers get adapters and how large they are."""

    rank: int = 8  # r: the adapters' inner dimension (trainable params per matrix: r * (in + out))
    alpha: float = 16.0  # scaling numerator: the update is (alpha / r) * B A
    dropout: float = 0.0  # dropout on the adapter's input (training only)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # short names from TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q,k,v"`` -> ``("q", "k", "v")``; refuses unknown names, naming the allowed ones."""
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise UsageError(f"--lora-targets {text!r}: unknown target(s) {', '.join(bad) or '(none given)'}; "
                         f"use a comma-separated subset of {','.join(TARGETS)}")
    return names


def check_config(cfg: LoRAConfig, mcfg: ModelConfig) -> None:
    problems = []
    if cfg.rank < 1:
        problems.append(f"--lora-rank must be >= 1 (got {cfg.rank})")
    if not cfg.alpha > 0:
        problems.append(f"--lora-alpha must be > 0 (got {cfg.alpha})")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"--lora-dropout must be in [0, 1) (got {cfg.dropout})")
    if "gate" in cfg.targets and mcfg.mlp != "swiglu":
        problems.append("--lora-targets gate: this model's MLP is GELU, which has no gate projection; leave out gate")
    if problems:
        raise UsageError("; ".join(problems))


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` sharing a base layer's weight and bias, plus a rank-r update ``(alpha/r) B A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: base keys and tying are unchanged
        self.register_parameter("bias", base.bias)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT; B = 0 keeps outputs unchanged
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta(self) -> Tensor:
        """The weight update ``(alpha / r) B A`` (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.size(0)}, scaling={self.scaling:g}, merged={self.merged}"


def target_shapes(mcfg: ModelConfig, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each target in one block, from the model config alone."""
    q, kv, c, h = mcfg.n_head * mcfg.head_dim, mcfg.kv_heads * mcfg.head_dim, mcfg.n_embd, mcfg.mlp_hidden
    shapes = {"q": (c, q), "k": (c, kv), "v": (c, kv), "o": (q, c), "gate": (c, h), "up": (c, h), "down": (h, c)}
    return {t: shapes[t] for t in targets}


def expected_params(mcfg: ModelConfig, cfg: LoRAConfig) -> int:
    """Trainable parameters by the formula: ``n_layer * sum over targets of r * (in + out)``."""
    return mcfg.n_layer * sum(cfg.rank * (i + o) for i, o in target_shapes(mcfg, cfg.targets).values())


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the targeted linear layers of every block and freeze everything but the adapters.
    Returns the wrapped modules' names."""
    check_config(cfg, model.cfg)
    wrapped = []
    for i, block in enumerate(model.blocks):
        for t in cfg.targets:
            parent_name, attr = TARGETS[t].split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise MiniLLMError(f"blocks.{i}.{TARGETS[t]} already has a LoRA adapter")
            setattr(parent, attr, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout))
            wrapped.append(f"blocks.{i}.{TARGETS[t]}")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return wrapped


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only: ``blocks.N.attn.q_proj.lora_A`` -> (r, in), ..."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += (alpha/r) B A); forward then skips the adapter."""
    for m in lora_modules(model):
        if not m.merged:
            m.weight += m.delta().to(m.weight.dtype)
            m.merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo ``merge`` (W -= (alpha/r) B A), up to floating-point rounding."""
    for m in lora_modules(model):
        if m.merged:
            m.weight -= m.delta().to(m.weight.dtype)
            m.merged = False


def merged_state_dict(sd: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """Plain GPT weights from a LoRA model's state dict (``W + scaling * B A`` for each adapted layer;
    the ``lora_*`` keys dropped). Needs the adapters unmerged (as they are during training)."""
    out = {k: v for k, v in sd.items() if ".lora_" not in k}
    for k in sd:
        if k.endswith(".lora_A"):
            stem = k[: -len(".lora_A")]
            w = out[stem + ".weight"]
            delta = (sd[stem + ".lora_B"].float() @ sd[k].float()) * scaling
            out[stem + ".weight"] = (w.float() + delta).to(w.dtype)
    return out


# ---------------------------------------------------------------- adapter files


def save_adapter(path: Path | str, model: nn.Module, cfg: LoRAConfig, base_sha256: str, base_path: str,
                 extra: dict[str, Any] | None = None) -> None:
    """Write the adapter alone (atomically): tensors, LoRA config, base config and base checkpoint sha256."""
    from minillm.config import to_dict

    save_adapter_tensors(path, adapter_state(model), cfg, base_sha256, base_path, to_dict(model.cfg), extra)


def save_adapter_tensors(path: Path | str, tensors: dict[str, Tensor], cfg: LoRAConfig, base_sha256: str,
                         base_path: str, base_model_config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    from minillm.checkpoint import save_checkpoint

    save_checkpoint(path, {"kind": ADAPTER_KIND, "adapter_format": ADAPTER_FORMAT, "tensors": tensors,
                           "lora_config": {**dataclasses.asdict(cfg), "targets": list(cfg.targets)},
                           "base_sha256": base_sha256, "base_path": str(base_path),
                           "base_model_config": base_model_config, **(extra or {})})


def load_adapter(path: Path | str) -> dict[str, Any]:
    """Read an adapter file (``weights_only=True``, its ``tensors_sha256`` verified when it has one); refuses
    files that are not minillm adapters."""
    from minillm.checkpoint import read_tensor_file
    from minillm.corpus.read import check_input_file

    path = Path(path)
    check_input_file(path, "--adapter", "give the adapter.pt a LoRA finetune run wrote")
    ad = read_tensor_file(path, "--adapter")
    if not isinstance(ad, dict) or ad.get("kind") != ADAPTER_KIND:
        raise MiniLLMError(f"--adapter: {path} is not a LoRA adapter (a checkpoint? give it to --ckpt instead)")
    ad["path"] = str(path)
    return ad


def adapter_config(ad: dict[str, Any]) -> LoRAConfig:
    c = ad["lora_config"]
    return LoRAConfig(rank=int(c["rank"]), alpha=float(c["alpha"]), dropout=float(c["dropout"]),
                      targets=tuple(c["targets"]))


def attach_adapter(model: nn.Module, base_state: dict[str, Any], adapter: dict[str, Any] | Path | str,
                   merged: bool = True) -> LoRAConfig:
    """Put an adapter on ``model``, loaded from the checkpoint ``base_state`` (``load_model``'s state, with
    its ``path``). Refuses an adapter trained on another base (the sha256 of the base file differs).
    ``merged`` folds it into the weights (fastest for inference; same logits)."""
    from minillm.io import sha256_file

    ad = load_adapter(adapter) if not isinstance(adapter, dict) else adapter
    base_path = Path(base_state["path"])
    sha = sha256_file(base_path)
    if sha != ad["base_sha256"]:
        raise MiniLLMError(
            f"--adapter {ad['path']} was trained on base checkpoint {ad.get('base_path', '?')} "
            f"(sha256 {ad['base_sha256'][:12]}…), not on --ckpt {base_path} (sha256 {sha[:12]}…); "
            f"give the base it was trained on with --ckpt")
    cfg = adapter_config(ad)
    apply_lora(model, cfg)
    try:
        missing, unexpected = model.load_state_dict(ad["tensors"], strict=False)
    except RuntimeError as e:
        raise MiniLLMError(f"--adapter {ad['path']} does not fit the model of --ckpt {base_path}: "
                           f"{str(e)[:200]}") from e
    missing = [k for k in missing if ".lora_" in k]
    if missing or unexpected:
        raise MiniLLMError(f"--adapter {ad['path']} does not fit the model of --ckpt {base_path} "
                           f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    model.requires_grad_(False)
    if merged:
        merge(model)
    return cfg


def param_report(model: nn.Module, mcfg: ModelConfig, cfg: LoRAConfig) -> dict[str, int]:
    """Trainable parameters counted on the model and by the formula, and the AdamW state they need
    (two fp32 tensors per parameter: exp_avg and exp_avg_sq). Raises if the count and the formula differ."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = expected_params(mcfg, cfg)
    if trainable != expected:
        raise MiniLLMError(f"LoRA: {trainable} trainable parameters, but the formula gives {expected} (internal error)")
    return {"trainable_params": trainable, "formula_params": expected,
            "total_params": sum(p.numel() for p in model.parameters()),
            "optimizer_state_bytes": 2 * 4 * trainable}


def optimizer_state_bytes(opts) -> int:
    """Bytes actually held in the optimizers' state tensors (after at least one step)."""
    n = 0
    for opt in opts:
        for st in opt.state.values():
            n += sum(v.numel() * v.element_size() for k, v in st.items() if torch.is_tensor(v) and k != "step")
    return n


def merge_checkpoint(ckpt: Path | str, adapter: Path | str, out: Path | str, tokenizer: Path | None = None,
                     force_tokenizer: bool = False) -> dict[str, Any]:
    """Write base + adapter as one plain checkpoint (loadable by generate / evaluate / export / finetune),
    with the base's tokenizer copied beside it as ``tokenizer.json`` (refused if a different one is there)."""
    import shutil

    from minillm.checkpoint import save_checkpoint
    from minillm.config import to_dict
    from minillm.io import atomic_open, sha256_file
    from minillm.model.load import load_model, resolve_tokenizer

    out = Path(out)
    model, state = load_model(ckpt, "cpu")
    tok = resolve_tokenizer(state, tokenizer, force_tokenizer)
    ad = load_adapter(adapter)
    if out.resolve() in (Path(state["path"]).resolve(), Path(ad["path"]).resolve()):
        raise MiniLLMError(f"--out {out} is one of the inputs; write the merged checkpoint to a new file")
    cfg = attach_adapter(model, state, ad, merged=True)
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    tok_sha = sha256_file(tok)
    beside = out.parent / "tokenizer.json"
    if beside.is_file() and beside.resolve() != Path(tok).resolve() and sha256_file(beside) != tok_sha:
        raise MiniLLMError(f"--out {out}: {beside} is a different tokenizer than the base's ({tok}); write the "
                           f"merged checkpoint into another directory")
    save_checkpoint(out, {"model": sd, "model_config": to_dict(model.cfg),
                          "train_config": ad.get("train_config") or state.get("train_config") or {},
                          "tokenizer_sha256": tok_sha,
                          "merged_from": {"base": str(state["path"]), "base_sha256": ad["base_sha256"],
                                          "adapter": str(ad["path"]), "lora_config": ad["lora_config"],
                                          "mode": ad.get("mode")}})
    if not beside.is_file():
        with open(tok, "rb") as src, atomic_open(beside) as dst:
            shutil.copyfileobj(src, dst)
    return {"out": str(out), "base": str(state["path"]), "adapter": str(ad["path"]), "rank": cfg.rank,
            "targets": list(cfg.targets), "params": sum(v.numel() for k, v in sd.items() if k != "lm_head.weight"
                                                        or not model.cfg.tie_embeddings),
            "tokenizer": str(beside)}
