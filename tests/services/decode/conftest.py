"""The tiny model the engine tests build, for the decode-side tests that run an engine."""

from tests.engine.conftest import tiny_llama  # noqa: F401
