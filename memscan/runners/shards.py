"""The shard loop every run kind shares: run a stage over the shards not yet done, commit each
result once in the driver, and stop cleanly.

A stage returns ``(tables, meta)``: ``tables`` maps table names to the shard's DataFrames and
``meta`` holds what the completion record keeps beside them (timings, counts). Commits happen
here, in the driver, once per shard, whichever runner produced the result; the merge goes in
shard order, so the tables do not depend on the runner or on the order shards finished in::

    with open_run(out, "triage", resume=resume) as run:
        run.start({...}, identity=("config", "n_shards"))
        with make_pool(runner, setup, args) as pool:
            run_shards(run, pool, stage, {s: (prompts_of(s),) for s in range(n)}, weights=...)
        tables = run.store.merge(n, tables=("scores",))

Examples
--------
>>> import tempfile, pandas as pd
>>> from memscan.runners.local import LocalPool
>>> from memscan.store import open_run
>>> def stage(ctx, lo, hi):
...     return {"rows": pd.DataFrame({"i": range(lo, hi)})}, {"n": hi - lo}
>>> with open_run(tempfile.mkdtemp() + "/r", "example") as run, LocalPool(lambda: None) as pool:
...     _ = run.start({"n_shards": 2})
...     done = run_shards(run, pool, stage, {0: (0, 3), 1: (3, 5)}, label="example", progress=False)
...     run.store.merge(2, tables=("rows",))["rows"]["i"].tolist()
[0, 1, 2, 3, 4]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from memscan.errors import MemscanError
from memscan.progress import progress_bar
from memscan.runners.base import ShardTask, WorkerPool
from memscan.store import Run


def run_shards(
    run: Run,
    pool: WorkerPool,
    stage: Callable,
    shard_args: Mapping[int, tuple],
    *,
    weights: Mapping[int, int] | None = None,
    label: str = "shards",
    unit: str = "items",
    progress: bool = True,
    stop_after_shards: int | None = None,
    describe: Callable[[int, dict], str] | None = None,
) -> int:
    """Run ``stage(context, *shard_args[s])`` for every shard ``s`` not yet committed; commit each.

    Parameters
    ----------
    run : the open run (its store receives the commits)
    pool : a worker pool (:func:`memscan.runners.make_pool`)
    stage : ``stage(context, *args) -> (tables, meta)``; it may take a ``progress`` keyword
    shard_args : the stage's arguments for each shard, by shard index (all shards of the run)
    weights : units of progress each shard stands for (default 1)
    label, unit : the progress bar's description and unit
    stop_after_shards : run at most this many new shards (a kill hook for tests of resume)
    describe : ``describe(shard, tables) -> str`` for the run log line of a commit

    Returns the number of shards committed by this call. Raises when shards remain undone (after
    ``stop_after_shards``), with the hint to resume.
    """
    n_shards = len(shard_args)
    todo_all = run.todo(n_shards)
    todo = todo_all[:stop_after_shards]
    # 1. a resumed run's log names the shards an earlier process committed: a process killed
    #    between a shard's commit and its log line left no "committed" line for it
    kept = sorted(set(shard_args) - set(todo_all) - run.shards_logged)
    if kept and run.resuming:
        run.store.log(
            f"resume: kept {len(kept)} shard{'s' * (len(kept) != 1)} committed earlier ({shard_ranges(kept)})"
        )
    run.shards_logged.update(kept)
    weights = weights or {}
    tasks = [ShardTask(s, tuple(shard_args[s]), weight=int(weights.get(s, 1))) for s in todo]
    committed = 0
    bar = progress_bar(progress, unit=unit)
    with bar:
        task = bar.add_task(label, total=sum(t.weight for t in tasks))
        for done in pool.map(stage, tasks, progress=lambda n: bar.update(task, advance=n)):
            tables, meta = done.value
            run.store.commit_shard(done.key, tables, {**meta, "worker": done.worker, "attempt": done.attempt})
            what = describe(done.key, tables) if describe else ", ".join(f"{len(v)} {k}" for k, v in tables.items())
            run.store.log(f"shard {done.key} committed: {what}")
            run.shards_logged.add(done.key)
            committed += 1
    if run.todo(n_shards):
        raise MemscanError(f"run {run.root} stopped before all shards were done", "rerun with --resume")
    return committed


def shard_ranges(shards: list[int]) -> str:
    """Sorted shard numbers as runs of consecutive ones, for a log line.

    >>> shard_ranges([0, 1, 2, 5, 7, 8])
    '0-2, 5, 7-8'
    """
    runs: list[list[int]] = []
    for s in shards:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
