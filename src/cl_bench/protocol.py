"""The protocol card: what a run consumed and what it could see, counted by the runner from what
happened, not declared by the strategy. It is written as ``summary["protocol"]`` beside the metrics;
``results/README.md`` defines every field and the leaderboard flags rows whose protocol differs from
the others in their table.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

PROC_STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+)", PROC_STATUS.read_text(), re.MULTILINE).group(1))


class PeakMemory:
    """Peak memory of one run, not of the process that ran it (a bench runs many in one process).
    CUDA: the allocator's peak, reset when the run starts (``cuda_max_allocated``). CPU on Linux: the
    resident-set high-water mark, reset when the run starts (``/proc/self/clear_refs``), minus the
    resident set at that moment (``rss_peak_above_start``: what the run itself added). Elsewhere the
    process's lifetime maximum (``process_max_rss``), which earlier runs in the process may set."""

    def __init__(self, device: torch.device):
        self.device, self.start_kib = device, 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "cuda_max_allocated"
            return
        try:
            CLEAR_REFS.write_text("5")
            self.start_kib, self.kind = _status_kib("VmRSS"), "rss_peak_above_start"
        except (OSError, AttributeError):
            self.kind = "process_max_rss"

    def peak_mb(self) -> float:
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "rss_peak_above_start":
            return max(_status_kib("VmHWM") - self.start_kib, 0) / 1024
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def text_digest(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def switches(cfg, strategy) -> dict:
    """The strategy's declared paper-versus-code settings: ``{key: {"value": this run's, "paper": the
    paper's}}``; ``eval_batch_size`` of a batch-dependent strategy has no paper value (``None``)."""
    values = {key: {"value": cfg.strategy[key], "paper": paper}
              for key, paper in type(strategy).protocol_switches.items()}
    if type(strategy).eval_batch_dependent:
        values["eval_batch_size"] = {"value": cfg.eval_batch_size, "paper": None}
    return values


def extra_data(cfg, stream, strategy, info: dict) -> list[dict]:
    """Every source of data from outside the stream: pretrained weights, general suites, the strategy's own."""
    found = []
    if info.get("pretrained"):
        found.append({"role": "pretrained_weights", "source": info["pretrained"], "data_hash": info["weights_digest"]})
    for suite in stream.general:
        found.append({"role": "general_suite (evaluation only)", "source": suite.name,
                      "data_hash": text_digest(suite.test.prompts, suite.test.answers)})
    return found + strategy.outside_data()


def card(cfg, stream, strategy, per_task: list[dict], info: dict, memory: PeakMemory) -> dict:
    """The protocol block of ``summary.json`` after the tasks in ``per_task``."""
    budget = {k: v for k, v in cfg.budget.items() if v is not None}
    stored = max((p["examples_stored"] for p in per_task), default=0)
    stages = [p["trainable_params"] for p in per_task]
    return {
        "samples_trained": sum(p["samples_trained"] for p in per_task),
        "samples_trained_per_task": [p["samples_trained"] for p in per_task],
        "optimizer_steps": sum(p["optimizer_steps"] for p in per_task),
        "optimizer_steps_per_task": [p["optimizer_steps"] for p in per_task],
        "epochs": cfg.strategy.get("epochs"),
        "budget": budget or None,
        "examples_stored": stored,
        # a frozen backbone's inputs are its cached features: what a strategy stores of them too
        "examples_stored_kind": ("features" if info["cached_features"] else "raw") if stored else None,
        "task_identity_train": type(strategy).task_identity_train,
        "task_identity_test": "given" if cfg.eval_mode == "til" else "none",
        "eval_batches": "per_task" if cfg.eval_mode == "til" else "mixed",
        "scored_split": stream.provenance.get("scored_split", "test"),
        "extra_data": extra_data(cfg, stream, strategy, info),
        "allow_stream_data": bool(cfg.allow_stream_data),
        "switches": switches(cfg, strategy),
        "trainable_params_per_stage": stages,
        "trainable_params_max_stage": max(stages, default=0),
        "peak_memory_mb": memory.peak_mb(),
        "peak_memory_kind": memory.kind,
    }
