"""The training loop: one flat function from a composed config to a finished run dir."""

import dataclasses
import logging
import math
import signal
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mft.build import build_model
from mft.build.parallelize import compile_seconds
from mft.checkpoint.adapter import write_adapter
from mft.checkpoint.consolidated import stream_consolidated
from mft.checkpoint.train_state import (
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
    trainer_file,
)
from mft.config import TrainConfig, plain
from mft.data.batch import Batch
from mft.data.dataset import PackedDataset, build_datasets
from mft.data.tokenizer import check_vocab, load_tokenizer
from mft.peft.lora import lora_state_dict, lora_step_copies
from mft.train.checks import check_config
from mft.train.evaluate import evaluate
from mft.train.loss import supervised_loss
from mft.train.metrics import MetricsLogger, RunStatus, StartupTimes, failure_message
from mft.train.optim import build_optimizer, build_scheduler, trainable_parameters
from mft.train.resume import check_resume_fits, check_run_dir, random_base_to_resume
from mft.train.routing import RoutingWindow, moe_layers, parameter_counts, set_aux_loss_scale
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
    stopped_by: Optional[str] = None  # "SIGTERM" or "SIGINT" when a signal stopped the run after saving
    base_kept: bool = True  # False: LoRA on a random base that save_random_base=false did not keep


def accumulate_gradients(model, group: list[Batch], device: torch.device, world: World = World(),
                         loss_chunk: int = 0, aux_loss_coef: float = 0.0,
                         routing: Optional[RoutingWindow] = None) -> tuple[float, int]:
    """Backward over micro-batches so the gradient is the mean over all their supervised tokens.

    Each micro-batch's summed loss is divided by the whole group's supervised-token count, so
    grad_accum=k over k batches equals one batch holding all of them. Under FSDP the count is
    summed over ranks and the loss scaled by the world size (FSDP averages gradients over
    ranks), so N ranks equal one process with N times the batch. Returns (loss sum, tokens)
    over the whole step, every rank included (the cross-entropy only).

    A mixture of experts with `aux_loss_coef` > 0 adds coef * the mean over its layers of their
    load-balancing losses, each micro-batch's weighing 1 / len(group) (and, through FSDP's
    average, each rank's 1 / world): the loss is a mean per micro-batch, not a sum over tokens.
    `routing` collects the routers' statistics after each micro-step.
    """
    if aux_loss_coef:
        set_aux_loss_scale(moe_layers(model), aux_loss_coef, len(group))
    local = sum(int(b.loss_mask.sum()) for b in group)
    supervised = max(1, int(all_reduce_sum(local, device)))
    loss_sum = 0.0
    with lora_step_copies(model):  # LoRA factors cast once for all micro-steps
        for batch in group:
            sums = supervised_loss(model, batch.to(device), loss_chunk=loss_chunk)
            (sums.loss * world.size / supervised).backward()
            loss_sum += float(sums.loss.detach())
            if routing is not None:
                routing.add()
    return all_reduce_sum(loss_sum, device), supervised


