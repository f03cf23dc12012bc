"""Checkpoints for resuming: sharded model/optimizer state (torch.distributed.checkpoint) plus
step, schedule, data position and RNG, in one folder that appears atomically.

    checkpoints/step_000100/
        adapter.safetensors, adapter_config.json   (or consolidated.safetensors + params.json)
        train_state/            DCP shards of the trainable parameters and their AdamW states
        train_state/trainer.json   step, world size, seed, base folder, scheduler, data iterator state
        train_state/rng_<rank>.safetensors

Only trainable parameters are saved (a LoRA run does not copy its frozen 7B base every time).
DCP re-shards on load, so a run resumes under a different number of GPUs.

Reading a checkpoint runs nothing from it. DCP's index (`.metadata`) is a pickle: it is read by
an unpickler that builds only DCP's own metadata classes. Only tensors are saved (the optimizer's
hyper-parameters come from the config, its learning rate from the schedule), and tensors are read
with `torch.load(weights_only=True)`; an entry of any other kind is refused rather than unpickled.
"""

import dataclasses
import json
import logging
import os
import pickle
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from mft.model.names import canonical_name
from mft.utils.distributed import World, barrier
from mft.utils.errors import MftError
from mft.utils.jsonfile import read_json_object
from mft.utils.tensorfile import save_safetensors

log = logging.getLogger(__name__)

STATE_DIR = "train_state"
TRAINER_FILE = "trainer.json"
METADATA_FILE = ".metadata"


@dataclass
class TrainerState:
    """trainer.json: where the run stood when the checkpoint was written."""

    step: int
    world_size: int  # processes that wrote it (the RNG files are per rank)
    scheduler: Dict[str, Any]  # the LR scheduler's state_dict
    data: List[Dict[str, Any]]  # one data-iterator state per rank
    seed: Optional[int] = None  # the run's seed (absent in checkpoints from before it was recorded)
    base: Optional[str] = None  # the folder of the base weights it trained on (absolute path)
    random_base: bool = False  # that base was drawn at random by the run (saved in its base_model/)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def trainer_file(folder: Path) -> Path:
    """A checkpoint folder's trainer.json."""
    return Path(folder) / STATE_DIR / TRAINER_FILE


def _trainable_state(model, optimizer):
    """The trainable parameters and their optimizer state, as DCP saves and loads them: tensors only."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    trainable = {name for name, p in _canonical_parameters(model) if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd


def _canonical_parameters(model):
    return ((canonical_name(n), p) for n, p in model.named_parameters())


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without a process group, which one process never has."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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
    every rank and write on rank 0. A failed write (a full disk, say) leaves no partial folder.
    """
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    try:
        export(tmp)  # rank 0 creates tmp with the exported files (atomic_dir)
        barrier()  # ... before any rank's DCP writer creates tmp/train_state
        model_sd, optim_sd = _trainable_state(model, optimizer)
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": {"state": optim_sd["state"]}},
                     checkpoint_id=str(tmp / STATE_DIR), no_dist=not world.distributed)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_safetensors(rng, tmp / STATE_DIR / f"rng_{world.rank}.safetensors")  # 0644, not safetensors' 0600
        if world.is_main:
            state = TrainerState(step=step, world_size=world.size, **trainer_state)
            with open(tmp / STATE_DIR / TRAINER_FILE, "w") as f:
                f.write(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())  # trainer.json marks the checkpoint complete: it must be on disk first
    except (OSError, CheckpointException) as e:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise MftError(f"writing the checkpoint {final} failed: {_os_error_text(e)}. The partial folder was "
                       f"removed; the latest complete checkpoint is {latest_checkpoint(run_dir) or 'none yet'}.") from None
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if world.is_main:
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            os.replace(final, old)  # an earlier save of this step stays until the new one is in place
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _os_error_text(e: BaseException) -> str:
    """'no space left on device (/path/file)' for an OSError, also one DCP wrapped per rank."""
    if isinstance(e, CheckpointException):
        wrapped = [failure[0] if isinstance(failure, tuple) else failure for failure in e.failures.values()]
        e = next((w for w in wrapped if isinstance(w, OSError)), wrapped[0] if wrapped else e)
    if isinstance(e, OSError) and e.errno is not None:
        where = f" ({e.filename})" if e.filename else ""
        return f"{os.strerror(e.errno).lower()}{where}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _step_folders(run_dir: Path) -> List[Path]:
    """checkpoints/step_N folders by step (a save in progress has a dotted name and is not one)."""
    folders = [p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[5:]))


