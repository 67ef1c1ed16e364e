"""One run on several processes (``nproc=K``): data parallelism over torch.distributed.

Every rank builds the same stream and model from the same seed and draws the same step batches (the
shared ``Context.generator``); a language-model step's batch is cut into one contiguous share per rank,
each rank forwards and backwards its share (in micro-batches of ``batch_size``), losses are weighted by
the share of the *whole* batch's answer tokens, and the gradients are summed over ranks
(``all_reduce``): the update of one process taking the whole batch, to float rounding. Evaluation runs
on every rank (so state stays identical), with generation split across ranks and gathered. Rank 0 alone
takes the run's lock and writes files; every rank resumes from the same checkpoint, which holds each
rank's random-generator states.

Launch: ``cl-bench run ... nproc=K`` starts K local processes (gloo on the CPU, NCCL with one GPU per
rank on CUDA). Under an outside launcher (``torchrun``, ``accelerate launch``) that sets ``WORLD_SIZE``,
``RANK`` and ``MASTER_ADDR``/``MASTER_PORT``, ``cl-bench run`` joins that process group instead.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import torch
import torch.distributed as dist

from cl_bench.errors import PeerLost, UserError

BUCKET = 2 ** 24  # gradient elements per all_reduce
PEER_LOST = 3  # exit code of a rank stopped by PeerLost


def launched_world() -> int:
    """The process count an outside launcher (or ``launch``) set in the environment; 1 when none."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_rank() -> int:
    """This process's rank under a launcher (0 when there is none)."""
    return int(os.environ.get("RANK", "0") or 0) if launched_world() > 1 else 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_writer() -> bool:
    """Rank 0 writes the run's files; the others only compute."""
    return rank() == 0


def check_strategy(name: str, strategy_class) -> None:
    """Refuse, in one line, a strategy that cannot run as one rank of a data-parallel run."""
    if not strategy_class.data_parallel:
        raise UserError(f"strategy '{name}' does not run data-parallel ({strategy_class.no_data_parallel}); "
                        f"run it with nproc=1")


def start(device: torch.device) -> torch.device:
    """Join the launcher's process group (when ``WORLD_SIZE`` > 1); the device this rank computes on."""
    if launched_world() <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def collective():
    """A collective's failure (another rank exited or was stopped) as PeerLost, which the rank's CLI exits
    on quietly: the launcher reports the rank that failed first."""
    try:
        yield
    except RuntimeError as error:
        raise PeerLost(f"another rank of this run went away ({' '.join(str(error).split())[:160]})") from error


def share(count: int) -> range:
    """This rank's contiguous share of ``count`` items (earlier ranks take the remainder)."""
    size, index = world_size(), rank()
    base, extra = divmod(count, size)
    begin = index * base + min(index, extra)
    return range(begin, begin + base + (index < extra))


def total(value: float | int) -> float:
    """``value`` summed over ranks (itself in one process)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    with collective():
        dist.all_reduce(tensor)
    return tensor.item()


def gather(value) -> list:
    """Every rank's ``value`` (picklable), in rank order."""
    if not dist.is_initialized():
        return [value]
    values = [None] * world_size()
    with collective():
        dist.all_gather_object(values, value)
    return values


def sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Sum each parameter's gradient over ranks (in buckets of BUCKET elements). A parameter without a
    gradient on every rank keeps none (AdamW then skips it, as one process would)."""
    if not dist.is_initialized():
        return
    present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32)
    with collective():
        dist.all_reduce(present)
    used = [p for p, count in zip(parameters, present.tolist()) if count]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.nn.Parameter] = []
    for p in used:
        bucket.append(p)
        if sum(q.numel() for q in bucket) >= BUCKET:
            _reduce(bucket)
            bucket = []
    if bucket:
        _reduce(bucket)


def _reduce(parameters: list[torch.nn.Parameter]) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    with collective():
        dist.all_reduce(flat)
    offset = 0
    for p in parameters:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(argv: list[str], nproc: int) -> int:
    """Run ``cl-bench run argv`` as ``nproc`` local ranks and wait for all; the exit code. Rank 0 prints as
    a single run would; when another rank fails first, the rest are stopped and its last error line is
    reported."""
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)),  # as torchrun: no oversubscribed cores
           **os.environ, "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, "-m", "cl_bench.cli", "run", *argv]
    ranks, logs = [], []
    for index in range(nproc):
        log = None if index == 0 else tempfile.TemporaryFile("w+")
        logs.append(log)
        quiet = {} if log is None else {"stdout": subprocess.DEVNULL, "stderr": log}
        ranks.append(subprocess.Popen(command, env={**env, "RANK": str(index), "LOCAL_RANK": str(index)}, **quiet))
    try:
        failed = wait_all(ranks)
    except KeyboardInterrupt:  # the terminal sent SIGINT to every rank: rank 0 marks the run interrupted
        for process in ranks:
            process.wait()
        raise
    if not failed:
        return 0
    # the rank that failed on its own, not one that lost its peer or that we stopped
    culprit = next((i for i in failed if ranks[i].returncode not in (PEER_LOST, -signal.SIGTERM)), failed[0])
    code = ranks[culprit].returncode
    if culprit == 0 and code > 0 and code != PEER_LOST:
        return code  # rank 0 printed why
    lines = []
    if logs[culprit] is not None:
        logs[culprit].seek(0)
        lines = [line for line in logs[culprit].read().splitlines() if line.strip()]
    why = (f"killed by signal {-code}" if code < 0 else "another rank went away" if code == PEER_LOST
           else lines[-1] if lines else "no message")
    raise UserError(f"rank {culprit} of nproc={nproc} stopped (exit {code}): {why}")


def wait_all(ranks: list[subprocess.Popen]) -> list[int]:
    """Wait for every rank; the indices of those that failed, in the order they ended. The first failure of
    its own stops the others, which would otherwise wait for it in a collective forever."""
    waiting, failed, stopping = {process.pid: index for index, process in enumerate(ranks)}, [], False
    while waiting:
        pid, status = os.wait()
        index = waiting.pop(pid, None)
        if index is None:
            continue
        ranks[index].returncode = os.waitstatus_to_exitcode(status)
        if ranks[index].returncode != 0:
            # a rank that lost its peer says nothing of its own: the peer that went away is exiting and says why
            if ranks[index].returncode != PEER_LOST and not stopping:
                stopping = True
                for other in waiting.values():
                    ranks[other].send_signal(signal.SIGTERM)
            failed.append(index)
    return failed
