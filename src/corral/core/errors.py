"""Every error Corral raises, in one tree rooted at `CorralError`.

Each class carries the HTTP status it maps to and a stable, machine-readable `code`; the message
says what happened and what to do about it.

The tree with every status and code is in docs/sdk.md (written by scripts/sdk_reference.py).
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar


class CorralError(Exception):
    """Root of every error Corral raises.

    Example:
        >>> try:
        ...     raise SandboxNotFound("no sandbox sb-123")
        ... except CorralError as exc:
        ...     print(exc.status_code, exc.code)
        404 sandbox_not_found
    """

    status_code: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"
    retry_after: int | None = None  # seconds; sent as Retry-After when set

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code

    def to_dict(self) -> dict[str, Any]:
        """The error as the JSON body the HTTP API returns."""
        return {"error": {"code": self.code, "message": self.message}}


class InvalidRequest(CorralError):
    """The request is malformed or names impossible values; fix it and retry."""

    status_code = 400
    default_code = "invalid_request"


class InvalidPath(InvalidRequest):
    """A sandbox path is relative, contains NUL, or names the wrong kind of file."""

    default_code = "invalid_path"


class AuthError(CorralError):
    """The API key is missing, malformed, unknown or revoked."""

    status_code = 401
    default_code = "unauthorized"


class PermissionDenied(CorralError):
    """The sandbox's own permissions forbid the operation."""

    status_code = 403
    default_code = "permission_denied"


class NotFound(CorralError):
    """The named thing does not exist."""

    status_code = 404
    default_code = "not_found"


class SandboxNotFound(NotFound):
    """No sandbox has this id (or it belongs to someone else)."""

    default_code = "sandbox_not_found"


class FileNotFound(NotFound):
    """No file or directory at this path inside the sandbox."""

    default_code = "file_not_found"


class ImageNotFound(NotFound):
    """No image has this name."""

    default_code = "image_not_found"


class VolumeNotFound(NotFound):
    """No volume has this name or id (or it belongs to another API key)."""

    default_code = "volume_not_found"


class ContextNotFound(NotFound):
    """No code context with that id in the sandbox (list them with `code_contexts`)."""

    default_code = "context_not_found"


class CommandTimeout(CorralError):
    """A command ran past its timeout and was killed; `result` holds what it printed."""

    status_code = 408
    default_code = "command_timeout"
    result: Any = None


class Conflict(CorralError):
    """The request conflicts with the current state of a resource."""

    status_code = 409
    default_code = "conflict"


class CheckpointFailed(Conflict):
    """The runtime could not save the sandbox's memory (a snapshot, fork, hibernate or move):
    something in its current state cannot be checkpointed. Nothing was saved; the sandbox
    goes on as it was, unless the runtime ended it (its state then says so)."""

    default_code = "checkpoint_failed"


class InvalidState(Conflict):
    """The sandbox is in a state that does not allow this operation."""

    default_code = "invalid_state"


class FileExists(Conflict):
    """Something already exists at this path inside the sandbox."""

    default_code = "file_exists"


class PathBusy(Conflict):
    """The path is in use inside the sandbox: a mount point, or a program that is running."""

    default_code = "path_busy"


class VolumeInUse(Conflict):
    """The volume is mounted by live sandboxes (named in the message); end them first."""

    default_code = "volume_in_use"


class PayloadTooLarge(CorralError):
    """The request body is larger than the server accepts."""

    status_code = 413
    default_code = "payload_too_large"


class LimitReached(CorralError):
    """A limit is reached (a sandbox's processes, a key's or the node's sandboxes); retry later."""

    status_code = 429
    default_code = "limit_reached"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class RuntimeUnavailable(CorralError):
    """The requested runtime is unknown or cannot run on this machine."""

    status_code = 422
    default_code = "runtime_unavailable"


class UnsupportedLanguage(CorralError):
    """The code interpreter has no such language in this sandbox; the message lists those it has."""

    status_code = 422
    default_code = "unsupported_language"


class NoSpace(CorralError):
    """The sandbox's disk quota is full."""

    status_code = 507
    default_code = "no_space"


class PortClosed(CorralError):
    """Nothing answers on the port inside the sandbox (a preview, a port forward)."""

    status_code = 502
    default_code = "port_closed"


class SandboxFailed(CorralError):
    """The runtime failed to start or keep the sandbox running."""

    status_code = 500
    default_code = "sandbox_failed"


