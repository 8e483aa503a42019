"""EC2 instance metadata over IMDSv2, with the stdlib only.

IMDSv2 needs a session token: ``PUT /latest/api/token`` first, then every GET carries it.
Transient failures (connection errors, timeouts, 5xx) are retried with exponential backoff;
a 401 means the token expired, so it is fetched again once. Proxies are bypassed on purpose:
``http_proxy`` in the agent's environment must never route 169.254.169.254 elsewhere.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from ipaddress import AddressValueError, IPv4Address
from typing import Any

from neti.config import Config, Ec2Identity
from neti.errors import IdentityError
from neti.fleet.addr import LABEL_RE, own_address_problem
from neti.identity import Identity

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
META = "/latest/meta-data/"
TOKEN_TTL = 21600  # seconds; the maximum IMDS allows, the agent resolves once at start-up
MAX_BODY = 64 * 1024  # metadata values are tiny; never buffer an unbounded answer
MAX_TOKEN = 512  # EC2's tokens are ~56 characters
READ_CHUNK = 4096
MAX_ASSOCIATIONS = 64
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0

MAC_RE = re.compile(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
REGION_RE = re.compile(r"\A[a-z]{2,}(-[a-z0-9]+)+-\d+\Z")
# A token goes back into a request header: visible ASCII only (no CR/LF, spaces, controls).
TOKEN_RE = re.compile(r"\A[\x21-\x7e]+\Z")


class _TooLarge(Exception):
    """The answer is longer than MAX_BODY: refused, not retried (it will not shrink)."""


class _Transient(Exception):
    """A failure worth retrying (connection refused, timeout, 5xx)."""


class ImdsClient:
    """A small IMDSv2 client: ``get(path)`` returns the text, or None for a 404."""

    def __init__(
        self,
        endpoint: str = "http://169.254.169.254",
        timeout: float = 2.0,
        retries: int = 3,
        backoff: float = BACKOFF_BASE,
        sleep: Callable[[float], None] = time.sleep,
    ):
        parsed = urllib.parse.urlsplit(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise IdentityError(f"instance metadata endpoint {endpoint!r} is not an http(s) URL")
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._sleep = sleep
        self._token: str | None = None
        # An empty ProxyHandler disables http_proxy/https_proxy for this opener.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_config(cls, icfg: Ec2Identity) -> ImdsClient:
        return cls(icfg.endpoint, timeout=icfg.timeout, retries=icfg.retries)

    # --- transport ---
    def _fail(self, path: str, why: str) -> IdentityError:
        return IdentityError(f"instance metadata {self.endpoint}{path}: {why}")

    def _once(self, req: urllib.request.Request) -> tuple[int, str]:
        """One HTTP exchange: (status, body). Raises _Transient for retryable failures."""
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.status, self._read(resp)
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code >= 500:
                    raise _Transient(f"HTTP {exc.code}") from None
                return exc.code, ""
        except urllib.error.URLError as exc:
            raise _Transient(str(exc.reason)) from None
        except TimeoutError:  # a timeout while reading the answer is not wrapped by urllib
            raise _Transient(f"timed out after {self.timeout:g}s") from None
        except OSError as exc:
            raise _Transient(str(exc) or type(exc).__name__) from None

    def _read(self, resp: Any) -> str:
        """The body, at most MAX_BODY bytes, within one ``timeout`` however slowly it drips."""
        deadline = time.monotonic() + self.timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = resp.read1(READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_BODY:
                raise _TooLarge()
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise _Transient(f"answer not complete within {self.timeout:g}s")
        return b"".join(chunks).decode("utf-8", "replace")

    def _with_retries(self, path: str, req_factory: Callable[[], urllib.request.Request]):
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(min(self.backoff * 2 ** (attempt - 1), BACKOFF_CAP))
            try:
                return self._once(req_factory())
            except _TooLarge:
                raise self._fail(path, f"answer larger than {MAX_BODY // 1024} KiB") from None
            except _Transient as exc:
                last = str(exc)
                log.debug("IMDS %s attempt %d failed: %s", path, attempt + 1, last)
        raise self._fail(path, f"{last} (after {self.retries + 1} attempts)")

    def _fetch_token(self) -> str:
        def req() -> urllib.request.Request:
            return urllib.request.Request(
                self.endpoint + TOKEN_PATH,
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)},
            )

        status, body = self._with_retries(TOKEN_PATH, req)
        token = body.strip()
        if status != 200 or not token:
            raise self._fail(
                TOKEN_PATH,
                f"IMDSv2 token request refused (HTTP {status}); is IMDSv2 enabled and the "
                "metadata hop limit high enough for this host?",
            )
        # It is sent back as a header: CR/LF would inject headers (and make urllib raise).
        # The token itself is a secret, so the message describes it without showing it.
        if len(token) > MAX_TOKEN:
            raise self._fail(TOKEN_PATH, f"IMDSv2 token is {len(token)} characters long; refused")
        if not TOKEN_RE.match(token):
            raise self._fail(
                TOKEN_PATH,
                "IMDSv2 token has spaces, control characters (CR/LF) or non-ASCII; refused",
            )
        return token

    def get(self, path: str) -> str | None:
        """GET ``/latest/meta-data/<path>``: its text, None on 404, IdentityError otherwise."""
        full = META + path.lstrip("/")
        for refresh in (False, True):
            if self._token is None or refresh:
                self._token = self._fetch_token()
            token = self._token

            def req(token: str = token) -> urllib.request.Request:
                return urllib.request.Request(
                    self.endpoint + full, headers={"X-aws-ec2-metadata-token": token}
                )

            status, body = self._with_retries(full, req)
            if status == 200:
                return body.strip()
            if status == 404:
                return None
            if status == 401 and not refresh:
                log.debug("IMDS token rejected for %s; fetching a new one", full)
                continue
            break
        raise self._fail(full, f"HTTP {status}")

    def require(self, path: str) -> str:
        value = self.get(path)
        if not value:
            raise self._fail(META + path, "not found (HTTP 404 or empty)")
        return value

    def listing(self, path: str) -> list[str] | None:
        """A metadata directory's entries (trailing '/' removed), None on 404."""
        text = self.get(path)
        if text is None:
            return None
        return [line.strip().rstrip("/") for line in text.splitlines() if line.strip()]


