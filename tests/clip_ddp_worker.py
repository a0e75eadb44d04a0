"""Run by tests/test_clip_task.py (alone or under torchrun): the CLIP task on digit captions
through the engine for the first N optimizer steps of an epoch; each rank then saves its
initial and final weights and the epoch's training loss."""

import itertools
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitlab.tasks.clip import CLIP_DIGITS_RECIPE
from vitlab.training import build_trainer, load_config

out, steps = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
cfg = load_config(None, sys.argv[3:] + [f"output_dir={out / 'run'}"], base=CLIP_DIGITS_RECIPE)
trainer = build_trainer(cfg, log=lambda s: None)
model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
rank = trainer.dist.rank
save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(out / f"init{rank}.safetensors"))
trainer.train_loader = list(itertools.islice(trainer.train_loader, steps))  # the same first global batches
rec = trainer.train_epoch()
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
(out / f"loss{rank}.json").write_text(json.dumps({"train_loss": rec["train_loss"], "step": trainer.step}))
if trainer.dist.enabled:  # both ranks done with every collective before either tears gloo down
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
