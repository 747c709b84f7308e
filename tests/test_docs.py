"""Generated documentation stays in step with the code it is generated from."""

from core.schemas import TABLES
from pipelines.docs import DOCS, render_data_model


def test_data_model_page_is_generated_from_the_schemas_and_up_to_date():
    text = render_data_model(TABLES.values())
    for spec in TABLES.values():
        assert f"`{spec.name}`" in text or spec.name in text
        for column in spec.columns:
            assert column.name in text, f"{spec.name}.{column.name} is missing from docs/data.md"
    assert (DOCS / "data.md").read_text() == text, "regenerate it: make docs"
