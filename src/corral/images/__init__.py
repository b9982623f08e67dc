"""The image machinery: built-in images, the layer store, builds from recipes, OCI archives and
registries, and filesystem diffs.

An image is an ordered stack of read-only layers on the host; sandboxes never copy one. Builds
run their steps in sandboxes through the small `SandboxHost` interface the engine provides
(`corral.images.builder`), so nothing here imports the engine.
"""
