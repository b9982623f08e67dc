"""HTTP routes for API keys (admin keys only)."""

from __future__ import annotations

from fastapi import APIRouter

from corral.core.egress import EgressPolicy
from corral.core.quota import Quota
from corral.server.auth import KeysDep
from corral.server.schemas import (
    CreateKey,
    KeyNetworkOut,
    KeyOut,
    NetworkRulesBody,
    QuotaBody,
    QuotaOut,
)

router = APIRouter(prefix="/v1", tags=["keys"])


@router.get("/keys")
async def list_keys(keys: KeysDep) -> list[KeyOut]:
    """Every API key (never their secrets). Admin keys only."""
    return [KeyOut.of(key) for key in await keys.list()]


@router.post("/keys", status_code=201)
async def create_key(body: CreateKey, keys: KeysDep) -> KeyOut:
    """A new API key; its secret is in this response only. Admin keys only."""
    made, secret = await keys.create(body.name, admin=body.admin)
    return KeyOut.of(made, secret)


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, keys: KeysDep) -> KeyOut:
    """Revoke a key: it stops working at once; its sandboxes run until they end."""
    return KeyOut.of(await keys.revoke(key_id))


@router.get("/keys/{key_id}/quota")
async def get_quota(key_id: str, keys: KeysDep) -> QuotaOut:
    """A key's quota (null: no limit) and what it takes now. Admin keys only."""
    return QuotaOut(**await keys.quota(key_id))


@router.put("/keys/{key_id}/quota")
async def set_quota(key_id: str, body: QuotaBody, keys: KeysDep) -> QuotaOut:
    """Set a key's quota (fields left out or null: no limit). Admin keys only."""
    return QuotaOut(**await keys.quota(key_id, Quota.from_dict(body.model_dump())))


@router.get("/keys/{key_id}/network")
async def get_key_network(key_id: str, keys: KeysDep) -> KeyNetworkOut:
    """A key's default egress rules for its internet sandboxes (null: none). Admin keys only."""
    return KeyNetworkOut(**await keys.network(key_id))


@router.put("/keys/{key_id}/network")
async def set_key_network(
    key_id: str, body: NetworkRulesBody | None, keys: KeysDep
) -> KeyNetworkOut:
    """Set a key's default egress rules (a body of null drops them): internet sandboxes of the
    key that give no rules of their own get these. Admin keys only."""
    rules = None if body is None else EgressPolicy.parse(body.model_dump())
    return KeyNetworkOut(**await keys.network(key_id, rules, clear=body is None))
