"""The deployments of this server: one `Runner` each, started with the server and adopted
again after a restart; where the gateway finds the instance serving a name."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from corral.core.errors import NotFound
from corral.server.deployments.logs import LogBook
from corral.server.deployments.runner import Runner, new_deployment_id
from corral.server.deployments.spec import DeploymentSpec
from corral.server.deployments.store import DeploymentEntry, DeploymentStore, name_taken

if TYPE_CHECKING:
    from corral.server.service import Service


class DeploymentHost:
    """Every deployment on this server, by name."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.runners: dict[str, Runner] = {}
        self.in_flight: collections.Counter[str] = collections.Counter()  # by sandbox id
        self._reserved: set[str] = set()  # names being created

    @property
    def store(self) -> DeploymentStore:
        return self.service.store.deployments

    def _book(self, deployment_id: str) -> LogBook:
        return LogBook(self.service.config.data_dir / "deployments" / deployment_id)

    async def start(self) -> None:
        """Adopt the deployments in the store: their instances if they live on, else new ones."""
        for entry in await self.store.all():
            runner = Runner(self.service, entry, self._book(entry.id), self.in_flight)
            runner.adopt()
            self.runners[entry.name] = runner
            runner.start()

    async def stop(self) -> None:
        """Stop looking after them; their instances run on for the next start to adopt."""
        await asyncio.gather(*(runner.stop() for runner in self.runners.values()))

    def get(self, name: str) -> Runner:
        runner = self.runners.get(name)
        if runner is None:
            raise NotFound(f"no deployment named {name!r}", code="deployment_not_found")
        return runner

    async def create(self, owner: str, spec: DeploymentSpec) -> Runner:
        """A new deployment, once its first instance answers its health check; nothing is
        recorded if it does not (`DeploymentFailed`)."""
        if spec.name in self.runners or spec.name in self._reserved:
            raise name_taken(spec.name)
        self._reserved.add(spec.name)
        try:
            now = time.time()
            entry = DeploymentEntry(new_deployment_id(), owner, spec, 1, now, now)
            runner = Runner(self.service, entry, self._book(entry.id), self.in_flight)
            try:
                instance = await runner.launch(spec)
            except BaseException:
                runner.book.remove()
                raise
            try:
                await self.store.add(entry)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.service.engine.terminate(instance.sandbox_id)
                runner.book.remove()
                raise
            self.runners[spec.name] = runner
            await runner.serve(instance)
            runner.start()
            return runner
        finally:
            self._reserved.discard(spec.name)

    async def delete(self, runner: Runner) -> None:
        await runner.delete()
        await self.store.remove(runner.entry.id)
        self.runners.pop(runner.name, None)
        runner.book.remove()

    @contextlib.contextmanager
    def request(self, sandbox_id: str) -> Iterator[None]:
        """One request on its way to `sandbox_id`: an update's switch waits for it."""
        self.in_flight[sandbox_id] += 1
        try:
            yield
        finally:
            self.in_flight[sandbox_id] -= 1
            if not self.in_flight[sandbox_id]:
                del self.in_flight[sandbox_id]
