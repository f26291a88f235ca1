"""The server tests' real models and server thread, reused."""

from tests.server.conftest import model_dirs  # noqa: F401
