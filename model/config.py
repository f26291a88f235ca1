"""ModelConfig: everything needed to rebuild a network, stored as JSON beside the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT_VERSION = 1


class ModelConfig(BaseModel):
    """Architecture and serving metadata of an S4 / S4D network."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str = "model"
    version: str = "1"
    task: Literal["classification", "regression", "sequence"] = "classification"
    layer: Literal["s4d", "s4"] = "s4d"
    d_input: int = Field(1, ge=1)
    d_output: int = Field(1, ge=1)
    d_model: int = Field(64, ge=1)
    n_layers: int = Field(4, ge=1)
    d_state: int = Field(64, ge=2)
    rank: int = Field(1, ge=1, description="low-rank size of S4's DPLR A")
    init: Literal["legs", "lin"] = "legs"
    disc: Literal["zoh", "bilinear"] = Field("zoh", description="S4D only; S4 is bilinear")
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(1e-1, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    prenorm: bool = True
    norm: Literal["layer", "none"] = "layer"
    residual: bool = True
    encoder: bool = Field(True, description="Linear d_input -> d_model; else d_input == d_model")
    decoder: bool = Field(True, description="Linear d_model -> d_output; else equal sizes")
    labels: list[str] | None = None
    sample_rate: float | None = Field(None, gt=0, allow_inf_nan=False,
                                      description="Hz the model was trained at")
    chunk_max: int = Field(256, ge=1, description="longest block of the chunked recurrence")
    channels: int = Field(1, ge=1, description="SSM outputs per feature (official S4Block "
                          "`channels`), mixed by the output linear")
    bidirectional: bool = Field(False, description="S4D only: add an anti-causal kernel; such "
                                "a model serves whole sequences (predict) but cannot stream")
    bandlimit: float | None = Field(
        None, gt=0, le=1, description="S4D only: keep the modes whose frequency "
        "dt·|Im A|/2π at the trained rate is below bandlimit × its Nyquist frequency (the others "
        "get C = 0), so no mode aliases when served at rates down to bandlimit × sample_rate")
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"unsupported config format_version {self.format_version} "
                             f"(this s4serve reads version {FORMAT_VERSION})")
        if self.d_state % 2:
            raise ValueError(f"d_state must be even (conjugate pairs), got {self.d_state}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min {self.dt_min} is larger than dt_max {self.dt_max}")
        if not self.encoder and self.d_input != self.d_model:
            raise ValueError("without an encoder d_input must equal d_model "
                             f"({self.d_input} != {self.d_model})")
        if not self.decoder and self.d_output != self.d_model:
            raise ValueError("without a decoder d_output must equal d_model "
                             f"({self.d_output} != {self.d_model})")
        if self.labels is not None and len(self.labels) != self.d_output:
            raise ValueError(f"{len(self.labels)} labels for d_output = {self.d_output}")
        if self.layer == "s4" and (self.bandlimit is not None or self.bidirectional):
            raise ValueError("bandlimit and bidirectional apply to S4D layers only")
        if self.layer == "s4" and self.chunk_max & (self.chunk_max - 1):
            raise ValueError(f"chunk_max must be a power of two for S4, got {self.chunk_max}")
        return self

    @property
    def streamable(self) -> bool:
        """Whether the network has a recurrent form (bidirectional layers have none)."""
        return not self.bidirectional

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        return cls.model_validate_json(Path(path).read_text())
