"""The engine: the per-node owner of sandboxes (see `corral.engine.engine.Engine`)."""

from corral.engine.engine import Engine, default_data_dir, lock_data_dir
from corral.host.cgroups import favor_dynamic_changes  # the host's cgroup mode, for a server
from corral.host.scope import HostScope  # the engine's share of a machine, for `Engine(scope=)`

__all__ = ["Engine", "HostScope", "default_data_dir", "favor_dynamic_changes", "lock_data_dir"]
