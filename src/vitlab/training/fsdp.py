"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the engine: ``distributed.strategy=fsdp``.

Preparation order (:func:`prepare_fsdp`), what torch's FSDP2 expects:

1. activation checkpointing is switched on by the trainer (``model.set_grad_checkpointing``);
2. scalar (0-d) parameters (CLIP's ``logit_scale``, SigLIP's bias) become 1-D of size 1, since
   FSDP2 shards every parameter along dim 0; their names are kept so a saved file turns them
   back into scalars (:func:`scalars_back`);
3. every transformer block (a :class:`vitlab.components.Block`) is compiled on its own when
   ``distributed.compile`` is on;
4. ``fully_shard`` each block, then the root module.

The EMA copy is taken after step 2 and sharded the same way, so its averaged weights are DTensors
with the same placements as the parameters and the average stays a local operation per shard.
A single process (no torchrun) joins a 1-rank gloo group of its own so the same code runs there.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..components.layers import Block
from .distributed import DistInfo, init_distributed

#: Distribution strategies ``distributed.strategy`` accepts.
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")


def init_fsdp_process_group(device: torch.device) -> DistInfo:
    """The torchrun group (as for DDP), or a 1-rank group of its own (gloo; nccl on CUDA) when run
    as a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo()


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded on their own: every outermost transformer block of the model."""
    units: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, Block):
            units.append(m)
            inside.update(id(c) for c in m.modules())
    return units


def scalars_to_1d(model: nn.Module) -> list[str]:
    """Replace every 0-d parameter by a 1-D one of size 1 (same value); returns their names."""
    names = []
    for mod_name, mod in model.named_modules():
        for p_name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 0:
                # () -> (1,): FSDP2 shards along dim 0, which a scalar does not have
                setattr(mod, p_name, nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))
                names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def scalars_back(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """``state`` with the parameters :func:`scalars_to_1d` reshaped turned back into 0-d tensors."""
    out = dict(state)
    for n in names:
        if n in out:
            out[n] = out[n].reshape(())  # (1,) -> ()
    return out


def scalars_forward(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`scalars_back`: those 0-d tensors as 1-D of size 1."""
    out = dict(state)
    for n in names:
        if n in out and out[n].dim() == 0:
            out[n] = out[n].reshape(1)  # () -> (1,)
    return out


#: Methods besides ``forward`` that tasks call on a model with its weights (the backbone contract's
#: ``forward_*``, CLIP's towers and temperature); on the sharded root they are registered with
#: ``register_fsdp_forward_method`` so they gather the root's parameters as ``forward`` does. A
#: model adds its own through a ``fsdp_forward_methods`` attribute (a tuple of names).
FORWARD_METHODS: tuple[str, ...] = ("forward_features", "forward_head", "forward_intermediates", "image_features",
                                    "text_features", "encode_image", "encode_text", "itm_logits", "scale")


def shard(model: nn.Module, device: torch.device, world_size: int, compile_blocks: bool = False) -> nn.Module:
    """Compile (optionally) and ``fully_shard`` each block, then ``fully_shard`` the root, in place;
    the root's :data:`FORWARD_METHODS` are registered as forward methods."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size,))
    units = fsdp_units(model)
    if compile_blocks:
        for block in units:
            block.compile()
    for block in units:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name in (*FORWARD_METHODS, *getattr(model, "fsdp_forward_methods", ())):
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def prepare_fsdp(model: nn.Module, device: torch.device, world_size: int, compile_blocks: bool = False,
                 ema_decay: float | None = None) -> tuple[nn.Module, Any, list[str]]:
    """Scalars made 1-D, an EMA copy (if ``ema_decay``), then both sharded the same way.

    Returns:
        The sharded model (the same object), the :class:`~vitlab.training.ema.ModelEma` or None,
        and the names of the parameters made 1-D.
    """
    from .ema import ModelEma

    names = scalars_to_1d(model)
    ema = ModelEma(model, ema_decay) if ema_decay else None
    shard(model, device, world_size, compile_blocks)
    if ema is not None:
        shard(ema.module, device, world_size, compile_blocks=False)
    return model, ema, names


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on the CPU, on every rank (a collective call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensors, unsharded, flattened as ``<param fqn>/<key>`` (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    out = {}
    for fqn, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"{fqn}/{k}"] = v.detach().cpu().clone()
    return out
