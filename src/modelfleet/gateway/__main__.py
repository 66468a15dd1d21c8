"""``python -m modelfleet.gateway --controller URL --port 8000 …``: the gateway without the
main CLI (tests and benchmarks use it). One flag per GatewaySettings field; each also reads
its MODELFLEET_* variable (MODELFLEET_CONTROLLER for the list)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from modelfleet.gateway import GatewaySettings, run_gateway


def parse(argv: list[str] | None = None) -> GatewaySettings:
    p = argparse.ArgumentParser(prog="python -m modelfleet.gateway", description=__doc__.split("\n")[0])
    for f in fields(GatewaySettings):
        flag = "--controller" if f.name == "controllers" else "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind.startswith("bool"):  # --access-log / --no-access-log
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=MISSING)
            continue
        conv = int if kind.startswith("int") else float if kind.startswith("float") else str
        p.add_argument(flag, dest=f.name, type=conv, default=MISSING)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not MISSING}
    return GatewaySettings.from_env(**args)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = parse(argv)
    except ValueError as exc:  # a bad setting or token file: one line, no traceback
        raise SystemExit(f"modelfleet gateway: {exc}") from None
    run_gateway(settings)


if __name__ == "__main__":
    main()
