"""Deployments: a command from an image or snapshot as a service at a stable URL (see
docs/deployments.md). Their traffic goes through `corral.server.previews.gateway`.

spec     what a deployment runs, checked once
host     every deployment of the server, started and adopted again with it
runner   one deployment kept served: instances, health, restarts, sleep, updates, log copies
logs     its logs and events on the host
store    the deployments table
"""
