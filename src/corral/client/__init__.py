"""The SDK: talk to a Corral server from Python, with asyncio (`AsyncSandbox`) or without
(`Sandbox`, its twin). Imports only `corral.core`; never the server, engine or runtimes."""

from corral.client._client import AsyncClient
from corral.client._deployments import AsyncDeployment, Deployment
from corral.client._files import AsyncFiles, Files
from corral.client._image import Image
from corral.client._network import Network
from corral.client._previews import AsyncPreview, Preview
from corral.client._process import AsyncProcess, Process, ProcessExit
from corral.client._sandbox import AsyncSandbox, CommandResult, Sandbox
from corral.client._sync import Client
from corral.client._volumes import AsyncVolume, Volume

__all__ = [
    "AsyncClient",
    "AsyncDeployment",
    "AsyncFiles",
    "AsyncPreview",
    "AsyncProcess",
    "AsyncSandbox",
    "AsyncVolume",
    "Client",
    "CommandResult",
    "Deployment",
    "Files",
    "Image",
    "Network",
    "Preview",
    "Process",
    "ProcessExit",
    "Sandbox",
    "Volume",
]
