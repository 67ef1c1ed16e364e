"""The task loop: train task by task, score every seen task after each (``evaluation.py``), flush, resume.

Results of a run live in ``<results_dir>/runs/<run_id>/``: ``config.yaml``, ``scores.csv`` (sum and
count per (after_task, eval_task)), ``summary.json`` (metrics, costs, provenance, status),
``train_log.csv`` (loss, learning rate and rates every few steps: ``cl_bench.train_log``) and
``checkpoints/task-NNN.pt`` (strategy state, the run's generator and every global RNG state after task
NNN; the newest ``keep_checkpoints`` are kept). All are written atomically (temporary file + rename)
after every task, so a crash at any point (``kill -9`` included) leaves a valid partial run that the
same command resumes, with the same final score matrix on CPU as an uninterrupted run; a finished run
is skipped. Ctrl-C marks the run ``interrupted`` and keeps the last task's checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cl_bench import distributed, metrics, outside_data, protocol
from cl_bench._io import atomic_write_text, atomic_torch_save, provenance
from cl_bench.config import config_hash, run_id
from cl_bench.errors import UserError
from cl_bench.evaluation import score_general, score_tasks
from cl_bench.locking import run_lock
from cl_bench.models.backbone import FeatureCache, VectorBackbone, weights_fingerprint
from cl_bench.models.factory import create_backbone
from cl_bench.registry import SCENARIOS, STRATEGIES
from cl_bench.scenarios.base import Samples, Stream
from cl_bench.strategies.base import Budget, Context, NonFiniteLoss, Strategy
from cl_bench.train_log import TrainLog, open_loggers

# 2: the protocol block, optimizer steps and examples stored per task, mixed-batch cil evaluation
SCHEMA_VERSION = 2
CPU_FEATURE_BATCH = 32  # images per batch when filling the feature cache on the CPU


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"device '{name}' is not a torch device") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but no CUDA GPU is available (use device=cpu or auto)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_stream(cfg: DictConfig) -> Stream:
    settings = {k: v for k, v in OmegaConf.to_container(cfg.scenario).items() if k not in ("name", "type")}
    return SCENARIOS.get(cfg.scenario.type)(**settings).stream()


def build_strategy(cfg: DictConfig, stream: Stream, context: Context, progress) -> tuple[Strategy, Stream, dict]:
    """The strategy on its backbone; a frozen backbone is replaced by its cached features."""
    strategy_class = STRATEGIES.get(cfg.strategy.type)
    if stream.kind not in strategy_class.stream_kinds:
        raise UserError(f"strategy '{cfg.strategy.name}' handles {' or '.join(strategy_class.stream_kinds)} "
                        f"streams, but scenario '{cfg.scenario.name}' is a {stream.kind} stream")
    if context.budget is not None and not strategy_class.honours_budget:
        raise UserError(f"strategy '{cfg.strategy.name}' cannot honour budget ({context.budget}): "
                        f"{strategy_class.no_budget}")
    if distributed.world_size() > 1:  # under an outside launcher too
        distributed.check_strategy(cfg.strategy.name, strategy_class)
    if cfg.eval_mode == "cil" and strategy_class.needs_task_at_test:
        raise UserError(f"strategy '{cfg.strategy.name}' needs the task identity at test time; run it with "
                        f"eval_mode=til")
    context.num_classes = stream.num_classes if stream.kind == "classes" else None
    settings = {k: v for k, v in OmegaConf.to_container(cfg.strategy).items() if k not in ("name", "type")}
    settings = outside_data.resolve_auto(strategy_class, settings, stream)
    context.outside = outside_data.load(strategy_class, settings)
    outside_data.refuse_stream_data(context.outside, stream, allowed=cfg.allow_stream_data)
    backbone = create_backbone(cfg.model, stream.input_kind, stream.input_shape)
    info = {"backbone_params": sum(p.numel() for p in backbone.parameters()), "feature_seconds": 0.0,
            "cached_features": backbone.frozen, "pretrained": getattr(backbone, "pretrained_source", "")}
    if info["pretrained"]:
        info["weights_digest"] = weights_fingerprint(backbone)
    if backbone.frozen:
        start = time.perf_counter()
        # on the CPU small batches stay in cache: EfficientNet-Lite0 at 64x64 forwards 1.7-2.4x faster in batches
        # of 32 than of 256 (benchmarks/feature_cache.py, several quiet runs); a GPU takes the evaluation batch
        batch_size = CPU_FEATURE_BATCH if context.device.type == "cpu" else cfg.eval_batch_size
        cache = FeatureCache(cfg.cache_dir, batch_size=batch_size, device=context.device, progress=progress)
        stream = stream.map_inputs(lambda samples: cache.encode(backbone, samples), "features")
        # bind the frozen backbone now: the name `backbone` is rebound to the identity just below
        context.featurize = lambda samples, frozen=backbone: Samples(cache.encode(frozen, samples), samples.targets)
        info["feature_seconds"] = time.perf_counter() - start
        backbone = VectorBackbone(torch.nn.Identity(), backbone.out_dim, preprocessing={"cached_features": True})
    strategy = strategy_class(backbone, context, **settings).to(context.device)
    return strategy, stream, info


class Run:
    """One run directory: its files, its score matrices and its resumable state."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.id = run_id(cfg)
        self.directory = Path(cfg.results_dir) / "runs" / self.id

    @property
    def summary_path(self) -> Path:
        return self.directory / "summary.json"

    def checkpoint_file(self, completed: int) -> Path:
        return self.directory / "checkpoints" / f"task-{completed:03d}.pt"

    def checkpoints(self) -> list[Path]:
        """Kept checkpoints, newest (most tasks completed) first."""
        return sorted((self.directory / "checkpoints").glob("task-*.pt"), reverse=True)

    @property
    def checkpoint_path(self) -> Path:
        """The newest checkpoint (a path that does not exist when there is none)."""
        return next(iter(self.checkpoints()), self.checkpoint_file(0))

    def previous(self) -> dict | None:
        if not self.summary_path.exists():
            return None
        from cl_bench.leaderboard import read_checked_summary

        try:
            summary = read_checked_summary(self.summary_path)
        except ValueError:
            return None  # unreadable or malformed: start again and overwrite
        # written under an older protocol (no protocol card, per-task cil batches): start again
        return summary if summary["schema"] == SCHEMA_VERSION else None

    def fresh_directory(self) -> None:
        """resume=false: keep the old run and start in the next free '<id>-rN' directory."""
        n = 2
        while self.directory.exists():
            self.directory = self.directory.with_name(f"{self.id}-r{n}")
            n += 1

    def write_scores(self, sums: np.ndarray, counts: np.ndarray) -> str:
        """Write scores.csv; returns its sha256, which the summary records."""
        lines = ["after_task,eval_task,sum,count,score"]
        for i, j in zip(*np.nonzero(~np.isnan(counts))):
            score = 100.0 * sums[i, j] / counts[i, j] if counts[i, j] else float("nan")
            lines.append(f"{i},{j + 1},{sums[i, j]:.6g},{int(counts[i, j])},{score:.6f}")
        text = "\n".join(lines) + "\n"
        atomic_write_text(self.directory / "scores.csv", text)
        return hashlib.sha256(text.encode()).hexdigest()


