"""The HTML model card renders the Markdown and never HTML that came with the data."""

from __future__ import annotations

from training.card import card_html


def test_card_html_renders_tables_and_escapes_text_from_the_data() -> None:
    card = ("# Model card\n\nData: cohort <img src=x onerror=alert(1)> & `<b>` co.\n\n"
            "<div>block</div>\n\n"
            "| metric | value |\n|---|---|\n| AUROC | 0.74 |\n")
    page = card_html(card, "itp <script>")
    assert "<table>" in page and "<td>0.74</td>" in page
    assert "<img" not in page and "<script>" not in page and "<div>" not in page
    assert "<code>&lt;b&gt;</code>" in page
    assert "&lt;img src=x" in page and "<title>itp &lt;script&gt;</title>" in page
