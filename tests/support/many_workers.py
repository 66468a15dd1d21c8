"""Run N real WorkerAgents (heartbeat loops, controller failover) in one process.

Used where a test needs many workers: N separate Python processes would cost minutes of
CPU on a 2-core machine, and the agent logic under test (heartbeat, failover,
re-registration) is the same code. Their instance supervisors run with no model.

    python -m tests.support.many_workers --controller URL[,URL] --count 50 --prefix w --interval 2
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
from pathlib import Path

from modelfleet.worker.agent import WorkerAgent, WorkerSettings


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--controller", required=True)
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--prefix", default="w")
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--join-token", default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logdir = Path(tempfile.mkdtemp(prefix="mf-many-"))
    agents = [
        WorkerAgent(WorkerSettings(
            controllers=a.controller.split(","), join_token=a.join_token, name=f"{a.prefix}{i:03d}",
            port=20000 + i, heartbeat_interval=a.interval, log_dir=logdir / str(i),
        ))
        for i in range(a.count)
    ]
    for agent in agents:
        await agent.start()
    print(f"STARTED {a.count}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
