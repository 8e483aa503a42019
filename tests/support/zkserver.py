"""A real standalone ZooKeeper (Debian's package) for tests and the lab."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from neti.registry.quota import server_jvm_flags
from tests.support.markers import require

if TYPE_CHECKING:
    from neti.lab.pki import CertificateAuthority, Issued

ZK_JAR = "/usr/share/java/zookeeper.jar"
# The DNS name a TLS server's certificate carries besides its address: what clients that
# reach it through a proxy check it by (zk_tls.server_name).
SERVER_NAME = "zookeeper.neti.test"
# The Netty server (needed for TLS) uses jars Debian's zookeeper.jar manifest does not name.
NETTY_JARS = [
    "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-resolver.jar",
    "/usr/share/java/netty-transport-native-unix-common.jar",
]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ZooKeeperServer:
    """Start/stop one server; ``netns`` runs it inside a network namespace.

    ``tls``: a CertificateAuthority (neti.lab.pki). The server then listens on a
    secureClientPort only (``port``), requires a client certificate signed by that CA and
    names clients by it (x509 provider). ``plain_port`` also opens a plaintext clientPort
    (for digest-only tests); without TLS it is ignored.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        netns: str | None = None,
        tls: CertificateAuthority | None = None,
        plain_port: int | bool | None = None,
        super_digest: str | None = None,
    ):
        self.host = host
        self.port = port or free_port(host if netns is None else "127.0.0.1")
        self.netns = netns
        self.datadir = tempfile.mkdtemp(prefix="neti-zk-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(self.datadir) / "zk.log"
        self.tls = tls
        self.super_digest = super_digest  # "super:<base64 sha1>" for zookeeper.DigestAuth...
        self.server_cert: Issued | None = None
        self.probe_cert: Issued | None = None
        self.plain_port: int | None = None
        if tls is not None:
            self.server_cert = tls.issue_server(
                "zookeeper", name="zk-server", ips=[host], dns=["localhost", SERVER_NAME]
            )
            self.probe_cert = tls.issue("zk-probe", name="zk-probe")
            if plain_port:
                self.plain_port = (
                    plain_port
                    if isinstance(plain_port, int) and plain_port > 1
                    else free_port(host if netns is None else "127.0.0.1")
                )

    @property
    def plain_hosts(self) -> str:
        """host:port of the plaintext port (TLS mode with plain_port only)."""
        assert self.plain_port is not None
        return f"{self.host}:{self.plain_port}"

    @property
    def hosts(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ZooKeeperServer:
        require("zk", "tests/support/zkserver.py starts a ZooKeeper")
        cfg = Path(self.datadir) / "zoo.cfg"
        common = (
            f"tickTime=500\ndataDir={self.datadir}/data\n"
            "maxSessionTimeout=60000\nminSessionTimeout=1000\n"
            "admin.enableServer=false\n4lw.commands.whitelist=ruok,srvr\n"
        )
        classpath = ZK_JAR  # Debian's jar names its dependencies in its manifest
        extra: list[str] = []
        if self.super_digest:
            extra.append(
                f"-Dzookeeper.DigestAuthenticationProvider.superDigest={self.super_digest}"
            )
        if self.tls is None:
            cfg.write_text(f"{common}clientPort={self.port}\nclientPortAddress={self.host}\n")
        else:
            assert self.server_cert is not None
            plain = (
                f"clientPort={self.plain_port}\nclientPortAddress={self.host}\n"
                if self.plain_port
                else ""
            )
            # ZooKeeper's PEM key store is one file holding the key and its certificate.
            keystore = Path(self.datadir) / "keystore.pem"
            keystore.write_bytes(
                self.server_cert.key.read_bytes() + self.server_cert.cert.read_bytes()
            )
            keystore.chmod(0o600)
            cfg.write_text(
                f"{common}{plain}secureClientPort={self.port}\n"
                f"secureClientPortAddress={self.host}\n"
                "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n"
                "authProvider.x509=org.apache.zookeeper.server.auth.X509AuthenticationProvider\n"
                f"ssl.keyStore.location={keystore}\n"
                "ssl.keyStore.type=PEM\n"
                f"ssl.trustStore.location={self.tls.cert_path}\n"
                "ssl.trustStore.type=PEM\n"
                "ssl.clientAuth=need\n"
                # Clients are reached by IP through proxies and NAT: no reverse-DNS checks.
                "ssl.hostnameVerification=false\n"
            )
            classpath = ":".join([ZK_JAR, *NETTY_JARS])
        cmd = [
            "java",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-cp",
            classpath,
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.log.dir=" + self.datadir,
            *server_jvm_flags(),  # the ensemble's own limits, as docs/operations.md sets them
            *extra,
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
        args: list[str] = []
        if self.tls is not None:
            assert self.probe_cert is not None
            # The same four-letter word over TLS, with a client certificate.
            probe = (
                "import socket,ssl,sys\n"
                "c=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname=False\n"
                "c.load_verify_locations(sys.argv[3]); c.load_cert_chain(sys.argv[4],sys.argv[5])\n"
                "s=c.wrap_socket(socket.create_connection((sys.argv[1],int(sys.argv[2])),1))\n"
                "s.sendall(b'ruok'); print(s.recv(4).decode())\n"
            )
            args = [str(self.tls.cert_path), str(self.probe_cert.cert), str(self.probe_cert.key)]
        try:
            r = subprocess.run(
                [*cmd, "python3", "-c", probe, self.host, str(self.port), *args],
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
