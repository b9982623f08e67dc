"""The code interpreter's figures, for bench/run.py: `run_code("x += 1")` beside a fresh
`python3 -c`, the first `run_code` on a sandbox claimed from a warm pool, a chart end to end."""

from __future__ import annotations

import time
from typing import Any

from corral import AsyncSandbox

IMAGE = "code-interpreter"
CHART = (
    "fig, ax = plt.subplots(figsize=(6, 4))\n"
    "ax.plot(range(100), [i * i for i in range(100)], label='squares')\n"
    "ax.set_title('squares'); ax.legend()"
)


async def code_figures(suite: Any, runtime: str, summary: Any) -> None:
    """Record the code interpreter's figures for `runtime` on `suite` (see bench/run.py)."""
    for image, kind in (("debian", "python"), (IMAGE, "ipython")):
        sandbox = await AsyncSandbox.create(
            runtime=runtime, image=image, pool=False, client=suite.client
        )
        try:
            await round_trips(suite, sandbox, runtime, kind, summary)
        finally:
            await sandbox.terminate()
    await first_from_pool(suite, runtime, summary)


async def round_trips(
    suite: Any, sandbox: AsyncSandbox, runtime: str, kind: str, summary: Any
) -> None:
    n = suite.args.samples
    await sandbox.run_code("x = 0")  # the context's interpreter starts here
    steps = [await suite.timed(lambda: sandbox.run_code("x += 1")) for _ in range(n)]
    suite.record(f"run_code x += 1 ({kind})", runtime, summary(steps))
    if kind == "python":
        argv = ["python3", "-c", "x = 0; x += 1"]
        fresh = [await suite.timed(lambda: sandbox.run(argv)) for _ in range(n)]
        suite.record("run python3 -c 'x += 1'", runtime, summary(fresh))
        return
    await sandbox.run_code("import matplotlib.pyplot as plt")
    charts = []
    for _ in range(max(n // 10, 5)):
        start = time.perf_counter()
        done = await sandbox.run_code(CHART)
        assert done.results[-1].png is not None and done.results[-1].chart
        charts.append(time.perf_counter() - start)
    suite.record("matplotlib chart end to end (PNG and data)", runtime, summary(charts))


async def first_from_pool(suite: Any, runtime: str, summary: Any) -> None:
    """Claim from a warm pool of the image, then the first `run_code`: both, and the second
    alone (the interpreter is running in a pooled sandbox before the claim)."""
    batch = min(10, suite.args.samples)
    pool = f"bench-code-{runtime}"
    await suite.client.set_pool(pool, batch, runtime=runtime, image=IMAGE)
    total: list[float] = []
    first: list[float] = []
    try:
        while len(total) < max(suite.args.samples // 4, batch):
            await suite.wait_idle(pool, batch)
            made = []
            for _ in range(batch):
                start = time.perf_counter()
                sandbox = await AsyncSandbox.create(
                    runtime=runtime, image=IMAGE, pool=True, client=suite.client
                )
                claimed = time.perf_counter()
                made.append(sandbox)
                assert (await sandbox.run_code("1 + 1")).text == "2"
                done = time.perf_counter()
                total.append(done - start)
                first.append(done - claimed)
            for sandbox in made:
                await sandbox.terminate()
        hits = next(p for p in await suite.client.list_pools() if p["name"] == pool)["hits"]
    finally:
        await suite.client.remove_pool(pool)
    suite.record(
        "claim + first run_code (warm pool)", runtime, {**summary(total), "pool_hits": hits}
    )
    suite.record("first run_code after a warm claim", runtime, summary(first))
