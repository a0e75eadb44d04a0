"""Run by tests/test_fsdp.py (alone or under torchrun): the tiny digits ViT through the engine.

``python fsdp_worker.py MODE OUT [overrides...]``; MODE ``train`` trains (``fit``), ``resume``
only restores the run's latest checkpoint, ``stop`` trains and exits right after the first
checkpoint, ``continue`` resumes and trains to the end. Rank 0 then writes the whole (unsharded) state:
``OUT/weights.safetensors`` (model and EMA), ``OUT/optim.safetensors`` (per-parameter optimizer
tensors) and ``OUT/state.json`` (counters, scheduler). A 0-d parameter ``temp`` (a stand-in for
CLIP's logit scale) scales the logits, so the scalar-to-1-D path is trained too.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vitlab.training import build_trainer, load_config
from vitlab.training.fsdp import full_model_state, full_optimizer_state
from vitlab.training.recipes import DIGITS_RECIPE
import vitlab.training.run as run_module

mode, out = sys.argv[1], Path(sys.argv[2])
torch.set_num_threads(1)
cfg = load_config(None, sys.argv[3:] + [f"output_dir={out / 'run'}"], base=DIGITS_RECIPE)

_build = run_module.get_task(cfg.task).from_config


def with_temperature(c):
    setup = _build(c)
    model = setup.model
    model.temp = nn.Parameter(torch.tensor(1.25))
    model.register_forward_hook(lambda mod, inp, o: o * mod.temp)  # mod: the model or its EMA copy
    return setup


run_module.get_task(cfg.task).from_config = with_temperature
trainer = build_trainer(cfg, log=lambda s: None)
if mode == "stop":  # train, and stop (as a kill would) right after the first epoch's checkpoint
    original_save = trainer.save

    def save_then_stop():
        original_save()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.exit(0)

    trainer.save = save_then_stop
    trainer.fit()
elif mode == "train":
    trainer.fit()
elif mode == "continue":
    assert trainer.resume(), "no checkpoint to resume"
    trainer.fit()
else:
    assert trainer.resume(), "no checkpoint to resume"
model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
if trainer.fsdp:
    weights = full_model_state(model)
    ema = full_model_state(trainer.ema.module) if trainer.ema else {}
    optim = full_optimizer_state(model, trainer.optimizer)
else:
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()} if trainer.ema else {}
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {}
    for p, st in trainer.optimizer.state.items():
        optim.update({f"{names[id(p)]}/{k}": v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
if trainer.dist.is_main:
    tensors = {**{f"model/{k}": v.reshape(-1) for k, v in weights.items()},
               **{f"ema/{k}": v.reshape(-1) for k, v in ema.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "weights.safetensors"))
    save_file({k: v.reshape(-1).contiguous() for k, v in optim.items()}, str(out / "optim.safetensors"))
    state = {"epoch": trainer.epoch, "step": trainer.step, "scheduler": trainer.scheduler.state_dict(),
             "ema_updates": trainer.ema.updates if trainer.ema else 0, "history": trainer.history,
             "lr": [g["lr"] for g in trainer.optimizer.param_groups], "rng": torch.get_rng_state().tolist(),
             "compiled_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}
    (out / "state.json").write_text(json.dumps(state, default=str))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
