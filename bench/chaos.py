"""The failure matrix, in one command (issue 9 §8): `make chaos`, or

    python bench/chaos.py [--only NAME ...] [--fast] [--no-doc]

Runs every scenario of tests/chaos/matrix.py against real processes (controllers, workers,
gateways, private PostgreSQL/MariaDB/Redis servers, scripted instances), one after the other,
and prints a table: scenario, load, sent, failed, time to detect, time to recover, verdict.
Writes bench/results/chaos.json (a partial run: chaos-partial.json, not kept in git) and puts
the table into docs/reliability.md (between the ``chaos:begin`` / ``chaos:end`` markers).
Exits 1 when any verdict fails.

The load generator is tests/gateway/load.py (asyncio + httpx, 8 requests in flight against
scripted instances answering in 20 ms), in this process: its CPU time is printed and kept in
the JSON (``load_client_cpu_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])

from tests.chaos.matrix import SCENARIOS, Result, fast_scenarios, run_many, table  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "chaos.json"
PARTIAL = ROOT / "bench" / "results" / "chaos-partial.json"  # --only / --fast: never over a full run's
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- chaos:begin -->", "<!-- chaos:end -->"


def write_doc(results: list[Result], when: str, cpu: float) -> None:
    """Replace the table between the markers in docs/reliability.md."""
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    block = (
        f"{BEGIN}\nLast run: {when}, `python bench/chaos.py` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} cores).\n\n{table(results)}\n{END}"
    )
    DOC.write_text(head + block + tail)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="scenario names (see --list)")
    ap.add_argument("--fast", action="store_true", help="only the fast scenarios (those in make test)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/reliability.md")
    args = ap.parse_args()
    if args.list:
        for name, (_, fast) in SCENARIOS.items():
            print(f"{name}{'  (fast)' if fast else ''}")
        return 0
    names = args.only or (fast_scenarios() if args.fast else list(SCENARIOS))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {unknown}; --list shows them")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mf-chaos-") as tmp:
        results = run_many(names, Path(tmp))
    took = time.monotonic() - t0
    # The load client and the drivers run in this process: its CPU time is what the load cost.
    own = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = own.ru_utime + own.ru_stime
    print()
    print(table(results))
    for r in results:
        if r.checks or r.note:
            print(f"\n{r.scenario}: {r.note}")
            for c in r.checks:
                print(f"  - {c}")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    complete = args.only is None and not args.fast
    out = {
        "when": when,
        "took_s": round(took, 1),
        "cpus": os.cpu_count(),
        "complete": complete,
        "results": [r.row() for r in results],
    }
    path = RESULTS if complete else PARTIAL
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"\n{len(results)} scenarios in {took:.0f} s; the load client and drivers used {client_cpu:.0f} s of CPU "
        f"({client_cpu / took:.0%} of one core); wrote {path.relative_to(ROOT)}"
    )
    if not args.no_doc and complete:
        write_doc(results, when, client_cpu / took)
        print(f"updated {DOC.relative_to(ROOT)}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
