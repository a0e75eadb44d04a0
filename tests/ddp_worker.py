"""Run by tests/test_distributed.py under torchrun: one tiny epoch, then each rank saves its weights."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitlab.training import build_trainer, load_config
from vitlab.training.recipes import DIGITS_RECIPE

out = Path(sys.argv[1])
overrides = sys.argv[2:]
torch.set_num_threads(1)
cfg = load_config(None, overrides + [f"output_dir={out / 'run'}"], base=DIGITS_RECIPE)
trainer = build_trainer(cfg, log=lambda s: None)
model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
if trainer.dist.is_main:
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(out / "init.safetensors"))
trainer.fit()
rank = trainer.dist.rank
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
if trainer.dist.enabled:
    torch.distributed.destroy_process_group()