class ImageBuildFailed(CorralError):
    """A step of an image build failed; `step` is its number (0: the base), `log` its output.

    Nothing of the failed step is kept: no image, no partial layer. Steps before it stay
    cached, so the next build resumes at the failed step.
    """

    status_code = 422
    default_code = "image_build_failed"

    def __init__(
        self, message: str, *, code: str | None = None, step: int = 0, log: str = ""
    ) -> None:
        super().__init__(message, code=code)
        self.step = step
        self.log = log


class DeploymentFailed(CorralError):
    """A deployment's new instance did not start serving; the message ends with its output.

    Nothing changed: a new deployment is not created, an updated one serves its old version.
    """

    status_code = 422
    default_code = "deployment_failed"


class AgentUnavailable(SandboxFailed):
    """The guest agent inside the sandbox does not answer."""

    status_code = 503
    default_code = "agent_unavailable"


class SandboxEnded(SandboxFailed):
    """The sandbox ended while the operation was under way; its end reason says why."""

    status_code = 410
    default_code = "sandbox_ended"


class ServiceUnavailable(CorralError):
    """The server cannot take the request now (starting, shutting down); retry shortly."""

    status_code = 503
    default_code = "service_unavailable"


class ConnectionFailed(ServiceUnavailable):
    """The SDK could not reach the server: check CORRAL_URL and that `corral serve` runs."""

    default_code = "connection_failed"


_ERRNO_ERRORS: dict[str, type[CorralError]] = {
    "ENOENT": FileNotFound,
    "EEXIST": FileExists,
    "ENOTEMPTY": FileExists,
    "EACCES": PermissionDenied,
    "EPERM": PermissionDenied,
    "EROFS": PermissionDenied,
    "ENOSPC": NoSpace,
    "EDQUOT": NoSpace,
    "ENOTDIR": InvalidPath,
    "EISDIR": InvalidPath,
    "ELOOP": InvalidPath,
    "ENAMETOOLONG": InvalidPath,
    "EINVAL": InvalidRequest,
    "EXDEV": InvalidRequest,
    "EBUSY": PathBusy,
    "ETXTBSY": PathBusy,
}

# What to do, added to the guest's own message for errnos whose text does not say.
_ERRNO_HINTS: dict[str, str] = {
    "EBUSY": "the path is a mount point or in use; act on a path inside it instead",
    "ETXTBSY": "a running program uses this file; stop it first",
}


# Codes the guest agent reports itself, kept as they are.
_GUEST_CODES: dict[str, type[CorralError]] = {
    "invalid_request": InvalidRequest,
    "invalid_path": InvalidPath,
    "invalid_cwd": InvalidRequest,
    "result_too_large": InvalidRequest,
    "invalid_user": InvalidRequest,
    "command_not_found": InvalidRequest,
    "process_not_found": NotFound,
    "cancelled": Conflict,
    "limit_reached": LimitReached,
    "unsupported_language": UnsupportedLanguage,
    "context_not_found": ContextNotFound,
    "port_closed": PortClosed,
}


def from_guest(code: str, message: str) -> CorralError:
    """Map an error reported by the guest agent (an errno name or its own code) to our tree."""
    cls = _ERRNO_ERRORS.get(code)
    if cls is not None:
        hint = _ERRNO_HINTS.get(code)
        return cls(f"{message} ({hint})" if hint else message, code=cls.default_code)
    cls = _GUEST_CODES.get(code)
    if cls is not None:
        return cls(message, code=code)
    if code in errno.errorcode.values():
        return SandboxFailed(message, code="guest_os_error")
    return SandboxFailed(message, code=code or SandboxFailed.default_code)


def _subclasses(cls: type[CorralError]) -> list[type[CorralError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


_BY_CODE: dict[str, type[CorralError]] = {cls.default_code: cls for cls in _subclasses(CorralError)}
# For codes this version does not know: the most general class with the status.
_BY_STATUS: dict[int, type[CorralError]] = {
    cls.status_code: cls for cls in reversed(_subclasses(CorralError)) if cls is not CorralError
}
_BY_STATUS[500] = CorralError
_BY_STATUS[503] = ServiceUnavailable
_BY_CODE.update({code: cls for code, cls in _GUEST_CODES.items() if code not in _BY_CODE})


def from_response(status: int, code: str, message: str) -> CorralError:
    """Rebuild the error a server sent (`{"error": {"code", "message"}}`) as our own class.

    The class comes from the code when we know it, else from the HTTP status; the server's
    code and message are kept either way.
    """
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequest if 400 <= status < 500 else CorralError
    return cls(message, code=code)
