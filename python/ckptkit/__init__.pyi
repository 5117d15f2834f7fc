from os import PathLike
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

_Path = Union[str, PathLike[str]]

__version__: str

class Error(Exception):
    """Every ckptkit error; the attributes say where (None when unknown)."""

    file: Optional[str]
    layer: Optional[str]
    tensor: Optional[str]
    offset: Optional[int]

class UsageError(Error): ...
class OutputExistsError(Error): ...
class HashMismatchError(Error): ...
class AmbiguousLayoutError(Error): ...
class LayoutError(Error): ...
class LossyRelayoutError(Error): ...
class UnknownFamilyError(Error): ...
class PendingCommitError(Error): ...
class CorruptFileError(Error): ...

def inspect(
    path: _Path, *, qmap: Optional[_Path] = None, shapes_from: Optional[_Path] = None
) -> dict[str, Any]:
    """Layers, layouts, shapes and sizes: the fields of `migrate inspect --json`."""

def check(
    path: _Path,
    against: _Path,
    *,
    qmap: Optional[_Path] = None,
    shapes_from: Optional[_Path] = None,
) -> dict[str, Any]:
    """Will `path` load where `against`'s layout is expected? `migrate check --json`."""

def verify(path: _Path) -> dict[str, Any]:
    """Structure and every recorded hash: `migrate verify --json`."""

def convert(
    src: _Path,
    dst: _Path,
    *,
    to: Optional[str] = None,
    like: Optional[_Path] = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rename: Sequence[str] = (),
    compress: Optional[str] = None,
    allow_lossy: bool = False,
    force: bool = False,
    progress: Optional[Callable[[int, int], object]] = None,
    qmap: Optional[_Path] = None,
    shapes_from: Optional[_Path] = None,
    max_shard_size: Optional[int] = None,
) -> dict[str, Any]:
    """`migrate convert`; returns the fields of its `--json`."""

class Reader:
    """A lazy reader over a checkpoint (see `open`)."""

    def keys(self) -> list[str]: ...
    def metadata(self) -> dict[str, str]: ...
    def layers(self) -> list[dict[str, Any]]: ...
    def get_tensor(self, name: str, framework: Literal["np", "pt"] = "np") -> Any:
        """One stored tensor as a numpy array ("np") or torch tensor ("pt"), hash-checked."""
    def get_dequantized(
        self, layer: str, framework: Literal["np", "pt"] = "np", dtype: Optional[str] = None
    ) -> dict[str, Any]:
        """One layer in plain form (`{"<layer>.weight": ..., ...}`), dequantized as its library does."""
    def __enter__(self) -> "Reader": ...
    def __exit__(self, *args: object) -> bool: ...
    def __len__(self) -> int: ...

def open(path: _Path, *, qmap: Optional[_Path] = None, shapes_from: Optional[_Path] = None) -> Reader:
    """A lazy, safe_open-like reader over a file, a directory or a container."""

def load(
    path: _Path,
    *,
    like: Optional[Union[_Path, str, Mapping[str, Any]]] = None,
    like_qmap: Optional[Union[_Path, Mapping[str, Any]]] = None,
    framework: Literal["np", "pt"] = "pt",
    device: str = "cpu",
    allow_lossy: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    only: Sequence[str] = (),
    rename: Sequence[str] = (),
    qmap: Optional[_Path] = None,
    shapes_from: Optional[_Path] = None,
    progress: Optional[Callable[[int, int], object]] = None,
) -> dict[str, Any]:
    """The state dict in `like`'s layout (a reference path, a target spelling, or a model's
    state_dict() with `like_qmap` its quanto map when needed), converted in memory."""
