"""The README states the pipeline as it is: its pass table is PASS_TABLE, row by row."""
from pathlib import Path

from rewriter.pipeline import PASS_TABLE

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    table = text.split("<!-- pass-table -->", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip("|").split("|") for line in table.strip().splitlines()[2:]]
    return [(stage.strip(), name.strip().strip("`")) for stage, name, _ in rows]


def test_readme_pass_table_is_the_pipeline():
    # each row's factory names its pass class first (lambda c: Classify(), lambda c: Assign(c.config), ...)
    table = [(step.stage, step.make.__code__.co_names[0]) for step in PASS_TABLE]
    assert _readme_rows() == table
