"""LoRA finetuning through ``peft``: inject adapters into a VideoDiT, freeze the base, merge for export.

The adapters are injected in place (``peft.inject_adapter_in_model``), not through a ``PeftModel``
wrapper, so the model stays a ``VideoDiT`` with ``blocks`` and the parallel code (SP hooks on
``patch_embed``/``rope``/``final_layer``, the attention ``core`` attribute, per-block FSDP) works
unchanged. Names of adapted layers gain peft's parts::

    blocks.0.attn.q_proj.weight  ->  blocks.0.attn.q_proj.base_layer.weight        (frozen)
                                     blocks.0.attn.q_proj.lora_A.default.weight    (rank, D)  trained
                                     blocks.0.attn.q_proj.lora_B.default.weight    (D, rank)  trained, zero at start

Order in a run (:meth:`vdit.train.trainer.Trainer.build_parallel_model`): inject on the meta model
(structure and ``requires_grad``), parallelize (FSDP shards frozen and trainable parameters alike),
then materialize from a CPU twin that loaded the base weights (``train.init_from``) and got
adapters from a seeded RNG (:func:`vdit.train.build.build_model`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["lora_targets", "apply_lora", "merge_lora", "has_lora", "parameter_summary"]


def lora_targets(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Full names of the ``nn.Linear`` layers inside ``model.blocks`` whose last name part is in
    ``target_modules`` (so the text projection's ``fc1`` is not taken for the MLP's).

    Raises:
        ValueError: nothing matches (lists the Linear names a block has).
    """
    wanted = set(target_modules)
    names = [n for n, m in model.named_modules()
             if n.startswith("blocks.") and isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted]
    if not names:
        avail = sorted({n.split(".", 2)[-1] for n, m in model.named_modules()
                        if n.startswith("blocks.0.") and isinstance(m, nn.Linear)})
        raise ValueError(f"lora.target_modules={list(target_modules)} matches no Linear in the blocks; "
                         f"a block has {avail}")
    return names


def apply_lora(model: nn.Module, cfg, seed: int | None = None) -> nn.Module:
    """Inject LoRA adapters (``cfg``: :class:`vdit.train.config.LoraConfig`) and freeze everything else.

    Args:
        model: a plain ``VideoDiT`` (meta device for structure, or materialized).
        cfg: ``rank`` (> 0), ``alpha``, ``dropout``, ``target_modules``.
        seed: seed of the adapters' ``A`` init (the global RNG is forked, not disturbed); None uses
            the current global RNG.

    Returns:
        ``model``, with ``requires_grad`` True exactly on the adapter weights.

    Raises:
        ValueError: ``cfg.rank < 1`` or no target matches. ImportError: peft is not installed.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if cfg.rank < 1:
        raise ValueError(f"lora.rank={cfg.rank}: apply_lora needs rank >= 1")
    peft_cfg = LoraConfig(r=int(cfg.rank), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
                          target_modules=lora_targets(model, list(cfg.target_modules)), bias="none")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(peft_cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    """True when ``model`` carries peft LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W += (alpha / rank) B A``) and put the plain
    ``nn.Linear`` back, so ``model.state_dict()`` has the names of a plain ``VideoDiT``.

    Returns:
        ``model`` (changed in place), every parameter trainable again.
    """
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def parameter_summary(model: nn.Module, optimizer_states: int = 2, state_bytes: int = 4) -> dict[str, int]:
    """Trainable and frozen parameter counts and the optimizer-state memory they imply (all ranks together).

    Args:
        model: plain or sharded (DTensor ``numel`` is the global count).
        optimizer_states: tensors of state per trainable parameter (AdamW: ``exp_avg``, ``exp_avg_sq``).
        state_bytes: bytes per state element (fp32 states: 4).

    Returns:
        ``{"params/trainable", "params/frozen", "optim/state_bytes"}``.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"params/trainable": int(trainable), "params/frozen": int(frozen),
            "optim/state_bytes": int(trainable * optimizer_states * state_bytes)}
