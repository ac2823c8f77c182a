"""The per-worker training loop that Ray Train runs: DeepSpeed ZeRO on streamed shards.

Every rank runs the same fixed number of micro-batches per epoch (computed by the driver from the
manifest, see :class:`~enigma.train.plan.RunPlan`), so no rank waits on a collective that another
never reaches. Checkpoints and the export live in :mod:`enigma.train.checkpoint`, the learning
rate in :mod:`enigma.train.schedule`, TensorBoard and the driver's progress lines in
:mod:`enigma.train.progress`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint, deepspeed_json
from .checkpoint import CHECKPOINT_TMP, TrainState
from .config import TrainConfig
from .export import export_model, render_card
from .plan import RunSpec
from .progress import Reporter, run_hparams
from .schedule import lr_at

EVAL_PROGRESS_S = 5.0  # a line at most this often while an evaluation runs


def mean_over_workers(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def train_batches(spec: RunSpec, rank: int, state: TrainState):
    """Micro-batches for ever, ``plan.micro_per_epoch`` per epoch on every rank: the rank's span
    of each epoch's order (:mod:`enigma.data.epochs`), resuming at ``state.micro_in_epoch`` of
    ``state.epoch`` without reading what came before."""
    cfg, plan, order = spec.train, spec.plan, spec.epoch_order("train")
    span = plan.micro_per_epoch * cfg.micro_batch
    start = rank * span
    while True:
        skip = state.micro_in_epoch
        batches = order.batches(state.epoch, start, start + span, cfg.micro_batch, skip)
        for seen, batch in enumerate(batches, start=skip + 1):
            state.micro_in_epoch = seen
            yield batch
        if state.micro_in_epoch < plan.micro_per_epoch:
            raise RuntimeError(f"rank {rank}'s span ran out after {state.micro_in_epoch} of "
                               f"{plan.micro_per_epoch} micro-batches")  # fmt: skip
        state.epoch += 1
        state.micro_in_epoch = 0


def val_batches(spec: RunSpec, rank: int) -> list[dict]:
    """The rank's ``plan.eval_batches`` micro-batches of val, the same at every evaluation."""
    size = spec.train.micro_batch
    span = spec.plan.eval_batches * size
    return list(spec.epoch_order("val").batches(0, rank * span, (rank + 1) * span, size))


def model_inputs(batch: dict, device) -> dict:
    """A micro-batch as the model's keyword arguments: pretraining blocks learn every next
    token; fine-tuning rows carry their labels (the assistant's tokens) and attention mask."""
    ids = batch["input_ids"].to(device).long()
    inputs = {"input_ids": ids, "labels": ids}
    if "labels" in batch:
        inputs["labels"] = batch["labels"].to(device).long()
        inputs["attention_mask"] = batch["attention_mask"].to(device).long()
    return inputs


@torch.no_grad()
def evaluate(engine, batches: list[dict], progress=None) -> float:
    """Mean val loss over this rank's ``batches``; ``progress(done, total)`` is called every few
    seconds of a long evaluation."""
    engine.eval()
    total, seen = 0.0, 0
    said = time.perf_counter()
    for batch in batches:
        total += engine(**model_inputs(batch, engine.device)).loss.float().item()
        seen += 1
        if progress and time.perf_counter() - said > EVAL_PROGRESS_S:
            progress(seen, len(batches))
            said = time.perf_counter()
    engine.train()
    return mean_over_workers([total / max(seen, 1)], engine.device)[0]


@torch.no_grad()
def machine_reconstruction(model, ids: torch.Tensor) -> float:
    """‖x − E⁻¹(E(x))‖/‖x‖ of the machine on this batch's embeddings (every rank calls it:
    under ZeRO-3 the parameter gathers are collectives)."""
    if model.machine is None:
        return 0.0
    import deepspeed

    x = model.embed(ids[:2]).float()
    positions = torch.arange(ids.shape[1], device=ids.device)
    # Inside reversible layers' stack (a ZeRO-3 leaf) the machine has no gathering hooks of its
    # own; outside ZeRO-3 this gathers nothing.
    inside_stack = getattr(model, "stack", None) is not None
    params = list(model.machine.parameters()) if inside_stack else []
    with deepspeed.zero.GatheredParameters(params, enabled=inside_stack):
        y = model.machine(x, positions)
        back = model.machine.inverse(y, positions)
    return ((back - x).norm() / x.norm()).item()


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def assign_accelerator(use_gpu: bool) -> None:
    """DeepSpeed's accelerator follows this worker's device, whatever the process inherited
    (a driver that ran on CPU earlier exports ``DS_ACCELERATOR=cpu`` to a local cluster)."""
    name = "cuda" if use_gpu else "cpu"
    os.environ["DS_ACCELERATOR"] = name
    from deepspeed.accelerator import real_accelerator

    current = real_accelerator.ds_accelerator
    if current is not None and current._name != name:
        real_accelerator.ds_accelerator = None  # detected again, from the variable above


