"""The Corral SDK: sandboxes on a Corral server, from async or sync Python code."""

from corral.client._client import AsyncClient
from corral.client._process import AsyncProcess, ProcessExit
from corral.client._sandbox import AsyncFiles, AsyncSandbox, CommandResult
from corral.client._sync import Client, Files, Process, Sandbox, Volume
from corral.client._volumes import AsyncVolume

__all__ = [
    "AsyncClient",
    "AsyncFiles",
    "AsyncProcess",
    "AsyncSandbox",
    "AsyncVolume",
    "Client",
    "CommandResult",
    "Files",
    "Process",
    "ProcessExit",
    "Sandbox",
    "Volume",
]
