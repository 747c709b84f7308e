"""The risk report: every section and image in one self-contained page, rendered by a real browser,
written to the workspace and logged to (and rebuilt from) a real MLflow store."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pytest

from core.errors import ScfriskError
from core.settings import Settings
from models.gates import GateDecision
from models.registry import apply_decision, configure_mlflow, log_pd_model
from pipelines.report import ARTIFACT_DIR, POPULATION_FILE, report_file, report_for_version, write_risk_report
from reporting.risk_report import OtherModel, render_risk_report, risk_report_sections
from tests.explain_fixtures import Trained, train

SECTIONS = [
    "Model card summary",
    "Out-of-time performance",
    "Calibration",
    "Grade table",
    "Stability",
    "Global explanations",
    "Segment, product and grade views",
    "Individual decisions",
    "Known limitations",
    "Gate decision",
]
DECISION = GateDecision(
    False, ("pass: ECE 0.0100 <= 0.05", "fail: OOT AUC 0.80 vs champion 0.83 - tolerance 0.01")
)


class Page(HTMLParser):
    """What a reader (and a printer) gets: section titles, images, external references, visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.captions: list[str] = []
        self.text: list[str] = []
        self._tag = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag = tag
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._tag == "h2":
            self.headings.append(data)
        if self._tag == "figcaption":
            self.captions.append(data)


@pytest.fixture(scope="module")
def html(trained: Trained) -> str:
    champion = OtherModel("champion", "1", train(seed=11).model)
    sections = risk_report_sections(
        trained.model,
        trained.frame,
        version="2",
        decision=DECISION,
        other=champion,
        time_col="applied_at",
        source="synthetic applications",
        explain_rows=600,
    )
    return render_risk_report(sections, "scfrisk-pd", "2")


def _parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def test_report_has_every_section_and_its_images_inline(html: str) -> None:
    page = _parse(html)
    assert page.headings == SECTIONS
    assert page.external == [], "the report must open offline: no external file, script or style"
    assert len(page.images) == 5
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


def test_report_without_test_rows_says_what_is_missing(trained: Trained) -> None:
    with pytest.raises(ScfriskError, match="no 'test' rows"):
        risk_report_sections(trained.model, trained.frame[trained.frame["slice"] != "test"], version="2")
    with pytest.raises(ScfriskError, match=r"lacks column\(s\) \['y'\]"):
        risk_report_sections(trained.model, trained.frame.drop(columns="y"), version="2")


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (the test target runs `apt-get install -y chromium`)",
)
def test_report_renders_in_headless_chromium_without_console_errors(html: str, tmp_path: Path) -> None:
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(html, encoding="utf-8")
    proc = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,4000",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 50_000, "a blank page screenshots to a few KB"
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []


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
