"""Complete a wheelhouse for the image's Python, which may differ from the host's.

pip evaluates environment markers against the interpreter it runs in, so wheels downloaded
on a host with Python 3.11.7 miss what the image's 3.11.2 needs (redis requires
async-timeout below 3.11.3). This walks the requirements from the roots given, with their
extras, evaluates every marker for the image's environment (a JSON object read from the
image, see MARKER_ENV_SCRIPT) and downloads, one by one with ``pip download --no-deps``,
each requirement that no wheel in the wheelhouse satisfies.

    python complete_wheels.py --env env.json --dest DIR --search DIR... ROOT...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

# Printed by the image's python3: packaging.markers.default_environment(), without packaging.
MARKER_ENV_SCRIPT = """
import json, os, platform, sys
v = sys.implementation.version
iver = f"{v.major}.{v.minor}.{v.micro}" + ("" if v.releaselevel == "final" else v.releaselevel[0] + str(v.serial))
print(json.dumps({
    "implementation_name": sys.implementation.name, "implementation_version": iver, "os_name": os.name,
    "platform_machine": platform.machine(), "platform_release": platform.release(),
    "platform_system": platform.system(), "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform,
}))
"""


def index_wheels(dirs: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in dirs:
        for whl in sorted(d.glob("*.whl")):
            name, _, _, _ = parse_wheel_filename(whl.name)
            found.setdefault(str(name), whl)
    return found


def requires(whl: Path) -> list[Requirement]:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(z.read(meta).decode())
    return [Requirement(r) for r in headers.get_all("Requires-Dist") or []]


def applies(req: Requirement, env: dict[str, str], extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def complete(env: dict[str, str], dest: Path, search: list[Path], roots: list[str], pip: list[str]) -> list[str]:
    """Download what is missing; return the requirements that were downloaded."""
    wheels = index_wheels([dest, *search])
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = [Requirement(r) for r in roots]
    added: list[str] = []
    while queue:
        req = queue.pop()
        name = str(canonicalize_name(req.name))
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        whl = wheels.get(name)
        if whl is None:
            spec = f"{req.name}{req.specifier}"
            subprocess.run(
                [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec], check=True
            )
            added.append(spec)
            wheels = index_wheels([dest, *search])
            whl = wheels[name]
        queue.extend(r for r in requires(whl) if applies(r, env, set(req.extras)))
    return added


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", type=Path, required=True, help="marker environment JSON of the image's Python")
    ap.add_argument("--dest", type=Path, required=True, help="where missing wheels go")
    ap.add_argument("--search", type=Path, action="append", default=[], help="wheel folders that count too")
    ap.add_argument("roots", nargs="+", help="requirements, e.g. 'modelfleet[runners]'")
    args = ap.parse_args()
    env = json.loads(args.env.read_text())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    for spec in complete(env, args.dest, args.search, args.roots, pip):
        print(f"added for Python {env['python_full_version']}: {spec}")


if __name__ == "__main__":
    main()
