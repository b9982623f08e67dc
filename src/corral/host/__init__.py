"""Root-only host plumbing: mounts, quota disks, cgroups, user namespaces, seccomp, networks.

Each module wraps one kernel mechanism in plain functions of plain values (paths, ids, numbers),
so it can be read and tested on its own; none knows what a sandbox plan or a runtime is. Only
`corral.core` is imported from here.
"""