def _is_complete(folder: Path) -> bool:
    return (folder / STATE_DIR / TRAINER_FILE).is_file() and (folder / STATE_DIR / METADATA_FILE).is_file()


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint in run_dir, or None when there is none."""
    complete = [p for p in _step_folders(run_dir) if _is_complete(p)]
    return complete[-1] if complete else None


def _checkpoint_to_resume(run_dir: Path, resume: str) -> Optional[Path]:
    """The newest checkpoint of run_dir; a damaged newest one is an error, not a silent step back."""
    folders = _step_folders(run_dir)
    if not folders:
        return None
    newest = folders[-1]
    if not _is_complete(newest):
        missing = [name for name in (TRAINER_FILE, METADATA_FILE) if not (newest / STATE_DIR / name).is_file()]
        older = latest_checkpoint(run_dir)
        instead = (f"resume=<that folder> to continue from the previous complete one, {older}" if older
                   else "no older complete checkpoint exists")
        raise MftError(
            f"resume={resume}: the newest checkpoint {newest} is damaged ({STATE_DIR}/{' and '.join(missing)} "
            f"missing; mft writes checkpoints atomically, so something removed it). Continuing from an older "
            f"one would silently repeat steps: move {newest} away and resume again, or pass {instead}."
        )
    return newest


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """`resume`: null (start fresh), `auto` (latest checkpoint in this run dir, if any) or a path
    to a run dir or a checkpoints/step_N folder."""
    if not resume:
        return None
    if resume == "auto":
        return _checkpoint_to_resume(run_dir, resume)
    path = Path(resume)
    if (path / STATE_DIR).is_dir():
        if not _is_complete(path):
            raise MftError(f"resume={resume}: {path / STATE_DIR} lacks {TRAINER_FILE} or {METADATA_FILE}; "
                           "the checkpoint is incomplete.")
        return path
    found = _checkpoint_to_resume(path, resume) if path.is_dir() else None
    if found is None:
        raise MftError(
            f"resume={resume}: no complete checkpoint there (expected a run dir with checkpoints/step_N/"
            f"{STATE_DIR}/{TRAINER_FILE}, or such a step folder)."
        )
    return found


def read_trainer_state(path: Path) -> TrainerState:
    """trainer.json, every field checked for its type."""
    raw = read_json_object(path, "trainer state")
    optional = (str, type(None))
    kinds = {"step": int, "world_size": int, "scheduler": dict, "data": list, "seed": (int, type(None)),
             "base": optional, "random_base": bool}
    for key, kind in kinds.items():
        if key not in raw:
            if key in ("step", "world_size", "scheduler", "data"):
                raise MftError(f"{path}: the key {key!r} is missing; the checkpoint is damaged.")
            continue
        value = raw[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise MftError(f"{path}: {key!r} should be {expected}, got {value!r}; the checkpoint is damaged.")
    state = TrainerState(**{key: raw[key] for key in kinds if key in raw})
    if state.step < 1 or state.world_size < 1 or not state.data or not all(isinstance(d, dict) for d in state.data):
        raise MftError(f"{path}: step and world_size must be positive and data a non-empty list of objects; "
                       "the checkpoint is damaged.")
    return state


def _metadata_classes() -> frozenset:
    """The only types whose instances a checkpoint index may fill in: DCP's metadata dataclasses."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    found = {obj for obj in vars(dcp_metadata).values()
             if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__ and dataclasses.is_dataclass(obj)}
    return frozenset(found | {_StorageInfo})


def _path_string(*parts: str) -> str:
    """A pickled pathlib path (rebuilt from its parts), as a plain string."""
    if not all(isinstance(part, str) for part in parts):
        raise pickle.UnpicklingError("a path in the index is not made of strings")
    return os.path.join(*parts) if parts else ""


