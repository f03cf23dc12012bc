"""Checkpoints for resuming: sharded model/optimizer state (torch.distributed.checkpoint) plus
step, schedule, data position and RNG, in one folder that appears atomically.

    checkpoints/step_000100/
        adapter.safetensors, adapter_config.json   (or consolidated.safetensors + params.json)
        train_state/            DCP shards of the trainable parameters and their AdamW states
        train_state/trainer.json   step, world size, scheduler, data iterator state
        train_state/rng_<rank>.safetensors

Only trainable parameters are saved (a LoRA run does not copy its frozen 7B base every time).
DCP re-shards on load, so a run resumes under a different number of GPUs. No pickle anywhere:
DCP's tensor files, JSON and safetensors.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from mft.model.names import canonical_name
from mft.utils.distributed import World, barrier
from mft.utils.errors import MftError
from mft.utils.tensorfile import save_safetensors

STATE_DIR = "train_state"
TRAINER_FILE = "trainer.json"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def _trainable_state(model, optimizer):
    model_sd, optim_sd = get_state_dict(model, optimizer)
    trainable = {name for name, p in _canonical_parameters(model) if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd


def _canonical_parameters(model):
    return ((canonical_name(n), p) for n, p in model.named_parameters())


def save_checkpoint(
    run_dir: Path,
    step: int,
    world: World,
    export: Callable[[Path], None],
    model,
    optimizer,
    trainer_state: Dict[str, Any],
) -> Path:
    """Write checkpoints/step_N atomically; every rank calls it (it holds collectives).

    `export(folder)` writes the user-facing files (adapter or model) and must itself gather on
    every rank and write on rank 0.
    """
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    export(tmp)  # rank 0 creates tmp with the exported files (atomic_dir)
    barrier()  # ... before any rank's DCP writer creates tmp/train_state
    model_sd, optim_sd = _trainable_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / STATE_DIR), no_dist=not world.distributed)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_safetensors(rng, tmp / STATE_DIR / f"rng_{world.rank}.safetensors")  # 0644, not safetensors' 0600
    if world.is_main:
        state = {"step": step, "world_size": world.size, **trainer_state}
        with open(tmp / STATE_DIR / TRAINER_FILE, "w") as f:
            f.write(json.dumps(state, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())  # trainer.json marks the checkpoint complete: it must be on disk first
    barrier()
    if world.is_main:
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            os.replace(final, old)  # an earlier save of this step stays until the new one is in place
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint in run_dir (half-written ones never carry a final name)."""
    folders = sorted((run_dir / "checkpoints").glob("step_*/" + STATE_DIR + "/" + TRAINER_FILE))
    return folders[-1].parent.parent if folders else None


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """`resume`: null (start fresh), `auto` (latest checkpoint in this run dir, if any) or a path
    to a run dir or a checkpoints/step_N folder."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / STATE_DIR / TRAINER_FILE).is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise MftError(
            f"resume={resume}: no complete checkpoint there (expected a run dir with checkpoints/step_N/"
            f"{STATE_DIR}/{TRAINER_FILE}, or such a step folder)."
        )
    return found


def load_checkpoint(folder: Path, world: World, model, optimizer) -> Dict[str, Any]:
    """Restore trainable weights, optimizer and RNG from `folder`; returns trainer.json's content."""
    state_dir = folder / STATE_DIR
    try:
        trainer = json.loads((state_dir / TRAINER_FILE).read_text())
        model_sd, optim_sd = _trainable_state(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(state_dir), no_dist=not world.distributed)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
            options=StateDictOptions(strict=False),
        )
    except (CheckpointException, RuntimeError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MftError(
            f"resume from {folder} failed: the checkpoint does not fit this run ({first_line}). The model, "
            "peft and quant settings must be those the checkpoint was trained with."
        ) from None
    rng_file = state_dir / f"rng_{world.rank}.safetensors"
    if rng_file.is_file() and trainer.get("world_size") == world.size:
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return trainer
