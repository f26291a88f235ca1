"""The fuzz budget, imported by the fuzz tests: a bounded run in `make test`, a long one with
`make fuzz` (S4SERVE_FUZZ_EXAMPLES, examples per property)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("S4SERVE_FUZZ_EXAMPLES", "60"))
settings.register_profile("s4serve", max_examples=EXAMPLES, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile("s4serve")
