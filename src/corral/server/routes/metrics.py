"""HTTP routes for metrics: Prometheus's scrape (admin keys only) and each sandbox's recent use."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from corral.server.auth import AllSandboxesDep, SandboxesDep
from corral.server.resources.sandboxes import SAMPLE_EVERY

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def scrape(sandboxes: AllSandboxesDep) -> Response:
    """Every metric of this node in Prometheus's text format. Admin keys only (it names every
    key's sandboxes): give Prometheus the key as a bearer token."""
    return Response(sandboxes.metrics(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/sandboxes/{sandbox_id}/metrics")
async def sandbox_metrics(sandbox_id: str, sandboxes: SandboxesDep) -> dict[str, Any]:
    """The sandbox's CPU, memory, processes, disk and network, sampled every few seconds over
    the last ten minutes, oldest first."""
    samples = await sandboxes.metrics(sandbox_id)
    return {
        "sandbox_id": sandbox_id,
        "interval": SAMPLE_EVERY,
        "samples": [sample.to_dict() for sample in samples],
    }


@router.get("/v1/metrics/sandboxes")
async def latest_metrics(sandboxes: SandboxesDep) -> list[dict[str, Any]]:
    """Each of your live sandboxes with its newest sample (null until the first): `corral top`."""
    return [
        {
            "sandbox_id": info.id,
            "state": info.state.value,
            "runtime": info.runtime,
            "metadata": dict(info.metadata),
            "sample": None if sample is None else sample.to_dict(),
        }
        for info, sample in sandboxes.latest_metrics()
    ]
