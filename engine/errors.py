"""Typed engine errors.

Every error a caller can provoke says which field is wrong and how to fix it. The mesh's one
interceptor maps these classes to gRPC status codes (services/bootstrap); the engine itself knows
nothing of gRPC.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequest(EngineError, ValueError):
    """A request field is out of range. Maps to INVALID_ARGUMENT."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}")


class ModelLoadError(EngineError):
    """A model path or file cannot be used. Maps to FAILED_PRECONDITION at service start."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}; {fix}")


class UnsupportedModel(ModelLoadError):
    """config.json names an architecture or feature the engine does not implement."""


class OutOfBlocks(EngineError):
    """The block pool cannot hold a request even after evicting every cached free block.

    Maps to RESOURCE_EXHAUSTED.
    """


class RequestNotFound(EngineError, KeyError):
    """No request with this id is known (finished, aborted or never added). Maps to NOT_FOUND."""


class DeviceLost(EngineError):
    """The engine's device can no longer run steps: a sticky CUDA error, steps that keep failing,
    or (tests) a loss injected through EngineConfig.inject_device_loss_at_step. The engine is
    finished and its requests must move to another worker. Maps to UNAVAILABLE."""