def make_engine(model, cfg: TrainConfig, ds_config: dict, device: torch.device, agree=None):
    """``deepspeed.initialize`` of ``model`` as training runs it: Transformer layers checkpointed
    through DeepSpeed's API, the machine compiled where ``compile_machine`` says, and the
    optimizer :func:`enigma.train.optimizer.choose` picks on this machine. Returns the engine and
    the line saying which optimizer and why."""
    import deepspeed

    from .config import compiles_layers, compiles_machine
    from .optimizer import choose

    config = getattr(model, "config", None)  # reversible layers switch checkpointing off there
    rebuilt = getattr(config, "reversible_layers", True)  # no config: no layers to checkpoint
    if cfg.checkpointing == "on" and not rebuilt:
        if "activation_checkpointing" in ds_config:
            deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
            # Through DeepSpeed's API (configured above); the model's own code never imports
            # DeepSpeed, so an exported model loads where it is not installed.
            model._set_gradient_checkpointing(True, deepspeed.checkpointing.checkpoint)
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
    stage = deepspeed_json.zero_stage(ds_config)
    if stage == 3:  # a reversible chain's backward needs all of its parameters at once
        from deepspeed.utils import set_z3_leaf_module

        for leaf in getattr(model, "zero3_leaves", list)():
            set_z3_leaf_module(leaf, True)
    machine = getattr(model, "machine", None)  # EnigmaLM's; None in the plain Transformer
    on_cuda = device.type == "cuda"
    if config is not None and compiles_layers(cfg, on_cuda, stage):
        model.compile_layers()
    if machine is not None and compiles_machine(cfg, on_cuda, stage, machine.memory_efficient):
        machine.compile()  # in place: parameter names and checkpoints stay the same
    choice = choose(ds_config, device, agree)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],  # LoRA: its own
        optimizer=choice.client_optimizer,
        config=choice.config,
    )
    return engine, choice.line


def build_engine(spec: RunSpec):
    """EnigmaLM with identical initial weights on every rank, wrapped by :func:`make_engine`
    (``deepspeed.initialize`` adopts the process group Ray Train set up)."""
    assign_accelerator(spec.use_gpu)
    import deepspeed

    from ..models.lm import EnigmaLM

    deepspeed.init_distributed()
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    cfg, line = resolve_checkpointing(spec.train, device)
    torch.manual_seed(cfg.seed)
    if cfg.base_model:
        from .tuning import build_model

        model = build_model(cfg)
    else:
        model = EnigmaLM(cfg.model_config())
    agree = lambda ok: not any_rank(not ok, device)  # every rank takes the same optimizer
    engine, optimizer_line = make_engine(model, cfg, spec.deepspeed_config, device, agree)
    return engine, [optimizer_line, *([line] if line else [])]


def resolve_checkpointing(cfg: TrainConfig, device) -> tuple[TrainConfig, str | None]:
    """``activation_checkpointing="auto"`` decided on every rank, all agreeing (see
    :mod:`enigma.train.checkpointing`); returns the config with it on or off and the line."""
    if cfg.checkpointing != "auto" or cfg.model_config().reversible_layers:
        return cfg, None
    import ray.train

    from .checkpointing import decide

    here = ray.train.get_context().get_local_world_size()
    on, line = decide(cfg.model_config(), cfg, device, here, lambda need: any_rank(need, device))
    return cfg.replace(activation_checkpointing="on" if on else "off"), line


