"""GraphiQL without the internet.

Strawberry's GraphiQL page loads React, GraphiQL, its explorer plugin and js-cookie from
unpkg.com, each pinned by an exact version and an integrity hash (SRI). `scripts/bootstrap`
runs `python -m graph.graphiql`, which takes those very files from the npm registry
(`npm pack <package>@<version>`), checks each against the page's integrity hash and
keeps it in var/graphiql/ (not committed, not in the wheel or the image). Where they are
all there, the server serves them under /graphiql/static/ and a copy of the page that
names them; where they are not, the CDN's page as Strawberry ships it (said in a line of
the log at start)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

log = logging.getLogger("strawgate.graphiql")

# Where bootstrap keeps the files: the checkout's var/ (gitignored). From a wheel this
# folder never exists, and GraphiQL (off in production by default) uses the CDN.
ASSETS = Path(__file__).resolve().parent.parent / "var" / "graphiql"
# Where the server serves them; a file's path below it is `<package>@<version>/<file>`,
# so a new version is a new URL and the files can be cached for good.
PREFIX = "/graphiql/static/"
CDN = "https://unpkg.com/"

_TAG = re.compile(r"<(?:script|link)\b([^>]*)>", re.IGNORECASE | re.DOTALL)
_CDN_URL = re.compile(r"""\b(?:src|href)\s*=\s*["']https://unpkg\.com/([^"']+)["']""", re.I)
_INTEGRITY = re.compile(r"""\bintegrity\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
_NAME = re.compile(
    r"^(?P<package>(?:@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*)"
    r"@(?P<version>[0-9][0-9A-Za-z.+-]*)/(?P<path>[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*)$"
)
_MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# npm must neither retry for minutes nor run anything (a tarball from the registry runs
# no script on `npm pack`; said anyway); its cache is used first, so a second bootstrap
# works offline.
_NPM_OPTIONS = (
    "--json",
    "--ignore-scripts",
    "--prefer-offline",
    "--fetch-retries=1",
    "--fetch-retry-mintimeout=1000",
    "--fetch-retry-maxtimeout=5000",
    "--fetch-timeout=60000",
    "--loglevel=error",
    "--no-update-notifier",
)


@dataclass(frozen=True)
class Asset:
    """One file the page loads from the CDN: `name` is `<package>@<version>/<path>`."""

    package: str
    version: str
    path: str
    integrity: str  # the page's SRI ("sha384-..."); "" where it names none

    @property
    def name(self) -> str:
        return f"{self.package}@{self.version}/{self.path}"

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


@dataclass(frozen=True)
class IdePage:
    """The GraphiQL page the server answers with, and the files it serves for it (none:
    the page loads them from the CDN)."""

    html: str
    files: Mapping[str, Path] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        return bool(self.files)


def assets(html: str) -> list[Asset]:
    """The CDN files a page loads by <script> and <link>, in the page's order."""
    found: list[Asset] = []
    for attributes in _TAG.findall(html):
        url = _CDN_URL.search(attributes)
        if url is None:
            continue
        match = _NAME.match(url.group(1))
        if match is None or any(part in (".", "..") for part in match["path"].split("/")):
            raise ValueError(f"not a package file on the CDN: {url.group(1)!r}")
        integrity = _INTEGRITY.search(attributes)
        found.append(
            Asset(
                package=match["package"],
                version=match["version"],
                path=match["path"],
                integrity=integrity.group(1).strip() if integrity else "",
            )
        )
    return found


def intact(data: bytes, integrity: str) -> bool:
    """Whether `data` matches one of the SRI hashes of `integrity` (none: never)."""
    for token in integrity.split():
        algorithm, _, expected = token.partition("-")
        if algorithm in ("sha256", "sha384", "sha512"):
            digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode("ascii")
            if digest == expected:
                return True
    return False


def ide_page(cdn_html: str, folder: Path | None = None) -> IdePage:
    """The page to serve for Strawberry's `cdn_html`: the local copy where every file it
    loads is in `folder` (ASSETS by default), else `cdn_html` itself."""
    folder = ASSETS if folder is None else folder
    try:
        wanted = assets(cdn_html)
    except ValueError as exc:
        log.warning("GraphiQL loads its scripts and styles from the CDN: %s", exc)
        return IdePage(cdn_html)
    missing = [asset.name for asset in wanted if not (folder / asset.name).is_file()]
    if not wanted:
        return IdePage(cdn_html)  # it loads nothing from the CDN
    if missing:
        log.warning(
            "GraphiQL loads its scripts and styles from %s: %d of its %d files are not in %s"
            " (run scripts/bootstrap with npm installed to use it offline)",
            CDN,
            len(missing),
            len(wanted),
            folder,
        )
        return IdePage(cdn_html)
    names = {asset.name for asset in wanted}

    def local(match: re.Match[str]) -> str:
        name = match.group(1)
        whole = match.group(0)
        return whole.replace(CDN + name, PREFIX + name) if name in names else whole

    html = _CDN_URL.sub(local, cdn_html)
    log.info("GraphiQL serves its scripts and styles itself (from %s): no CDN", folder)
    return IdePage(html, {name: folder / name for name in sorted(names)})


