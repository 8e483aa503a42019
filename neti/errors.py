"""Errors that reach the operator as one clear line, never a traceback."""


class NetiError(Exception):
    """An expected failure: the CLI prints ``str(self)`` and exits with ``exit_code``."""

    exit_code = 1


class ConfigError(NetiError):
    """The config file is missing, unreadable or invalid; ``errors`` lists every problem."""

    exit_code = 2

    def __init__(self, path: str, errors: list[str]):
        self.path = path
        self.errors = errors
        if len(errors) == 1:  # one problem, one line
            super().__init__(f"invalid config {path}: {errors[0]}")
            return
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"invalid config {path}:\n{lines}")


class IdentityError(NetiError):
    """This host's identity (instance ID, addresses, network) could not be determined."""


class RegistryError(NetiError):
    """ZooKeeper is unreachable or the registry refused an operation."""


class SubnetFullError(RegistryError):
    """No free overlay address is left in the subnet."""


class DataplaneError(NetiError):
    """The kernel refused a change (iptables-restore, ipset, nft)."""


class RegistryAccessError(RegistryError):
    """ZooKeeper refused our credentials, or our TLS/auth files are unusable: retrying the
    same thing cannot help, so the agent exits instead of looping (docs/security.md)."""

    exit_code = 2
