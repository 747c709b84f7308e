"""The risk report: summary first, every section and image in one self-contained page, rendered by a real
browser, written to the workspace and logged to (and rebuilt from) a real MLflow store."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from core.errors import ScfriskError
from core.settings import Settings, load_settings
from credit.policy import load_policy
from explanation.reason_codes import table_definitions
from features.definitions import FEATURE_INDEX
from models.gates import MODEL_KIND_TAG, SPLIT_KIND_TAG, GateDecision
from models.master_scale import load_master_scale
from models.registry import apply_decision, configure_mlflow, log_pd_model
from models.splits import stratified_split
from models.stability import calendar_trends
from models.training import infer_features, train_pd_model
from pipelines.report import (
    ARTIFACT_DIR,
    POPULATION_FILE,
    feature_snapshots,
    report_file,
    report_for_version,
    write_risk_report,
)
from reporting.html import Section, Table, render_page
from reporting.risk_report import (
    CURRENCY,
    TOP_ROWS,
    OtherModel,
    render_risk_report,
    risk_report_sections,
)
from testkit.explain import NOT_FEATURES, Trained, catalogue_applications, train
from tests.browser import chromium, console_messages, needs_chromium
from tests.conftest import REPO

SECTIONS = [
    "Summary",
    "Model card summary",
    "Out-of-time performance",
    "Calibration",
    "Grade table",
    "Stability and shifts",
    "Stability over time",
    "Global explanations",
    "Segment, product and grade views",
    "Individual decisions",
    "Known limitations",
    "Gate decision",
]
DECISION = GateDecision(
    False, ("pass: ECE 0.0100 <= 0.05", "fail: OOT AUC 0.80 vs champion 0.83 - tolerance 0.01")
)
GATES = load_settings(REPO / "scfrisk.toml").gates
SCREEN = (1280, 1200)
"""A desktop screen: the summary must fit in it, below the title and the table of contents."""


class Page(HTMLParser):
    """What a reader (and a printer) gets: sections with their text and table cells, images, external
    references, folded tables."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.captions: list[str] = []
        self.text: list[str] = []
        self.section_text: dict[str, list[str]] = {}
        self.cells: dict[str, list[str]] = {}
        self.details = 0
        self._tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        if tag == "details":
            self.details += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self._tags:
            del self._tags[len(self._tags) - 1 - self._tags[::-1].index(tag) :]

    def handle_data(self, data: str) -> None:
        tag = self._tags[-1] if self._tags else ""
        if "style" in self._tags or "title" in self._tags:
            return
        self.text.append(data)
        if tag == "h2":
            self.headings.append(data)
        if tag == "figcaption":
            self.captions.append(data)
        if self.headings:
            self.section_text.setdefault(self.headings[-1], []).append(data)
            if tag in ("td", "th") or "td" in self._tags:
                self.cells.setdefault(self.headings[-1], []).append(data)


def _parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def with_policy_inputs(frame: pd.DataFrame) -> pd.DataFrame:
    """The fixture's applications plus the feature-store columns the credit policy reads."""
    rng = np.random.default_rng(3)
    extra = {
        "net_sales_30d": frame["net_sales_90d"] / 3,
        "unsettled_order_value": frame["net_sales_90d"] * 0.2,
        "open_receivables_current": frame["net_sales_90d"] * rng.uniform(0, 0.5, len(frame)),
        "receivables_top_counterparty_share": rng.uniform(0.1, 0.6, len(frame)),
        "inventory_value_in_warehouse": frame["net_sales_90d"] * rng.uniform(0, 0.3, len(frame)),
    }
    return frame.assign(**{k: v for k, v in extra.items() if k not in frame.columns})


