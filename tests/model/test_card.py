"""Model cards: front matter parsed and validated; shipped cards agree with metrics.json."""

import json
from pathlib import Path

import pytest

from model.card import CardError, parse_card, read_card

ZOO = Path(__file__).resolve().parents[2] / "model" / "zoo"
SHIPPED = sorted(p for p in ZOO.iterdir() if (p / "config.json").is_file())

GOOD = """---
summary: s
data: {name: n, source: s, split: p, license: l}
accuracy: {test: 0.5}
rates_tested_hz: [10]
intended_use: u
limitations: none known
---
# prose
"""


def test_parse_card():
    card = parse_card(GOOD)
    assert card.accuracy == {"test": 0.5} and card.data.license == "l"


@pytest.mark.parametrize(("text", "message"), [
    ("# no front matter\n", "starts with"),
    ("---\nsummary: s\n", "closing"),
    (GOOD.replace("license: l", "licence: l"), "license"),
    (GOOD.replace("accuracy: {test: 0.5}", "accuracy: {test: high}"), "accuracy"),
    ("---\n: [\n---\n", "front matter"),
])
def test_bad_cards_say_what_is_wrong(text, message):
    with pytest.raises(CardError, match=message):
        parse_card(text)


@pytest.mark.parametrize("model_dir", SHIPPED, ids=lambda p: p.name)
def test_shipped_cards_state_the_measured_accuracy(model_dir):
    card = read_card(model_dir)
    assert card is not None, f"{model_dir.name} has no README.md model card"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    for key, value in card.accuracy.items():
        measured = metrics["test_accuracy"] if key == "test" else metrics[key]["accuracy"]
        assert value == pytest.approx(measured, abs=5e-4), key
    extra = {k for k, v in metrics.items() if isinstance(v, dict) and "accuracy" in v}
    assert extra <= set(card.accuracy), "every extra evaluation appears on the card"


def test_a_plain_readme_is_no_card(tmp_path):
    (tmp_path / "README.md").write_text("# My model\n\nNotes for people, no front matter.\n")
    assert read_card(tmp_path) is None  # and the model still loads
