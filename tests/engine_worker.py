"""Run by tests/test_engine.py (alone or under torchrun): the toy regression task through the
engine; each rank then saves its weights and its EMA weights."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import toy_task  # noqa: F401  (registers "toy_regression"; tests/ is this script's folder)
from vitlab.training import build_trainer, load_config

out = Path(sys.argv[1])
torch.set_num_threads(1)
cfg = load_config(None, sys.argv[2:] + ["task=toy_regression", f"output_dir={out / 'run'}"])
trainer = build_trainer(cfg, log=lambda s: None)
model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(out / f"init{trainer.dist.rank}.safetensors"))
trainer.fit()
rank = trainer.dist.rank
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
save_file({k: v.contiguous() for k, v in trainer.ema.module.state_dict().items()}, str(out / f"ema{rank}.safetensors"))
if trainer.dist.enabled:
    torch.distributed.destroy_process_group()
