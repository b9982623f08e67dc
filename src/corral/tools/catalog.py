"""The tools an agent's model may call, as data: name, description and JSON schema of each.

The same catalog backs the MCP server (`corral.tools.mcp`) and function calling with OpenAI's
and Anthropic's formats (`corral.tools.formats`); `Toolbox` carries them out. Descriptions are
written for a model: what the tool does, when to use it, what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SANDBOX_ID = {
    "type": "string",
    "description": "The sandbox to act on (sb-...). Leave out to use this session's sandbox, "
    "which is created on first use.",
}
TIMEOUT = {"type": "number", "description": "Seconds before it is stopped (default 60)."}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    properties: dict[str, Any]
    required: tuple[str, ...] = ()
    on_sandbox: bool = True  # acts on one sandbox (takes `sandbox_id`)

    @property
    def schema(self) -> dict[str, Any]:
        """The JSON schema of its arguments."""
        properties = dict(self.properties)
        if self.on_sandbox:
            properties["sandbox_id"] = SANDBOX_ID
        return {
            "type": "object",
            "properties": properties,
            "required": list(self.required),
            "additionalProperties": False,
        }


def _text(description: str) -> dict[str, Any]:
    return {"type": "string", "description": description}


TOOLS = (
    Tool(
        "create_sandbox",
        "Create a new isolated Linux sandbox and make it this session's sandbox. Only needed to "
        "choose its image, runtime, network or size: the other tools create a default one on "
        "first use. Returns its id.",
        {
            "image": _text("'debian' (default), 'code-interpreter' (Python with numpy, "
                           "pandas, matplotlib; Node.js), or the id or name of a built image."),
            "runtime": {"type": "string", "enum": ["gvisor", "namespaces"],
                        "description": "Isolation: gvisor (strongest) or namespaces (fastest)."},
            "network": {"type": "string", "enum": ["none", "internet"],
                        "description": "Whether the sandbox may reach the internet."},
            "allow": {"type": "array", "items": {"type": "string"},
                      "description": "With network 'internet': the only hosts it may reach "
                                     "(names, *.wildcards, IPv4 addresses or CIDRs)."},
            "deny": {"type": "array", "items": {"type": "string"},
                     "description": "With network 'internet': hosts it may never reach."},
            "cpu": {"type": "number", "description": "CPU cores (default 1)."},
            "memory_mb": {"type": "integer", "description": "Memory limit in MiB."},
            "timeout": {"type": "number", "description": "Lifetime in seconds."},
        },
        on_sandbox=False,
    ),
    Tool(
        "run_code",
        "Run code in a stateful interpreter: variables, imports and functions stay for the next "
        "call. The value of the last expression is returned, with printed output, charts (as "
        "images and data) and tables. Prefer this to run_command for Python work.",
        {
            "code": _text("The code to run."),
            "language": {"type": "string", "enum": ["python", "javascript", "bash"],
                         "description": "Default python."},
            "context": _text("A code context id, for a separate interpreter (default: the "
                             "language's own)."),
            "timeout": TIMEOUT,
        },
        ("code",),
    ),
    Tool(
        "run_command",
        "Run a shell command (bash) in the sandbox and return its exit code and output. With "
        "background true it is started and left running (a server, say), and its process id is "
        "returned at once.",
        {
            "command": _text("The shell command line."),
            "workdir": _text("Absolute directory to run it in."),
            "timeout": TIMEOUT,
            "background": {"type": "boolean", "description": "Start it and return at once."},
        },
        ("command",),
    ),
    Tool(
        "read_file",
        "Read a text file from the sandbox.",
        {"path": _text("Absolute path of the file.")},
        ("path",),
    ),
    Tool(
        "write_file",
        "Write a text file in the sandbox (created, with its directories, or replaced).",
        {"path": _text("Absolute path of the file."), "content": _text("The whole new content.")},
        ("path", "content"),
    ),
    Tool(
        "list_files",
        "List a directory of the sandbox: names, types and sizes.",
        {
            "path": _text("Absolute path of the directory (default /root)."),
            "depth": {"type": "integer", "description": "Levels to descend (default 1)."},
        },
    ),
    Tool(
        "search_files",
        "Search the sandbox's files for a regular expression, like grep -rn: matching lines "
        "with their file and line number.",
        {
            "pattern": _text("An extended regular expression."),
            "path": _text("Directory or file to search (default /root)."),
            "glob": _text("Only files whose name matches, e.g. '*.py'."),
        },
        ("pattern",),
    ),
    Tool(
        "edit_file",
        "Replace exact text in a file of the sandbox. old_text must appear exactly once, unless "
        "replace_all is true; include enough surrounding lines to make it unique.",
        {
            "path": _text("Absolute path of the file."),
            "old_text": _text("The exact text to replace."),
            "new_text": _text("What to put instead."),
            "replace_all": {"type": "boolean", "description": "Replace every occurrence."},
        },
        ("path", "old_text", "new_text"),
    ),
    Tool(
        "upload_from_url",
        "Download a URL into a file of the sandbox, from inside the sandbox (it needs network "
        "'internet').",
        {"url": _text("An http or https URL."), "path": _text("Absolute path to write.")},
        ("url", "path"),
    ),
    Tool(
        "expose_port",
        "Give a port of the sandbox a URL, to reach a web server or API running there (start "
        "it first with run_command and background). Returns the URL, the header HTTP clients "
        "send, and a link that opens it in a browser.",
        {
            "port": {"type": "integer", "description": "The port the server listens on."},
            "public": {"type": "boolean",
                       "description": "Anyone with the URL may open it (no token)."},
        },
        ("port",),
    ),
    Tool("pause_sandbox", "Freeze the sandbox: it keeps its memory and stops using CPU.", {}),
    Tool("resume_sandbox", "Resume a paused or hibernated sandbox.", {}),
    Tool(
        "hibernate_sandbox",
        "Save the sandbox's memory and files to disk and stop it (gvisor sandboxes); "
        "resume_sandbox brings it back exactly.",
        {},
    ),
    Tool(
        "snapshot_sandbox",
        "Save the sandbox's memory and files as a snapshot that new sandboxes can start from "
        "(gvisor sandboxes). Returns the snapshot's id.",
        {"name": _text("A name for the snapshot.")},
    ),
    Tool(
        "fork_sandbox",
        "Copy the running sandbox, memory and files, into new sandboxes that continue from "
        "here independently (gvisor sandboxes). Returns their ids.",
        {"count": {"type": "integer", "description": "How many copies (default 1)."}},
    ),
    Tool("list_sandboxes", "List your sandboxes: id, state, runtime, image.", {}, on_sandbox=False),
    Tool("terminate_sandbox", "End the sandbox now; its files are gone.", {}),
)  # fmt: skip
BY_NAME = {tool.name: tool for tool in TOOLS}
