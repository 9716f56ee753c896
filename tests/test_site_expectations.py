"""What to expect at a new site (templates/_expectations.html) on the result, model and device pages: the
independent test-split figures are the first row, read from the card, the proxies below them."""

from __future__ import annotations

import dataclasses

import pytest
from builders import REAL_XRAYS, SHIPPED_MODEL, upload

from pneumonia.serving.card import CARD_NAME, ModelCard
from pneumonia.web.device_site import render_page

CARD = ModelCard.load(SHIPPED_MODEL / CARD_NAME)


def rows_of(html: str) -> list[str]:
    """The ids of the expectation rows, in the order shown."""
    table = html.split('id="expectations"', 1)[1].split("</table>", 1)[0]
    return [part.split('"', 1)[0] for part in table.split('<tr id="expect-')[1:]]


def independent_row(html: str) -> str:
    return html.split('id="expect-independent"', 1)[1].split("</tr>", 1)[0]


def assert_shows_the_independent_evaluation_first(html: str, card: ModelCard):
    evaluation = card.independent_evaluation
    assert rows_of(html)[0] == "independent" and set(card.expectations["framing"]) < set(rows_of(html))
    row = independent_row(html)
    for name in ("default", "screening"):
        figures = evaluation.thresholds[name]
        assert f"{100 * figures.specificity:.1f} % / {100 * figures.recall:.1f} %" in row
    assert f"{evaluation.images} images" in row and f"AUC {evaluation.auc:.3f}" in row and evaluation.date in row
    assert evaluation.command in html.split('id="independent-method"', 1)[1].split("</p>", 1)[0]


@pytest.fixture(scope="module")
def shipped_client(shipped_app):
    return shipped_app.test_client()


def test_the_model_page_shows_the_independent_figures_first(shipped_client):
    html = shipped_client.get("/model").get_data(as_text=True)
    assert_shows_the_independent_evaluation_first(html, CARD)
    assert "82.1 % / 96.7 %" in independent_row(html) and "61.5 % / 99.5 %" in independent_row(html)


def test_the_result_page_shows_the_independent_figures_first(shipped_client):
    response = shipped_client.post("/predict", data=upload(REAL_XRAYS[0].read_bytes(), REAL_XRAYS[0].name))
    assert response.status_code == 200
    assert_shows_the_independent_evaluation_first(response.get_data(as_text=True), CARD)


def test_the_device_page_shows_the_independent_figures_first():
    assert_shows_the_independent_evaluation_first(render_page(CARD, None), CARD)


def test_a_card_without_an_independent_evaluation_shows_the_proxies_alone():
    html = render_page(dataclasses.replace(CARD, independent_evaluation=None), None)
    assert rows_of(html)[0] == "originals" and 'id="independent-method"' not in html