def asset_endpoint(files: Mapping[str, Path]) -> Callable[[Request], Awaitable[Response]]:
    """GET PREFIX{name}: one of the page's files, by its exact name only."""

    async def asset(request: Request) -> Response:
        path = files.get(request.path_params["name"])
        if path is None or not path.is_file():
            return JSONResponse({"errors": [{"message": "Not Found"}]}, status_code=404)
        media_type = _MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        return FileResponse(path, media_type=media_type)

    return asset


# --- Fetching (scripts/bootstrap) ------------------------------------------------------


def strawberry_page() -> str:
    """Strawberry's GraphiQL page, found without importing Strawberry (bootstrap runs
    this every time: it must be quick)."""
    spec = importlib.util.find_spec("strawberry")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("strawberry-graphql is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return (folder / "static" / "graphiql.html").read_text(encoding="utf-8")


def fetch(
    folder: Path | None = None,
    *,
    html: str | None = None,
    npm: str | None = None,
    out: TextIO = sys.stderr,
) -> bool:
    """Puts the page's files into `folder` (ASSETS by default), each checked against the
    page's integrity hash; quiet when they are all there already. Never raises for a
    missing npm or an unreachable registry: it says, in one line, that GraphiQL will use
    the CDN, and answers False."""
    folder = ASSETS if folder is None else folder
    fallback = f"GraphiQL will load its scripts from {CDN} (it needs the internet)"
    try:
        wanted = assets(strawberry_page() if html is None else html)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"GraphiQL: {exc}: {fallback}", file=out)
        return False
    missing = [asset for asset in wanted if not _kept(folder / asset.name, asset.integrity)]
    if not missing:
        return True
    unpinned = [asset.name for asset in missing if not asset.integrity]
    if unpinned:
        print(f"GraphiQL: {', '.join(unpinned)} has no integrity hash: {fallback}", file=out)
        return False
    npm = npm or shutil.which("npm")
    if npm is None:
        print(f"GraphiQL: npm is not installed: {fallback}", file=out)
        return False
    specs = sorted({asset.spec for asset in missing})
    # One line, finished by the outcome.
    print(f"GraphiQL: {', '.join(specs)} from the npm registry ... ", end="", file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="strawgate-graphiql-") as tmp:
        try:
            done = subprocess.run(  # noqa: S603 - npm, with the page's own package names
                [npm, "pack", *_NPM_OPTIONS, "--pack-destination", tmp, *specs],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=tmp,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"npm pack failed ({exc}): {fallback}", file=out)
            return False
        if done.returncode != 0:
            print(f"npm pack failed ({_npm_error(done)}): {fallback}", file=out)
            return False
        try:
            packed = {f"{item['name']}@{item['version']}": item for item in json.loads(done.stdout)}
        except (ValueError, TypeError, KeyError):
            print(f"npm pack answered no list of packages: {fallback}", file=out)
            return False
        for asset in missing:
            tarball = packed.get(asset.spec, {}).get("filename")
            data = _member(Path(tmp) / tarball, asset.path) if tarball else None
            if data is None or not intact(data, asset.integrity):
                problem = "is not in its package" if data is None else "fails its integrity hash"
                print(f"{asset.name} {problem}: {fallback}", file=out)
                return False
            _write(folder / asset.name, data)
    print(f"{len(missing)} files kept in {folder}", file=out)
    return True


def _kept(path: Path, integrity: str) -> bool:
    try:
        return intact(path.read_bytes(), integrity)
    except OSError:
        return False


def _member(tarball: Path, path: str) -> bytes | None:
    """The file `path` of an npm tarball (its one top folder is usually `package/`)."""
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.partition("/")[2] == path:
                extracted = archive.extractfile(member)
                return extracted.read() if extracted is not None else None
    return None


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _npm_error(done: subprocess.CompletedProcess[str]) -> str:
    """npm's summary of its error (--json puts it on stdout), else its first line."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return str(json.loads(done.stdout)["error"]["summary"])
    lines = [line.removeprefix("npm error").strip() for line in done.stderr.splitlines()]
    return next((line for line in lines if line), f"exit status {done.returncode}")


if __name__ == "__main__":
    fetch()
