"""What a verified, resumable download costs: the worker's fetch against the Hub client's own
download and a bare HTTP copy, side by side in one run, from a local fake hub (tests/fakes/hub.py)
serving the bundled GGUF (98 MB), so that the network is not what is measured.

    .venv/bin/python bench/downloads.py [--rounds 5]

- ``bare httpx``: one GET streamed to a file, nothing else (the floor);
- ``hf_hub_download``: huggingface_hub's own download into a local folder (HEAD on /resolve,
  redirect to the CDN, its own consistency check);
- ``modelfleet fetch``: ``python -m modelfleet.worker.fetch`` as the worker runs it (a child
  process: interpreter start, listing through huggingface_hub, HEAD, ranged GET, sha256 of every
  byte, fsync, manifest);
- ``fetch, cached``: the same source again (one listing call, nothing downloaded);
- ``fetch, resume at 50 %``: a partial file of half the size is there; the rest is fetched with a
  range request and the prefix is hashed from disk.

Rounds alternate the order of the scenarios. Prints the median seconds, MB/s and the ratio to
the bare copy; writes bench/results/downloads.json with every round and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.hub import FakeHub  # noqa: E402

from modelfleet.bundled import BUNDLED  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "downloads.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    console = Console()
    load_before = [round(x, 2) for x in os.getloadavg()]
    gguf = BUNDLED["smollm2-135m-instruct"].path()
    size = gguf.stat().st_size
    hub = FakeHub().start()
    hub.add_hf("bench/smol", {"smol.gguf": gguf})
    env = hub.client_env()
    for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE"):
        os.environ[k] = env[k]
    work = Path(tempfile.mkdtemp(prefix="bench-downloads-"))

    def bare() -> None:
        commit = httpx.get(f"{hub.endpoint}/api/models/bench/smol", timeout=10).json()["sha"]
        url = f"{hub.endpoint}/bench/smol/resolve/{commit}/smol.gguf"
        with (
            httpx.Client(follow_redirects=True, timeout=60) as c,
            c.stream("GET", url) as r,
            (work / "bare.gguf").open("wb") as f,
        ):
            for chunk in r.iter_raw(1 << 20):
                f.write(chunk)

    def hf() -> None:
        from huggingface_hub import hf_hub_download

        shutil.rmtree(work / "hf", ignore_errors=True)
        hf_hub_download("bench/smol", "smol.gguf", local_dir=work / "hf")

    def fetch(cache: Path) -> None:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "modelfleet.worker.fetch",
                "--cache",
                str(cache),
                "--source",
                "hf://bench/smol/smol.gguf",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if p.returncode != 0:
            raise SystemExit(f"fetch failed: {p.stdout[-500:]} {p.stderr[-2000:]}")

    def fresh() -> None:
        shutil.rmtree(work / "cache", ignore_errors=True)
        fetch(work / "cache")

    def cached() -> None:
        fetch(work / "cache")

    def resume() -> None:
        # Half of the file as the partial download a killed worker leaves behind.
        shutil.rmtree(work / "resume", ignore_errors=True)
        fetch(work / "resume")
        (target,) = (work / "resume").rglob("smol.gguf")
        partial = target.with_name("smol.gguf.partial")
        with target.open("rb") as src, partial.open("wb") as dst:
            dst.write(src.read(size // 2))
        target.unlink()
        for m in (work / "resume" / ".manifests").glob("*.json"):
            m.unlink()
        t0 = time.perf_counter()
        fetch(work / "resume")
        timings["fetch, resume at 50 %"].append(time.perf_counter() - t0)

    scenarios: dict[str, Callable[[], None]] = {
        "bare httpx": bare,
        "hf_hub_download": hf,
        "modelfleet fetch": fresh,
        "fetch, cached": cached,
    }
    timings: dict[str, list[float]] = {name: [] for name in [*scenarios, "fetch, resume at 50 %"]}
    console.print(f"{args.rounds} rounds of {len(timings)} scenarios, {size / 1e6:.1f} MB from a local fake hub")
    for r in range(args.rounds):
        names = list(scenarios) if r % 2 == 0 else list(reversed(scenarios))
        for name in names:
            if name == "fetch, cached" and not (work / "cache").exists():
                fresh()
            t0 = time.perf_counter()
            scenarios[name]()
            timings[name].append(time.perf_counter() - t0)
        resume()
    hub.stop()
    shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(timings["bare httpx"])
    table = Table(title=f"downloading {size / 1e6:.1f} MB (median of {args.rounds})")
    for col in ("scenario", "seconds", "MB/s", "× bare"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    rows: list[dict[str, Any]] = []
    for name, ts in timings.items():
        med = statistics.median(ts)
        moved = size / 2 if "resume" in name else (0 if name == "fetch, cached" else size)
        rows.append(
            {
                "scenario": name,
                "median_s": round(med, 3),
                "seconds": [round(t, 3) for t in ts],
                "mb_per_s": round(moved / med / 1e6, 1) if moved else None,
                "ratio_to_bare": round(med / base, 2),
            }
        )
        table.add_row(name, f"{med:.2f}", f"{moved / med / 1e6:.0f}" if moved else "-", f"{med / base:.2f}")
    console.print(table)
    out = {
        "bytes": size,
        "rounds": args.rounds,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
