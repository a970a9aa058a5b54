"""Parallel evaluation: worker processes over images (``--workers N``) and torchrun sharding.

- ``--workers N`` (N > 1): N spawned processes, each loading the models once and running with
  ``torch.set_num_threads(threads_per_worker)`` (default 1), take images from a shared queue; each writes its
  own result files (see :mod:`.store`), the main process shows the progress bar and merges at the end.
- torchrun / any launcher setting ``RANK`` and ``WORLD_SIZE``: rank r evaluates images r, r + W, r + 2W, ...
  Every rank writes its own files; rank 0 waits (polling the done records) until every unit of the plan is
  finished or every other rank has exited, then merges and writes the report. No process group is needed.

On a 2-core machine a single process with 2 threads is as fast as two workers; workers pay off with more cores.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .runner import Embedder, EvalConfig, RunStats, evaluate_samples, load_model_handle, set_threads
from .store import ResultStore


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    token: str = "local"

    @property
    def active(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """RANK / WORLD_SIZE from the environment (torchrun, SLURM via torchrun, or set by hand)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return DistInfo()
    token = os.environ.get("TORCHELASTIC_RUN_ID") or (
        f"{os.environ.get('MASTER_ADDR', '')}-{os.environ.get('MASTER_PORT', '')}"
    )
    if world <= 1:
        return DistInfo()
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in 0..WORLD_SIZE-1={world - 1}")
    return DistInfo(rank, world, token.replace("/", "_") or "dist")


def shard(items: list, info: DistInfo) -> list:
    return items[info.rank :: info.world_size] if info.active else list(items)


def exit_marker(out: Path, info: DistInfo, rank: int) -> Path:
    return Path(out) / "raw" / f"exit-{info.token}-rank{rank}-of{info.world_size}"


def wait_for_ranks(store: ResultStore, info: DistInfo, plan_keys: set[tuple], timeout_s: float = 7 * 24 * 3600,
                   poll_s: float = 5.0) -> bool:
    """Rank 0: block until every planned unit is done or every other rank left its exit marker."""
    deadline = time.monotonic() + timeout_s
    want = {tuple(str(v) for v in k) for k in plan_keys}
    while time.monotonic() < deadline:
        if want <= store.done_keys():
            return True
        if all(exit_marker(store.out, info, r).exists() for r in range(1, info.world_size)):
            return want <= store.done_keys()
        time.sleep(poll_s)
    return False


# ---- worker processes ------------------------------------------------------------------------
_W: dict = {}


def _init_worker(model_args, device, cfg, out, run_id, cache_dir, threads, done) -> None:
    set_threads(threads)
    _W["models"] = [load_model_handle(a, device, cfg.box_check) for a in model_args]
    _W["cfg"] = cfg
    _W["store"] = ResultStore(out, f"{run_id}-p{os.getpid()}")
    _W["run_id"] = run_id
    _W["embedder"] = Embedder(cache_dir)
    _W["done"] = done


def _work(args) -> tuple[int, RunStats]:
    sample, conditions = args
    count = [0]

    def on_unit(n: int, computed: bool) -> None:
        if computed:  # groups skipped as done are already counted in the main process' progress bar
            count[0] += n

    stats = evaluate_samples(_W["models"], [sample], conditions, _W["cfg"], _W["store"], _W["run_id"],
                             _W["embedder"], _W["done"], on_unit=on_unit)
    return count[0], stats


def run_in_workers(model_args: list[str], device: str, samples, conditions, cfg: EvalConfig, out: Path, run_id: str,
                   cache_dir, workers: int, done: set[tuple], progress=None, threads_per_worker: int = 1) -> RunStats:
    """Evaluate `samples` with `workers` spawned processes; ``progress.update(n)`` per finished group."""
    total = RunStats()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker,
                  initargs=(model_args, device, cfg, str(out), run_id, cache_dir, threads_per_worker, done)) as pool:
        for n, stats in pool.imap_unordered(_work, [(s, conditions) for s in samples], chunksize=1):
            total.add(stats)
            if progress is not None:
                progress.update(n)
    return total
