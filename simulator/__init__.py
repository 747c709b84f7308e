"""The platform simulator: a realistic e-commerce platform whose merchants' truth is known.

Every merchant has a monthly latent financial health (level + trend + AR noise + rare persistent
shocks + a little seasonality). Health sets sales level and growth, cancel/refund/complaint rates,
shipping delays, ratings, logins, inventory turnover, receivable delays, and who applies for which
product. A loan's TRUE probability of default depends on health at the application AND over the
following months, so pre-application behaviour predicts default well but not perfectly. The truth goes
to `oracle/`, which training never reads.

The output is a snapshot at the end of the window: nothing that happens lies at or after `config.end`
(only planned dates, the schema's `scheduled` columns, may) and each status is the state at that
instant. Or, with `days`, the same history day by day: a base as of a first day, then each day's new
and changed rows. Generation is vectorised with numpy, one chunk of merchants at a time, and every chunk
writes its own part file per table so memory stays bounded.

One module per concern: `merchants` (who sells, their health and calendar), `orders` (orders and
behaviour events), `finance` (inventory, receivables, applications, loans and their performance),
`oracle` (the truth), `timeline` (rows' lives cut at an instant, and into days), `platform` (chunks, ids
and files). The simulator is a product of its own: it imports only the data model below it, and nothing
but the CLI and the tests import it.
"""

from simulator.config import HISTORY_MONTHS, OUTCOME_MONTHS, SimulationConfig, months_to_train
from simulator.oracle import ORACLE_DIR, ORACLE_SCHEMAS
from simulator.platform import SimulationSummary, simulate_chunk, simulate_platform

__all__ = [
    "HISTORY_MONTHS",
    "ORACLE_DIR",
    "ORACLE_SCHEMAS",
    "OUTCOME_MONTHS",
    "SimulationConfig",
    "SimulationSummary",
    "simulate_chunk",
    "months_to_train",
    "simulate_platform",
]
