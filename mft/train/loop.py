"""The training loop: one flat function from a composed config to a finished run dir."""

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mft.build import build_model
from mft.checkpoint.adapter import write_adapter
from mft.checkpoint.consolidated import consolidated_state, write_consolidated
from mft.checkpoint.train_state import load_checkpoint, resolve_resume, save_checkpoint
from mft.config import TrainConfig, plain
from mft.data.batch import Batch
from mft.data.dataset import build_datasets
from mft.data.tokenizer import check_vocab, load_tokenizer
from mft.peft.lora import lora_state_dict
from mft.train.checks import check_config
from mft.train.evaluate import evaluate
from mft.train.loss import supervised_loss
from mft.train.metrics import MetricsLogger
from mft.train.optim import build_optimizer, build_scheduler, trainable_parameters
from mft.train.setup import describe_base, model_spec, save_base_model, train_runtime
from mft.utils.device import resolve_device, resolve_dtype
from mft.utils.distributed import World, all_reduce_sum, gather_objects
from mft.utils.dtensor import full_tensor
from mft.utils.errors import MftError

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Optional[Path]
    is_adapter: bool
    first_valid_loss: Optional[float]
    metrics: Dict[str, Any]
    preempted: bool = False  # stopped by SIGTERM after saving a checkpoint


def accumulate_gradients(model, group: list[Batch], device: torch.device, world: World = World(),
                         loss_chunk: int = 0) -> tuple[float, int]:
    """Backward over micro-batches so the gradient is the mean over all their supervised tokens.

    Each micro-batch's summed loss is divided by the whole group's supervised-token count, so
    grad_accum=k over k batches equals one batch holding all of them. Under FSDP the count is
    summed over ranks and the loss scaled by the world size (FSDP averages gradients over
    ranks), so N ranks equal one process with N times the batch. Returns (loss sum, tokens)
    over the whole step, every rank included.
    """
    local = sum(int(b.loss_mask.sum()) for b in group)
    supervised = max(1, int(all_reduce_sum(local, device)))
    loss_sum = 0.0
    for batch in group:
        sums = supervised_loss(model, batch.to(device), loss_chunk=loss_chunk)
        (sums.loss * world.size / supervised).backward()
        loss_sum += float(sums.loss.detach())
    return all_reduce_sum(loss_sum, device), supervised


