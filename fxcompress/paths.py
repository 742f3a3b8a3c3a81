"""File names read from files: the one rule every folder fxcompress reads follows.

A resume folder's ``progress.json``, a checkpoint's ``model.safetensors.index.json`` and a
frontier snapshot's ``snapshot.json`` name other files. Those folders are untrusted input (a
download, a shared disk, a folder someone edited), so a name in them is only ever a file
*inside* its folder: not absolute, no ``..``, and no symbolic link leading out — otherwise a
crafted entry would make fxcompress read, truncate or delete a file anywhere the user can
write. :func:`inside_folder` checks a name before anything is opened, and every reader uses it.

One layout is let through on purpose: the Hugging Face hub cache, whose snapshot folders
(``models--<org>--<name>/snapshots/<revision>/``) hold links into the repository's own
``blobs`` folder.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

__all__ = ["inside_folder"]


def inside_folder(folder: str | Path, name: object, error: type[Exception] = ValueError,
                  what: str = "an entry") -> Path:
    """``folder / name``, checked to lie inside ``folder`` once every link is followed; any
    other name raises ``error`` saying that ``what`` (the file and entry that named it)
    points outside. Nothing is opened: only the path is resolved."""
    folder = Path(folder)
    if not isinstance(name, str) or not name.strip():
        raise error(f"{what} is {name!r}, not a file name")
    if _escapes(name):
        raise error(f"{what} names {name!r}, outside {folder}: only a file inside the folder "
                    f"may be named (no absolute path, no '..')")
    try:
        target = (folder / name).resolve()
        roots = [folder.resolve(), *_hub_blobs(folder)]
    except (OSError, ValueError, RuntimeError) as e:  # a loop of links, a NUL byte
        raise error(f"{what} names {name!r}, which cannot be resolved: {e}") from e
    if target in roots or not any(target.is_relative_to(root) for root in roots):
        raise error(f"{what} names {name!r}, which leads outside {folder} (to {target}): "
                    f"only a file inside the folder may be named")
    return folder / name


def _escapes(name: str) -> bool:
    """Absolute (on any platform: ``/x``, ``C:\\x``, ``\\\\server\\x``) or climbing out."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return posix.is_absolute() or bool(windows.drive or windows.root) \
        or ".." in posix.parts or ".." in windows.parts


def _hub_blobs(folder: Path) -> list[Path]:
    """The ``blobs`` folder a Hugging Face hub-cache snapshot folder links into."""
    revisions = folder.absolute().parent
    repo = revisions.parent
    if revisions.name == "snapshots" and repo.name.startswith(("models--", "datasets--")):
        return [(repo / "blobs").resolve()]
    return []
