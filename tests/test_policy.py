"""Every way the policy file can be wrong is refused with a message naming the key to fix."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest

from core.schemas import PRODUCTS
from credit.policy import PolicyError, load_policy, parse_policy

POLICY_FILE = Path(__file__).resolve().parents[1] / "policy.toml"
BASE = tomllib.loads(POLICY_FILE.read_text())


def _refused(change, match: str) -> None:
    data = copy.deepcopy(BASE)
    change(data)
    with pytest.raises(PolicyError, match=match):
        parse_policy(data)


def test_repository_policy_covers_every_platform_product():
    policy = load_policy(POLICY_FILE)
    assert set(policy.products) == set(PRODUCTS)
    assert policy.version == BASE["version"]
    assert policy.master_scale.names == ["A", "B", "C", "D", "E", "F", "G"]


def test_negative_rate_is_named():
    _refused(
        lambda d: d["products"]["microloan"]["pricing"].update(funding_rate=-0.01),
        r"'products\.microloan\.pricing\.funding_rate': Input should be greater than or equal to 0 \(got -0\.01\)",
    )


def test_advance_rate_above_100_percent_is_named():
    _refused(
        lambda d: d["products"]["order_financing"]["advance_rate"].update(B=1.05),
        r"'products\.order_financing\.advance_rate\.B': Input should be less than or equal to 1",
    )


def test_overlapping_master_scale_grades_are_refused():
    _refused(
        lambda d: d["master_scale"]["grades"][3].update(max_pd=0.015), r"master_scale.*strictly increase"
    )


def test_master_scale_gap_at_the_top_is_refused():
    _refused(lambda d: d["master_scale"]["grades"][-1].update(max_pd=0.5), r"master_scale.*no gap")


def test_advance_rate_with_a_grade_gap_is_named():
    _refused(
        lambda d: d["products"]["microloan"]["advance_rate"].pop("C"),
        r"products\.microloan\.advance_rate: needs exactly the grades \['A', 'B', 'C', 'D', 'E'\]",
    )


def test_advance_rate_rising_for_worse_grades_is_named():
    _refused(
        lambda d: d["products"]["microloan"]["advance_rate"].update(E=0.95),
        r"products\.microloan\.advance_rate: must not rise for worse grades",
    )


def test_unknown_exposure_base_kind_is_named():
    _refused(
        lambda d: d["products"]["microloan"]["base"].update(kind="crypto_wallet"),
        r"'products\.microloan\.base': Input tag 'crypto_wallet'.*'revenue_capacity'",
    )


def test_unknown_worst_grade_is_named():
    _refused(
        lambda d: d["products"]["microloan"].update(worst_grade="Z"),
        r"products\.microloan\.worst_grade: unknown grade 'Z'",
    )


def test_unknown_segment_is_named():
    _refused(
        lambda d: d["products"]["order_financing"].update(segments=["corporate", "charity"]),
        r"'products\.order_financing\.segments': unknown \['charity'\]",
    )


def test_unknown_haircut_category_is_named():
    _refused(
        lambda d: d["products"]["warehouse_receipt_financing"]["base"]["haircuts"].update(gold=0.1),
        r"'products\.warehouse_receipt_financing\.base\.haircuts': unknown categories \['gold'\]",
    )


def test_misspelt_key_is_named():
    _refused(
        lambda d: d["products"]["microloan"].update(tenor_dayz=30),
        r"unknown key 'products\.microloan\.tenor_dayz'",
    )


def test_every_problem_is_reported_at_once():
    data = copy.deepcopy(BASE)
    data["products"]["microloan"]["lgd"] = 1.5
    data["products"]["order_financing"]["min_tenure_days"] = -1
    with pytest.raises(PolicyError) as caught:
        parse_policy(data)
    assert "products.microloan.lgd" in str(caught.value)
    assert "products.order_financing.min_tenure_days" in str(caught.value)


def test_request_for_a_product_not_in_the_policy_is_refused():
    with pytest.raises(PolicyError, match=r"unknown product 'leasing'.*known: order_financing"):
        load_policy(POLICY_FILE).product("leasing")


def test_missing_and_malformed_policy_files_are_refused(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[products\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(tmp_path / "bad.toml")
