"""Reason codes: for one merchant, the factors that pushed its default risk up (and those that lowered it),
in the words of the feature catalogue, with the merchant's value and the value typical of approved merchants.

A reason is a SHAP contribution (log-odds, see `explanation.contributions`) of a feature the booster split on. Only
strictly positive contributions can be an adverse reason, only strictly negative ones a mitigating factor,
so a feature that did not move this merchant's score never appears, and there is no generic fallback.
Because the calibrated PD is monotone in the log-odds, the order of reasons is the order on the PD scale.

SHAP measures a contribution against the average merchant, while the sentence compares the merchant with
the typical approved one; so a factor is cited only when the comparison reads the same way: a feature
with a declared risk direction only on the risky side of the reference (for an adverse reason: above it
when higher is riskier, below it when higher is safer), any other feature only when it differs from the
reference. A possible proxy of a protected attribute (`features.catalogue.PROTECTED_PROXIES`) is never cited.

Two ways to get them, one table format, one reading (`ReasonCodeIndex`):
- `ReasonCodeIndex.for_population`: built in batch at publish time for every merchant of the online store
  (exact TreeSHAP costs milliseconds per row), saved to Parquet + JSON, answered per request by a lookup.
- `explain_payloads`: on the fly for explicit feature payloads, through the same model and texts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import ScfriskError
from explanation.contributions import Explanation, explain
from features.catalogue import PROTECTED_PROXIES
from features.definitions import FEATURE_INDEX, Feature, format_pair
from models.pd_model import FeatureSpec, PDModel

TOP_N = 4
APPROVED_QUANTILE = 0.5
"""Training merchants whose PD is at or below this quantile count as 'approved' for reference values."""
REFERENCES_KEY = "reason_code_references"
"""Where the training flow stores reference values in `PDModel.metadata`, so every consumer uses the same."""
RAISES, LOWERS = "raises", "lowers"
COLUMNS = ("merchant_id", "direction", "rank", "code", "description", "contribution", "value", "reference")
TABLE_FILE, META_FILE = "reason_codes.parquet", "reason_codes.json"


@dataclass(frozen=True)
class Reason:
    code: str
    """The feature's name, stable across model versions."""
    description: str
    """The sentence a risk officer reads."""
    contribution: float
    """Log-odds this feature added (> 0) or removed (< 0) for this merchant."""
    value: str
    reference: str


@dataclass(frozen=True)
class MerchantReasons:
    raised: tuple[Reason, ...]
    """Up to `TOP_N` factors that increased the risk, largest first: what an adverse-action notice cites."""
    lowered: tuple[Reason, ...]
    """Up to `TOP_N` factors that decreased it, most protective first."""


def reference_values(
    inputs: pd.DataFrame, pd_values: np.ndarray, approved_quantile: float = APPROVED_QUANTILE
) -> dict[str, Any]:
    """Typical value per feature among approved (low-PD) training merchants: median, or commonest level.

    Computed on the model input (`PDModel.prepare`), so it is on the same footing as the merchant's value.
    """
    pd_values = np.asarray(pd_values, float)
    approved = inputs[pd_values <= np.quantile(pd_values, approved_quantile)]
    out: dict[str, Any] = {}
    for name in inputs.columns:
        column = approved[name]
        if isinstance(column.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(column):
            counts = column.value_counts()
            out[name] = str(counts.index[0]) if len(counts) else None
        else:
            median = column.median()
            out[name] = None if pd.isna(median) else float(median)
    return out


def model_references(model: PDModel) -> dict[str, Any]:
    """The reference values the training flow stored with the model."""
    references = (model.metadata or {}).get(REFERENCES_KEY)
    if not references:
        raise ScfriskError(
            f"the PD model has no '{REFERENCES_KEY}' in its metadata; retrain it (training stores the "
            "reference values of approved merchants) or pass references explicitly"
        )
    return references


def _label(feature: Feature) -> str:
    """The description's first clause without the final period: 'Share of orders ... refunded'."""
    return feature.description.split(": ")[0].rstrip(".")


def describe(feature: Feature, value: Any, reference: Any) -> tuple[str, str, str]:
    """(value text, reference text, sentence) for one feature of one merchant: the sentence says which
    side of the typical approved merchant's value the merchant's lies on."""
    value_text, reference_text = format_pair(value, reference, feature.unit)
    if _missing(value) or _missing(reference):
        comparison = f"; the typical approved merchant's: {reference_text}"
    elif feature.kind == "categorical" or feature.unit == "category":
        comparison = (", like the typical approved merchant" if str(value) == str(reference)
                      else f", unlike the typical approved merchant's {reference_text}")
    else:
        side = "the same as" if value_text == reference_text else (
            "higher than" if float(value) > float(reference) else "lower than")
        comparison = f", {side} the typical approved merchant's {reference_text}"
    return value_text, reference_text, f"{_label(feature)}: {value_text}{comparison}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def citable(inputs: pd.DataFrame, references: Mapping[str, Any], definitions: Sequence[Feature],
            sign: float) -> np.ndarray:
    """Which (row, feature) may be cited as a reason on the side `sign` (+1: raised the risk, -1: lowered
    it): see the module docstring. A missing value or reference cannot contradict the sentence, so it may."""
    out = np.ones(inputs.shape, dtype=bool)
    for j, feature in enumerate(definitions):
        if feature.name in PROTECTED_PROXIES:
            out[:, j] = False
            continue
        reference = references.get(feature.name)
        if _missing(reference):
            continue
        column = inputs[feature.name]
        if feature.kind == "categorical" or not pd.api.types.is_numeric_dtype(column):
            text = column.astype(object).to_numpy()
            out[:, j] = pd.isna(text) | (text.astype(str) != str(reference))
            continue
        values = column.to_numpy(dtype=float)
        away = values - float(reference)
        risky = sign * feature.direction * away > 0 if feature.direction else away != 0
        out[:, j] = np.isnan(values) | risky
    return out


