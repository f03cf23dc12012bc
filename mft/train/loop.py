"""The training loop: one flat function from a composed config to a finished run dir."""

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
from omegaconf import OmegaConf
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mft.checkpoint.adapter import save_adapter
from mft.checkpoint.consolidated import save_consolidated
from mft.data.batch import Batch
from mft.data.dataset import build_datasets
from mft.data.tokenizer import load_tokenizer
from mft.errors import MftError
from mft.model.transformer import TransformerBlock
from mft.train.evaluate import evaluate
from mft.train.loss import supervised_loss
from mft.train.metrics import MetricsLogger
from mft.train.optim import build_optimizer, build_scheduler, trainable_parameters
from mft.train.setup import apply_peft, build_base_model, check_vocab, describe_base, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    is_adapter: bool
    first_valid_loss: Optional[float]
    metrics: Dict[str, Any]


def micro_batches(dataset, batch_size: int) -> Iterator[Batch]:
    """Batches forever, epoch after epoch (the dataset reshuffles per epoch)."""
    epoch = 0
    while True:
        yield from dataset.batches(batch_size, epoch)
        epoch += 1


def accumulate_gradients(model, group: list[Batch], device: torch.device) -> tuple[float, int]:
    """Backward over micro-batches so the gradient is the mean over all their supervised tokens.

    Each micro-batch's summed loss is divided by the whole group's supervised-token count, so
    grad_accum=k over k batches equals one batch holding all of them. Returns (loss sum, tokens).
    """
    supervised = max(1, sum(int(b.loss_mask.sum()) for b in group))
    loss_sum = 0.0
    for batch in group:
        sums = supervised_loss(model, batch.to(device))
        (sums.loss / supervised).backward()
        loss_sum += float(sums.loss.detach())
    return loss_sum, supervised


def total_steps(cfg, num_sequences: int) -> int:
    if cfg.max_steps is not None:
        if cfg.max_steps <= 0:
            raise MftError(f"max_steps must be positive, got {cfg.max_steps}.")
        return cfg.max_steps
    if cfg.epochs is None or cfg.epochs <= 0:
        raise MftError("Set max_steps or a positive epochs (both are null or non-positive).")
    per_epoch = math.ceil(num_sequences / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(cfg.epochs * per_epoch))


def train(cfg, run_dir: Path) -> RunResult:
    run_dir = Path(run_dir)
    if cfg.batch_size <= 0 or cfg.grad_accum <= 0:
        raise MftError(f"batch_size and grad_accum must be positive, got {cfg.batch_size} and {cfg.grad_accum}.")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)

    tokenizer = load_tokenizer(cfg.model.tokenizer)
    train_set, valid_set = build_datasets(cfg.data, tokenizer)
    log.info("train data: %s", train_set.summary())
    if valid_set is not None:
        log.info("valid data: %s", valid_set.summary())

    model, args = build_base_model(cfg.model, device, dtype)
    check_vocab(args, tokenizer, cfg.model.name, cfg.model.tokenizer)
    base_checkpoint = cfg.model.checkpoint
    if base_checkpoint is None:
        # A randomly initialised base is part of the result: keep it so the adapter stays usable.
        base_checkpoint = str(save_consolidated(model, run_dir / "base_model"))
    lora = apply_peft(model, cfg.peft)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerBlock))
    n_train = sum(p.numel() for p in trainable_parameters(model))
    n_total = sum(p.numel() for p in model.parameters())
    log.info("model %s on %s/%s: %.2fM parameters, %.3fM trainable", cfg.model.name, device, dtype, n_total / 1e6, n_train / 1e6)

    steps = total_steps(cfg, len(train_set))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    metrics = MetricsLogger(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True))
    base = describe_base(cfg.model, args, base_checkpoint)

    def run_eval(step: int) -> Dict[str, float]:
        if valid_set is None:
            return {}
        result = evaluate(model, valid_set, cfg.batch_size, device, cfg.eval_batches)
        metrics.log(step, result)
        log.info("step %d: valid_loss %.4f, perplexity %.2f, mean token accuracy %.3f", step,
                 result["valid_loss"], result["valid_perplexity"], result["valid_mean_token_accuracy"])
        return result

    def save(step: int) -> Path:
        folder = run_dir / "checkpoints" / f"step_{step:06d}"
        if lora is not None:
            return save_adapter(model, folder, lora, base, step=step)
        return save_consolidated(model, folder)

    model.train()
    batches = micro_batches(train_set, cfg.batch_size)
    first_valid = run_eval(0).get("valid_loss")
    last_eval: Dict[str, float] = {}
    window_loss, window_tokens, window_inputs, window_start = 0.0, 0, 0, time.perf_counter()
    checkpoint = None
    with logging_redirect_tqdm(), tqdm(total=steps, disable=not cfg.progress, dynamic_ncols=True, desc="train") as bar:
        for step in range(1, steps + 1):
            group = [next(batches) for _ in range(cfg.grad_accum)]
            step_loss, supervised = accumulate_gradients(model, group, device)
            window_inputs += sum(b.num_tokens for b in group)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                list(trainable_parameters(model)), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            )
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
            if (cfg.save_every and step % cfg.save_every == 0) or step == steps:
                checkpoint = save(step)

    summary = {"step": steps, "train_loss": record["train_loss"], **last_eval,
               "train_data": asdict(train_set.stats), "valid_data": asdict(valid_set.stats) if valid_set else None}
    metrics.summary(summary)
    metrics.close()
    return RunResult(run_dir, checkpoint, lora is not None, first_valid, summary)