def run(cfg: DictConfig, *, console=None, wait_for_lock: bool = False) -> dict:
    """Train and score one configuration; returns its summary (also written to summary.json). Holds the
    run's lock throughout: when another process has it, RunBusy (or, with ``wait_for_lock``, wait).
    As one rank of a data-parallel run (``distributed``), only rank 0 takes the lock and writes."""
    if cfg.nproc > 1 and distributed.launched_world() == 1:
        raise UserError(f"nproc={cfg.nproc} starts its processes from `cl-bench run`; bench and run -m run each "
                        f"configuration in one process (or start cl-bench run under torchrun)")
    device = distributed.start(resolve_device(cfg.device)) if distributed.launched_world() > 1 else None
    try:
        if not distributed.is_writer():
            return _run_locked(cfg, device)
        with run_lock(cfg.results_dir, run_id(cfg), wait=wait_for_lock):
            return _run_locked(cfg, device, console=console)
    finally:
        distributed.stop()


def _run_locked(cfg: DictConfig, device: torch.device | None, *, console=None) -> dict:
    from cl_bench.progress import Progress

    say = console.print if console is not None else (lambda *a, **k: None)
    writer = distributed.is_writer()
    record = Run(cfg)
    previous = record.previous()
    if previous and cfg.resume and previous.get("status") == "finished":
        say(f"[dim]{record.id}: already finished, skipped[/dim]")
        return {**previous, "skipped": True}  # not written: tells the caller that this call trained nothing
    device = device or resolve_device(cfg.device)
    seed_everything(cfg.seed)
    budget = {k: v for k, v in cfg.budget.items() if v is not None}
    context = Context(device=device, generator=torch.Generator().manual_seed(cfg.seed),
                      budget=Budget(**budget) if budget else None)
    memory = protocol.PeakMemory(device)
    progress_bar = Progress(enabled=cfg.progress and writer, console=console)
    context.progress = progress_bar.track
    with progress_bar:
        stream = build_stream(cfg)  # missing data or a bad setting fails here, before anything is written
        strategy, stream, info = build_strategy(cfg, stream, context, progress_bar.track)
        # checkpoints store only the tensors that differ from these
        initial = tensor_digests(strategy.state_dict()) if strategy.resumable else {}
        if writer:
            if not cfg.resume:
                record.fresh_directory()
            record.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(record.directory / "config.yaml", OmegaConf.to_yaml(cfg))
        T, G = len(stream), len(stream.general)
        sums, counts = np.full((T + 1, T), np.nan), np.full((T + 1, T), np.nan)
        general_sums, general_counts = np.full((T + 1, G), np.nan), np.full((T + 1, G), np.nan)
        summary = {
            "schema": SCHEMA_VERSION, "run_id": record.directory.name, "status": "running", "message": "",
            "strategy": cfg.strategy.name, "strategy_type": cfg.strategy.type, "scenario": cfg.scenario.name,
            "model": cfg.model.name,
            "seed": cfg.seed, "order_seed": stream.provenance.get("order_seed"), "eval_mode": cfg.eval_mode,
            "config_hash": config_hash(cfg), "group_hash": config_hash(cfg, with_seed=False),
            "setting_hash": config_hash(cfg, with_seed=True, with_strategy=False),
            "tasks_total": T, "tasks_completed": 0, "per_task": [], "metrics": {}, "cost": {},
            "provenance": {**provenance(), "device": str(device), "nproc": distributed.world_size(),
                           "stream": stream.provenance},
        }
        start_task, trainable_names = 0, set()
        if cfg.resume and previous and not strategy.resumable:
            say(f"[yellow]{record.id}: cannot resume ({strategy.not_resumable}); restarting from task 1[/yellow]")
        elif cfg.resume and previous and record.checkpoints():
            start_task, trainable_names = resume(record, strategy, context, previous, summary,
                                                 (sums, counts, general_sums, general_counts), say, stream.tasks)
            say(f"[dim]{record.id}: resuming after task {start_task} of {T}[/dim]")
        train_log = TrainLog(record.directory / "train_log.csv" if writer else None, cfg.train_log_every,
                             open_loggers(list(cfg.loggers) if writer else [], record.directory,
                                          record.directory.name, OmegaConf.to_container(cfg)))
        train_log.resume(start_task)
        context.on_step = train_log.step

        def flush(status: str, message: str = "") -> None:
            summary.update(status=status, message=message)
            done = summary["tasks_completed"]  # a partial run reports metrics over the tasks it completed
            general = 100 * general_sums[: done + 1] / general_counts[: done + 1] if G else None
            summary["metrics"] = metrics.compute_all(sums[: done + 1, :done], counts[: done + 1, :done],
                                                     general=general) if done else {}
            if done and "task_identified" in summary["per_task"][done - 1]:
                summary["metrics"]["task_identified_final"] = summary["per_task"][done - 1]["task_identified"]
            if G:
                summary["general"] = {"suites": [g.name for g in stream.general],
                                      "scores": [[None if np.isnan(v) else float(v) for v in row]
                                                 for row in 100 * general_sums / general_counts]}
            summary["protocol"] = protocol.card(cfg, stream, strategy, summary["per_task"], info, memory)
            summary["cost"] = costs(summary, strategy, trainable_names, info)
            summary["provenance"]["finished_at" if status == "finished" else "updated_at"] = time.time()
            if writer:
                summary["scores_sha256"] = record.write_scores(sums, counts)
                atomic_write_text(record.summary_path, json.dumps(summary, indent=1, default=str))

        scoring = dict(eval_mode=cfg.eval_mode, batch_size=cfg.eval_batch_size, seed=cfg.seed)
        try:
            if start_task == 0:
                if cfg.eval_unseen:
                    score_tasks(strategy, stream, 0, range(T), sums, counts, **scoring)
                score_general(strategy, stream, 0, general_sums, general_counts)
            for t in range(start_task, T):
                task = stream.tasks[t]
                strategy.before_task(task)
                trainable = {n for n, p in strategy.named_parameters() if p.requires_grad}
                trainable_names |= trainable
                trained_before, steps_before = strategy.samples_trained, strategy.optimizer_steps
                tokens_before = token_counters(strategy)
                train_log.begin_task(t + 1, strategy)
                began = time.perf_counter()
                strategy.learn(task)
                strategy.after_task(task)
                trained = time.perf_counter() - began
                train_log.end_task(strategy)
                began = time.perf_counter()
                scored = range(T) if cfg.eval_unseen else range(t + 1)
                identified = score_tasks(strategy, stream, t + 1, scored, sums, counts, **scoring)
                score_general(strategy, stream, t + 1, general_sums, general_counts)
                tokens = {k: v - tokens_before[k] for k, v in token_counters(strategy).items()}
                summary["per_task"].append({
                    "task": t + 1, "train_seconds": trained, "eval_seconds": time.perf_counter() - began,
                    "trainable_params": sum(p.numel() for n, p in strategy.named_parameters() if n in trainable),
                    "total_params": sum(p.numel() for p in strategy.parameters()),
                    "samples_trained": strategy.samples_trained - trained_before,
                    "optimizer_steps": strategy.optimizer_steps - steps_before,
                    "examples_stored": strategy.examples_stored(),
                    "samples_evaluated": int(np.nansum(counts[t + 1])),
                    "score": float(100 * np.nansum(sums[t + 1, : t + 1]) / np.nansum(counts[t + 1, : t + 1])),
                    **({} if identified is None else {"task_identified": identified}),
                    **tokens,
                })
                summary["tasks_completed"] = t + 1
                train_log.scores(t + 1, {**{f"task{j + 1}": float(100 * sums[t + 1, j] / counts[t + 1, j])
                                            for j in scored if counts[t + 1, j] > 0},
                                         "seen": summary["per_task"][-1]["score"]})
                flush("running")  # summary before checkpoint: a crash in between only repeats a task
                if strategy.resumable:
                    save_checkpoint(record, strategy, context, (sums, counts, general_sums, general_counts), t + 1,
                                    trainable_names, initial, keep=cfg.keep_checkpoints)
                say(f"{record.id}: task {t + 1}/{T} done, accuracy on seen tasks "
                    f"{summary['per_task'][-1]['score']:.2f} ({trained:.1f}s train)")
        except NonFiniteLoss as error:
            flush("failed", str(error))
            raise RunFailed(f"run {record.directory.name} failed: {error}") from error
        except KeyboardInterrupt:
            flush("interrupted", "stopped by the user (Ctrl-C); rerun the same command to resume")
            raise
        except BaseException as error:
            flush("failed", f"{type(error).__name__}: {error}")
            raise
        finally:
            train_log.close(summary["metrics"] if summary["tasks_completed"] == T else None)
        flush("finished")
    return summary


