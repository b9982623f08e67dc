"""Corral: self-hosted secure sandboxes for AI agents."""

from corral.engine import Engine
from corral.errors import CorralError
from corral.spec import SandboxSpec

__all__ = ["CorralError", "Engine", "SandboxSpec"]
