"""`docs/features.md`, generated from the definitions so the catalogue can never drift from the SQL."""

from __future__ import annotations

from pathlib import Path

from features.definitions import DERIVED, FEATURE_INDEX, FEATURES, Feature, feature_set_version

CATALOGUE = Path(__file__).resolve().parents[1] / "docs" / "features.md"

PROTECTED_PROXIES: dict[str, str] = {
    "region": "where a merchant is registered can stand in for ethnicity or national origin (redlining)",
}
"""Features that may stand in for a protected attribute, and why: the one declaration the platform model
(never an input) and the reason codes (never a reason) read. Protected attributes themselves (gender,
age, ethnicity, religion...) are not in the data at all."""


def check_proxies(proxies: dict[str, str]) -> None:
    """Refuse a declaration that names no defined feature: a misspelt proxy would silently be cited."""
    unknown = sorted(set(proxies) - set(FEATURE_INDEX))
    if unknown:
        raise ValueError(f"PROTECTED_PROXIES names features that features/definitions.py lacks: {unknown}")


check_proxies(PROTECTED_PROXIES)


DIRECTION = {1: "higher = riskier", -1: "higher = safer", 0: "neutral"}


def _window(f: Feature) -> str:
    if f.source == DERIVED:
        return "-"
    if f.window_days is None:
        return "all history"
    return f"{f.window_days} d" + (f", {f.lag_days} d earlier" if f.lag_days else "")


def _how(f: Feature) -> str:
    how = f"`{f.aggregation}`"
    if f.per:
        how = f"per `{f.per}`: {how}, then `{f.outer.format(x='x', k=f.per)}`"  # type: ignore[union-attr]
    if f.filter:
        how += f" where `{f.filter}`"
    return how.replace("|", "\\|")


def render_catalogue() -> str:
    """The feature catalogue as Markdown: one row per feature, in definition order."""
    lines = [
        "# Feature catalogue",
        "",
        f"Generated from `features/definitions.py` (`make docs` or `python -m features.catalogue`); "
        f"do not edit by hand. "
        f"Feature-set version `{feature_set_version()}`, {len(FEATURES)} features.",
        "",
        "Every feature of a merchant as of time T uses only facts whose own timestamp is strictly before T "
        "(an order refunded after T counts as not refunded, a rating given after T is unknown). A window of "
        "N days keeps facts from T - N days (inclusive) to T (exclusive). Empty values mean *unknown* (a rate "
        "with no denominator); sums and counts with no facts are 0.",
        "",
        "| feature | meaning | source | window | computed as | unit | risk direction |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in FEATURES:
        lines.append(
            f"| `{f.name}` | {f.description} | {f.source} | {_window(f)} | {_how(f)} | {f.unit} | "
            f"{'categorical' if f.kind == 'categorical' else DIRECTION[f.direction]} |"
        )
    lines += [
        "",
        "## Possible proxies of protected attributes",
        "",
        "Never an input of the platform PD model and never given as a reason for a decision "
        "(`features/catalogue.py`, `PROTECTED_PROXIES`). They stay in the store for fairness monitoring.",
        "",
        *(f"- `{name}`: {why}." for name, why in PROTECTED_PROXIES.items()),
    ]
    return "\n".join(lines) + "\n"


def write_catalogue(path: Path | str = CATALOGUE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_catalogue())
    return path


if __name__ == "__main__":
    write_catalogue()
