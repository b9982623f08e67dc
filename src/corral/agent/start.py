"""How the guest agent starts: ``python3 -I -S start.py SOCKET_DIR [MEMORY_BUDGET_BYTES]``.

Python compiles the script it runs at every start, but imports a module from its compiled
copy, which the engine writes once beside the agent's code (`corral.engine.datadir`). So the
agent is the module `guest`, and this script only imports and runs it: 2.5 ms less at every
agent's start (docs/performance.md).
"""

import os
import sys

# No OpenSSL (hmac then uses Python's sha256; 0.47 MiB less private memory per idle agent).
# docs/performance.md.
sys.modules.setdefault("_hashlib", None)  # type: ignore[arg-type]
# -I leaves the script's own directory off the path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guest  # type: ignore[import-not-found]  # noqa: E402 - after the path is set

guest.main()
