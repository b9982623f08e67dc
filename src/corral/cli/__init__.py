"""The `corral` command line.

    corral serve                         start the server (prints its URL and an API key)
    corral keys create|list|revoke|quota|network   API keys (on the server's machine)
    corral doctor                        which runtimes this machine can run
    corral image build FILE.py:VAR       build an image (list, rm, prune)
    corral volume create|list|rm         persistent volumes (mount with --volume NAME:/path[:ro])
    corral sandbox create|list|info|kill|timeout
    corral run [OPTIONS] -- CMD ...      run one command in a fresh sandbox, then end it
    corral exec ID -- CMD ...            run a command in a sandbox, streaming its output
    corral shell ID                      an interactive terminal in a sandbox
    corral cp SRC DST                    copy files in or out (sb-…:/path names a sandbox file)
    corral run-code ID FILE|-            run code in a sandbox's code interpreter (state kept)
    corral repl ID                       an interactive session with its code interpreter
    corral mcp                           the sandboxes as MCP tools, over stdio
    corral expose ID PORT                a port of a sandbox at a URL (corral previews lists)
    corral port-forward ID LOCAL:REMOTE  a local TCP port carried to a port in a sandbox
    corral top                           your sandboxes and what each uses, live
    corral nodes list                    the machines that run sandboxes (admin key)

Commands that talk to a server read CORRAL_URL and CORRAL_API_KEY (or --url, --api-key).
"""

from corral.cli import (
    _agents,
    _audit,
    _code,
    _deployments,
    _images,
    _keys,
    _local,
    _nodes,
    _previews,
    _remote,
    _top,
    _volumes,
)
from corral.cli._common import app

__all__ = ["app", "main"]
_commands = (
    _agents,
    _audit,
    _code,
    _images,
    _keys,
    _local,
    _deployments,
    _nodes,
    _previews,
    _remote,
    _top,
    _volumes,
)  # importing them registers their commands


def main() -> None:
    app()
