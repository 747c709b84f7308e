"""SHAP values of the PD booster: exact additivity to the raw margin, importance tables, the audit file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.errors import ScfriskError
from explanation.contributions import compare_importance, explain, global_importance, importance_by
from testkit.explain import SHAP_PREFIX, Trained, explanation_table, used_features, write_explanations


def test_shap_values_plus_base_value_equal_the_raw_margin_for_every_row(trained: Trained) -> None:
    model, frame = trained.model, trained.frame
    inputs = model.prepare(frame)
    assert inputs.isna().any().any(), "the fixture must exercise missing values and sentinels"
    explanation = explain(model.booster, inputs)
    np.testing.assert_allclose(explanation.margin.to_numpy(), model.raw_margin(frame), rtol=0, atol=1e-9)
    assert explanation.values.columns.tolist() == model.feature_names
    assert explanation.values.index.equals(frame.index)


def test_chunked_explanation_equals_one_pass(trained: Trained) -> None:
    inputs = trained.model.prepare(trained.frame.head(1500))
    whole = explain(trained.model.booster, inputs)
    chunked = explain(trained.model.booster, inputs, chunk_rows=400)
    pd.testing.assert_frame_equal(whole.values, chunked.values)
    assert whole.base_value == chunked.base_value


def test_features_without_splits_never_get_a_contribution(trained: Trained) -> None:
    inputs = trained.model.prepare(trained.frame)
    values = explain(trained.model.booster, inputs).values
    unused = sorted(set(values.columns) - set(used_features(trained.model.booster)))
    assert (values[unused] == 0.0).all().all()
    assert (values[used_features(trained.model.booster)] != 0.0).any().all()


def test_group_importances_average_back_to_the_global_importance(trained: Trained) -> None:
    values = explain(trained.model.booster, trained.model.prepare(trained.frame)).values
    overall = global_importance(values)
    assert overall.is_monotonic_decreasing
    np.testing.assert_allclose(overall, values.abs().mean()[overall.index])
    by_product = importance_by(values, trained.frame["product"])
    weights = trained.frame["product"].value_counts(normalize=True)[by_product.columns]
    np.testing.assert_allclose(by_product @ weights, overall)
    assert by_product.index.tolist() == overall.index.tolist()


def test_champion_challenger_comparison_keeps_features_only_one_model_uses() -> None:
    champion = pd.Series({"refund_rate_90d": 0.6, "tenure_days": 0.3, "region": 0.1})
    challenger = pd.Series({"refund_rate_90d": 0.5, "tenure_days": 0.5})
    table = compare_importance(champion, challenger).set_index("feature")
    assert table.loc["region", "challenger"] == 0.0
    assert table["champion_share"].sum() == pytest.approx(1.0)
    assert table["challenger_share"].sum() == pytest.approx(1.0)
    assert table.loc["tenure_days", "challenger_rank"] == 1
    assert table.loc["tenure_days", "share_change"] == pytest.approx(0.5 - 0.3)


def test_audit_file_reproduces_each_margin_and_keeps_the_keys(trained: Trained, tmp_path) -> None:
    frame = trained.frame.head(300)
    explanation = explain(trained.model.booster, trained.model.prepare(frame))
    table = explanation_table(explanation, frame[["merchant_id", "applied_at"]], model_version="7")
    back = pd.read_parquet(write_explanations(table, tmp_path / "audit" / "shap.parquet"))
    shap_columns = [c for c in back.columns if c.startswith(SHAP_PREFIX)]
    assert len(shap_columns) == len(trained.model.feature_names)
    np.testing.assert_allclose(
        back[shap_columns].sum(axis=1) + back["base_value"], trained.model.raw_margin(frame), atol=1e-9
    )
    assert back["merchant_id"].tolist() == frame["merchant_id"].tolist()
    assert set(back["model_version"]) == {"7"}


def test_explaining_nothing_is_a_clear_error(trained: Trained) -> None:
    with pytest.raises(ScfriskError, match="no rows"):
        explain(trained.model.booster, trained.model.prepare(trained.frame.head(0)))


def test_categories_are_matched_by_level_not_by_code_order(trained: Trained) -> None:
    inputs = trained.model.prepare(trained.frame.head(500))
    shuffled = inputs.assign(
        region=inputs["region"].cat.reorder_categories(inputs["region"].cat.categories[::-1])
    )
    np.testing.assert_allclose(
        explain(trained.model.booster, shuffled).margin.to_numpy(),
        trained.model.raw_margin(trained.frame.head(500)),
        rtol=0,
        atol=1e-9,
    )
