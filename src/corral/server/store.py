"""The store: what must outlive the server process, kept in SQLite or PostgreSQL (`database`).

`api_keys` holds each key's SHA-256 digest, never the key itself (keys are
256 random bits, so a fast hash is as safe as a slow one and keeps every request cheap).
`sandboxes` is the service's catalogue: which key owns which sandbox, its spec, and its state and
end reason, which stay readable for `ENDED_RETENTION` after the sandbox ended. The engine keeps
its own per-sandbox runtime record next to each sandbox; this is the tenant-facing view.
`images` and `volumes` say which key owns which image and volume, and the names it gave them;
`blobs` which key uploaded which content (the files themselves are shared by digest).

The schema is created and upgraded by the Alembic migrations in `corral.server.migrations`
(`corral.server.database` runs them).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from corral.core.errors import Conflict, ImageNotFound, InvalidRequest, NotFound
from corral.core.ids import new_id
from corral.core.models import SandboxInfo, StateChange
from corral.core.quota import UNITS, Quota
from corral.core.state import EndReason, SandboxState
from corral.engine.sealing import KeyRing, open_spec, seal_spec
from corral.server.blobs import BlobStore
from corral.server.database import open_database
from corral.server.deployments.store import DeploymentStore
from corral.server.key_network import KeyNetworks
from corral.server.previews.store import PreviewStore
from corral.server.tables import (
    BlobRow,
    ImageRow,
    KeyRow,
    QuotaRow,
    SandboxRow,
    VolumeRow,
    insert_into,
)
from corral.server.webhooks import WebhookStore

KEY_PREFIX = "corral_"
ENDED_RETENTION = 7 * 24 * 3600.0  # ended sandboxes stay visible in `info` for 7 days
KEY_CACHE_SECONDS = 1.0  # see Store.authenticate
KEY_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class ImageEntry:
    """A built image as one key sees it."""

    id: str
    name: str | None
    created_at: float


@dataclass(frozen=True)
class VolumeEntry:
    """A volume as its key sees it in the store (its usage is the engine's to tell)."""

    id: str
    name: str
    size_mb: int
    created_at: float


def _volume(row: VolumeRow) -> VolumeEntry:
    return VolumeEntry(row.id, row.name, row.size_mb, row.created_at)


# The names of a cluster's fronts' own keys (one per front): the only keys that may move a
# sandbox's memory between nodes. No other key may take such a name.
FRONT_KEY_PREFIX = "corral-front"


@dataclass(frozen=True)
class ApiKey:
    """An API key as listed: never the secret, which is shown once, on creation."""

    id: str
    name: str
    hint: str
    admin: bool
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def front(self) -> bool:
        """Whether this is a cluster's front's own key."""
        return self.admin and self.name.startswith(FRONT_KEY_PREFIX)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "hint": self.hint,
            "admin": self.admin,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def _one_key(session: AsyncSession, ref: str) -> KeyRow:
    """The key whose id or name is `ref`."""
    rows = list(
        await session.scalars(select(KeyRow).where((KeyRow.id == ref) | (KeyRow.name == ref)))
    )
    if len(rows) != 1:
        raise NotFound(
            f"no key {ref!r}"
            if not rows
            else f"several keys are named {ref!r}; name it by id (corral keys list)",
            code="key_not_found",
        )
    return rows[0]


def _quota(row: QuotaRow) -> Quota:
    return Quota(**{name: getattr(row, name) for name in UNITS})


def _key(row: KeyRow) -> ApiKey:
    return ApiKey(row.id, row.name, row.hint, row.admin, row.created_at, row.revoked_at)


def _info(row: SandboxRow, keys: KeyRing) -> SandboxInfo:
    return SandboxInfo(
        id=row.id,
        state=SandboxState(row.state),
        runtime=row.runtime,
        spec=open_spec(keys, json.loads(row.spec)),
        created_at=row.created_at,
        expires_at=row.expires_at,
        ended_at=row.ended_at,
        end_reason=EndReason(row.end_reason) if row.end_reason else None,
        end_detail=row.end_detail,
        node=row.node,
        history=tuple(
            StateChange(SandboxState(state), at, reason)
            for state, at, reason in json.loads(row.history)
        ),
    )


def _columns(info: SandboxInfo, keys: KeyRing) -> dict[str, Any]:
    return {
        "state": info.state.value,
        "runtime": info.runtime,
        "spec": json.dumps(seal_spec(keys, info.spec)),
        "history": json.dumps([[h.state.value, h.at, h.reason] for h in info.history]),
        "created_at": info.created_at,
        "expires_at": info.expires_at,
        "ended_at": info.ended_at,
        "node": info.node,
        "end_reason": info.end_reason.value if info.end_reason else None,
        "end_detail": info.end_detail,
    }


class Store:
    """Keys and the sandbox catalogue in one database. Open with `await Store.open(path)`."""

    def __init__(self, engine: AsyncEngine, keys: KeyRing) -> None:
        self._engine = engine
        self._keys = keys  # seal each sandbox's environment
        self._session = async_sessionmaker(engine, expire_on_commit=False)
        self.previews = PreviewStore(self._session)
        self.deployments = DeploymentStore(self._session)
        self.key_networks = KeyNetworks(self._session)
        self.blobs = BlobStore(self._session)
        self.webhooks = WebhookStore(self._session, keys)
        self.sessions = self._session  # for tables other modules own (the audit log)
        self._active_keys: dict[str, tuple[ApiKey, float]] = {}  # digest -> key, good until

    @classmethod
    async def open(cls, database: Path | str, keys: KeyRing) -> Store:
        """Open (creating and migrating as needed) the SQLite database at the path `database`,
        or the PostgreSQL database at the URL `database` (which must exist)."""
        return cls(await open_database(database), keys)

    async def close(self) -> None:
        await self._engine.dispose()

    # -- keys -------------------------------------------------------------------------------

    async def create_key(
        self, name: str, *, admin: bool = False, secret: str | None = None, front: bool = False
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (shown once; only its digest is stored). `front`: a
        cluster's front's own key, whose name starts with `FRONT_KEY_PREFIX` (no other may)."""
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise InvalidRequest("a key's name must be 1 to 200 characters")
        if name.startswith(FRONT_KEY_PREFIX) != front:
            raise InvalidRequest(
                f"key names starting with {FRONT_KEY_PREFIX!r} are a cluster front's own; "
                "choose another name",
                code="reserved_name",
            )
        admin = admin or front
        secret = secret or KEY_PREFIX + secrets.token_urlsafe(32)
        row = KeyRow(
            id=new_id("key"),
            name=name,
            digest=digest(secret),
            hint=secret[: len(KEY_PREFIX) + 4],
            admin=admin,
            created_at=time.time(),
            revoked_at=None,
        )
        async with self._session.begin() as session:
            session.add(row)
        return _key(row), secret

    async def ensure_key(self, secret: str, name: str, *, admin: bool) -> ApiKey:
        """The key with this secret, created if no key has it (for `CORRAL_API_KEY`)."""
        found = await self.authenticate(secret, include_revoked=True)
        if found is not None:
            return found
        key, _ = await self.create_key(name, admin=admin, secret=secret)
        return key

    async def authenticate(self, secret: str, *, include_revoked: bool = False) -> ApiKey | None:
        """The key whose secret this is, or None (also for a revoked key).

        Active keys are remembered for KEY_CACHE_SECONDS, which saves a query on every request:
        a key revoked through this store stops working at once, one revoked by another process
        on the same database (`corral keys revoke`) within that time.
        """
        hashed = digest(secret)
        cached = self._active_keys.get(hashed)
        if cached is not None and cached[1] > time.monotonic() and not include_revoked:
            return cached[0]
        async with self._session() as session:
            row = await session.scalar(select(KeyRow).where(KeyRow.digest == hashed))
        if row is None or (row.revoked_at is not None and not include_revoked):
            self._active_keys.pop(hashed, None)
            return None
        key = _key(row)
        if key.active:
            if len(self._active_keys) >= KEY_CACHE_SIZE:
                self._active_keys.clear()
            self._active_keys[hashed] = (key, time.monotonic() + KEY_CACHE_SECONDS)
        return key

    async def list_keys(self) -> list[ApiKey]:
        async with self._session() as session:
            rows = await session.scalars(select(KeyRow).order_by(KeyRow.created_at))
            return [_key(row) for row in rows]

    async def find_key(self, ref: str) -> ApiKey:
        """The key whose id or name is `ref` (`NotFound` if none, or several by that name)."""
        async with self._session() as session:
            return _key(await _one_key(session, ref))

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke a key by id or name (the service then ends its sandboxes)."""
        async with self._session.begin() as session:
            rows = [await _one_key(session, key_id)]
            if rows[0].revoked_at is None:
                rows[0].revoked_at = time.time()
            key = _key(rows[0])
        self._active_keys.clear()  # after the commit, so no request re-caches the key
        return key

    async def revoked(self, key_ids: Iterable[str]) -> set[str]:
        """Those of `key_ids` that are revoked."""
        wanted = list(key_ids)
        if not wanted:
            return set()
        async with self._session() as session:
            rows = await session.scalars(
                select(KeyRow.id).where(KeyRow.id.in_(wanted), KeyRow.revoked_at.is_not(None))
            )
            return set(rows)

    async def has_keys(self) -> bool:
        async with self._session() as session:
            return await session.scalar(select(KeyRow.id).limit(1)) is not None

    # -- quotas -----------------------------------------------------------------------------

    async def quotas(self) -> dict[str, Quota]:
        """Every key's quota that sets any limit, by key id."""
        async with self._session() as session:
            return {row.key_id: _quota(row) for row in await session.scalars(select(QuotaRow))}

    async def set_quota(self, key_ref: str, quota: Quota) -> ApiKey:
        """Set the quota of the key whose id or name is `key_ref`; the key."""
        async with self._session.begin() as session:
            key = _key(await _one_key(session, key_ref))
            values = {"key_id": key.id, **quota.to_dict()}
            insert = insert_into(session, QuotaRow).values(**values)
            await session.execute(
                insert.on_conflict_do_update(index_elements=["key_id"], set_=quota.to_dict())
            )
        return key

    async def usage(self, key_id: str, snapshot_bytes: int = 0) -> Quota:
        """What the key's live sandboxes ask for (hibernated ones: disk only), its volumes and
        its uploads take; its snapshots' bytes are the engine's to tell."""
        used = Quota(snapshot_bytes=snapshot_bytes)
        for info in await self.live_sandboxes(owner=key_id):
            awake = info.state is not SandboxState.HIBERNATED
            spec = info.spec
            used = used.plus(
                Quota(
                    cpu=spec.cpu if awake else 0,
                    memory_mb=spec.memory_mb if awake else 0,
                    disk_mb=spec.disk_mb,
                )
            )
        async with self._session() as session:
            volume_mb = await session.scalar(
                select(func.sum(VolumeRow.size_mb)).where(VolumeRow.owner == key_id)
            )
            blob_bytes = await session.scalar(
                select(func.sum(BlobRow.size)).where(BlobRow.owner == key_id)
            )
        # PostgreSQL sums integers as NUMERIC (a Decimal here); SQLite as an integer.
        return used.plus(Quota(volume_mb=int(volume_mb or 0), blob_bytes=int(blob_bytes or 0)))

    # -- images -----------------------------------------------------------------------------

    async def add_image(self, owner: str, image_id: str, name: str | None) -> ImageEntry:
        """Record that `owner` built `image_id`; a `name` moves to it from any other image."""
        async with self._session.begin() as session:
            if name is not None:
                await session.execute(
                    update(ImageRow)
                    .where(ImageRow.owner == owner, ImageRow.name == name, ImageRow.id != image_id)
                    .values(name=None)
                )
            # An upsert: concurrent builds of one recipe by one key record it once.
            insert = insert_into(session, ImageRow).values(
                owner=owner, id=image_id, name=name, created_at=time.time()
            )
            await session.execute(
                insert.on_conflict_do_update(
                    index_elements=["owner", "id"],
                    set_={"name": func.coalesce(insert.excluded.name, ImageRow.name)},
                )
            )
            row = await session.get_one(ImageRow, (owner, image_id))
            return ImageEntry(row.id, row.name, row.created_at)

    async def find_image(self, owner: str, ref: str) -> ImageEntry | None:
        """`owner`'s image whose id or name is `ref`."""
        async with self._session() as session:
            row = await session.scalar(
                select(ImageRow).where(
                    ImageRow.owner == owner, (ImageRow.id == ref) | (ImageRow.name == ref)
                )
            )
        return ImageEntry(row.id, row.name, row.created_at) if row is not None else None

    async def list_images(self, owner: str) -> list[ImageEntry]:
        async with self._session() as session:
            rows = await session.scalars(
                select(ImageRow).where(ImageRow.owner == owner).order_by(ImageRow.created_at)
            )
            return [ImageEntry(r.id, r.name, r.created_at) for r in rows]

    async def remove_image(self, owner: str, ref: str) -> ImageEntry:
        async with self._session.begin() as session:
            row = await session.scalar(
                select(ImageRow).where(
                    ImageRow.owner == owner, (ImageRow.id == ref) | (ImageRow.name == ref)
                )
            )
            if row is None:
                raise ImageNotFound(f"you have no image {ref!r} (corral image list shows yours)")
            entry = ImageEntry(row.id, row.name, row.created_at)
            await session.delete(row)
        return entry

    async def image_ids(self) -> set[str]:
        """Every image some key still has: what pruning keeps."""
        async with self._session() as session:
            return set(await session.scalars(select(ImageRow.id)))

    # -- volumes ----------------------------------------------------------------------------

    async def add_volume(self, owner: str, entry: VolumeEntry) -> None:
        """Record `owner`'s new volume; `Conflict` (volume_exists) if the name is taken."""
        try:
            async with self._session.begin() as session:
                session.add(VolumeRow(owner=owner, **entry.__dict__))
        except IntegrityError as exc:
            raise Conflict(
                f"you already have a volume named {entry.name!r}", code="volume_exists"
            ) from exc

    async def find_volume(self, owner: str, ref: str) -> VolumeEntry | None:
        """`owner`'s volume whose id or name is `ref` (another key's is None, like no volume)."""
        async with self._session() as session:
            row = await session.scalar(
                select(VolumeRow).where(
                    VolumeRow.owner == owner, (VolumeRow.id == ref) | (VolumeRow.name == ref)
                )
            )
        return _volume(row) if row is not None else None

    async def list_volumes(self, owner: str) -> list[VolumeEntry]:
        async with self._session() as session:
            rows = await session.scalars(
                select(VolumeRow).where(VolumeRow.owner == owner).order_by(VolumeRow.created_at)
            )
            return [_volume(row) for row in rows]

    async def remove_volume(self, owner: str, volume_id: str) -> None:
        async with self._session.begin() as session:
            await session.execute(
                delete(VolumeRow).where(VolumeRow.owner == owner, VolumeRow.id == volume_id)
            )

    # -- sandboxes --------------------------------------------------------------------------

    async def add_sandbox(self, owner: str, info: SandboxInfo) -> None:
        async with self._session.begin() as session:
            session.add(SandboxRow(id=info.id, owner=owner, **_columns(info, self._keys)))

    async def update_sandbox(self, info: SandboxInfo, *, live_on: str | None = None) -> bool:
        """Record the engine's newest view of a sandbox (a no-op for unknown ids); with
        `live_on`, only if the row is still live on that node. Whether a row changed."""
        query = update(SandboxRow).where(SandboxRow.id == info.id)
        if live_on is not None:
            live = SandboxRow.state != SandboxState.TERMINATED.value
            query = query.where(SandboxRow.node == live_on, live)
        async with self._session.begin() as session:
            done = await session.execute(query.values(**_columns(info, self._keys)))
        return bool(getattr(done, "rowcount", 0))

    async def owner(self, sandbox_id: str) -> str | None:
        async with self._session() as session:
            return await session.scalar(select(SandboxRow.owner).where(SandboxRow.id == sandbox_id))

    async def get_sandbox(self, sandbox_id: str) -> tuple[str, SandboxInfo] | None:
        async with self._session() as session:
            row = await session.get(SandboxRow, sandbox_id)
        return None if row is None else (row.owner, _info(row, self._keys))

    async def list_sandboxes(
        self, *, owner: str | None = None, state: SandboxState | None = None
    ) -> list[SandboxInfo]:
        query = select(SandboxRow).order_by(SandboxRow.created_at)
        if owner is not None:
            query = query.where(SandboxRow.owner == owner)
        if state is not None:
            query = query.where(SandboxRow.state == state.value)
        async with self._session() as session:
            return [_info(row, self._keys) for row in await session.scalars(query)]

    async def live_sandboxes(self, owner: str | None = None) -> list[SandboxInfo]:
        """Sandboxes the catalogue believes are not terminated (of `owner`, if given)."""
        query = select(SandboxRow).where(SandboxRow.state != SandboxState.TERMINATED.value)
        if owner is not None:
            query = query.where(SandboxRow.owner == owner)
        async with self._session() as session:
            return [_info(row, self._keys) for row in await session.scalars(query)]

    async def forget_ended(self, before: float) -> int:
        """Drop ended sandboxes that ended before `before`; return how many."""
        async with self._session.begin() as session:
            result = await session.execute(
                delete(SandboxRow).where(
                    SandboxRow.state == SandboxState.TERMINATED.value, SandboxRow.ended_at < before
                )
            )
            return int(getattr(result, "rowcount", 0) or 0)