class RunFailed(Exception):
    """A run stopped itself (e.g. a non-finite loss); its partial results are on disk."""


TOKEN_COUNTERS = ("tokens_trained", "tokens_generated", "generation_seconds")


def token_counters(strategy) -> dict:
    """Language-model strategies count tokens; others report nothing."""
    return {k: getattr(strategy, k) for k in TOKEN_COUNTERS if hasattr(strategy, k)}


def costs(summary: dict, strategy: Strategy, trainable_names: set, info: dict) -> dict:
    per_task = summary["per_task"]
    train_seconds = sum(p["train_seconds"] for p in per_task)
    totals = [p["total_params"] for p in per_task]
    samples = sum(p["samples_trained"] for p in per_task)
    return {
        "train_seconds": train_seconds,
        "eval_seconds": sum(p["eval_seconds"] for p in per_task),
        "feature_seconds": info["feature_seconds"],
        "trainable_params": sum(p.numel() for n, p in strategy.named_parameters() if n in trainable_names),
        "trainable_params_per_task": [p["trainable_params"] for p in per_task],
        "params_added_per_task": (totals[-1] - totals[0]) / (len(totals) - 1) if len(totals) > 1 else None,
        "backbone_params": info["backbone_params"],
        "peak_memory_mb": summary["protocol"]["peak_memory_mb"],
        "peak_memory_kind": summary["protocol"]["peak_memory_kind"],
        "samples_per_second": samples / train_seconds if train_seconds > 0 else None,
        **token_rates(per_task, train_seconds),
    }


