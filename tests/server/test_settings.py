"""Settings: what a typo in the environment or an option turns into."""

from __future__ import annotations

import pytest


def test_backend_names_are_the_registered_ones_and_typos_fail_early():
    from typing import get_args

    from pydantic import ValidationError

    from server.backends.base import _REGISTRY
    from server.settings import BackendName, Settings

    assert set(get_args(BackendName)) == set(_REGISTRY)
    for bad in ({"backend": "bogus"}, {"backends": {"m": "tensorrt"}}, {"device": "gpu"},
                {"device": "cuda:x"}):
        with pytest.raises(ValidationError):
            Settings(**bad)
    assert Settings(device="cuda:1", backends={"m": "onnx"}).backend_for("m") == "onnx"
