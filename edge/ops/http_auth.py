"""HTTP basic auth against an htpasswd file of bcrypt hashes.

The file (``metrics.basic_auth_file``) holds lines ``user:hash`` made with
``htpasswd -nbB user password``; only bcrypt hashes (``$2y$``, ``$2b$``,
``$2a$``) are accepted, any other line is a :class:`~edge.errors.ConfigError`
naming its line number (never its text). The file is read once.

A successful check is cached in memory as the SHA-256 of the password and
later compared in constant time (:func:`hmac.compare_digest`), so a scrape
every 15 s costs one bcrypt per process, not one per scrape. An unknown user
costs the same bcrypt as a known one, so timing does not tell which users
exist. Neither the password nor the ``Authorization`` header is ever logged.

Used by :mod:`edge.ops.health` (every endpoint answers 401 without valid
credentials when ``basic_auth_file`` is set).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import threading
import time
from pathlib import Path

import bcrypt

from edge.errors import ConfigError

__all__ = ["HtpasswdAuth"]

_BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
#: A whole bcrypt hash: prefix, a two-digit cost of 04-31, 22 characters of salt and 31 of hash.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
#: A client whose checks failed this often within FAILURE_WINDOW_S gets 401 without a bcrypt check until the
#: window ends: a bcrypt costs tens of milliseconds of a core, and 32 clients sending wrong passwords held every
#: connection slot busy with them (a scraper with the right password was turned away).
FAILURES_BEFORE_THROTTLE = 5
FAILURE_WINDOW_S = 10.0


class HtpasswdAuth:
    """HTTP basic auth against an htpasswd file of bcrypt hashes.

    Parameters
    ----------
    path : path-like
        Lines ``user:hash`` with hashes from ``htpasswd -nbB user password``
        (``$2y$``, ``$2b$`` or ``$2a$``); blank lines and ``#`` comments are
        skipped.

    Raises
    ------
    ConfigError
        If the file cannot be read, holds no user, or holds a line that is
        not ``user:bcrypt-hash`` (the line number is named, never its text).

    Examples
    --------
    >>> import base64, tempfile, bcrypt
    >>> f = tempfile.NamedTemporaryFile("w", suffix=".htpasswd", delete=False)
    >>> _ = f.write("prom:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode() + "\\n"); f.close()
    >>> auth = HtpasswdAuth(f.name)
    >>> auth.check("Basic " + base64.b64encode(b"prom:s3cret").decode())
    True
    >>> auth.check("Basic " + base64.b64encode(b"prom:wrong").decode())
    False
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Config key metrics.basic_auth_file: cannot read {self.path}: {exc}.") from exc
        users: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not user or _BCRYPT_HASH.fullmatch(hashed) is None:
                raise ConfigError(
                    f"Config key metrics.basic_auth_file: line {number} of {self.path} is not 'user:bcrypt-hash' "
                    "(make it with 'htpasswd -nbB user password'; other hash types are not accepted)."
                )
            users[user] = hashed.encode("ascii", "replace")
        if not users:
            raise ConfigError(f"Config key metrics.basic_auth_file: {self.path} holds no user.")
        self._users = users
        # An unknown user costs the same bcrypt as a known one (no user enumeration by timing).
        self._decoy = next(iter(users.values()))
        self._lock = threading.Lock()
        self._verified: dict[str, bytes] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (failed checks, start of their window)

    @property
    def users(self) -> tuple[str, ...]:
        """The user names in the file."""
        return tuple(self._users)

    def check(self, authorization: str | None, peer: str = "") -> bool:
        """Whether an ``Authorization`` header value carries valid credentials.

        ``peer`` (the client's address): after :data:`FAILURES_BEFORE_THROTTLE`
        failed bcrypt checks within :data:`FAILURE_WINDOW_S`, its further
        attempts fail at once, without a bcrypt, until the window ends
        (credentials verified before still pass: they are cached).
        """
        return self._check(authorization, peer)

    def _throttled(self, peer: str) -> bool:
        with self._lock:
            count, since = self._failures.get(peer, (0, 0.0))
        return count >= FAILURES_BEFORE_THROTTLE and time.monotonic() - since < FAILURE_WINDOW_S

    def _failed(self, peer: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 4096:  # many clients: forget the ones whose window has ended
                self._failures = {k: v for k, v in self._failures.items() if now - v[1] < FAILURE_WINDOW_S}
            count, since = self._failures.get(peer, (0, now))
            self._failures[peer] = (count + 1, since) if now - since < FAILURE_WINDOW_S else (1, now)

    def _check(self, authorization: str | None, peer: str) -> bool:
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):  # ValueError: non-ASCII base64 text
            return False
        if not sep:
            return False
        secret = password.encode("utf-8")
        digest = hashlib.sha256(secret).digest()
        with self._lock:
            known = self._verified.get(user)
        if known is not None and hmac.compare_digest(known, digest):
            return True
        if peer and self._throttled(peer):
            return False
        hashed = self._users.get(user)
        try:
            ok = bcrypt.checkpw(secret, hashed if hashed is not None else self._decoy)
        except ValueError:  # a password longer than bcrypt's 72 bytes, or a hash bcrypt cannot parse
            ok = False
        if ok and hashed is not None:
            with self._lock:
                self._verified[user] = digest
            return True
        if peer:  # only checks that cost a bcrypt count (a first request without credentials does not)
            self._failed(peer)
        return False
