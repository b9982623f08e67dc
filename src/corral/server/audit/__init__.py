"""The audit log: every API action, who made it and how it went, kept durably and queryable
(`GET /v1/audit`, `corral audit`), and replayable (`corral audit replay`).

    trail    what each request did: the ASGI middleware that records it, and the actions
             (commands, code) that record themselves with their outcome
    log      the `audit` table, written off the request path, queried and pruned
    replay   re-running a sandbox's recorded commands and code in a fork of a snapshot
"""

from corral.server.audit.log import AuditLog
from corral.server.audit.trail import Action, AuditRequests, concerns, failed, identify, name

__all__ = ["Action", "AuditLog", "AuditRequests", "concerns", "failed", "identify", "name"]