def any_rank(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is true on any (a collective: every rank calls it)."""
    return mean_over_workers([1.0 if flag else 0.0], device)[0] > 0


def restore(engine, spec: RunSpec, notes: list[str]) -> TrainState:
    """The checkpoint the driver chose, checked and printed; after a worker restart within this
    run, Ray's latest first, when it is newer than that choice (one this run wrote since; the
    choice is the fallback). Ray's record of an earlier run may lag behind the checkpoints on
    disk, or name one the driver passed over: it never overrides the choice. When there was a
    checkpoint and none loads, the run fails: a failed load never becomes a fresh start (see
    :func:`load_agreed`)."""
    import ray.train

    latest = ray.train.get_checkpoint()
    chosen = ray.train.Checkpoint(spec.resume_from) if spec.resume_from else None
    candidates = [chosen] if chosen else []
    if latest is not None and _step_of(latest.path) > (_step_of(chosen.path) if chosen else -1):
        candidates.insert(0, latest)
    return load_agreed(engine, candidates, notes)


def _step_of(path: str) -> int:
    """The step in a checkpoint's name (``step-0000010``: 10), -1 for another name."""
    name = str(path).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    digits = name.removeprefix("step-")
    return int(digits) if name.startswith("step-") and digits.isdigit() else -1


def load_agreed(engine, candidates: list, notes: list[str]) -> TrainState:
    """Load the first of ``candidates`` (``ray.train.Checkpoint``s) that every rank finds
    complete. Each rank checks what it will read before any rank loads, and the ranks agree
    (a collective), so that no rank enters a load, whose collectives (ZeRO-3's gathers) the
    others would never join, while another gives up; one passed over is reported in
    ``notes``."""
    for found in candidates:
        with found.as_directory() as directory:
            problem = checkpoint.damage(directory)
            if not any_rank(problem is not None, engine.device):
                return checkpoint.restore(engine, directory)
        notes.append(f"checkpoint {found.path} was passed over ({problem or 'on another rank'})")
    if candidates:
        raise RuntimeError("no checkpoint could be loaded: " + "; ".join(notes))
    return TrainState()


