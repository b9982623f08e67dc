"""HTTP routes for commands in a sandbox: run one to completion, list, signal or kill them.
(Streaming a command: `corral.server.routes.stream`.)"""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.server.auth import SandboxesDep
from corral.server.resources.sandboxes import Command
from corral.server.schemas import CommandOut, Exec, KilledOut, ProcessOut, RunCommand, Signal

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["processes"])


def command_of(body: Exec) -> Command:
    """The command a request body describes (shared by the plain and streaming exec)."""
    return Command(
        cmd=body.cmd,
        argv=body.argv,
        env=body.env,
        cwd=body.cwd,
        user=body.user,
        timeout=body.timeout,
        tag=body.tag,
    )


@router.post("/exec")
async def run_command(sandbox_id: str, body: RunCommand, sandboxes: SandboxesDep) -> CommandOut:
    """Run a command to completion and return its exit code and output.

    Each output stream keeps its first 8 MiB (`truncated` says when more was dropped); stream
    bigger output over the exec WebSocket instead. A command past `timeout` is killed and the
    result says `timed_out`.
    """
    result, truncated = await sandboxes.run(sandbox_id, command_of(body), body.stdin)
    return CommandOut.of(result, truncated)


@router.get("/processes")
async def list_processes(sandbox_id: str, sandboxes: SandboxesDep) -> list[ProcessOut]:
    """Processes started in the sandbox, running and recently ended."""
    return [ProcessOut.of(p) for p in await sandboxes.processes(sandbox_id)]


@router.post("/processes/{process_id}/signal")
async def signal_process(
    sandbox_id: str, process_id: int, body: Signal, sandboxes: SandboxesDep
) -> Response:
    """Send a signal (default SIGTERM) to a process and its process group. SIGKILL kills
    everything the process started, whatever its group or session."""
    await sandboxes.signal(sandbox_id, process_id, body.signal)
    return Response(status_code=204)


@router.post("/processes/kill-all")
async def kill_all_processes(sandbox_id: str, sandboxes: SandboxesDep) -> KilledOut:
    """Kill every process in the sandbox but Corral's agent: the way back for a sandbox whose
    processes are out of control. Its files stay; new commands run as before."""
    return KilledOut(killed=await sandboxes.kill_all(sandbox_id))
