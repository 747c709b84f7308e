"""PD model: out-of-time splits, calibration, monotone behaviour, baselines, save/load, reproducibility."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.errors import ScfriskError
from models.calibration import Calibrator, choose_calibrator
from models.evaluation import (
    evaluate_model,
    expected_calibration_error,
    pd_metrics,
    population_stability_index,
)
from models.master_scale import load_master_scale
from models.pd_model import PDModel, prepare_features
from models.splits import split_summary, stratified_split, time_split
from models.training import binary_target, infer_features, train_pd_model
from testkit.synthetic import DIRECTIONS, synthetic_applications
from tests.conftest import REPO

NOT_FEATURES = {"application_id", "applied_at", "defaulted", "true_pd"}


def _train(frame: pd.DataFrame, seed: int = 3):
    y = frame["defaulted"]
    slices = time_split(frame["applied_at"], valid_months=4, test_months=4)
    features = infer_features(frame[slices == "train"], NOT_FEATURES, DIRECTIONS)
    result = train_pd_model(frame, y, slices, features, seed=seed, max_rounds=200, search_trials=2,
                            master_scale=load_master_scale(REPO / "policy.toml"))
    baseline_pd = result.baseline.predict_pd(result.model.prepare(frame))
    evaluation = evaluate_model(result.model, baseline_pd, frame, y, slices, ["merchant_type", "product"],
                                frame["true_pd"], min_grade_count=30, grade_tolerance_z=1.64)
    return result, evaluation, slices


@pytest.fixture(scope="module")
def applications() -> pd.DataFrame:
    return synthetic_applications(7000, seed=11)


@pytest.fixture(scope="module")
def trained(applications):
    return _train(applications)


def test_time_split_keeps_test_strictly_after_validation_after_training(applications):
    slices = time_split(applications["applied_at"], valid_months=4, test_months=4)
    summary = split_summary(slices, applications["defaulted"], applications["applied_at"])
    assert list(summary.index) == ["train", "valid", "test"]
    assert summary.loc["train", "end"] < summary.loc["valid", "start"] <= summary.loc["valid", "end"]
    assert summary.loc["valid", "end"] < summary.loc["test", "start"]
    assert summary["rows"].sum() == len(applications)


def test_time_split_too_short_history_is_a_user_error(applications):
    with pytest.raises(ScfriskError, match="too short.*lower model.valid_months"):
        time_split(applications["applied_at"], valid_months=12, test_months=12)


def test_stratified_split_keeps_the_default_rate():
    y = pd.Series(np.r_[np.ones(100), np.zeros(900)].astype(int))
    slices = stratified_split(y, 0.2, 0.2, seed=1)
    rates = y.groupby(slices).mean()
    assert set(slices) == {"train", "valid", "test"}
    assert np.allclose(rates, 0.1, atol=0.01)


def test_lightgbm_beats_logistic_baseline_and_random_out_of_time(trained):
    _, evaluation, slices = trained
    m = evaluation.metrics
    rng = np.random.default_rng(0)
    test_y = evaluation.scored.loc[(slices == "test").to_numpy(), "y"].to_numpy()
    random_auc = pd_metrics(test_y, rng.random(len(test_y)))["auc"]
    assert m["test_auc"] > m["baseline_auc"] + 0.01
    assert m["test_auc"] > random_auc + 0.2
    assert m["auc_gap_to_oracle"] < 0.03


def test_calibrated_pd_matches_observed_rates_and_grades_rise(trained):
    _, evaluation, _ = trained
    assert evaluation.metrics["test_ece"] < 0.03
    assert abs(evaluation.metrics["test_mean_pd"] - evaluation.metrics["test_default_rate"]) < 0.03
    assert evaluation.metrics["grades_monotone"] == 1.0
    by = evaluation.by_group
    assert {"corporate", "individual", "microloan", "order_financing"} <= set(by["value"])
    assert set(evaluation.grades["grade"]) == set("ABCDEFG")


def test_same_seed_same_model(applications, trained):
    again, evaluation, _ = _train(applications)
    first = trained[0]
    assert evaluation.metrics["test_auc"] == trained[1].metrics["test_auc"]
    np.testing.assert_array_equal(first.model.predict_pd(applications), again.model.predict_pd(applications))


def test_raising_a_plus_one_feature_never_lowers_pd(trained, applications):
    model = trained[0].model
    rows = applications.sample(200, random_state=0)
    for name, sign in DIRECTIONS.items():
        if sign == 0:
            continue
        grid = np.quantile(applications[name].dropna().clip(lower=0), np.linspace(0, 1, 9))
        variants = pd.concat([rows.assign(**{name: value}) for value in grid], ignore_index=True)
        pds = model.predict_pd(variants).reshape(len(grid), len(rows))
        steps = np.diff(pds, axis=0) * sign
        assert (steps >= -1e-12).all(), f"{name} ({sign:+d}) moved PD against its direction"


def test_save_load_round_trip_gives_identical_pds(trained, applications, tmp_path):
    model = trained[0].model
    model.metadata = {"feature_set_version": "test"}
    loaded = PDModel.load(model.save(tmp_path / "model"))
    np.testing.assert_array_equal(model.predict_pd(applications), loaded.predict_pd(applications))
    assert loaded.features == model.features and loaded.metadata == {"feature_set_version": "test"}
    assert list(loaded.grade(applications.head(3))) == list(model.grade(applications.head(3)))
    assert not list(tmp_path.glob("model/*.pkl"))


def test_prepare_handles_unknown_levels_sentinels_and_text(trained, applications):
    model = trained[0].model
    rows = applications.head(4).copy()
    rows["region"] = ["mars", "", "NA", None]
    rows["late_settlement_share"] = ["-999", "0.1", "n/a", "abc"]
    prepared = model.prepare(rows)
    assert prepared["region"].isna().all()
    assert prepared["late_settlement_share"].isna().tolist() == [True, False, True, True]
    assert np.isfinite(model.predict_pd(rows)).all()
    with pytest.raises(ScfriskError, match="lacks 1 model feature.*rating_avg"):
        model.prepare(rows.drop(columns="rating_avg"))


def test_platt_is_chosen_when_the_margin_is_a_shifted_logit():
    rng = np.random.default_rng(5)
    margin = rng.normal(-2, 1.5, 5000)
    y = rng.binomial(1, 1 / (1 + np.exp(-(0.7 * margin + 0.4))))
    calibrator, scores = choose_calibrator(margin, y, seed=1)
    assert calibrator.method == "platt" and scores["platt"] <= scores["isotonic"]
    assert calibrator.coef_ == pytest.approx(0.7, abs=0.1)
    restored = Calibrator.from_dict(calibrator.to_dict())
    np.testing.assert_array_equal(restored.transform(margin), calibrator.transform(margin))


def test_ece_and_psi_detect_what_they_should():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.01, 0.3, 20000)
    y = rng.binomial(1, p)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, p * 2) > 0.1
    assert population_stability_index(p, rng.uniform(0.01, 0.3, 20000)) < 0.01
    assert population_stability_index(p, p * 3) > 0.25


@pytest.mark.parametrize(("values", "expected"), [
    (["good", "bad", "good"], [0, 1, 0]),
    (["0", "1", "1"], [0, 1, 1]),
    ([0.0, 1.0, 0.0], [0, 1, 0]),
    ([False, True, True], [0, 1, 1]),
])
def test_binary_target_reads_common_codings(values, expected):
    assert binary_target(pd.Series(values, name="t")).tolist() == expected


def test_binary_target_without_a_default_label_is_named():
    with pytest.raises(ScfriskError, match="target column 'grade'.*found"):
        binary_target(pd.Series(["a", "b", "c"], name="grade"))


def test_categorical_and_text_coded_kinds_are_inferred():
    frame = pd.DataFrame({"amount": ["1", "2.5", "-999", "NA"], "city": ["x", "y", "", "x"], "n": [1, 2, 3, 4]})
    kinds = {f.name: (f.kind, f.levels) for f in infer_features(frame, set())}
    assert kinds == {"amount": ("numeric", ()), "city": ("categorical", ("x", "y")), "n": ("numeric", ())}
    assert prepare_features(frame, infer_features(frame, set()))["amount"].isna().tolist() == [False, False, True, True]