class Worker:
    """One rank's run: the engine, its state, its shards and the rank-0 reporter."""

    def __init__(self, spec: RunSpec, queue=None):
        import ray.train

        self.spec, self.cfg, self.plan = spec, spec.train, spec.plan
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.engine, lines = build_engine(spec)
        self.stage = deepspeed_json.zero_stage(spec.deepspeed_config)
        notes: list[str] = []
        self.state = restore(self.engine, spec, notes)
        self.state.fingerprint, self.state.precision = spec.fingerprint, self.cfg.precision
        tensorboard = spec.local_dir("tensorboard")
        upload = None
        if spec.storage.remote:
            upload = lambda: spec.storage.upload(Path(tensorboard), "tensorboard")
        self.reporter = Reporter(
            self.rank, f"{tensorboard}/{self.cfg.resolved_run_name}", queue, self.state.step,
            upload, hparams=run_hparams(self.cfg, self.stage),
        )  # fmt: skip
        for note in [*lines, *notes]:
            self.reporter.note(note)
        self.val: list[dict] | None = None  # read at the first evaluation, then kept
        self.batches = train_batches(spec, self.rank, self.state)
        self.interval = {"loss": 0.0, "steps": 0, "start": time.perf_counter()}

    def step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step of ``grad_accum`` micro-batches; returns the last ids and the lr."""
        lr = lr_at(self.state.step, self.cfg, self.plan.total_steps, self.plan.warmup_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(self.cfg.grad_accum):
            inputs = model_inputs(next(self.batches), self.engine.device)
            ids = inputs["input_ids"]
            loss = self.engine(**inputs).loss
            self.engine.backward(loss)
            self.engine.step()
            # Summed on the device: a .item() here would sync the host every micro-batch.
            self.interval["loss"] += loss.detach().float() / self.cfg.grad_accum
        self.state.step += 1
        self.state.tokens += self.spec.tokens_per_step
        self.interval["steps"] += 1
        return ids, lr

    def log(self, ids: torch.Tensor, lr: float) -> None:
        """The interval's mean loss over every rank, and what rank 0 reports with it."""
        steps, elapsed = self.interval["steps"], time.perf_counter() - self.interval["start"]
        loss, grad_norm = mean_over_workers(
            [
                float(self.interval["loss"]) / steps,
                float(self.engine.get_global_grad_norm() or 0.0),
            ],
            self.engine.device,
        )
        line = {
            "step": self.state.step,
            "total": self.plan.total_steps,
            "loss": loss,
            "ppl": math.exp(min(loss, 50)),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": self.spec.tokens_per_step * steps / elapsed,
            "memory_mb": memory_mb(self.engine.device),
            "machine_reconstruction_error": machine_reconstruction(self.engine.module, ids),
            "torch_threads": torch.get_num_threads(),
        }
        self.state.tokens_per_sec = line["tokens_per_sec"]
        self.reporter.train(line)
        self.interval = {"loss": 0.0, "steps": 0, "start": time.perf_counter()}

    def tick(self) -> None:
        """Between log lines, rank 0 says where it is at least every half minute (no collective:
        the loss waits for the next log line)."""
        steps, elapsed = self.interval["steps"], time.perf_counter() - self.interval["start"]
        rate = self.spec.tokens_per_step * steps / max(elapsed, 1e-9)
        self.reporter.tick(self.state.step, self.plan.total_steps, rate)

    def report(self, metrics: dict, with_checkpoint: bool) -> None:
        """Report to Ray Train; with a checkpoint, every rank writes its shard of it."""
        import ray.train

        if not with_checkpoint:
            ray.train.report(metrics)
            return
        self.check_fence()  # nothing of a generation taken over reaches the storage
        self.reporter.persist()
        tmp_root = self.cfg.checkpoint_tmp_dir or str(Path(self.spec.output_dir) / CHECKPOINT_TMP)
        self.fill_disk()
        try:
            local = checkpoint.save(
                self.engine, self.state, self.rank, tmp_root, self.spec.run_info()
            )
        except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as either
            free = shutil.disk_usage(tmp_root).free / 2**20
            raise RuntimeError(
                f"step {self.state.step}: writing the checkpoint under {tmp_root} failed ({err}; "
                f"{free:,.0f} MB free there); is the disk full? The previous checkpoint is "
                "intact: free space, then rerun the same command to resume from it"
            ) from err
        try:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(local),
                checkpoint_dir_name=f"step-{self.state.step:07d}",
            )
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def validate_and_checkpoint(self) -> bool:
        """Evaluate, export on a new best, report with a checkpoint; True to stop early."""
        state = self.state
        say = lambda done, total: self.reporter.note(
            f"evaluating @ step {state.step}: {done}/{total} batches"
        )
        if self.val is None:
            self.val = val_batches(self.spec, self.rank)
        val = evaluate(self.engine, self.val, say)
        state.last_val, state.last_val_step = val, state.step
        if state.first_val is None:
            state.first_val = val
        improved = val < state.best_val
        if improved:
            state.best_val, state.best_step, state.bad_evals = val, state.step, 0
            self.export()
        else:
            state.bad_evals += 1
        metrics = {"step": state.step, "val_loss": val, "val_ppl": math.exp(min(val, 50))}
        metrics.update(best_val_loss=state.best_val, epoch=state.epoch)
        metrics.update(tokens_per_sec=state.tokens_per_sec, tokens=state.tokens)
        self.reporter.eval(metrics, improved)
        self.report(metrics, with_checkpoint=True)
        patience = self.cfg.early_stop_patience  # 0: never stop early
        return patience > 0 and state.bad_evals >= patience

    def export(self) -> None:
        """Export the best model; a failure on any rank ends every rank now, with the cause,
        instead of leaving the others waiting in the next collective."""
        out = Path(self.spec.local_dir("model"))
        self.check_fence()
        error = None
        try:
            state = self.state
            card = lambda model: render_card(model, self.spec.run_info(), state.best_val,
                                             state.best_step)  # fmt: skip
            if self.cfg.base_model:
                from .export import export_finetuned

                export_finetuned(self.engine, self.cfg, self.spec, self.rank, self.stage, card)
            else:
                export_model(
                    self.engine, self.cfg.model_config(), out, self.spec.tokenizer_dir,
                    self.rank, self.stage, card,
                )  # fmt: skip
            if self.rank == 0 and self.spec.storage.remote:
                for name in ("model", "adapter"):
                    if Path(self.spec.local_dir(name)).is_dir():
                        self.upload(name)
        except Exception as err:  # re-raised below, after every rank knows
            error = err
        if any_rank(error is not None, self.engine.device):
            if error is not None:
                raise error
            raise RuntimeError(f"step {self.state.step}: exporting {out} failed on another rank")

    def check_fence(self) -> None:
        """Every rank stops (:class:`~enigma.storage.fence.Fenced`) when a newer generation
        took the run over: rank 0 reads the fence, the ranks agree."""
        from ..storage import fence as fences

        error = None
        if self.rank == 0:
            try:
                fences.check(self.spec.storage, self.spec.generation)
            except Exception as err:  # the store's errors too: every rank stops with rank 0
                error = err
        if any_rank(error is not None, self.engine.device):
            raise error or RuntimeError("rank 0 could not read the run's fence, or found it moved")

    def upload(self, name: str) -> None:
        """Swap the exported ``name`` into the remote storage; with the injected fault, die once
        inside the swap (after its ``kill_in_model_swap`` step), as a killed node would."""
        stop = self.spec.faults.kill_in_model_swap
        marker = Path(self.spec.output_dir) / f".fault-injected-swap-{name}"
        from ..storage import fence as fences

        storage, generation = self.spec.storage, self.spec.generation
        guard = lambda: fences.check(storage, generation)  # noqa: E731  (before each step)
        if stop and not marker.exists():
            storage.replace_model(Path(self.spec.local_dir(name)), name, stop, guard)
            marker.write_text(stop)
            os._exit(1)
        storage.replace_model(Path(self.spec.local_dir(name)), name, guard=guard)

    def inject_fault(self) -> None:
        """Injected kills: the last rank dies once at each listed step; Ray restarts the group
        from the last checkpoint. A marker file per step makes each kill happen once."""
        if self.state.step not in self.spec.faults.kill_at_steps or self.rank != self.world - 1:
            return
        marker = Path(self.spec.output_dir) / f".fault-injected-{self.state.step}"
        if not marker.exists():
            marker.write_text(str(self.state.step))
            os._exit(1)

    def fill_disk(self) -> None:
        """Injected full disk: from ``disk_full_at_step`` on, this process may not write more than
        64 KiB to any file (``RLIMIT_FSIZE``), so a checkpoint write fails as on a full disk."""
        at = self.spec.faults.disk_full_at_step
        if at and self.state.step >= at:
            import resource
            import signal

            # Blocked, the signal does not kill the process: the write fails with EFBIG instead.
            # (The loop runs in a worker thread, where signal handlers cannot be installed.)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGXFSZ})
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    def run(self) -> None:
        cfg, state, total = self.cfg, self.state, self.plan.total_steps
        self.engine.train()
        while state.step < total:
            ids, lr = self.step()
            self.inject_fault()
            last = state.step == total
            if state.step % cfg.log_steps == 0 or last:
                self.log(ids, lr)
            else:
                self.tick()
            stop_here = state.step == cfg.stop_at_step
            if state.step % cfg.eval_steps == 0 or last:
                if self.validate_and_checkpoint():
                    break
            elif state.step % cfg.save_steps == 0 or stop_here:
                self.report({"step": state.step, "val_loss": state.last_val}, True)
            if stop_here:
                break
        summary = {"step": state.step, "best_val": state.best_val, "first_val": state.first_val}
        self.reporter.done(summary)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config`` holds the :class:`RunSpec` and the progress queue. A
    failure on any rank sends its traceback's last lines to the driver at once (workers' own
    output does not reach it), then ends this attempt as usual."""
    spec: RunSpec = config["spec"]
    try:
        if spec.faults.import_on_start:
            import importlib

            importlib.import_module(spec.faults.import_on_start)
        Worker(spec, config.get("progress")).run()
    except Exception:
        report_failure(config.get("progress"))
        raise


def report_failure(queue, lines: int = 8) -> None:
    if queue is None:
        return
    import traceback

    import ray.train

    tail = traceback.format_exc().rstrip().splitlines()[-lines:]
    rank = ray.train.get_context().get_world_rank()
    try:
        queue.put({"kind": "error", "rank": rank, "lines": tail}, timeout=5)
    except Exception:  # the driver is gone or the queue full: the error is raised regardless
        pass
