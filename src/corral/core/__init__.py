"""The core: Corral's vocabulary as plain, I/O-free data, shared by the SDK and the server.

Errors, ids, the sandbox spec (every field with its default and bounds, defined once), the
state machine's states, the result types, and image recipe validation. Nothing here touches the
network, the disk or the host, and nothing here imports another part of Corral.
"""
