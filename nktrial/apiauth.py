"""The Prefect API's basic-auth string that `nktrial up` keeps, and the modes of the data folder's files.

`nktrial up` generates the string once (`nktrial:<32 url-safe characters>`) into
`<data folder>/prefect-api-auth`, mode 0600, and starts the server with
PREFECT_SERVER_API_AUTH_STRING and its worker and `prefect deploy` with PREFECT_API_AUTH_STRING.
The CLI sends the same string to a server on this machine when the user has not set one.
Nothing here imports Prefect, and nothing here prints the string.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from protocol.errors import UserError
from tasks.settings import LOOPBACK

AUTH_FILE = "prefect-api-auth"
AUTH_USER = "nktrial"


def secret_path(data_dir: Path) -> Path:
    return Path(data_dir) / AUTH_FILE


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner can enter (0700): created so, or tightened.

    A folder anyone may write to (such as /tmp) is refused: the trial's data needs a folder of its own.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & stat.S_IWOTH:
        raise UserError(f"data folder {path} is writable by everyone; give the trial a folder of its own (NKTRIAL_DATA_DIR)")
    if mode & 0o077:
        path.chmod(0o700)
    return path


def private_file(path: Path) -> None:
    """Take group and other access away from an existing file (0600); a missing one is left alone."""
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:
        pass


def load_or_create(data_dir: Path) -> tuple[str, bool]:
    """The auth string kept in the data folder, and whether this call generated it (the first start)."""
    path = secret_path(data_dir)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        private_file(path)
        value = read(data_dir)
        if not value:
            raise UserError(f"{path} holds no API auth string; delete it and start again (a new one is made)") from None
        return value, False
    value = f"{AUTH_USER}:{secrets.token_urlsafe(24)}"
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    return value, True


def read(data_dir: Path) -> str | None:
    try:
        return secret_path(data_dir).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def is_loopback(api_url: str) -> bool:
    return (urllib.parse.urlsplit(api_url).hostname or "") in LOOPBACK


def client_auth(api_url: str | None, data_dir: Path) -> str | None:
    """The auth string a CLI command sends to the API at `api_url`.

    PREFECT_API_AUTH_STRING when set; otherwise, for a server on this machine (a loopback address) and no
    PREFECT_API_KEY, the string `nktrial up` keeps in the data folder, if there is one. Never sent elsewhere.
    """
    if os.environ.get("PREFECT_API_AUTH_STRING"):
        return os.environ["PREFECT_API_AUTH_STRING"]
    if not api_url or os.environ.get("PREFECT_API_KEY") or not is_loopback(api_url):
        return None
    return read(data_dir)


def authorization(auth: str | None) -> dict[str, str]:
    if not auth:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth.encode("utf-8")).decode("ascii")}


def api_status(api_url: str, auth: str | None, *, timeout: float = 5) -> int | None:
    """The HTTP status of an authenticated read (POST /deployments/filter), or None when nothing answers."""
    req = urllib.request.Request(f"{api_url.rstrip('/')}/deployments/filter", data=b'{"limit": 1}', method="POST",
                                 headers={"Content-Type": "application/json", **authorization(auth)})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def refused_message(api_url: str, data_dir: Path) -> str:
    """Why the server said 401, and what to set; the string itself is never shown."""
    where = secret_path(data_dir)
    if os.environ.get("PREFECT_API_AUTH_STRING"):
        return f"the Prefect server at {api_url} refused PREFECT_API_AUTH_STRING (401); set it to the server's auth string"
    kept = f" (a server started by `nktrial up` keeps it in {where})"
    if not is_loopback(api_url):
        return f"the Prefect server at {api_url} asks for its API auth string (401): set PREFECT_API_AUTH_STRING{kept}"
    if where.exists():
        return (f"the Prefect server at {api_url} refused the auth string kept in {where} (401): the server was started with "
                "another one; restart `nktrial up`, or set PREFECT_API_AUTH_STRING to the server's")
    return f"the Prefect server at {api_url} asks for its API auth string (401): set PREFECT_API_AUTH_STRING{kept}"
