"""Model input: the block-wise `prepare_features` gives exactly what the per-column definition gives, for a
one-row payload as for a batch, and the booster scores it to the same bits as LightGBM's own pandas path."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.calibration import Calibrator
from models.pd_model import NUMERIC_SENTINELS, FeatureSpec, PDModel, clean_text, prepare_features

FEATURES = (
    FeatureSpec("amount", "numeric", 1),
    FeatureSpec("city", "categorical", 0, ("x", "y")),
    FeatureSpec("share", "numeric", -1),
    FeatureSpec("code", "categorical", 0, ("1", "2")),
    FeatureSpec("count", "numeric", 0),
)
AWKWARD_NUMBERS = [" 12 ", "1e3", "0.25", "NA", "", "-999", "null", "abc", None, np.nan, "inf", -999.0, -9999,
                   -99999.0, np.inf, -np.inf, 0.0, -1.5, 3, True]
AWKWARD_LEVELS = ["x", " y ", "X", "mars", "NA", "", "?", "-", None, np.nan, 1, 1.0, "1", " 2", 2.0, "1.0"]


def per_column(df: pd.DataFrame, features: tuple[FeatureSpec, ...]) -> pd.DataFrame:
    """The definition `prepare_features` must keep: each column parsed and masked on its own."""
    columns = {}
    for spec in features:
        if spec.kind == "numeric":
            numbers = pd.to_numeric(df[spec.name], errors="coerce").astype(float)
            missing = numbers.isin(NUMERIC_SENTINELS) | ~np.isfinite(numbers)
            columns[spec.name] = numbers.mask(missing).to_numpy()
        else:
            columns[spec.name] = pd.Categorical(clean_text(df[spec.name]), categories=list(spec.levels))
    return pd.DataFrame(columns, index=df.index)


@pytest.fixture(scope="module")
def model() -> PDModel:
    rng = np.random.default_rng(3)
    n = 600
    frame = pd.DataFrame({
        "amount": rng.lognormal(3, 1, n),
        "city": rng.choice(["x", "y"], n),
        "share": rng.uniform(0, 1, n),
        "code": rng.choice([1.0, 2.0], n),
        "count": rng.integers(0, 20, n),
    })
    y = rng.binomial(1, 1 / (1 + np.exp(-(frame["share"] * 3 - 2 + (frame["city"] == "y")))))
    X = prepare_features(frame, FEATURES)
    params = {"objective": "binary", "num_leaves": 4, "min_data_in_leaf": 5, "verbose": -1, "seed": 1}
    booster = lgb.train(params, lgb.Dataset(X, label=y), num_boost_round=15)
    return PDModel(booster, FEATURES, Calibrator("platt").fit(booster.predict(X, raw_score=True), y))


def awkward_frame() -> pd.DataFrame:
    k = len(AWKWARD_LEVELS)
    return pd.DataFrame({
        "amount": np.array(AWKWARD_NUMBERS[:k], dtype=object),
        "city": np.array(AWKWARD_LEVELS, dtype=object),
        "share": np.linspace(-0.5, 1.5, k),
        "code": np.array(AWKWARD_LEVELS[::-1], dtype=object),
        "count": pd.array([1, None] * (k // 2), dtype="Int64"),
        "ignored": "text",
    }, index=[f"M{i}" for i in range(k)])


def test_awkward_values_prepare_and_score_exactly_as_column_by_column(model: PDModel) -> None:
    frame = awkward_frame()
    prepared = prepare_features(frame, FEATURES)
    pd.testing.assert_frame_equal(prepared, per_column(frame, FEATURES), check_exact=True)
    assert prepared["amount"].notna().tolist()[:4] == [True, True, True, False]  # " 12 ", "1e3", "0.25", "NA"
    assert prepared["city"].astype(object).tolist()[:4] == ["x", "y", np.nan, np.nan]  # "X", "mars": unknown
    margin = model.booster.predict(per_column(frame, FEATURES), raw_score=True)  # LightGBM's own pandas path
    np.testing.assert_array_equal(model.raw_margin(frame), margin)
    np.testing.assert_array_equal(model.predict_pd(frame), model.calibrator.transform(margin))


def test_a_one_row_payload_is_prepared_and_scored_like_its_row_in_a_batch(model: PDModel) -> None:
    frame = pd.DataFrame({
        "amount": [12.0, -999.0, np.inf, np.nan, -99999.0, 0.5, 3e9, -1.0],
        "city": [" y", "x", "NA", None, "mars", "", "X", "y"],
        "share": [0.1, -9999.0, 0.7, -np.inf, 0.0, 1.0, np.nan, 0.3],
        "code": [1.0, 2.0, np.nan, 2.0, 3.0, 1.0, 2.0, 1.0],  # float codes: 1.0 is level "1"
        "count": pd.array([1, None, 3, -999, 5, 6, None, 8], dtype="Int64"),
    }, index=[f"M{i}" for i in range(8)])
    batch_inputs, batch_pd = model.prepare(frame), model.predict_pd(frame)
    assert batch_inputs["code"].astype(object).tolist()[:4] == ["1", "2", np.nan, "2"]
    for i in range(len(frame)):
        payload = pd.DataFrame([frame.iloc[i].to_dict()], index=[frame.index[i]])  # as the service builds it
        pd.testing.assert_frame_equal(model.prepare(payload), batch_inputs.iloc[[i]], check_exact=True)
        assert model.predict_pd(payload)[0] == batch_pd[i]


cells = st.sampled_from(AWKWARD_NUMBERS) | st.floats() | st.integers(-10**6, 10**6)
floats = st.floats()  # NaN and +-inf included


@settings(max_examples=60, deadline=None)
@given(amount=st.lists(cells, min_size=1, max_size=6), data=st.data())
def test_any_mix_of_text_numbers_and_sentinels_matches_the_definition(amount, data) -> None:
    n = len(amount)

    def column(values: st.SearchStrategy) -> list:
        return data.draw(st.lists(values, min_size=n, max_size=n))

    frame = pd.DataFrame({
        "amount": pd.Series(amount, dtype=object),
        "city": pd.Series(column(st.sampled_from(AWKWARD_LEVELS)), dtype=object),
        "share": column(floats),
        "code": column(st.sampled_from([1.0, 2.0, 3.0, np.nan])),
        "count": column(st.sampled_from(["-999", "7", " 8 ", "n/a"])),
    })
    expected = per_column(frame, FEATURES)
    pd.testing.assert_frame_equal(prepare_features(frame, FEATURES), expected, check_exact=True)
