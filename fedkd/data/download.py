"""Download the official files of the datasets in :mod:`fedkd.data.readers` (standard library).

Used only when ``data.download = true``. :data:`RESOURCES` lists, per reader name, the
files torchvision fetches (same URLs, same md5 checksums); :func:`download` fetches just
what the requested splits lack, into torchvision's layout under the root:

* each file goes to ``<name>.part``, its md5 is checked, then it is renamed into place;
* archives (``.tar.gz``, ``.zip``) are unpacked member by member (each member also via a
  ``.part`` file), refusing members that would land outside their folder, links and
  devices; the archive is deleted after a complete extraction and kept (and reused, if
  its md5 still matches) when extraction fails;
* the idx files of MNIST, Fashion-MNIST and EMNIST stay gzipped (the readers read ``.gz``).

Any failure raises :class:`~fedkd.config.ConfigError` on ``data.download`` naming the
dataset, the URL, the destination folder and the cause.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import logging
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any

from fedkd.config import ConfigError
from fedkd.data.readers import READERS, present_files

__all__ = ["RESOURCES", "Resource", "describe", "download"]

FIELD = "data.download"
log = logging.getLogger("fedkd")

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_USER_AGENT = "fedkd (python urllib)"


@dataclass(frozen=True)
class Resource:
    """One file to fetch: its URLs (mirrors, tried in order) and md5 checksum.

    It is saved as ``root/folder/filename`` (``filename`` defaults to the URL's last
    segment). Names ending in ``.tar``, ``.tar.gz``, ``.tgz`` or ``.zip`` are archives,
    unpacked into ``root/folder`` with the leading folder ``strip`` removed from member
    names (members outside ``strip`` are skipped), then deleted. ``provides`` holds
    ``fnmatch`` patterns of the root-relative paths (with ``/``) the resource yields, as
    :func:`~fedkd.data.readers.expected_files` names them (an idx file's ``.gz`` counts).
    """

    urls: tuple[str, ...]
    md5: str
    provides: tuple[str, ...]
    folder: str = ""
    filename: str = ""
    strip: str = ""

    @property
    def name(self) -> str:
        return self.filename or self.urls[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def archive(self) -> str:
        """``"tar"``, ``"zip"`` or ``""`` (a plain file, kept as downloaded)."""
        name = self.name.lower()
        if name.endswith((".tar", ".tar.gz", ".tgz")):
            return "tar"
        return "zip" if name.endswith(".zip") else ""


def _idx(base: str, folder: str, md5s: Mapping[str, str]) -> list[Resource]:
    """The four gzipped idx files of an MNIST-like dataset, one resource each."""
    return [
        Resource((f"{base}{stem}.gz",), md5, (f"{folder}/{stem}",), folder)
        for stem, md5 in md5s.items()
    ]


_MNIST_BASE = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_SVHN_BASE = "http://ufldl.stanford.edu/housenumbers/"

#: official files per reader name, as torchvision's MNIST, FashionMNIST, EMNIST,
#: CIFAR10, CIFAR100, SVHN and STL10 datasets fetch them
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist": tuple(
        _idx(
            _MNIST_BASE,
            "MNIST/raw",
            {
                "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
            },
        )
    ),
    "fashion_mnist": tuple(
        _idx(
            _FASHION_BASE,
            "FashionMNIST/raw",
            {
                "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
            },
        )
    ),
    "emnist": (
        Resource(
            (
                "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",
                "https://www.itl.nist.gov/iaui/vip/cs_links/EMNIST/gzip.zip",
            ),
            "58c8d27c78d21e728a6bc7b3cc06412e",
            ("EMNIST/raw/emnist-*",),
            "EMNIST/raw",
            strip="gzip",
        ),
    ),
    "cifar10": (
        Resource(
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            "c58f30108f718f92721af3b95e74349a",
            ("cifar-10-batches-py/*",),
        ),
    ),
    "cifar100": (
        Resource(
            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
            "eb9058c3a382ffc7106e4002c42a8d85",
            ("cifar-100-python/*",),
        ),
    ),
    "svhn": tuple(
        Resource((f"{_SVHN_BASE}{split}_32x32.mat",), md5, (f"{split}_32x32.mat",))
        for split, md5 in (
            ("train", "e26dedcc434d2e4c54c9b2d4a06d8373"),
            ("test", "eb5a983be6a315427106f1b164d9cef3"),
            ("extra", "a93ce644f1a588dc4d68dda5feec44a7"),
        )
    ),
    "stl10": (
        Resource(
            ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",),
            "91f7769df0f17e558f3565bffb0c7dfb",
            ("stl10_binary/*",),
        ),
    ),
}


# ----------------------------------------------------------------------------- public API


def describe(name: str, sources: Mapping[str, Sequence[Resource]] = RESOURCES) -> str:
    """One line saying where ``name``'s files come from, e.g. for a missing-file message."""
    key = _canonical(name)
    resources = sources.get(key, ())
    if not resources:
        from fedkd.data.readers import MANUAL_SOURCES

        return MANUAL_SOURCES.get(key, f"{READERS[key].title}: no download source known")
    parts = []
    for res in resources:
        where = f"{res.folder}/" if res.folder else "the root folder"
        how = {"tar": f"extracted under {where}", "zip": f"unzipped into {where}"}.get(
            res.archive, f"saved in {where}"
        )
        mirrors = f"; mirror: {', '.join(res.urls[1:])}" if len(res.urls) > 1 else ""
        parts.append((res.urls[0], how, mirrors))
    if len(parts) > 1 and len({(_dirname(u), h, m) for u, h, m in parts}) == 1:
        _, how, mirrors = parts[0]
        names = ", ".join(u.rsplit("/", 1)[-1] for u, _, _ in parts)
        return f"{_dirname(parts[0][0])} ({names}; {how}{mirrors})"
    return "; ".join(f"{url} ({how}{mirrors})" for url, how, mirrors in parts)


def download(
    name: str,
    root: str | Path,
    splits: Sequence[str],
    *,
    sources: Mapping[str, Sequence[Resource]] | None = None,
    progress: bool | None = None,
    **options: Any,
) -> list[Path]:
    """Fetch what the ``splits`` of dataset ``name`` lack under ``root``; return the files written.

    Files already present (an idx file's ``.gz`` twin counts) are not fetched again; an
    archive is fetched whole when any file it provides is missing. ``options`` are the
    reader options (EMNIST ``subset``, CIFAR-100 ``labels``, ...) that choose the files.
    ``progress``: a tqdm bar on stderr (default: when stderr is a terminal), else log lines.
    Raises :class:`ConfigError` on ``data.download`` when a download, checksum or
    extraction fails or a file is still missing afterwards.
    """
    sources = RESOURCES if sources is None else sources  # (looked up now: tests may swap it)
    key = _canonical(name)
    title = READERS[key].title
    root = Path(root).expanduser()
    if isinstance(splits, str):
        splits = [splits]
    missing = _missing(key, root, splits, options)
    if not missing:
        return []
    if key not in sources:
        raise ConfigError(FIELD, f"fedkd cannot download {title}: get it from {describe(key)}")
    needed: list[Resource] = []
    for rel in missing:
        res = next((r for r in sources[key] if _provides(r, rel)), None)
        if res is None:
            raise ConfigError(FIELD, f"no download source for {title} file {rel.as_posix()}")
        if res not in needed:
            needed.append(res)
    show = sys.stderr.isatty() if progress is None else progress
    written: list[Path] = []
    for res in needed:
        written += _fetch(title, root, res, show)
    still = _missing(key, root, splits, options)
    if still:
        raise ConfigError(
            FIELD,
            f"downloaded {title} from {', '.join(r.urls[0] for r in needed)} into {root} but "
            f"{', '.join(rel.as_posix() for rel in still)} "
            f"{'is' if len(still) == 1 else 'are'} still missing "
            "(the download did not hold it in the expected layout)",
        )
    return written


# ----------------------------------------------------------------------------- helpers


def _canonical(name: str) -> str:
    """The READERS key for ``name``, matched as :func:`~fedkd.data.readers.read_split` does."""
    key = str(name).lower().replace("-", "").replace("_", "")
    canonical = {k.replace("_", ""): k for k in READERS}
    if key not in canonical:
        raise ConfigError("data.dataset", f"no reader for {name!r}; known: {', '.join(READERS)}")
    return canonical[key]


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/"


def _missing(key: str, root: Path, splits: Sequence[str], options: dict[str, Any]) -> list[Path]:
    """Files the ``splits`` need that are not under ``root`` (relative to it), as
    :func:`~fedkd.data.readers.present_files` sees them (a ``.gz`` twin counts)."""
    out: list[Path] = []
    for split in splits:
        out += [p.relative_to(root) for p in present_files(key, root, split, **options)[1]]
    return list(dict.fromkeys(out))


def _provides(res: Resource, rel: Path) -> bool:
    return any(fnmatch.fnmatchcase(rel.as_posix(), pattern) for pattern in res.provides)


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, urllib.error.HTTPError):
        text = f"HTTP error {err.code} {err.reason}"
    elif isinstance(err, urllib.error.URLError):
        text = f"network error: {err.reason}"
    return " ".join(text.split())


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(title: str, root: Path, res: Resource, show: bool) -> list[Path]:
    """Download ``res`` (unless a kept archive with the right md5 is there) and unpack it."""
    folder = root / res.folder
    target = folder / res.name
    if res.archive and target.is_file() and _md5(target) == res.md5:
        log.info("reusing %s (md5 ok) from an earlier download", target)
    else:
        _download_file(title, res, folder, target, show)
        if not res.archive:
            return [target]
    return _extract(title, res, target, folder)