def token_rates(per_task: list[dict], train_seconds: float) -> dict:
    if not per_task or "tokens_trained" not in per_task[0]:
        return {}
    trained = sum(p["tokens_trained"] for p in per_task)
    generated = sum(p["tokens_generated"] for p in per_task)
    generating = sum(p["generation_seconds"] for p in per_task)
    return {"train_tokens_per_second": trained / train_seconds if train_seconds > 0 else None,
            "generation_tokens_per_second": generated / generating if generating > 0 else None}


def tensor_digests(state: dict) -> dict[str, str]:
    """A content digest of every tensor in a state dict (blake2b of the raw bytes)."""
    digests = {}
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            raw = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
            digests[name] = hashlib.blake2b(raw.tobytes(), digest_size=16).hexdigest() + str(tuple(tensor.shape))
    return digests


def changed_state(module: torch.nn.Module, initial: dict[str, str]) -> dict:
    """The state dict without the tensors still equal to their value after construction: a frozen
    pretrained backbone is rebuilt identically on resume, so it is not written after every task."""
    state = module.state_dict()  # once: a strategy's extra state may be costly to gather (Avalanche's buffers)
    current = tensor_digests(state)
    return {name: value for name, value in state.items()
            if not isinstance(value, torch.Tensor) or current[name] != initial.get(name)}


