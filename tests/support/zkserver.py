"""A real standalone ZooKeeper (Debian's package) for tests and the lab."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ZK_JAR = "/usr/share/java/zookeeper.jar"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ZooKeeperServer:
    """Start/stop one server; ``netns`` runs it inside a network namespace."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, netns: str | None = None):
        self.host = host
        self.port = port or free_port(host if netns is None else "127.0.0.1")
        self.netns = netns
        self.datadir = tempfile.mkdtemp(prefix="neti-zk-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(self.datadir) / "zk.log"

    @property
    def hosts(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ZooKeeperServer:
        cfg = Path(self.datadir) / "zoo.cfg"
        cfg.write_text(
            f"tickTime=500\ndataDir={self.datadir}/data\nclientPort={self.port}\n"
            f"clientPortAddress={self.host}\nmaxSessionTimeout=60000\nminSessionTimeout=1000\n"
            "admin.enableServer=false\n4lw.commands.whitelist=ruok,srvr\n"
        )
        cmd = [
            "java",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-cp",
            ZK_JAR,  # Debian's jar names its dependencies in its manifest
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.log.dir=" + self.datadir,
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(cfg),
        ]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        out = open(self.log, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited: {self.log.read_text()[-2000:]}")
            if self._ruok():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ZooKeeper did not start in {timeout}s: {self.log.read_text()[-2000:]}")

    def _ruok(self) -> bool:
        cmd = ["ip", "netns", "exec", self.netns] if self.netns else []
        probe = (
            "import socket,sys\n"
            "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),1)\n"
            "s.sendall(b'ruok'); print(s.recv(4).decode())\n"
        )
        try:
            r = subprocess.run(
                [*cmd, "python3", "-c", probe, self.host, str(self.port)],
                capture_output=True,
                text=True,
                timeout=5,
            )
        except subprocess.TimeoutExpired:
            return False
        return r.stdout.strip() == "imok"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.datadir, ignore_errors=True)