def _download_file(title: str, res: Resource, folder: Path, target: Path, show: bool) -> None:
    """Fetch ``res`` to ``target`` via ``target.part``, trying each URL in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    failures = []
    for url in res.urls:
        try:
            got = _stream(url, part, target.name, show)
        except (OSError, http.client.HTTPException, ValueError) as err:  # URLError, timeouts
            part.unlink(missing_ok=True)
            failures.append((url, _one_line(err)))
            continue
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        if got != res.md5:
            part.unlink(missing_ok=True)
            failures.append(
                (url, f"md5 mismatch: expected {res.md5}, got {got}; deleted {part.name}")
            )
            continue
        os.replace(part, target)
        return
    causes = "; ".join(f"{url}: {cause}" for url, cause in failures)
    raise ConfigError(
        FIELD, f"could not download {title} file {res.name} into folder {folder} from {causes}"
    )


def _stream(url: str, part: Path, label: str, show: bool) -> str:
    """Write the body at ``url`` to ``part``; return its md5."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.md5(usedforsecurity=False)
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, part.open("wb") as f:
        size = response.headers.get("Content-Length")
        total = int(size) if size and size.isdigit() else None
        if not show:
            log.info("downloading %s (%s)", url, _size(total))
        with _bar(show, total, label) as update:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
                update(len(chunk))
    if not show:
        log.info(
            "downloaded %s (%s) in %.0f s",
            label,
            _size(part.stat().st_size),
            time.monotonic() - start,
        )
    return digest.hexdigest()