def rng_states() -> dict:
    """Every global random generator's state, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))}
    if torch.cuda.is_initialized():  # only a run that uses CUDA has CUDA state (and must not start CUDA here)
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():  # the devices present, even if fewer than when saved
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def save_checkpoint(record: Run, strategy, context, matrices, completed: int, trainable_names, initial,
                    keep: int = 1) -> None:
    """Checkpoint after ``completed`` tasks, then prune all but the newest ``keep``. Optimizers need no
    entry: every strategy builds a fresh one at the start of each task (``learn``), so none lives across
    a task boundary (tests/test_crash_safety.py checks that resuming reproduces the matrix bit for bit)."""
    sums, counts, general_sums, general_counts = matrices
    rng_by_rank = distributed.gather(rng_states())  # each rank's own dropout stream, for a data-parallel resume
    if not distributed.is_writer():
        return
    changed = changed_state(strategy, initial)
    atomic_torch_save(record.checkpoint_file(completed), {
        "tasks_completed": completed, "strategy": changed, "unchanged": sorted(set(initial) - set(changed)),
        "generator": context.generator.get_state(), "rng": rng_by_rank[0],
        **({"rng_by_rank": rng_by_rank} if len(rng_by_rank) > 1 else {}),
        "sums": torch.from_numpy(sums), "counts": torch.from_numpy(counts),
        "general_sums": torch.from_numpy(general_sums), "general_counts": torch.from_numpy(general_counts),
        "trainable_names": sorted(trainable_names),
    })
    for old in record.checkpoints()[keep:]:
        old.unlink(missing_ok=True)


CHECKPOINT_FIELDS = {"tasks_completed": int, "strategy": dict, "unchanged": list, "generator": torch.Tensor,
                     "rng": dict, "sums": torch.Tensor, "counts": torch.Tensor, "general_sums": torch.Tensor,
                     "general_counts": torch.Tensor, "trainable_names": list}


def checkpoint_problem(state, shapes: dict[str, tuple]) -> str | None:
    """Why a loaded checkpoint cannot be this run's (None when it fits): its fields, their types, and
    the score matrices' ``shapes``."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a checkpoint"
    for key, kind in CHECKPOINT_FIELDS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"field {key} is missing or not {kind.__name__}"
    if not 1 <= state["tasks_completed"] < shapes["sums"][0]:
        return f"tasks_completed={state['tasks_completed']} outside this {shapes['sums'][1]}-task run"
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            return f"{key} has shape {tuple(state[key].shape)}, not {shape}"
    if not all(isinstance(name, str) for name in [*state["strategy"], *state["unchanged"], *state["trainable_names"]]):
        return "parameter names that are not strings"
    return None