def table_definitions(features: Sequence[FeatureSpec]) -> dict[str, Feature]:
    """Wording for every input of a model: the catalogue's where it defines the feature, else (a model
    trained with `scfrisk train --table`) the table's own column name, so reasons still name the column,
    the merchant's value and the reference value."""
    return {
        f.name: FEATURE_INDEX.get(f.name) or Feature(
            name=f.name, source="table", aggregation="", window_days=None,
            description=f"Column '{f.name}' of the training table", direction=f.direction,
            unit="category" if f.kind == "categorical" else "number", kind=f.kind,
        )
        for f in features
    }


def _definitions_for(columns: list[str], definitions: Mapping[str, Feature]) -> list[Feature]:
    missing = [c for c in columns if c not in definitions]
    if missing:
        raise ScfriskError(
            f"no catalogue definition for model feature(s) {missing[:10]}: every reason must be worded from "
            "features/definitions.py; add them there or drop them from the model"
        )
    return [definitions[c] for c in columns]


def top_reasons(
    contributions: pd.DataFrame,
    inputs: pd.DataFrame,
    references: Mapping[str, Any],
    definitions: Mapping[str, Feature] = FEATURE_INDEX,
    top_n: int = TOP_N,
) -> pd.DataFrame:
    """The reason table (`COLUMNS`) of every row: up to `top_n` strictly positive and `top_n` strictly
    negative contributions each among the citable ones (`citable`), ranked by size; the row index becomes
    `merchant_id`."""
    names = list(contributions.columns)
    specs = _definitions_for(names, definitions)
    c = contributions.to_numpy(float)
    values = inputs[names].to_numpy(object)
    rows, directions, ranks, cols = [], [], [], []
    for direction, sign in enumerate((1.0, -1.0)):  # 0: raises, 1: lowers, the order rows are listed in
        signed = np.where(citable(inputs[names], references, specs, sign), sign * c, 0.0)
        order = np.argsort(-signed, axis=1, kind="stable")[:, :top_n]
        row, rank = np.nonzero(np.take_along_axis(signed, order, axis=1) > 0)
        rows.append(row)
        directions.append(np.full(len(row), direction))
        ranks.append(rank)
        cols.append(order[row, rank])
    row, direction, rank, col = map(np.concatenate, (rows, directions, ranks, cols))
    listed = np.lexsort((rank, direction, row))
    row, direction, rank, col = row[listed], direction[listed], rank[listed], col[listed]
    texts = [
        describe(specs[j], values[i, j], references.get(names[j])) for i, j in zip(row.tolist(), col.tolist())
    ]
    value_text, reference_text, sentence = zip(*texts) if texts else ((), (), ())
    return pd.DataFrame(
        {
            "merchant_id": contributions.index.to_numpy()[row].astype(str),
            "direction": np.array([RAISES, LOWERS], dtype=object)[direction],
            "rank": (rank + 1).astype(np.int16),
            "code": np.array(names, dtype=object)[col],
            "description": list(sentence),
            "contribution": c[row, col],
            "value": list(value_text),
            "reference": list(reference_text),
        }
    )


def explain_payloads(
    model: PDModel,
    frame: pd.DataFrame,
    references: Mapping[str, Any] | None = None,
    definitions: Mapping[str, Feature] = FEATURE_INDEX,
    top_n: int = TOP_N,
) -> pd.DataFrame:
    """Reason table for explicit raw feature rows (one merchant each): exact TreeSHAP on the fly."""
    return explain_inputs(model, model.prepare(frame), references, definitions, top_n)


def explain_inputs(
    model: PDModel,
    inputs: pd.DataFrame,
    references: Mapping[str, Any] | None = None,
    definitions: Mapping[str, Feature] = FEATURE_INDEX,
    top_n: int = TOP_N,
) -> pd.DataFrame:
    """`explain_payloads` of a frame `PDModel.prepare` already made (the service scores the same frame)."""
    explanation = explain(model.booster, inputs, threads=1)
    return top_reasons(explanation.values, inputs, references or model_references(model), definitions, top_n)


