"""The engine: the per-node owner of sandboxes (see `corral.engine.engine.Engine`)."""

from corral.engine.engine import Engine, default_data_dir, lock_data_dir

__all__ = ["Engine", "default_data_dir", "lock_data_dir"]
