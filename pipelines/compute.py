"""How flows run per-partition work: the same call on a laptop and on a Dask cluster.

A flow hands `run_partitions` a function and the partitions to apply it to. With `[compute] engine =
"local"` that is a plain loop in the flow's process: no scheduler, no task runs, as fast as the code it
calls. With `"dask"` each partition is a Prefect task on prefect-dask's `DaskTaskRunner` (recorded in the
Prefect API like any task run), on the scheduler at `address`, or on a LocalCluster that the flow run
starts and stops. Nothing here schedules or retries: Dask and Prefect do.

A flow gets its engine when it is called: `on_engine(flow, settings)(...)` (`task_runner`); inside it,
`run_partitions` and `dask_client` ask the running flow which engine it has. A flow called inside another
one on the dask engine joins the parent's cluster instead of starting its own.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from rich.progress import Progress

from core.errors import ScfriskError
from core.settings import Settings
from core.sql import is_out_of_memory, out_of_memory

if TYPE_CHECKING:
    from distributed import Client
    from prefect import Flow
    from prefect.task_runners import TaskRunner

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
F = TypeVar("F", bound="Flow[Any, Any]")

_announced: set[str] = set()
"""Dashboard links already logged (once per cluster, not once per stage)."""


def task_runner(settings: Settings) -> TaskRunner | None:
    """The flow's task runner for the configured engine: None (the flow's default) for `local`."""
    compute = settings.compute
    if compute.engine == "local":
        return None
    from prefect_dask import DaskTaskRunner

    parent = _flow_dask_runner()
    if parent is not None:  # a subflow: the parent's cluster, not a second one
        return DaskTaskRunner(address=parent.client.scheduler.address)
    if compute.address:
        return DaskTaskRunner(address=compute.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": compute.n_workers,
            "threads_per_worker": compute.threads_per_worker,
            "memory_limit": compute.memory_limit,
            "processes": True,
            "host": "127.0.0.1",  # loopback only, the dashboard too (any free port)
            "dashboard_address": "127.0.0.1:0",
        },
    )


def on_engine(flow: F, settings: Settings) -> F:
    """The flow, set to run its partitions on the configured engine."""
    runner = task_runner(settings)
    return flow if runner is None else flow.with_options(task_runner=runner)


def dask_client() -> Client | None:
    """The Dask client of the running flow (e.g. for `lightgbm.dask`), None on the local engine."""
    runner = _flow_dask_runner()
    if runner is None:
        return None
    client = runner.client
    link = client.dashboard_link
    if link and link not in _announced:
        _announced.add(link)
        log.info("Dask dashboard: %s (%d workers)", link, worker_count(client))
    return client


def run_partitions(fn: Callable[[T], R], items: Iterable[T], label: str) -> list[R]:
    """`fn` applied to every item, results in the items' order, with a progress bar; call inside a flow.

    Local engine: a loop in this process. Dask engine: one Prefect task per item on the flow's cluster
    (`fn` and the items are pickled to the workers, so they must be module-level functions, partials of
    them, and plain data), the bar advancing as tasks complete; a failed task fails the call with its error.
    DuckDB running out of memory is translated where it happens (`_apply`: on the worker, whose budget it was).
    """
    items = list(items)
    client = dask_client()
    with Progress(transient=True) as progress:
        bar = progress.add_task(label, total=len(items))
        if client is None:
            results = []
            for item in items:
                results.append(_apply(_Work(fn, item, label)))
                progress.advance(bar)
            return results
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        # No cache key (hashing large arguments) and no stored results: the flow takes them as they come.
        # One opaque argument: Prefect walks the contents of dataclasses, lists and dicts passed to a task
        # (a batch's file lists, a manifest) looking for futures, for every task, on both sides.
        apply = task(_apply, name=label, cache_policy=NO_CACHE, persist_result=False)
        futures = [apply.submit(_Work(fn, item, label)) for item in items]
        # Polled, not `prefect.futures.wait(timeout=...)`: that arms SIGALRM in the flow's main thread on every
        # call, and an alarm landing while `threading.Event.wait` re-takes its lock raised "release unlocked
        # lock" and failed a 100M-order ingest after 45 minutes.
        pending, workerless_since, watched = set(futures), None, time.monotonic()
        while pending:
            done = {future for future in pending if future.wrapped_future.done()}
            pending -= done
            progress.advance(bar, len(done))
            if pending and time.monotonic() - watched >= WATCH_SECONDS:
                watched = time.monotonic()
                workerless_since = None if worker_count(client) else workerless_since or watched
                if workerless_since and (_started_here() or watched - workerless_since > LOST_WORKERS_SECONDS):
                    raise EngineError(
                        f"the Dask cluster at {client.scheduler.address} has no workers left, so {label} cannot "
                        f"finish ({len(pending)} of {len(items)} partitions not done); its workers were lost "
                        "(out of memory, or dropped by a scheduler that did not hear from them: see "
                        "docs/scaling.md). Nothing was published; run the command again"
                    )
            if pending:
                time.sleep(POLL_SECONDS)
        return [future.result() for future in futures]


WATCH_SECONDS = 5.0
"""How often a flow waiting on its partitions checks that the cluster still has workers."""
POLL_SECONDS = 0.1
"""How often it looks for finished partitions (a look is a flag read per pending future)."""
LOST_WORKERS_SECONDS = 120.0
"""How long a flow waits on a cluster at `address` with no workers (one scaling up from zero gets them
back) before it fails. A LocalCluster the flow started never gets them back: it fails at once."""


class EngineError(ScfriskError):
    """The cluster cannot run the flow's work: the flow fails with the reason instead of waiting forever."""


def worker_count(client: Client) -> int:
    """Workers the scheduler has. Its cluster-wide count, not the length of the per-worker listing: the
    client's periodic refresh caches the identity without that listing, and when a fresh query times out
    (a scheduler busy on a loaded machine) `scheduler_info()` returns the cache, which read as "no workers"
    and failed a healthy run."""
    return int(client.scheduler_info(n_workers=0).get("n_workers", 0))


def _started_here() -> bool:
    """Whether the running flow's cluster is one it started itself (a LocalCluster), not one at `address`."""
    runner = _flow_dask_runner()
    return runner is not None and runner.address is None


class _Work:
    """A function, its item and the work's label, in a plain object that Prefect does not look into."""

    __slots__ = ("fn", "item", "label")

    def __init__(self, fn: Callable[[Any], Any], item: Any, label: str) -> None:
        self.fn, self.item, self.label = fn, item, label


def _apply(work: _Work) -> Any:
    """The work, with DuckDB's out-of-memory error as the one line naming the budget of the process that ran
    it (`core.sql.out_of_memory`), the label and the item when it is a name (a table)."""
    try:
        return work.fn(work.item)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory(f"{work.label} ({work.item})" if isinstance(work.item, str) else work.label) from exc


def _flow_dask_runner() -> Any:
    """The running flow's DaskTaskRunner, if it has one (never imports Dask: without prefect_dask loaded,
    no runner can be one)."""
    module = sys.modules.get("prefect_dask")
    if module is None:
        return None
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = context.task_runner if context is not None else None
    return runner if isinstance(runner, module.DaskTaskRunner) else None