class _MetadataUnpickler(pickle._Unpickler):
    """Builds DCP's own metadata classes, torch sizes, dtypes and layouts; anything else is refused.

    Naming only allowed globals is not enough: pickle's BUILD sets attributes on whatever object
    it is given, and an allowed class or a shared object (an Enum member, a dtype) would be changed
    for the whole process. So BUILD fills in only new instances of DCP's metadata dataclasses,
    with no dunder names. The pure-Python unpickler is used because its opcodes can be replaced;
    an index is small. Paths are read as plain strings.
    """

    _ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }
    _PATHS = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
              ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        found = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        if isinstance(found, type) and found.__module__ == module:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self._PATHS:
            return _path_string
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not part of a checkpoint index")

    def _load_build(self) -> None:
        state, target = self.stack[-1], self.stack[-2]
        slots = state[1] if isinstance(state, tuple) and len(state) == 2 else None
        attributes = state[0] if slots is not None else state
        names = [k for d in (attributes, slots) if isinstance(d, dict) for k in d]
        if type(target) not in _metadata_classes() or any(not isinstance(k, str) or k.startswith("__") for k in names):
            raise pickle.UnpicklingError(f"it sets attributes on a {type(target).__name__}, which a checkpoint "
                                         "index never does")
        pickle._Unpickler.load_build(self)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the index read by _MetadataUnpickler instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = Path(self.path) / METADATA_FILE
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except Exception as e:  # a damaged pickle can raise nearly anything: none of it runs code
            raise MftError(f"{path} is not a checkpoint index that mft wrote ({type(e).__name__}: "
                           f"{_os_error_text(e)}); the checkpoint is damaged or was not written by mft.") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise MftError(f"{path} holds a {type(metadata).__name__}, not a checkpoint index.")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """mft saves only tensors; a non-tensor entry would be unpickled by DCP, so it is refused."""

    def load_bytes(self, read_item, value) -> None:
        raise MftError(f"the checkpoint stores {read_item.dest_index.fqn} as a pickled object; mft never "
                       "writes one and does not unpickle it.")


def _flatten(state: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """DCP's key for every leaf of a nested state dict: the path joined with dots."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_fits(metadata: dcp_metadata.Metadata, wanted: Dict[str, Any], folder: Path) -> None:
    """Every tensor this run needs is in the checkpoint with the same shape."""
    saved = metadata.state_dict_metadata
    problems = []
    for key, tensor in _flatten(wanted).items():
        entry = saved.get(key)
        if entry is None:
            problems.append(f"{key} is missing")
        elif not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            problems.append(f"{key} is not a tensor")
        elif tuple(entry.size) != tuple(tensor.shape):
            problems.append(f"{key} has shape {tuple(entry.size)}, this run needs {tuple(tensor.shape)}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise MftError(
            f"resume from {folder} failed: the checkpoint does not fit this run ({shown}). The model, peft and "
            "quant settings must be those the checkpoint was trained with."
        )


def load_checkpoint(folder: Path, trainer: TrainerState, world: World, model, optimizer) -> None:
    """Restore trainable weights, optimizer and RNG from `folder`, whose trainer.json (read with
    read_trainer_state) is `trainer`."""
    state_dir = folder / STATE_DIR
    model_sd, optim_sd = _trainable_state(model, optimizer)
    wanted = {"model": model_sd, "optim": {"state": optim_sd["state"]}}
    reader = _SafeReader(str(state_dir))
    _check_fits(reader.read_metadata(), wanted, folder)
    try:
        with _quiet_single_process():
            dcp.load(wanted, storage_reader=reader, planner=_TensorsOnlyPlanner(), no_dist=not world.distributed)
    except (CheckpointException, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise MftError(f"resume from {folder} failed: the files in {state_dir} are damaged "
                       f"({_os_error_text(e)}).") from None
    optim_sd["state"] = wanted["optim"]["state"]
    set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=optim_sd,
                   options=StateDictOptions(strict=False))
    _restore_rng(state_dir / f"rng_{world.rank}.safetensors", trainer, world)


def _restore_rng(path: Path, trainer: TrainerState, world: World) -> None:
    """The random state (dropout) this rank had; one saved by a different number of ranks does not fit."""
    if trainer.world_size != world.size:
        log.warning("resume: the checkpoint was written by %d process(es), this run has %d; the random state "
                    "(dropout) starts afresh, so the run will not repeat the uninterrupted one exactly.",
                    trainer.world_size, world.size)
        return
    if not path.is_file():
        raise MftError(f"resume: {path} is missing; the checkpoint is incomplete (every rank writes its random "
                       "state there).")
    try:
        rng = load_file(str(path))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    except (SafetensorError, OSError, KeyError, RuntimeError, TypeError) as e:
        raise MftError(f"resume: {path} is not a random state mft wrote ({_os_error_text(e)}); "
                       "the checkpoint is damaged.") from None

