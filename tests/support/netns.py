"""Several hosts on one machine: network namespaces on a private bridge, with links to cut.

Topology: a bridge in the root namespace holds 10.<a>.<b>.1 (the controller and gateway
listen there); each host is a namespace with one veth into the bridge and its own address
10.<a>.<b>.<10+n>. Cutting a host sets the bridge side of its veth down: its packets are
dropped, as when a cable is pulled (timeouts, no resets). Everything is removed at the end."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

from tests.conftest import IN_CI


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=30)


def netns_available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"mfprobe{random.randrange(1 << 16)}"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"ip netns does not work here: {exc}"
    return None


class NetLab:
    def __init__(self) -> None:
        self.tag = f"{random.randrange(1 << 16):04x}"
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"mfbr{self.tag}"
        self.hosts: dict[str, tuple[str, str, str]] = {}  # name -> (netns, host-side veth, ip)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    @property
    def gateway_ip(self) -> str:
        """The root namespace's address on the bridge (controllers and gateways listen there)."""
        return f"{self.subnet}.1"

    def add_host(self, name: str) -> tuple[str, str]:
        n = len(self.hosts)
        ns, outer, inner, ip = (
            f"mf{self.tag}{name}",
            f"mfv{self.tag}{n}",
            f"mfp{self.tag}{n}",
            f"{self.subnet}.{11 + n}",
        )
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "link", "set", outer, "master", self.bridge)
        sh("ip", "link", "set", outer, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", inner)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
        sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", self.gateway_ip)
        self.hosts[name] = (ns, outer, ip)
        return ns, ip

    def cut(self, name: str) -> None:
        sh("ip", "link", "set", self.hosts[name][1], "down")

    def restore(self, name: str) -> None:
        sh("ip", "link", "set", self.hosts[name][1], "up")
        sh("ip", "link", "set", self.hosts[name][1], "master", self.bridge)

    def destroy(self) -> None:
        for ns, outer, _ in self.hosts.values():
            subprocess.run(["ip", "link", "del", outer], capture_output=True)
            # Kill whatever still runs in the namespace before deleting it.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def netlab_or_skip() -> NetLab:
    import pytest

    why = netns_available()
    if why:
        if IN_CI:
            pytest.fail(f"{why} (CI=true)")
        pytest.skip(why)
    return NetLab()