def population_reasons(model: PDModel, population: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """The reason table of merchants of a feature snapshot (`merchant_id` + raw features) and the SHAP base
    value: one partition's work of `ReasonCodeIndex.from_parts`."""
    inputs = model.prepare(population.set_index("merchant_id"))
    explanation = explain(model.booster, inputs)
    return top_reasons(explanation.values, inputs, model_references(model)), explanation.base_value


class ReasonCodeIndex:
    """Precomputed reason codes of a scored population, O(1) per merchant.

    Rows are kept as Python lists sliced by merchant: a lookup builds at most 2 x `TOP_N` small objects,
    microseconds, so the service never runs TreeSHAP for a merchant of the online store.
    """

    def __init__(self, table: pd.DataFrame, metadata: Mapping[str, Any] | None = None) -> None:
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise ScfriskError(f"reason-code table lacks columns {missing}")
        table = table.sort_values(
            ["merchant_id", "direction", "rank"], ascending=[True, False, True], ignore_index=True
        )
        self.table = table[list(COLUMNS)]
        self.metadata = dict(metadata or {})
        merchants, starts = np.unique(table["merchant_id"].to_numpy(str), return_index=True)
        stops = np.append(starts[1:], len(table))
        self._slices = {m: (int(a), int(b)) for m, a, b in zip(merchants.tolist(), starts, stops)}
        self._columns = {c: table[c].tolist() for c in COLUMNS[1:]}

    @classmethod
    def build(
        cls,
        explanation: Explanation,
        inputs: pd.DataFrame,
        references: Mapping[str, Any],
        definitions: Mapping[str, Feature] = FEATURE_INDEX,
        top_n: int = TOP_N,
        model_version: str = "",
    ) -> ReasonCodeIndex:
        """From batch SHAP values whose index is the merchant id, and the model input they explain."""
        table = top_reasons(explanation.values, inputs, references, definitions, top_n)
        return cls(
            table,
            {
                "model_version": model_version,
                "base_value": explanation.base_value,
                "top_n": top_n,
                "references": dict(references),
            },
        )

    @classmethod
    def for_population(cls, model: PDModel, population: pd.DataFrame, model_version: str) -> ReasonCodeIndex:
        """Reason codes of every merchant of a feature snapshot (`merchant_id` + raw features), in batch."""
        return cls.from_parts([population_reasons(model, population)], model, model_version)

    @classmethod
    def from_parts(cls, parts: Sequence[tuple[pd.DataFrame, float]], model: PDModel,
                   model_version: str) -> ReasonCodeIndex:
        """The index of a population explained in parts (`population_reasons` of each, e.g. per merchant
        bucket on Dask workers): the same index as of the whole, whose rows are explained one by one."""
        tables, base_values = zip(*parts)
        return cls(
            pd.concat(tables, ignore_index=True),
            {"model_version": model_version, "base_value": base_values[0], "top_n": TOP_N,
             "references": dict(model_references(model))},
        )

    def __len__(self) -> int:
        return len(self._slices)

    def __contains__(self, merchant_id: object) -> bool:
        return merchant_id in self._slices

    def lookup(self, merchant_id: str) -> MerchantReasons:
        """The merchant's reasons; a `ScfriskError` for a merchant the index does not hold."""
        if merchant_id not in self._slices:
            raise ScfriskError(
                f"merchant '{merchant_id}' is not in the reason-code index of model version "
                f"{self.metadata.get('model_version') or '?'}; score it from an explicit feature payload"
            )
        return self.reasons(merchant_id)

    def reasons(self, merchant_id: str) -> MerchantReasons:
        """The merchant's reasons as objects (none for a merchant nothing moved): the one reading of a
        reason table, for the service, the publish checks and the reports alike."""
        start, stop = self._slices.get(merchant_id, (0, 0))
        col = self._columns
        raised, lowered = [], []
        for i in range(start, stop):
            reason = Reason(
                col["code"][i],
                col["description"][i],
                col["contribution"][i],
                col["value"][i],
                col["reference"][i],
            )
            (raised if col["direction"][i] == RAISES else lowered).append(reason)
        return MerchantReasons(tuple(raised), tuple(lowered))

    def save(self, directory: Path | str) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(directory / TABLE_FILE, index=False)
        (directory / META_FILE).write_text(json.dumps(self.metadata, indent=2, default=_json_default))
        return directory

    @classmethod
    def load(cls, directory: Path | str) -> ReasonCodeIndex:
        directory = Path(directory)
        if not (directory / TABLE_FILE).is_file():
            raise ScfriskError(f"{directory} holds no reason-code index ({TABLE_FILE} is missing)")
        meta = directory / META_FILE
        return cls(
            pd.read_parquet(directory / TABLE_FILE), json.loads(meta.read_text()) if meta.is_file() else {}
        )


def _json_default(value: np.generic) -> Any:
    """numpy scalars (e.g. a base value) as plain JSON numbers."""
    return value.item()
