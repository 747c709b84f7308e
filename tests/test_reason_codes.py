"""Reason codes: exactly the largest signed contributions, worded from the catalogue with the right values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.errors import ScfriskError
from explanation.contributions import explain
from explanation.reason_codes import (
    LOWERS,
    RAISES,
    REFERENCES_KEY,
    ReasonCodeIndex,
    explain_payloads,
    model_references,
    reference_values,
    top_reasons,
)
from features.catalogue import PROTECTED_PROXIES, check_proxies
from features.definitions import FEATURE_INDEX
from reporting.model_card import protected_attributes
from testkit.explain import Trained


@pytest.fixture(scope="module")
def index(trained: Trained) -> ReasonCodeIndex:
    frame = trained.frame.set_index("merchant_id")
    inputs = trained.model.prepare(frame)
    return ReasonCodeIndex.build(
        explain(trained.model.booster, inputs), inputs, model_references(trained.model), model_version="3"
    )


def _on_its_side(name: str, value: object, reference: object, sign: int) -> bool:
    """The citing rule, spelled out once more: a declared direction must agree with the comparison."""
    if name in PROTECTED_PROXIES:
        return False
    if pd.isna(value) or reference is None:
        return True
    feature = FEATURE_INDEX[name]
    if feature.kind == "categorical" or feature.direction == 0:
        return str(value) != str(reference)
    return sign * feature.direction * (float(value) - float(reference)) > 0


def test_reasons_are_exactly_the_largest_contributions_that_read_the_way_they_count(
    trained: Trained, index: ReasonCodeIndex
) -> None:
    frame = trained.frame.set_index("merchant_id").sample(200, random_state=1)
    inputs = trained.model.prepare(frame)
    values = explain(trained.model.booster, inputs).values
    references = model_references(trained.model)
    for merchant, row in values.iterrows():
        reasons = index.lookup(merchant)
        for sign, cited in ((1, reasons.raised), (-1, reasons.lowered)):
            keep = [n for n in row.index if sign * row[n] > 0
                    and _on_its_side(n, inputs.at[merchant, n], references.get(n), sign)]
            expected = (sign * row[keep]).sort_values(ascending=False).head(4)
            assert [r.code for r in cited] == expected.index.tolist()
            np.testing.assert_allclose([sign * r.contribution for r in cited], expected.to_numpy())


def test_a_factor_is_cited_only_on_the_risky_side_of_the_approved_reference() -> None:
    """SHAP counts against the average merchant, the sentence against the typical approved one: a
    refund rate below the approved merchants' or a tenure above theirs is never said to raise the risk."""
    contributions = pd.DataFrame({"refund_rate_90d": [0.4], "tenure_days": [0.3], "complaints_90d": [0.2],
                                  "avg_days_to_ship_90d": [0.1]}, index=["M1"])
    inputs = pd.DataFrame({"refund_rate_90d": [0.02], "tenure_days": [900.0], "complaints_90d": [3.0],
                           "avg_days_to_ship_90d": [7.0]}, index=["M1"])
    references = {"refund_rate_90d": 0.04, "tenure_days": 700.0, "complaints_90d": 0.0, "avg_days_to_ship_90d": 1.0}
    table = top_reasons(contributions, inputs, references)
    assert table["code"].tolist() == ["complaints_90d", "avg_days_to_ship_90d"]
    assert table["description"].tolist() == [
        "Buyer complaints received in the last 90 days: 3, higher than the typical approved merchant's 0",
        "Average days between an order and its shipment, orders of the last 90 days: 7 days, higher than the "
        "typical approved merchant's 1 day",
    ]


def test_no_reason_ever_cites_a_possible_proxy_of_a_protected_attribute(trained: Trained) -> None:
    assert "region" in PROTECTED_PROXIES and "region" in trained.model.feature_names  # the fixture uses it
    frame = trained.frame.set_index("merchant_id")
    table = explain_payloads(trained.model, frame, top_n=len(trained.model.feature_names))
    assert len(table) > 0 and not set(table["code"]) & set(PROTECTED_PROXIES)
    forced = top_reasons(pd.DataFrame({"region": [5.0], "segment": [0.1]}, index=["M1"]),
                         pd.DataFrame({"region": ["west"], "segment": ["individual"]}, index=["M1"]),
                         {"region": "east", "segment": "corporate"})
    assert forced["code"].tolist() == ["segment"]


def test_a_misspelt_proxy_declaration_is_refused() -> None:
    with pytest.raises(ValueError, match=r"lacks: \['regoin'\]"):
        check_proxies({"regoin": "typo"})


def test_the_model_card_says_how_protected_attributes_and_proxies_are_handled(trained: Trained) -> None:
    with_region = protected_attributes(trained.model)
    assert "## Protected attributes and their proxies" in with_region
    assert "- `region` (" in with_region and "**an input of this model**" in with_region
    assert "never given as a reason" in with_region
    without = type(trained.model)(trained.model.booster,
                                  tuple(f for f in trained.model.features if f.name != "region"),
                                  trained.model.calibrator)
    assert "not an input of this model" in protected_attributes(without)
    assert "None of them shapes this model's PDs." in protected_attributes(without)


def test_reason_text_renders_the_merchants_value_and_the_approved_reference(trained: Trained) -> None:
    merchant = trained.frame.loc[trained.frame["segment"] == "individual"].head(1).copy()
    merchant["refund_rate_90d"] = 0.18
    table = explain_payloads(trained.model, merchant)
    refund = table[(table["code"] == "refund_rate_90d")]
    assert refund["direction"].tolist() == [RAISES] and refund["rank"].tolist() == [1]
    reference = model_references(trained.model)["refund_rate_90d"]
    assert refund["description"].iloc[0] == (
        "Share of orders placed in the last 90 days that were refunded: 18%, "
        f"higher than the typical approved merchant's {reference:.0%}"
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
        {"refund_rate_90d": 0.04, "tenure_days": 700.0, "complaints_90d": 5.0, "segment": "corporate"},
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
    assert ": unknown; the typical approved merchant's: " in late["description"].iloc[0]


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


def test_a_reason_shows_the_decimals_that_tell_the_merchant_from_the_reference() -> None:
    """Rounded to whole days, 1.4 against 0.9 read '1 day, higher than ... 1 day' (seen in `make demo`)."""
    contributions = pd.DataFrame({"avg_days_to_ship_90d": [0.1], "refund_rate_90d": [0.2]}, index=["M1"])
    inputs = pd.DataFrame({"avg_days_to_ship_90d": [1.4], "refund_rate_90d": [0.0503]}, index=["M1"])
    references = {"avg_days_to_ship_90d": 0.9, "refund_rate_90d": 0.0501}
    table = top_reasons(contributions, inputs, references)
    assert table["description"].tolist() == [
        "Share of orders placed in the last 90 days that were refunded: 5.03%, higher than the typical approved "
        "merchant's 5.01%",
        "Average days between an order and its shipment, orders of the last 90 days: 1.4 days, higher than the "
        "typical approved merchant's 0.9 days",
    ]