def total_steps(cfg, num_sequences: int) -> int:
    """max_steps, or epochs over `num_sequences` (one rank's share under torchrun; both checked by check_config)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = math.ceil(num_sequences / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(cfg.epochs * per_epoch))


class Preemption:
    """SIGTERM (a scheduler's preemption or time limit) asks the loop to save and stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank got the signal."""
        return all_reduce_sum(float(self.requested), device) > 0

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def train(cfg: TrainConfig, run_dir: Path, world: World = World()) -> RunResult:
    run_dir = Path(run_dir)
    check_config(cfg)  # mft-train has run it already; here for callers that skip the CLI
    device = resolve_device(cfg.device, world.local_rank)
    dtype = resolve_dtype(cfg.precision, device)
    spec = model_spec(cfg)

    tokenizer = load_tokenizer(cfg.model.tokenizer)
    check_vocab(tokenizer, spec.args.vocab_size, cfg.model.name, cfg.model.tokenizer)
    train_set, valid_set = build_datasets(cfg.data, tokenizer)
    log.info("train data: %s", train_set.summary())
    if valid_set is not None:
        log.info("valid data: %s", valid_set.summary())

    model = build_model(spec, train_runtime(cfg, device, dtype, world))
    base_checkpoint = cfg.model.checkpoint
    if base_checkpoint is None:
        # A randomly initialised base is part of the result: keep it so the adapter stays usable.
        base_checkpoint = str(save_base_model(model, run_dir / "base_model", world))
    lora, args = spec.lora, spec.args
    torch.manual_seed(cfg.seed)  # dropout; the weights were drawn from their own generators
    n_train = sum(p.numel() for p in trainable_parameters(model))  # DTensor.numel() is the global size
    n_total = sum(p.numel() for p in model.parameters())
    log.info("model %s on %s/%s x %d process(es): %.2fM parameters, %.3fM trainable", cfg.model.name, device,
             dtype, world.size, n_total / 1e6, n_train / 1e6)

    steps = total_steps(cfg, len(train_set) // world.size)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    metrics = MetricsLogger(run_dir, cfg.logger, plain(cfg), enabled=world.is_main)
    base = describe_base(cfg.model, args, base_checkpoint, spec.quant)
    batches = train_set.iterator(cfg.batch_size, world.rank, world.size)

    def run_eval(step: int) -> Dict[str, float]:
        if valid_set is None:
            return {}
        result = evaluate(model, valid_set, cfg.batch_size, device, cfg.eval_batches, world.rank, world.size)
        metrics.log(step, result)
        log.info("step %d: valid_loss %.4f, perplexity %.2f, mean token accuracy %.3f", step,
                 result["valid_loss"], result["valid_perplexity"], result["valid_mean_token_accuracy"])
        return result

    def export(folder: Path, step: int) -> None:
        """The user-facing files: gathered on every rank, written by rank 0."""
        if lora is not None:
            state = lora_state_dict(model)
            if world.is_main:
                write_adapter(state, folder, lora, base, step=step)
        else:
            state = consolidated_state(model, keep=world.is_main)
            if world.is_main:
                write_consolidated(state, args, folder)

    def save(step: int) -> Path:
        # Each rank's data position: ranks can be in different epochs when batches do not divide evenly.
        trainer_state = {"scheduler": scheduler.state_dict(), "data": gather_objects(batches.state_dict())}
        return save_checkpoint(run_dir, step, world, lambda folder: export(folder, step), model, optimizer,
                               trainer_state)

    start = 0
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:
        trainer = load_checkpoint(resume_from, world, model, optimizer)
        scheduler.load_state_dict(trainer["scheduler"])
        data_states = trainer["data"]
        # Same world size: each rank continues exactly where it was; otherwise from rank 0's position.
        batches.load_state_dict(data_states[world.rank] if len(data_states) == world.size else data_states[0])
        start = trainer["step"]
        if start >= steps:
            raise MftError(f"resume: the checkpoint {resume_from} is at step {start}, already at or past the "
                           f"{steps} steps this run is set to train (raise max_steps or epochs).")
        log.info("resumed from %s at step %d", resume_from, start)
    elif cfg.resume == "auto":
        log.warning("resume=auto: no complete checkpoint in %s yet, starting from step 0", run_dir)

    model.train()
    first_valid = run_eval(0).get("valid_loss") if start == 0 else None
    last_eval: Dict[str, float] = {}
    record: Dict[str, float] = {}
    window_loss, window_tokens, window_inputs, window_start = 0.0, 0, 0, time.perf_counter()
    checkpoint, preempted, step = None, False, start
    preemption = Preemption()
    bar = tqdm(total=steps, initial=start, disable=not (cfg.progress and world.is_main), dynamic_ncols=True, desc="train")
    try:
        with logging_redirect_tqdm():
            for step in range(start + 1, steps + 1):
                group = [next(batches) for _ in range(cfg.grad_accum)]
                step_loss, supervised = accumulate_gradients(model, group, device, world, cfg.loss_chunk_tokens)
                window_inputs += sum(b.num_tokens for b in group) * world.size
                grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(
                    list(trainable_parameters(model)), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                ))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                window_loss += step_loss
                window_tokens += supervised
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss / supervised:.3f}", refresh=False)

                if step % cfg.logger.log_every == 0 or step == steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "train_loss": window_loss / window_tokens,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": window_inputs / elapsed,
                    }
                    metrics.log(step, record)
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    window_loss, window_tokens, window_inputs, window_start = 0.0, 0, 0, time.perf_counter()
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == steps:
                    last_eval = run_eval(step)
                preempted = preemption.agreed(device)
                if (cfg.save_every and step % cfg.save_every == 0) or step == steps or preempted:
                    checkpoint = save(step)
                if preempted:
                    log.warning("SIGTERM: saved %s at step %d and stopped", checkpoint, step)
                    break
    finally:
        bar.close()
        preemption.restore()

    summary = {"step": step, "train_loss": record.get("train_loss"), **last_eval, "preempted": preempted,
               "train_data": train_set.report(), "valid_data": valid_set.report() if valid_set else None}
    metrics.summary(summary)
    metrics.close()
    return RunResult(run_dir, checkpoint, lora is not None, first_valid, summary, preempted)
