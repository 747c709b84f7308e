"""LightGBM's data-parallel learner on the workers of a Dask cluster, fitting the booster one process would.

The rows are spread over the workers and LightGBM's own network (`machines`, `num_machines`, as
`lightgbm.dask` sets it up) sums their histograms. `lightgbm.dask`'s estimator fits another model than one
process does on the same rows (issue 15: OOT AUC 0.005-0.0075 apart on the sample), for three reasons that
this module removes:

- bins: each worker finds the bins of some features on its own rows. Here every worker takes the bin mappers
  of one reference `Dataset` built from the rows the local fit bins on (`binning_rows`);
- bagging: LightGBM draws a row's bag membership from the random stream of its block of 1024 rows, seeded
  `bagging_seed + block`, and every worker numbers its rows from 0, so that with one seed each worker repeats
  the draws of the first blocks. Here each worker gets a contiguous slice of the rows that starts on a block
  boundary, with the bagging seed of the slice's first block: every row is in the bags it is in locally;
- early stopping (which `lightgbm.dask` cannot do): every worker evaluates the whole validation cohort, so
  all stop on the round the local fit stops on.

The monotone constraints are "basic" on both engines (`models.training`): LightGBM runs no other method
data-parallel. What is left is LightGBM's: its serial learner stops searching, below a leaf, a feature that
had no valid split there, the data-parallel one does not and estimates leaf row counts from hessian sums
(docs/scaling.md, "Training on the workers"); and the order in which the workers' histograms are added.
"""

from __future__ import annotations

import math
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import lightgbm as lgb
import numpy as np
import pandas as pd

from core.errors import ScfriskError

if TYPE_CHECKING:
    from distributed import Client

BAG_BLOCK = 1024
"""Rows per bagging random stream (`bagging_rand_block_` in LightGBM's sample_strategy.h)."""
BIN_SAMPLE_ROWS = 200_000
"""LightGBM's default `bin_construct_sample_cnt`: up to this many rows, bins come from every row."""


def lightgbm_seeds(seed: int) -> dict[str, int]:
    """The seeds LightGBM derives from `seed` (`Config::Set`: its 16-bit linear congruential generator), so
    that a worker's bagging seed can be shifted from the one the local fit uses."""
    x, out = seed & 0xFFFFFFFF, {}
    for name in ("data_random_seed", "bagging_seed", "drop_seed", "feature_fraction_seed"):
        x = (214013 * x + 2531011) & 0xFFFFFFFF
        out[name] = ((x >> 16) & 0x7FFF) % 32767
    return out


def binning_rows(X: pd.DataFrame, seed: int) -> pd.DataFrame | None:
    """The rows both engines find the bins on: None (LightGBM's own: every row) up to `BIN_SAMPLE_ROWS`
    rows, else a seeded sample of that many in the rows' order (LightGBM's own sample is drawn in C++ and
    cannot be asked for)."""
    if len(X) <= BIN_SAMPLE_ROWS:
        return None
    picked = np.sort(np.random.default_rng(seed).choice(len(X), BIN_SAMPLE_ROWS, replace=False))
    return X.iloc[picked]


def binned(X: pd.DataFrame, y: np.ndarray, params: dict[str, Any], bins: pd.DataFrame | None) -> lgb.Dataset:
    """(X, y) as a training Dataset, with the bins of `bins` (or of X itself) and `params`."""
    reference = None if bins is None else lgb.Dataset(bins, params=params).construct()
    return lgb.Dataset(X, label=y, reference=reference, params=params, free_raw_data=False)


def slices(rows: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) row ranges, one per worker that gets rows, each starting on a bagging block."""
    size = math.ceil(math.ceil(rows / workers) / BAG_BLOCK) * BAG_BLOCK
    return [(start, min(rows, start + size)) for start in range(0, rows, size)]


def fit_on_cluster(client: Client, params: dict[str, Any], X: pd.DataFrame, y: np.ndarray, rounds: int,
                   valid: tuple[pd.DataFrame, np.ndarray] | None = None, patience: int = 0) -> lgb.Booster:
    """`lgb.train(params, (X, y), rounds)`, early-stopped on `valid` after `patience` rounds if given, with
    the rows spread over the workers of `client`; the booster comes back to this process."""
    ports = client.run(_free_port)  # every worker's address (not `scheduler_info()`: a stale cache under load)
    if not ports:
        raise ScfriskError(f"the Dask cluster at {client.scheduler.address} has no workers to fit the model on")
    ranges = slices(len(X), len(ports))
    workers = sorted(ports)[: len(ranges)]
    machines = ",".join(f"{urlparse(w).hostname}:{ports[w]}" for w in workers)
    cores = client.ncores(workers)
    bins = binning_rows(X, params["seed"])
    shared = client.scatter((X if bins is None else bins, valid), workers=workers, broadcast=True)
    bagging_seed = params.get("bagging_seed", lightgbm_seeds(params["seed"])["bagging_seed"])
    futures = []
    for rank, (worker, (start, stop)) in enumerate(zip(workers, ranges, strict=True)):
        own = {**params, "num_threads": cores[worker], "tree_learner": "data", "num_machines": len(workers),
               "machines": machines, "local_listen_port": ports[worker], "pre_partition": True,
               "bagging_seed": bagging_seed + start // BAG_BLOCK}
        part = client.scatter((X.iloc[start:stop], y[start:stop]), workers=[worker])
        futures.append(client.submit(_fit_part, part, shared, own, rounds, patience, rank == 0,
                                     workers=[worker], allow_other_workers=False, pure=False))
    model, best = next(result for result in client.gather(futures) if result is not None)
    booster = lgb.Booster(model_str=model)
    booster.best_iteration = best
    return booster


def _fit_part(part: tuple[pd.DataFrame, np.ndarray], shared: tuple[pd.DataFrame, Any], params: dict[str, Any],
              rounds: int, patience: int, keep: bool) -> tuple[str, int] | None:
    """One worker's side of the fit (all run at once, LightGBM's network joins them): the model string and
    best round from the first worker, None from the others."""
    (X, y), (bins, valid) = part, shared
    # The reference is built before `lgb.train` starts the network, so it finds its bins in this process
    # (LightGBM splits bin finding between machines only once they are connected): on every worker the same.
    train = lgb.Dataset(X, label=y, reference=lgb.Dataset(bins, params=params).construct(), params=params)
    valid_sets, callbacks = [], []
    if valid is not None:
        valid_sets = [lgb.Dataset(valid[0], label=valid[1], reference=train)]
        callbacks = [lgb.early_stopping(patience, verbose=False)]
    booster = lgb.train(params, train, num_boost_round=rounds, valid_sets=valid_sets, callbacks=callbacks)
    try:
        return (booster.model_to_string(), booster.best_iteration) if keep else None
    finally:
        booster.free_network()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