@contextmanager
def _bar(show: bool, total: int | None, label: str) -> Iterator[Any]:
    """A tqdm progress bar's ``update`` on stderr when ``show``, else a no-op."""
    if show:
        try:
            from tqdm import tqdm
        except ImportError:
            show = False
    if not show:
        yield lambda n: None
        return
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr
    ) as bar:
        yield bar.update


def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


# ----------------------------------------------------------------------------- archives


class _Refused(Exception):
    """An archive member that must not be extracted."""


def _member_path(name: str, strip: str) -> PurePosixPath | None:
    """The safe relative path of a member (None: skip it), refusing ones that escape."""
    if not name or "\0" in name:
        raise _Refused(f"member {name!r} has an invalid name")
    win = PureWindowsPath(name)
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or win.drive or win.root or ".." in path.parts:
        raise _Refused(f"member {name!r} lies outside the destination folder")
    parts = [p for p in path.parts if p not in ("", ".")]
    if strip:
        if parts[:1] != [strip]:
            return None
        parts = parts[1:]
    return PurePosixPath(*parts) if parts else None


def _write_member(source: IO[bytes], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with part.open("wb") as f:
            shutil.copyfileobj(source, f, _CHUNK)
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _tar_members(archive: Path, strip: str) -> Iterator[tuple[PurePosixPath, IO[bytes]]]:
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            rel = _member_path(member.name, strip)
            if member.isdir():
                continue
            if not member.isfile():
                raise _Refused(f"member {member.name!r} is a link or special file")
            if rel is None:
                continue
            source = tar.extractfile(member)
            assert source is not None
            yield rel, source


def _zip_members(archive: Path, strip: str) -> Iterator[tuple[PurePosixPath, IO[bytes]]]:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _member_path(info.filename, strip)
            if info.is_dir() or rel is None:
                continue
            with zf.open(info) as source:
                yield rel, source


def _extract(title: str, res: Resource, archive: Path, folder: Path) -> list[Path]:
    """Unpack ``archive`` into ``folder``; delete it on success, keep it on failure."""
    log.info("extracting %s into %s", archive.name, folder)
    members = _tar_members if res.archive == "tar" else _zip_members
    written = []
    entries = members(archive, res.strip)
    try:
        for rel, source in entries:
            dest = folder / rel
            _write_member(source, dest)
            written.append(dest)
    except (_Refused, tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        kind = "refusing to extract" if isinstance(err, _Refused) else "could not extract"
        raise ConfigError(
            FIELD,
            f"{kind} the {title} archive {archive} (from {res.urls[0]}) into folder {folder}: "
            f"{_one_line(err)}; the archive is kept (delete it to download it again)",
        ) from None
    finally:
        entries.close()
    archive.unlink()
    return written
