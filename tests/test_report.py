"""Report helpers: markdown tables that cannot be split by a cell's text, results pages written whole."""

from __future__ import annotations

from lrpcompress.report import markdown_table, write_page


def test_markdown_table_escapes_pipes_and_formats_missing_values():
    text = markdown_table([{"score": "per image |Σ|", "acc": 96.7312}, {"score": "l1"}],
                          [("score", "score | kind"), ("acc", "accuracy")])
    lines = text.splitlines()
    assert lines[0] == "| score \\| kind | accuracy |"
    assert lines[2].startswith("| per image \\|Σ\\| | 96.73")
    assert lines[3] == "| l1 | – |"
    assert all(line.replace("\\|", "").count("|") == 3 for line in lines)


def test_write_page_creates_folders_and_echoes(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "page.md"
    write_page(out, ["# title", "", "body"])
    assert out.read_text() == "# title\n\nbody"
    assert capsys.readouterr().out == "# title\n\nbody\n"
    assert [p.name for p in out.parent.iterdir()] == ["page.md"]  # no temporary file left behind
    write_page(None, ["only", "printed"])  # no path: printed, nothing written
    assert capsys.readouterr().out == "only\nprinted\n" and [p.name for p in out.parent.iterdir()] == ["page.md"]


def test_table_sections_give_a_heading_and_a_table_per_section():
    from lrpcompress.report import table_sections

    lines = table_sections({"Pooled": [{"a": 1, "b": "x|y"}], "Per run": [{"c": None}]})
    assert lines == ["", "## Pooled", "", "| a | b |\n|---|---|\n| 1 | x\\|y |", "", "## Per run", "",
                     "| c |\n|---|\n| – |", ""]
