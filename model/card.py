"""Model cards: `README.md` in a model directory, YAML front matter + prose (the Hugging Face
convention). The front matter holds the key facts the server exposes in ModelInfo `card`; the
prose is for people. Loading a model never needs one."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

CARD_FILE = "README.md"


class CardData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the dataset")
    source: str = Field(description="where the data comes from, how it was made")
    split: str = Field(description="what is held out, and how")
    license: str = Field(description="terms of the data")


class ModelCard(BaseModel):
    """The facts a card must state."""

    model_config = ConfigDict(extra="forbid")

    summary: str
    data: CardData
    accuracy: dict[str, float] = Field(description="held-out accuracy per evaluation "
                                       "(keys as in metrics.json: test, test_8khz, ...)")
    rates_tested_hz: list[float] = Field(description="sample rates the accuracy was measured at")
    intended_use: str
    limitations: str


class CardError(ValueError):
    """A card whose front matter is missing or malformed."""


def parse_card(text: str) -> ModelCard:
    """The front matter between the leading `---` lines, validated."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        raise CardError("a model card starts with a '---' line and YAML front matter")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise CardError("the card's front matter has no closing '---' line") from None
    try:
        facts = yaml.safe_load("\n".join(lines[1:end])) or {}
        return ModelCard.model_validate(facts)
    except (yaml.YAMLError, ValueError) as err:
        raise CardError(f"bad model card front matter: {err}") from err


def read_card(directory: str | Path) -> ModelCard | None:
    """The card of a model directory, or None when it has none (a README.md without front
    matter is a plain README, not a card)."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        return None
    text = path.read_text()
    return parse_card(text) if text.lstrip("\ufeff").startswith("---") else None