def monthly_snapshots(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    months = frame["applied_at"].dt.to_period("M")
    return {str(m): part for m, part in frame.groupby(months) if str(m) >= "2025-01"}


@pytest.fixture(scope="module")
def html(trained: Trained) -> str:
    champion = OtherModel("champion", "1", train(seed=11).model)
    frame = with_policy_inputs(trained.frame)
    sections = risk_report_sections(
        trained.model,
        frame,
        version="2",
        gates=GATES,
        decision=DECISION,
        other=champion,
        time_col="applied_at",
        source="synthetic applications",
        policy=load_policy(REPO / "policy.toml"),
        snapshots=monthly_snapshots(frame),
        explain_rows=600,
    )
    return render_risk_report(sections, "scfrisk-pd", "2")


@pytest.fixture(scope="module")
def own_table_html() -> str:
    """A model of `scfrisk train --table` on a table without time column, merchants or catalogue names."""
    frame = catalogue_applications(3000, 5)
    frame = frame.drop(columns=["merchant_id", "application_id", "applied_at", "true_pd"])
    frame = frame.rename(
        columns={c: f"col_{i}" for i, c in enumerate(frame.columns) if c not in NOT_FEATURES}
    )
    frame["slice"] = stratified_split(frame["defaulted"], 0.2, 0.2, seed=1).to_numpy()
    features = infer_features(frame, NOT_FEATURES, {})
    result = train_pd_model(
        frame,
        frame["defaulted"],
        frame["slice"],
        features,
        seed=1,
        max_rounds=60,
        search_trials=1,
        master_scale=load_master_scale(REPO / "policy.toml"),
    )
    model = result.model
    model.metadata = {MODEL_KIND_TAG: "table", SPLIT_KIND_TAG: "random"}  # what `train --table` records
    sections = risk_report_sections(
        model,
        frame.assign(y=frame["defaulted"]),
        version="1",
        gates=GATES,
        definitions=table_definitions(model.features),
        policy=load_policy(REPO / "policy.toml"),
        source="credit.csv",
        explain_rows=400,
    )
    return render_risk_report(sections, "credit-csv", "1")


def test_report_has_every_section_and_its_images_inline(html: str) -> None:
    page = _parse(html)
    assert page.headings == SECTIONS
    assert page.external == [], "the report must open offline: no external file, script or style"
    assert len(page.images) == 6
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    captions = " ".join(page.captions)
    for picture in (
        "Observed default rate against mean PD",
        "Mean |SHAP|",
        "beeswarm",
        "Dependence plots",
        "Champion vs challenger",
        "Score PSI and mean PD by month",
    ):
        assert picture in captions


def test_report_states_the_scale_of_explanations_and_shows_reason_codes(html: str) -> None:
    text = " ".join(_parse(html).text)
    assert "monotone increasing function of that margin" in text
    assert "than the typical approved merchant's " in text
    assert (
        "Mean |SHAP| by product" in text
        and "Mean |SHAP| by segment" in text
        and "Mean |SHAP| by grade" in text
    )
    assert "Characteristic stability index per feature" in text
    assert "Not promoted (challenger only)" in text and "OOT AUC 0.80 vs champion 0.83" in text
    assert "Compared with the champion (version 1)" in text


def test_summary_shows_approvals_limits_loss_declines_and_health_against_the_gates(html: str) -> None:
    page = _parse(html)
    summary = " ".join(page.section_text["Summary"])
    for caption in ("By grade", "By product", "Top reasons for declining", "Model health"):
        assert caption in summary
    assert re.search(r"approved of [\d,]+ applications", summary, re.IGNORECASE)
    assert f"limits ({CURRENCY})" in summary and f"expected loss ({CURRENCY})" in summary
    assert f"{CURRENCY} " in summary, "the key figures carry the currency"
    declines = html.split("Top reasons for declining", 1)[1].split("</table>", 1)[0]
    reasons = re.findall(r"<tr><td>([^<]+)</td>", declines)
    products = [p.replace("_", " ") for p in load_policy(REPO / "policy.toml").products]
    assert reasons and all(any(p in r.lower() for p in products) for r in reasons), reasons
    assert all(len(r.split()) > 4 for r in reasons), "the policy's words, not bare rule codes"
    # Health bands come from the shipped [gates]: ECE red above max_ece, amber above half of it.
    assert f"<= {GATES.max_ece / 2:g} / <= {GATES.max_ece:g} / > {GATES.max_ece:g}" in summary
    assert f"> {GATES.max_score_psi:g}" in summary
    summary_html = html.split('<section id="s0">', 1)[1].split("</section>", 1)[0]
    assert re.search(r'class="badge (green|amber|red)"', summary_html)
    assert "AUC vs champion" in summary


def test_features_are_named_by_the_catalogue_not_by_column(html: str, trained: Trained) -> None:
    page = _parse(html)
    names = set(trained.model.feature_names) - {"segment", "region", "category"}  # plain words already
    for section, cells in page.cells.items():
        raw = names.intersection(cell.strip() for cell in cells)
        assert not raw, f"raw feature names in the tables of '{section}': {sorted(raw)}"
    summary = " ".join(page.section_text["Summary"])
    assert not [n for n in names if n in summary]
    label = FEATURE_INDEX["avg_rating_90d"].description.rstrip(".")
    assert f"{label} (stars)" in " ".join(page.cells["Stability and shifts"])


def test_long_tables_show_the_top_rows_and_fold_the_rest(html: str) -> None:
    page = _parse(html)
    assert page.details >= 1
    views = html.split("Grades by segment and product", 1)[1]
    visible, folded = views.split("<details>", 1)
    assert visible.count("<tr>") == TOP_ROWS + 1  # header + the top rows
    assert folded.split("</details>", 1)[0].count("<tr>") > TOP_ROWS + 1

    frame = pd.DataFrame({"n": range(40)})
    folded_page = render_page("t", [Section("s", [Table(frame, fold_after=TOP_ROWS)])])
    assert folded_page.count("<tr>") == (TOP_ROWS + 1) + (40 + 1)
    assert "All 40 rows of this table" in folded_page


def test_stability_explains_shifts_and_follows_the_months(html: str) -> None:
    page = _parse(html)
    shifts = " ".join(page.section_text["Stability and shifts"])
    assert "while the score's PSI is" in shifts or "No feature shifted" in shifts
    over_time = " ".join(page.section_text["Stability over time"])
    assert "Score stability by month" in over_time
    for month in ("2025-01", "2025-06"):
        assert month in over_time


def test_a_feature_that_grows_with_the_calendar_is_told_from_one_that_jumps() -> None:
    rng = np.random.default_rng(0)
    months = pd.Series(np.repeat(pd.period_range("2024-01", periods=8, freq="M"), 200))
    month_index = np.repeat(np.arange(8), 200)
    inputs = pd.DataFrame(
        {
            "prior_loans": month_index * 0.5 + rng.poisson(1, len(months)),  # accumulates with platform age
            "price_changes_30d": rng.normal(10, 2, len(months)) + np.where(month_index == 5, 8.0, 0.0),
        }
    )
    trends = calendar_trends(inputs, months)
    assert trends.at["prior_loans", "level_rho"] > 0.8
    assert abs(trends.at["price_changes_30d", "level_rho"]) < 0.8


def test_own_table_report_speaks_of_rows_and_a_random_split(own_table_html: str) -> None:
    page = _parse(own_table_html)
    assert page.headings[0] == "Summary" and "Held-out performance" in page.headings
    text = " ".join(page.text)
    assert not re.search(r"merchant|out-of-time|out of time", text, re.IGNORECASE), re.findall(
        r".{60}(?:merchant|out-of-time|out of time).{60}", text, re.IGNORECASE
    )
    assert "random sample of the same period" in text
    assert "trained on its own table" in text


def test_report_without_test_rows_says_what_is_missing(trained: Trained) -> None:
    with pytest.raises(ScfriskError, match="no 'test' rows"):
        risk_report_sections(
            trained.model, trained.frame[trained.frame["slice"] != "test"], version="2", gates=GATES
        )
    with pytest.raises(ScfriskError, match=r"lacks column\(s\) \['y'\]"):
        risk_report_sections(trained.model, trained.frame.drop(columns="y"), version="2", gates=GATES)


def _bottom_of_summary(html: str, tmp_path: Path) -> float:
    """Where the summary section ends on the page, in CSS pixels, as chromium lays it out."""
    probe = html.replace(
        "</body>",
        "<script>document.body.dataset.bottom = document.getElementById('s0')"
        ".getBoundingClientRect().bottom</script></body>",
    )
    page = tmp_path / "probe.html"
    page.write_text(probe, encoding="utf-8")
    proc = chromium(page, tmp_path / "probe-profile", f"--window-size={SCREEN[0]},{SCREEN[1]}", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(re.search(r'data-bottom="([\d.]+)"', proc.stdout).group(1))


@needs_chromium
def test_report_renders_in_headless_chromium_with_the_summary_on_the_first_screen(
    html: str, own_table_html: str, tmp_path: Path
) -> None:
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(html, encoding="utf-8")
    proc = chromium(page, tmp_path / "profile", "--window-size=1280,4000", f"--screenshot={shot}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 50_000, "a blank page screenshots to a few KB"
    assert console_messages(proc) == []
    assert _bottom_of_summary(html, tmp_path) <= SCREEN[1]
    assert _bottom_of_summary(own_table_html, tmp_path) <= SCREEN[1]


def test_snapshots_are_the_last_months_of_the_models_feature_set(
    trained: Trained, settings: Settings
) -> None:
    model = replace(trained.model, metadata={**trained.model.metadata, "feature_set_version": "abc"})
    folder = settings.path("feature_store") / "version=abc"
    folder.mkdir(parents=True)
    for month in ("2025-01", "2025-02", "2025-03"):
        trained.frame.head(50).to_parquet(folder / f"as_of={month}-01T000000.parquet")
    for day in ("2025-03-14", "2025-03-15"):  # the daily refresh's snapshots, in the same folder
        trained.frame.head(50).to_parquet(folder / f"as_of={day}T000000.parquet")
    two = settings.model_copy(
        update={"features": settings.features.model_copy(update={"snapshot_months": 2})}
    )
    snapshots = feature_snapshots(two, model)
    assert list(snapshots) == ["2025-02", "2025-03"]
    assert list(snapshots["2025-03"].columns) == model.feature_names
    table_model = replace(model, metadata={**model.metadata, MODEL_KIND_TAG: "table"})
    assert feature_snapshots(two, table_model) == {}


def test_report_is_written_logged_and_rebuilt_from_the_registry(trained: Trained, settings: Settings) -> None:
    population = trained.frame.iloc[::3]  # every slice, a third of the rows: the registry is what is tested
    configure_mlflow(settings)
    with pytest.raises(ScfriskError, match="'scfrisk-pd' has no version 99"):
        report_for_version(settings, "99")
    with mlflow.start_run() as run:
        version = log_pd_model(trained.model, population, settings.mlflow.registered_model)
        mlflow.log_dict({**DECISION.as_dict(), "version": version}, "gate_decision.json")
    apply_decision(settings, version, DECISION)
    path = write_risk_report(
        settings,
        trained.model,
        population,
        version,
        run_id=run.info.run_id,
        decision=DECISION,
        time_col="applied_at",
    )
    assert path == report_file(settings, version) and path.parent == settings.path("reports")
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, ARTIFACT_DIR)}
    assert {f"{ARTIFACT_DIR}/{POPULATION_FILE}", f"{ARTIFACT_DIR}/{path.name}"} <= logged

    path.unlink()
    rebuilt = report_for_version(settings, version)
    page = _parse(rebuilt.read_text())
    assert page.headings == SECTIONS
    assert "Not promoted (challenger only)" in " ".join(page.text)

    apply_decision(settings, version, GateDecision(True, ("pass: manual",)))
    text = " ".join(_parse(report_for_version(settings, version).read_text()).text)
    assert "Compared with the" not in text, "the champion is not compared with itself"
