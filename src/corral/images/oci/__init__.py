"""OCI and Docker images turned into layers that Corral stacks with overlayfs.

An image arrives as an archive on disk (`docker save`, or an OCI image layout) or from a registry
(HTTP API v2). Either way the result is an `OciImage`: its layer blobs, verified against their
sha256 digests and stored in a work directory, and the few settings of its config a sandbox
needs. `unpack_layer` then turns each blob into a directory that overlayfs uses as a lower layer.

Everything read here is untrusted: archives, manifests, configs and layers come from whoever
built the image. Nothing is extracted by a name the archive chooses except inside a layer, where
every path is resolved one component at a time without following symlinks.
"""

from corral.images.oci.archive import read_archive
from corral.images.oci.manifest import OciConfig, OciImage, StatusLine, machine_platform
from corral.images.oci.registry import pull
from corral.images.oci.unpack import MAX_IMAGE_BYTES, MAX_MEMBERS, Budget, unpack_layer

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_MEMBERS",
    "Budget",
    "OciConfig",
    "OciImage",
    "StatusLine",
    "machine_platform",
    "pull",
    "read_archive",
    "unpack_layer",
]