def load_newest_checkpoint(record: Run, say, shapes: dict[str, tuple]) -> dict:
    """The newest kept checkpoint that reads back and fits (``checkpoint_problem``); a damaged one (a
    crash mid-write on a disk without atomic rename, a truncated copy) is passed over for the next
    older one, saying so."""
    last = "no checkpoint"
    for path in record.checkpoints():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            reason = checkpoint_problem(state, shapes)
            if reason is None:
                return state
        except Exception as error:
            reason = ("refused: it holds Python objects, not only tensors and plain data (loaded with "
                      "weights_only=True, never unpickled)" if isinstance(error, pickle.UnpicklingError)
                      else type(error).__name__)
        say(f"[yellow]{record.id}: checkpoint {path.name} is unusable ({reason}); trying an older one[/yellow]")
        last = f"checkpoint {path} is unusable ({reason})"
    raise UserError(f"{last}; no older checkpoint is kept (keep_checkpoints=N keeps more); "
                    f"rerun with resume=false to start fresh")


def resume(record: Run, strategy, context, previous: dict, summary: dict, matrices, say,
           tasks: list) -> tuple[int, set[str]]:
    """Restore the state after the last completed task of ``tasks``; returns how many tasks are done and
    the names of the parameters trained so far."""
    state = load_newest_checkpoint(record, say, {key: m.shape for key, m in zip(
        ("sums", "counts", "general_sums", "general_counts"), matrices)})
    completed = state["tasks_completed"]
    unfit = f"checkpoint {record.checkpoint_file(completed)} does not fit this strategy"
    unfit_errors = (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError)

    def refuse(error: Exception) -> UserError:
        first_line = next(iter(str(error).splitlines()), "")[:200]
        return UserError(f"{unfit} ({type(error).__name__}: {first_line}); rerun with resume=false to start fresh")

    try:
        missing, unexpected = strategy.load_state_dict(state["strategy"], strict=False)
    except unfit_errors as error:
        raise refuse(error) from None
    if unexpected or set(missing) - set(state["unchanged"]):
        raise UserError(f"{unfit} ({len(unexpected)} unexpected, {len(set(missing) - set(state['unchanged']))} "
                        f"missing tensors); rerun with resume=false to start fresh")
    strategy.to(context.device)
    try:
        strategy.resumed(tasks[:completed])  # state rebuilt from the tasks learnt (e.g. Avalanche's experiences)
    except unfit_errors as error:
        raise refuse(error) from None
    try:
        context.generator.set_state(state["generator"])
        by_rank = state.get("rng_by_rank")  # written by a data-parallel run; another nproc takes rank 0's
        same_world = isinstance(by_rank, list) and len(by_rank) == distributed.world_size()
        set_rng_states(by_rank[distributed.rank()] if same_world else state["rng"])
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as error:
        raise UserError(f"checkpoint {record.checkpoint_file(completed)}: its random-generator states are "
                        f"damaged ({type(error).__name__}); rerun with resume=false to start fresh") from None
    for target, key in zip(matrices, ("sums", "counts", "general_sums", "general_counts")):
        target[:] = state[key].numpy()
    summary["per_task"] = previous.get("per_task", [])[:completed]
    summary["tasks_completed"] = completed
    return completed, set(state["trainable_names"])