def total_steps(cfg, num_sequences: int) -> int:
    """max_steps, or epochs over `num_sequences` (one rank's share under torchrun; both checked by check_config)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = math.ceil(num_sequences / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(cfg.epochs * per_epoch))


class StopSignals:
    """SIGTERM (a scheduler's preemption or time limit) and Ctrl-C ask the loop to save and stop.

    A second Ctrl-C aborts at once (KeyboardInterrupt), without saving.
    """

    def __init__(self) -> None:
        self.received: Optional[str] = None  # the first signal's name
        self._interrupts = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # torchrun's own SIGTERM after a Ctrl-C does not count
                raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank got a signal."""
        return all_reduce_sum(float(self.received is not None), device) > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepWindow:
    """The optimizer steps since the last train record: their loss, tokens and skipped updates."""

    def __init__(self) -> None:
        self.loss, self.supervised, self.inputs, self.steps, self.skipped = 0.0, 0, 0, 0, 0
        self.real, self.supervised_seen = 0, 0
        self.started = time.perf_counter()

    def add(self, loss_sum: float, supervised: int, inputs: int, applied: bool, real: int = 0) -> None:
        """One step: its summed loss over `supervised` targets, `inputs` positions of which `real`
        hold data (the rest is packing padding); `applied`: its update was not skipped."""
        self.steps += 1
        self.inputs += inputs
        self.real += real
        self.supervised_seen += supervised
        if applied:
            self.loss += loss_sum
            self.supervised += supervised
        else:
            self.skipped += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (an evaluation, a checkpoint) does not count towards tokens/s."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - begin

    def record(self, lr: float, grad_norm: float) -> Dict[str, Any]:
        """train_loss is over the applied steps (null when every step was skipped)."""
        elapsed = time.perf_counter() - self.started
        record = {
            "train_loss": self.loss / self.supervised if self.supervised else None,
            "lr": lr,
            "grad_norm": grad_norm,
            # All positions (the model's work), the ones that hold data, the ones trained on.
            "tokens_per_s": self.inputs / elapsed,
            "real_tokens_per_s": self.real / elapsed,
            "supervised_tokens_per_s": self.supervised_seen / elapsed,
        }
        if self.skipped:
            record["skipped_steps"] = self.skipped
        return record


def check_finite_weights(model, device: torch.device, step: int) -> None:
    """Never write a checkpoint holding NaN or inf."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in trainable_parameters(model)]
    # One device sync for all tensors, not one per tensor.
    bad = int((~torch.stack([torch.isfinite(t).all() for t in local])).sum()) if local else 0
    if all_reduce_sum(float(bad), device) > 0:
        raise MftError(f"step {step}: the trained weights hold NaN or inf, so no checkpoint was written. "
                       "Lower optim.lr, or check the data and precision.")


def nonfinite_stop(step: int, count: int, loss: float, grad_norm: float, cfg: TrainConfig, run_dir: Path) -> MftError:
    last = latest_checkpoint(run_dir)
    return MftError(
        f"step {step}: the loss ({loss}) or gradient norm ({grad_norm}) was NaN or inf in {count} steps in a row "
        f"(max_nonfinite_steps={cfg.max_nonfinite_steps}); those updates were skipped and training stopped. "
        f"Usual causes: a learning rate too high (optim.lr={cfg.optim.lr:g}), fp16 overflow (use precision=bf16), "
        f"or corrupt data. Nothing non-finite was saved; the latest checkpoint is {last or 'none (none was written)'}."
    )


def data_report(dataset: PackedDataset) -> Dict[str, Any]:
    """A dataset's report for the run summary, with its skipped rows counted by reason (the row error codes)."""
    stores = {id(part.store): part.store for part in dataset.parts}.values()  # a file listed twice is read once
    reasons = Counter(code for store in stores for _, code, _ in store.errors)
    return {**dataset.report(), "skipped_by_reason": dict(sorted(reasons.items()))}


def train(cfg: TrainConfig, run_dir: Path, world: World = World()) -> RunResult:
    started = time.perf_counter()
    startup = StartupTimes(started)
    run_dir = Path(run_dir)
    check_config(cfg)  # mft-train has run it already; here for callers that skip the CLI
    device = resolve_device(cfg.device, world.local_rank)
    dtype = resolve_dtype(cfg.precision, device)
    spec = model_spec(cfg)
    resume_from = resolve_resume(cfg.resume, run_dir)
    check_run_dir(run_dir, bool(cfg.resume), resume_from)
    recorded = read_trainer_state(trainer_file(resume_from)) if resume_from is not None else None
    if recorded is not None:
        check_resume_fits(recorded, cfg, resume_from)
    saved_base = random_base_to_resume(cfg, run_dir, resume_from, recorded)
    run_dir.mkdir(parents=True, exist_ok=True)  # Hydra's app made it already; a caller of train() may not have
    if saved_base is not None:
        spec = dataclasses.replace(spec, weights=str(saved_base))

    with startup.phase("data"):
        tokenizer = load_tokenizer(cfg.model.tokenizer)
        check_vocab(tokenizer, spec.args.vocab_size, cfg.model.name, cfg.model.tokenizer)
        train_set, valid_set = build_datasets(cfg.data, tokenizer)
    log.info("train data: %s", train_set.summary())
    if valid_set is not None:
        log.info("valid data: %s", valid_set.summary())

    runtime = train_runtime(cfg, device, dtype, world)
    with startup.phase("model build"):
        model = build_model(spec, runtime)
    lora, args = spec.lora, spec.args
    random_base = cfg.model.checkpoint is None
    # A random base is part of a LoRA run's result: its adapter is usable, and resumable, only with it.
    # It is written with the first checkpoint, not before the first step (a full fine-tuning
    # checkpoint holds every weight and needs none).
    base_pending = random_base and lora is not None and cfg.save_random_base and saved_base is None
    if saved_base is not None:
        base_checkpoint = str(saved_base)
        log.info("the random base drawn when this run started: %s", saved_base)
    elif base_pending:
        base_checkpoint = str(run_dir / "base_model")
    elif random_base:
        base_checkpoint = None
        if lora is not None:
            log.warning("save_random_base=false: the random base is not kept, so the adapters this run saves can "
                        "neither be loaded (mft-generate, mft-export) nor resumed.")
    else:
        base_checkpoint = cfg.model.checkpoint
    torch.manual_seed(cfg.seed)  # dropout; the weights were drawn from their own generators
    n_train = sum(p.numel() for p in trainable_parameters(model))  # DTensor.numel() is the global size
    n_total, n_active = parameter_counts(args)
    log.info("model %s on %s/%s x %d process(es): %.2fM parameters%s, %.3fM trainable", cfg.model.name, device,
             dtype, world.size, n_total / 1e6,
             f" ({n_active / 1e6:.2f}M active per token)" if n_active != n_total else "", n_train / 1e6)
    routing = RoutingWindow(moe_layers(model))

    steps = total_steps(cfg, len(train_set) // world.size)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    drawn_with = recorded.seed if recorded is not None and recorded.seed is not None else cfg.seed
    base = describe_base(cfg.model, args, base_checkpoint, spec.quant,
                         random_draw={"seed": drawn_with, "saved": base_checkpoint is not None} if random_base else None)
    batches = train_set.iterator(cfg.batch_size, world.rank, world.size)

    start = 0
    if resume_from is not None:
        with startup.phase("resume"):
            load_checkpoint(resume_from, recorded, world, model, optimizer)
        try:
            scheduler.load_state_dict(recorded.scheduler)
            lrs = scheduler.get_last_lr()
            if len(lrs) != len(optimizer.param_groups) or not all(isinstance(lr, float) and math.isfinite(lr)
                                                                  for lr in lrs):
                raise ValueError(f"learning rates {lrs}")
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr  # the checkpoint holds tensors only: the rate comes back from the schedule
            # Same world size: each rank continues exactly where it was; otherwise from rank 0's position.
            batches.load_state_dict(recorded.data[world.rank] if len(recorded.data) == world.size else recorded.data[0])
        except (KeyError, TypeError, ValueError, IndexError, MftError) as e:
            raise MftError(f"resume: {trainer_file(resume_from)} holds a schedule or data position this run cannot "
                           f"use ({type(e).__name__}: {e}); the checkpoint is damaged, or the data config "
                           "changed.") from None
        start = recorded.step
        if start >= steps:
            raise MftError(f"resume: the checkpoint {resume_from} is at step {start}, already at or past the "
                           f"{steps} steps this run is set to train (raise max_steps or epochs).")
        log.info("resumed from %s at step %d", resume_from, start)
    elif cfg.resume == "auto":
        log.warning("resume=auto: no complete checkpoint in %s yet, starting from step 0", run_dir)
    # A resumed run's metrics read as one run: what the interrupted start logged after its checkpoint goes.
    metrics = MetricsLogger(run_dir, cfg.logger, plain(cfg), enabled=world.is_main, start_step=start)

    def run_eval(step: int) -> Dict[str, float]:
        if valid_set is None:
            return {}
        result = evaluate(model, valid_set, cfg.batch_size, device, cfg.eval_batches, world.rank, world.size)
        metrics.log(step, result)
        log.info("step %d: valid_loss %.4f, perplexity %.2f, mean token accuracy %.3f", step,
                 result["valid_loss"], result["valid_perplexity"], result["valid_mean_token_accuracy"])
        if not math.isfinite(result["valid_loss"]):  # weights that diverged can still be finite
            raise MftError(f"step {step}: the validation loss is {result['valid_loss']}: the weights have diverged, "
                           f"so training stopped before saving them. Lower optim.lr (now {cfg.optim.lr:g}) or check "
                           f"the data and precision; the latest checkpoint is {latest_checkpoint(run_dir) or 'none'}.")
        return result

    def export(folder: Path, step: int) -> None:
        """The user-facing files: gathered on every rank, written by rank 0."""
        if lora is not None:
            state = lora_state_dict(model)
            if world.is_main:
                write_adapter(state, folder, lora, base, step=step)
        else:
            stream_consolidated(model, folder if world.is_main else None)

    def save(step: int) -> Path:
        nonlocal base_pending
        check_finite_weights(model, device, step)
        if base_pending:  # before the first checkpoint, whose adapter names it
            begin = time.perf_counter()
            try:
                save_base_model(model, Path(base_checkpoint), world)
            except OSError as e:
                raise MftError(f"step {step}: writing the random base to {base_checkpoint} failed ({e}), so no "
                               "checkpoint was written (an adapter is usable only with its base). Free disk space, "
                               "or set save_random_base=false to keep no base.") from None
            base_pending = False
            log.info("saved the random base to %s in %.1f s", base_checkpoint, time.perf_counter() - begin)
        # Each rank's data position: ranks can be in different epochs when batches do not divide evenly.
        trainer_state = {"scheduler": scheduler.state_dict(), "data": gather_objects(batches.state_dict()),
                         "seed": cfg.seed, "base": str(Path(base_checkpoint).resolve()) if base_checkpoint else None,
                         "random_base": random_base}
        return save_checkpoint(run_dir, step, world, lambda folder: export(folder, step), model, optimizer,
                               trainer_state)

    def log_window(step: int, grad_norm: float) -> Dict[str, Any]:
        record = {**window.record(scheduler.get_last_lr()[0], grad_norm), **routing.record()}
        metrics.log(step, record)
        log.info("step %d: train_loss %s, lr %.3g, grad_norm %.4g, %.0f tokens/s%s%s", step,
                 "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}", record["lr"],
                 record["grad_norm"], record["tokens_per_s"],
                 f", router aux loss {record['router_aux_loss']:.4f}, expert load max {record['expert_load_max']:.2f}"
                 if "router_aux_loss" in record else "",
                 f", {window.skipped} non-finite step(s) skipped" if window.skipped else "")
        return record

    model.train()
    compile_before = compile_seconds()  # this process may have compiled before (a multirun's earlier points)
    last_eval: Dict[str, float] = {}
    record: Dict[str, Any] = {}
    window = StepWindow()
    checkpoint, stopped_by, step, skipped, nonfinite_in_a_row = None, None, start, 0, 0
    signals = StopSignals()
    bar = tqdm(total=steps, initial=start, disable=not (cfg.progress and world.is_main), dynamic_ncols=True, desc="train")
    # In the summary however the run ends.
    facts = {"total_steps": steps, "start_step": start, "world_size": world.size, "parameters": n_total,
             "active_parameters": n_active, "trainable_parameters": n_train, "train_data": data_report(train_set),
             "valid_data": data_report(valid_set) if valid_set else None}
    try:
        with logging_redirect_tqdm():
            with startup.phase("evaluation"):
                first_valid = run_eval(0).get("valid_loss") if start == 0 and cfg.eval_at_start else None
            window = StepWindow()  # the first tokens/s counts training steps only, not the step-0 evaluation
            first_step_began = time.perf_counter()
            for step in range(start + 1, steps + 1):
                group = [next(batches) for _ in range(cfg.grad_accum)]
                step_loss, supervised = accumulate_gradients(model, group, device, world, cfg.loss_chunk_tokens,
                                                             cfg.router_aux_loss_coef, routing)
                grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(
                    list(trainable_parameters(model)), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                )))
                finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
                if finite:  # every rank sees the same all-reduced loss and norm, so all skip together
                    try:
                        optimizer.step()
                    except RuntimeError as e:
                        if "overflow" not in str(e):
                            raise
                        raise MftError(f"step {step}: the AdamW update overflowed ({e}); optim.lr={cfg.optim.lr:g} "
                                       "is far too high. Nothing was saved at this step; the latest checkpoint is "
                                       f"{latest_checkpoint(run_dir) or 'none'}.") from None
                    nonfinite_in_a_row = 0
                else:
                    skipped += 1
                    nonfinite_in_a_row += 1
                    log.warning("step %d: loss %s, gradient norm %s: update skipped", step, step_loss / supervised,
                                grad_norm)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if step == start + 1 and runtime.compile:
                    log.info("torch.compile: %.1f s spent compiling the blocks by the end of the first step "
                             "(forward and backward, the first evaluation's included)", compile_seconds() - compile_before)
                # Every rank has as many positions; its real ones x ranks estimates theirs (no extra sync).
                window.add(step_loss, supervised, sum(b.num_tokens for b in group) * world.size, applied=finite,
                           real=sum(b.num_real_tokens for b in group) * world.size)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss / supervised:.3f}", refresh=False)
                if startup.total is None:
                    startup.parts["first step"] = time.perf_counter() - first_step_began
                    startup.finish()
                    log.info("%s", startup.line())
                if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    log_window(step, grad_norm)
                    raise nonfinite_stop(step, nonfinite_in_a_row, step_loss / supervised, grad_norm, cfg, run_dir)

                if step % cfg.logger.log_every == 0 or step == steps:
                    record = log_window(step, grad_norm)
                    bar.set_postfix(loss="n/a" if record["train_loss"] is None else f"{record['train_loss']:.3f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                    window = StepWindow()
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == steps:
                    with window.paused():  # tokens/s is the training steps' own speed
                        last_eval = run_eval(step)
                stopping = signals.agreed(device)
                if (cfg.save_every and step % cfg.save_every == 0) or step == steps or stopping:
                    if window.steps:  # the steps a checkpoint holds are all in metrics.jsonl
                        record = log_window(step, grad_norm)
                        window = StepWindow()
                    with window.paused():
                        checkpoint = save(step)
                if stopping and step < steps:  # a signal during the last step: the run has finished anyway
                    stopped_by = signals.received or "a signal on another rank"
                    log.warning("%s: saved %s at step %d and stopped", stopped_by, checkpoint, step)
                    break
        summary = {"step": step, "status": RunStatus.preempted.value if stopped_by else RunStatus.finished.value,
                   "wall_time_s": metrics.earlier_wall_time_s + time.perf_counter() - started, "train_loss": record.get("train_loss"), **last_eval,
                   "stopped_by": stopped_by, "skipped_nonfinite_steps": skipped, **startup.record(),
                   "compile_s": compile_seconds() - compile_before if runtime.compile else None, **facts}
        metrics.summary(summary)
    except BaseException as e:  # the run's outcome whatever stopped it (mft-train prints the error itself)
        metrics.summary({"step": step, "status": RunStatus.failed.value, "error": failure_message(e),
                         "wall_time_s": metrics.earlier_wall_time_s + time.perf_counter() - started,
                         **startup.record(), **facts})
        raise
    finally:
        bar.close()
        signals.restore()
        metrics.close()
    return RunResult(run_dir, checkpoint, lora is not None, first_valid, summary, stopped_by,
                     base_kept=not (lora is not None and random_base and base_checkpoint is None))
