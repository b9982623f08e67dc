"""Cluster mode: one API (a front) over the engines of several machines, on Ray.

Each node of a Ray cluster that offers sandboxes runs a Corral node server (`corral serve`
with its own data directory, host scope and node name), started and watched by a Ray actor
pinned to that node (`corral.server.cluster.agent`, the only module that imports Ray, run as
its own process). The front (`front`: the nodes and their loss; `api`: its HTTP API) places
each create on a node (`placement`), sends every request about a sandbox straight to its node
(`proxy`, `sockets`: HTTP and WebSockets, nothing through Ray), copies snapshots to the node
that needs them (`moves`), and ends the sandboxes of a node Ray reports lost (`node_lost`).
All of them share one store and one key for data at rest. `corral.server.cluster.local`
starts a Ray cluster of N nodes on this machine, in a network namespace of its own, for trying
it out and for tests.
"""
