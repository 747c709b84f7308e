"""Reason codes: exactly the largest signed contributions, worded from the catalogue with the right values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.explain import explain
from models.reason_codes import (
    LOWERS,
    RAISES,
    REFERENCES_KEY,
    ReasonCodeIndex,
    explain_payloads,
    model_references,
    reference_values,
    top_reasons,
)
from pipelines.errors import ScfriskError
from tests.explain_fixtures import Trained


@pytest.fixture(scope="module")
def index(trained: Trained) -> ReasonCodeIndex:
    frame = trained.frame.set_index("merchant_id")
    inputs = trained.model.prepare(frame)
    return ReasonCodeIndex.build(
        explain(trained.model.booster, inputs), inputs, model_references(trained.model), model_version="3"
    )


def test_reasons_are_exactly_the_largest_positive_and_negative_contributions(
    trained: Trained, index: ReasonCodeIndex
) -> None:
    frame = trained.frame.set_index("merchant_id").sample(200, random_state=1)
    values = explain(trained.model.booster, trained.model.prepare(frame)).values
    for merchant, row in values.iterrows():
        reasons = index.lookup(merchant)
        up = row[row > 0].sort_values(ascending=False).head(4)
        down = row[row < 0].sort_values().head(4)
        assert [r.code for r in reasons.raised] == up.index.tolist()
        assert [r.code for r in reasons.lowered] == down.index.tolist()
        np.testing.assert_allclose([r.contribution for r in reasons.raised], up.to_numpy())


def test_reason_text_renders_the_merchants_value_and_the_approved_reference(trained: Trained) -> None:
    merchant = trained.frame.loc[trained.frame["segment"] == "individual"].head(1).copy()
    merchant["refund_rate_90d"] = 0.18
    table = explain_payloads(trained.model, merchant)
    refund = table[(table["code"] == "refund_rate_90d")]
    assert refund["direction"].tolist() == [RAISES] and refund["rank"].tolist() == [1]
    reference = model_references(trained.model)["refund_rate_90d"]
    assert refund["description"].iloc[0] == (
        "Share of orders placed in the last 90 days that were refunded: 18%; "
        f"typical for approved merchants: {reference:.0%}"
    )
    assert refund["value"].iloc[0] == "18%"


def test_a_feature_with_zero_contribution_never_appears() -> None:
    contributions = pd.DataFrame(
        {
            "refund_rate_90d": [0.4, 0.0],
            "tenure_days": [0.0, -0.2],
            "complaints_90d": [-0.1, 0.0],
            "segment": [0.0, 0.0],
        },
        index=["M1", "M2"],
    )
    inputs = pd.DataFrame(
        {
            "refund_rate_90d": [0.2, 0.01],
            "tenure_days": [30.0, 900.0],
            "complaints_90d": [3.0, 0.0],
            "segment": ["individual", "corporate"],
        },
        index=["M1", "M2"],
    )
    table = top_reasons(
        contributions,
        inputs,
        {"refund_rate_90d": 0.04, "tenure_days": 700.0, "complaints_90d": 0.0, "segment": "corporate"},
    )
    assert (table["contribution"] != 0).all()
    assert table[table["merchant_id"] == "M1"][["direction", "code"]].values.tolist() == [
        [RAISES, "refund_rate_90d"],
        [LOWERS, "complaints_90d"],
    ]
    assert table[table["merchant_id"] == "M2"][["direction", "code"]].values.tolist() == [
        [LOWERS, "tenure_days"]
    ]
    assert "segment" not in set(table["code"])


def test_missing_values_are_said_to_be_unknown_never_a_number(trained: Trained) -> None:
    merchant = trained.frame.head(1).copy()
    merchant["late_delivery_rate_90d"] = -999.0  # legacy sentinel for missing
    table = explain_payloads(trained.model, merchant, top_n=len(trained.model.feature_names))
    late = table[table["code"] == "late_delivery_rate_90d"]
    assert late["value"].tolist() == ["unknown"]
    assert ": unknown; typical for approved merchants: " in late["description"].iloc[0]


def test_precomputed_index_and_on_the_fly_payloads_agree_and_survive_a_round_trip(
    trained: Trained, index: ReasonCodeIndex, tmp_path
) -> None:
    loaded = ReasonCodeIndex.load(index.save(tmp_path / "reasons"))
    assert len(loaded) == len(trained.frame)
    assert loaded.metadata["model_version"] == "3"
    payloads = trained.frame.head(20)
    live = explain_payloads(trained.model, payloads.set_index("merchant_id"))
    for merchant in payloads["merchant_id"]:
        stored = loaded.lookup(merchant)
        again = live[live["merchant_id"] == merchant]
        assert [r.description for r in stored.raised] == again.loc[
            again["direction"] == RAISES, "description"
        ].tolist()
        assert [r.code for r in stored.lowered] == again.loc[again["direction"] == LOWERS, "code"].tolist()


def test_unknown_merchant_names_the_model_version_and_the_way_out(index: ReasonCodeIndex) -> None:
    assert "M9999999" not in index
    with pytest.raises(
        ScfriskError, match=r"'M9999999' is not in the reason-code index of model version 3.*payload"
    ):
        index.lookup("M9999999")


def test_a_model_feature_without_catalogue_wording_is_refused() -> None:
    contributions = pd.DataFrame({"shoe_size": [0.3]}, index=["M1"])
    with pytest.raises(ScfriskError, match=r"no catalogue definition for model feature\(s\) \['shoe_size'\]"):
        top_reasons(contributions, pd.DataFrame({"shoe_size": [42.0]}, index=["M1"]), {})


def test_references_are_medians_and_commonest_levels_of_the_low_pd_half() -> None:
    inputs = pd.DataFrame(
        {
            "refund_rate_90d": [0.01, 0.03, 0.05, 0.30, 0.40, 0.50],
            "segment": pd.Categorical(["corporate", "corporate", "individual"] + ["individual"] * 3),
        }
    )
    pd_values = np.array([0.01, 0.02, 0.03, 0.2, 0.3, 0.4])
    assert reference_values(inputs, pd_values) == {"refund_rate_90d": 0.03, "segment": "corporate"}


def test_a_model_saved_without_references_says_how_to_fix_it(trained: Trained) -> None:
    bare = type(trained.model)(trained.model.booster, trained.model.features, trained.model.calibrator)
    with pytest.raises(ScfriskError, match=REFERENCES_KEY):
        explain_payloads(bare, trained.frame.head(1))