def _ipv4(client: ImdsClient, path: str, value: str) -> IPv4Address:
    """An address this host can be reached by: not loopback, link-local, 0.x, multicast."""
    try:
        ip = IPv4Address(value)
    except AddressValueError:
        raise client._fail(META + path, f"{value[:60]!r} is not an IPv4 address") from None
    problem = own_address_problem(ip)
    if problem:
        raise client._fail(META + path, f"{ip} cannot identify this host: {problem}")
    return ip


def _label(client: ImdsClient, path: str, value: str) -> str:
    if not LABEL_RE.match(value):
        raise client._fail(META + path, f"{value[:60]!r} is not a valid label") from None
    return value


def _public_ip(client: ImdsClient, mac: str, private_ip: IPv4Address) -> IPv4Address | None:
    """public-ipv4, else the primary interface's first public IPv4 association, else None."""
    value = client.get("public-ipv4")
    if value:
        return _ipv4(client, "public-ipv4", value)
    assoc_path = f"network/interfaces/macs/{mac}/ipv4-associations/"
    keys = client.listing(assoc_path) or []
    if not keys:
        return None
    # Each key is a public IP and becomes part of the next request's path: validated first,
    # and only the first MAX_ASSOCIATIONS are looked at (EC2 allows a few dozen per interface).
    ips = [_ipv4(client, assoc_path, key) for key in keys[:MAX_ASSOCIATIONS]]
    # An interface can carry several associations (secondary private IPs): prefer the one
    # mapped to the primary private address, fall back to the first.
    if len(ips) > 1:
        for ip in ips:
            if client.get(f"{assoc_path}{ip}") == str(private_ip):
                return ip
    return ips[0]


def fetch_identity(icfg: Ec2Identity, client: ImdsClient | None = None) -> Identity:
    """Instance ID, addresses and network label of this EC2 instance."""
    client = client or ImdsClient.from_config(icfg)
    instance_id = _label(client, "instance-id", client.require("instance-id"))
    private_ip = _ipv4(client, "local-ipv4", client.require("local-ipv4"))
    mac = client.require("mac").lower()
    if not MAC_RE.match(mac):
        raise client._fail(META + "mac", f"{mac[:60]!r} is not a MAC address")
    vpc_path = f"network/interfaces/macs/{mac}/vpc-id"
    vpc_id = client.get(vpc_path)
    network = _label(client, vpc_path, vpc_id) if vpc_id else icfg.classic_network
    public_ip = _public_ip(client, mac, private_ip)
    if public_ip is None:
        log.warning(
            "instance %s has no public IPv4 address (%s): using its private address %s as "
            "public_ip; hosts in other networks will not be able to reach it",
            instance_id,
            client.endpoint,
            private_ip,
        )
        public_ip = private_ip
    return Identity(instance_id, private_ip, public_ip, network)


def region(cfg: Config) -> str | None:
    """This instance's AWS region from ``placement/region``.

    None when the identity is static (no metadata service configured) or the path is absent;
    IdentityError when the service is unreachable or answers nonsense.
    """
    if not isinstance(cfg.identity, Ec2Identity):
        return None
    client = ImdsClient.from_config(cfg.identity)
    value = client.get("placement/region")
    if not value:
        return None
    if not REGION_RE.match(value):
        raise client._fail(META + "placement/region", f"{value[:60]!r} is not an AWS region")
    return value
