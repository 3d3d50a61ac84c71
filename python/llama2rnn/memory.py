"""Storage of memory files: names, the data folder, durable writes and the writer lock.

A memory file contains a model's whole recurrent state (the layout is in
``docs/memory-file.md`` and at the top of ``rust/memory_file.rs``). This module stores those
bytes; the engine encodes and decodes them.

Storage rules:

- A name (letters, digits, ``-``, ``_`` and ``.``, not starting with ``.``) means
  ``memories/NAME.mem`` in the data folder: ``$LLAMA2RNN_HOME``, else
  ``$XDG_DATA_HOME/llama2rnn``, else ``~/.local/share/llama2rnn``. A value that contains a
  ``/`` or ends in ``.mem`` is a plain path.
- Saving writes a temporary file ``.NAME.mem.PID-RANDOM.tmp`` in the same folder, fsyncs it,
  renames it over the memory with ``os.replace`` and fsyncs the folder. A process killed at
  any moment leaves the old or the new file, and readers never see a partial file. Listings
  ignore the temporary files because of their leading dot and suffix, and the next save of
  the same memory deletes those left by a killed process.
- One writer at a time: ``MemoryWriter.open`` takes an exclusive, non-blocking ``flock`` on
  the sidecar ``NAME.lock`` and writes the holder's PID and command into it, and ``close``
  deletes that file. The kernel drops the lock when its process exits, so a lock file left
  by a killed process blocks nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import secrets
import struct
import sys
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from . import _llama2rnn
from ._llama2rnn import MemoryFileError

PathLike = Union[str, "os.PathLike[str]"]

HOME_ENV = "LLAMA2RNN_HOME"
MEMORY_SUFFIX = ".mem"
LOCK_SUFFIX = ".lock"
TEMP_SUFFIX = ".tmp"
MAX_NAME_LENGTH = 200
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
# Maximum length of the command line stored in a lock file, so that a long prompt does not fill it.
MAX_HOLDER_COMMAND = 80

# The memory-file layout, as written by rust/memory_file.rs.
MAGIC = b"L2RNMEM\0"
VERSION = 1
HEADER_BYTES = 128
CHECKSUM_BYTES = 4
CONFIG_FIELDS = (
    "dim",
    "hidden_dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "seq_len",
    "mem_len",
)
FORMAT_CODES = {"llama2rnn": 0, "llama2c-v2": 1, "llama2c-v1": 2, "llama2c-v0": 3}
MODE_CODES = {"chunk": 0, "token": 1}
# Fields up to offset 104; zero padding follows up to HEADER_BYTES.
_HEADER = struct.Struct("<8sII8I4BIQQIIQqQ")


class MemoryInUseError(RuntimeError):
    """Another process, or another writer in this one, has the memory open for writing."""


class MemoryWriteError(OSError):
    """Saving a memory failed. The message states whether the old memory is unchanged (every
    failure before the rename) or already replaced (a failed fsync of the folder)."""

    def __str__(self) -> str:
        # The message alone, without OSError's "[Errno N]" prefix.
        return str(self.strerror)


# ---------------------------------------------------------------------------------------------
# Names and paths


def data_home() -> Path:
    """Return the data folder: $LLAMA2RNN_HOME, else $XDG_DATA_HOME/llama2rnn, else
    ~/.local/share/llama2rnn."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg).expanduser() / "llama2rnn"
    return Path.home() / ".local" / "share" / "llama2rnn"


def memories_dir() -> Path:
    """Return the folder of named memories."""
    return data_home() / "memories"


def is_plain_path(value: str) -> bool:
    """Return whether `value` is a file path rather than a memory name."""
    return "/" in value or os.sep in value or value.endswith(MEMORY_SUFFIX)


def validate_name(name: str) -> str:
    """Return `name` if it is a valid memory name, else raise ValueError."""
    if not name:
        raise ValueError("the memory name is empty: use letters, digits, '-', '_' and '.'")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"memory name {name[:20]!r}... is {len(name)} characters long: use at most "
            f"{MAX_NAME_LENGTH}"
        )
    if name.startswith("."):
        raise ValueError(f"memory name {name!r} is invalid: it must not start with '.'")
    if NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(
            f"memory name {name!r} is invalid: use only letters, digits, '-', '_' and '.', "
            "or give a path that contains '/' or ends in .mem"
        )
    return name


@dataclass(frozen=True)
class MemoryLocation:
    """Storage location of a memory: a named memory in the data folder, or a plain path."""

    path: Path
    name: str | None = None

    @property
    def label(self) -> str:
        """The memory as error messages name it."""
        if self.name is not None:
            return f"memory {self.name!r}"
        return f"memory file {self.path}"

    @property
    def lock_path(self) -> Path:
        """The sidecar lock file: NAME.lock next to NAME.mem (or PATH.lock for other names)."""
        file_name = self.path.name
        if file_name.endswith(MEMORY_SUFFIX):
            file_name = file_name[: -len(MEMORY_SUFFIX)]
        return self.path.with_name(file_name + LOCK_SUFFIX)


def locate(path_or_name: PathLike) -> MemoryLocation:
    """Resolve a memory name or a plain path (see `is_plain_path`) to its location. A
    `pathlib.Path` or other path object is always a plain path."""
    if not isinstance(path_or_name, str):
        return MemoryLocation(Path(path_or_name).expanduser().absolute())
    if is_plain_path(path_or_name):
        return MemoryLocation(Path(path_or_name).expanduser().absolute())
    name = validate_name(path_or_name)
    return MemoryLocation(memories_dir().absolute() / (name + MEMORY_SUFFIX), name)


def not_found_error(location: MemoryLocation) -> FileNotFoundError:
    """Return the error for a memory that does not exist."""
    if location.name is None:
        return FileNotFoundError(f"{location.label} not found")
    return FileNotFoundError(
        f"{location.label} not found: {location.path} does not exist (see `llama2rnn memory list`)"
    )


# ---------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class MemoryHeader:
    """The header fields of a memory file (see docs/memory-file.md)."""

    version: int
    config: dict[str, int]
    shared_classifier: bool
    format: str
    mode: str
    group_size: int
    fingerprint: int
    position: int
    chunk_rows: int
    rng_state: int
    last_token: int | None
    saved_unix_ms: int

    @property
    def is_memory_model(self) -> bool:
        return self.config["mem_len"] > 0

    def expected_size(self) -> int:
        """Return the file size in bytes that this header implies."""
        c = self.config
        kv_dim = c["dim"] // c["n_heads"] * c["n_kv_heads"] if c["n_heads"] else 0
        window_rows = c["mem_len"] + self.chunk_rows if self.is_memory_model else self.chunk_rows
        floats = c["n_layers"] * c["mem_len"] * c["dim"] + 2 * c["n_layers"] * window_rows * kv_dim
        if self.position > 0:
            floats += c["vocab_size"]
        return HEADER_BYTES + 4 * floats + CHECKSUM_BYTES

    def summary(self) -> str:
        """Return the model's format and shape in one line, for listings."""
        c = self.config
        shape = f"dim {c['dim']}, {c['n_layers']} layers"
        if self.is_memory_model:
            shape += f", M {c['mem_len']}"
        return f"{self.format} {self.mode}, {shape}"


def parse_header(data: bytes) -> MemoryHeader:
    """Parse the header at the start of `data` without checking the checksum.

    Raises MemoryFileError for missing magic bytes, an unsupported version or unknown codes.
    Use `check_memory_bytes` on the whole file to verify the checksum as well.
    """
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise MemoryFileError(
            "invalid memory file: not a llama2rnn memory file (the magic bytes are missing)"
        )
    if len(data) < HEADER_BYTES:
        raise MemoryFileError(
            f"invalid memory file: the file is truncated: {len(data)} bytes, shorter than a header"
        )
    fields = _HEADER.unpack_from(data)
    version = fields[1]
    if version != VERSION:
        raise MemoryFileError(
            f"invalid memory file: memory format version {version} is not supported (this "
            f"llama2rnn reads version {VERSION}); use the llama2rnn release that wrote it"
        )
    config = dict(zip(CONFIG_FIELDS, fields[3:11]))
    shared_classifier, format_code, mode_code = fields[11:14]
    formats = {code: name for name, code in FORMAT_CODES.items()}
    modes = {code: name for name, code in MODE_CODES.items()}
    if format_code not in formats:
        raise MemoryFileError(f"invalid memory file: unknown checkpoint format code {format_code}")
    if mode_code not in modes:
        raise MemoryFileError(f"invalid memory file: unknown update mode code {mode_code}")
    group_size, fingerprint, position, chunk_rows, _, rng_state, last_token, saved = fields[15:]
    return MemoryHeader(
        version=version,
        config=config,
        shared_classifier=bool(shared_classifier),
        format=formats[format_code],
        mode=modes[mode_code],
        group_size=group_size,
        fingerprint=fingerprint,
        position=position,
        chunk_rows=chunk_rows,
        rng_state=rng_state,
        last_token=last_token if last_token >= 0 else None,
        saved_unix_ms=saved,
    )


def check_memory_bytes(data: bytes, label: str) -> MemoryHeader:
    """Check the magic bytes, version, checksum and size of a whole memory file and return its
    header. Raises MemoryFileError naming `label`. This does not check which model made it:
    loading into a model does."""
    try:
        _llama2rnn.read_memory_header(data)
        header = parse_header(data)
    except MemoryFileError as error:
        raise MemoryFileError(f"{label}: {error}") from None
    if len(data) != header.expected_size():
        raise MemoryFileError(
            f"{label}: invalid memory file: the file is {len(data)} bytes but its header "
            f"implies {header.expected_size()}"
        )
    return header


def format_saved_time(saved_unix_ms: int) -> str:
    """Return the local time of saving as text, or "unknown" when it was not recorded."""
    if saved_unix_ms <= 0:
        return "unknown"
    moment = datetime.datetime.fromtimestamp(saved_unix_ms / 1000).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------------------------------------
# Reading


def read_memory(location: MemoryLocation) -> bytes:
    """Return the bytes of a stored memory. The rename in `MemoryWriter.write` means that a
    concurrent save is seen either whole or not at all."""
    try:
        return location.path.read_bytes()
    except FileNotFoundError:
        raise not_found_error(location) from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{location.label} cannot be read: it is a folder") from None


@dataclass(frozen=True)
class MemoryListing:
    """One named memory in a listing: its header, or why the header could not be read."""

    name: str
    path: Path
    size: int
    header: MemoryHeader | None
    error: str | None


def list_memories(folder: Path | None = None) -> list[MemoryListing]:
    """List the memories in `folder` (default: `memories_dir()`), sorted by name.

    Reads only the headers: the size is checked against the header, the checksum is not
    (``llama2rnn memory show`` checks it).
    """
    folder = memories_dir() if folder is None else folder
    if not folder.is_dir():
        return []
    listings = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or not name.endswith(MEMORY_SUFFIX) or not path.is_file():
            continue
        size = path.stat().st_size
        header: MemoryHeader | None = None
        problem: str | None = None
        try:
            with path.open("rb") as file:
                header = parse_header(file.read(HEADER_BYTES))
            if size != header.expected_size():
                expected = header.expected_size()
                problem = (
                    f"invalid memory file: truncated or damaged, {size} bytes where the "
                    f"header implies {expected}"
                )
                header = None
        except MemoryFileError as error:
            problem = str(error)
        except OSError as error:
            problem = f"cannot be read: {error.strerror or error}"
        listings.append(MemoryListing(name[: -len(MEMORY_SUFFIX)], path, size, header, problem))
    return listings


# ---------------------------------------------------------------------------------------------
# The writer lock and durable writes


def holder_command() -> str:
    """Return this process's command line as recorded in lock files, shortened."""
    argv = sys.argv or [""]
    program = os.path.basename(argv[0])
    if program == "-c":
        program = "python -c"
    elif program == "__main__.py":
        program = "python -m " + os.path.basename(os.path.dirname(argv[0]))
    elif program in ("", "-"):
        program = "python"
    command = " ".join([program, *(" ".join(arg.split()) for arg in argv[1:])])
    if len(command) > MAX_HOLDER_COMMAND:
        command = command[: MAX_HOLDER_COMMAND - 3] + "..."
    return command


def _describe_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"process {int(record['pid'])} ({record['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        # The holder has taken the lock but not yet written its record.
        return "another process"


def lock_holder(location: MemoryLocation) -> str | None:
    """Return who holds the writer lock ("process 1234 (llama2rnn generate)"), or None when
    the memory is not open for writing."""
    try:
        fd = os.open(location.lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _write_error(
    location: MemoryLocation,
    action: str,
    error: OSError,
    outcome: str = "any memory that was there is unchanged",
) -> MemoryWriteError:
    reason = error.strerror or str(error)
    return MemoryWriteError(
        error.errno,
        f"cannot save {location.label}: {action} failed in {location.path.parent}: {reason}; "
        f"{outcome}",
    )


def _temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{path.name}.") + r"\d+-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files of earlier saves of `path` that did not finish, and return
    them. Call it only while holding the writer lock, which rules out a save in progress."""
    pattern = _temp_pattern(path)
    try:
        with os.scandir(path.parent) as entries:
            stale = [Path(entry.path) for entry in entries if pattern.fullmatch(entry.name)]
    except FileNotFoundError:
        return []
    removed = []
    for temp in stale:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
            removed.append(temp)
    return removed


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as error:
        # Some file systems cannot fsync a folder; the rename itself has happened.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def write_durably(location: MemoryLocation, data: bytes) -> None:
    """Replace the file at `location` with `data` so that a crash at any moment leaves the old
    or the new content. Raises MemoryWriteError, removing its temporary file, on failure.

    The caller must hold the writer lock (`MemoryWriter` does).
    """
    path = location.path
    remove_stale_temps(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise _write_error(location, "creating a temporary file", error) from error
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(error, OSError):
            raise _write_error(location, "writing", error) from error
        raise
    try:
        _fsync_folder(path.parent)
    except OSError as error:
        outcome = "the new memory replaced the old one but may not survive a power loss"
        raise _write_error(location, "syncing the folder", error, outcome) from error


class MemoryWriter:
    """A memory opened for writing: holds the exclusive lock on its sidecar lock file until
    `close`, the end of a `with` block, garbage collection or the end of the process."""

    def __init__(self, location: MemoryLocation, fd: int) -> None:
        self.location = location
        self._fd: int | None = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, location: MemoryLocation) -> MemoryWriter:
        """Take the writer lock of `location`, creating its folder if needed. Raises
        MemoryInUseError, naming the holder, when another writer has it."""
        folder = location.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as error:
            raise _write_error(location, "creating the folder", error) from error
        while True:
            try:
                fd = os.open(location.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as error:
                action = f"opening the lock file {location.lock_path}"
                raise _write_error(location, action, error) from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(fd)
                os.close(fd)
                raise MemoryInUseError(
                    f"{location.label} is in use by {holder}; close it first"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # `close` deletes the lock file while holding the lock. A process that opened the
            # file just before then holds a lock on a deleted file, so it retries.
            try:
                current = os.stat(location.lock_path)
                opened = os.fstat(fd)
                same_file = (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        record = json.dumps({"pid": os.getpid(), "command": holder_command()}).encode("utf-8")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError:
            pass  # the record only improves the message that another writer gets
        return cls(location, fd)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, data: bytes) -> None:
        """Save `data` durably (see `write_durably`)."""
        if self._fd is None:
            raise ValueError(f"{self.location.label} was closed: open it again to save")
        write_durably(self.location, data)

    def remove(self) -> None:
        """Delete the memory, then release the lock."""
        if self._fd is None:
            raise ValueError(f"{self.location.label} was closed: open it again to delete it")
        remove_stale_temps(self.location.path)
        try:
            self.location.path.unlink()
        except FileNotFoundError:
            raise not_found_error(self.location) from None
        with contextlib.suppress(OSError):
            _fsync_folder(self.location.path.parent)
        self.close()

    def close(self) -> None:
        """Release the lock, deleting the lock file first. Closing twice does nothing."""
        if self._fd is None:
            return
        # Deleting the file while still holding the lock is safe because `open` checks, after
        # locking, that the file it locked is still the one at the path.
        with contextlib.suppress(OSError):
            self.location.lock_path.unlink()
        self._fd = None
        self._finalizer()

    def __enter__(self) -> MemoryWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def store_new(location: MemoryLocation, data: bytes) -> None:
    """Save `data` as a new memory at `location`. Raises FileExistsError if one exists."""
    with MemoryWriter.open(location) as writer:
        if location.path.exists():
            raise FileExistsError(
                f"{location.label} already exists ({location.path}); delete it first or "
                "choose another name"
            )
        writer.write(data)


# ---------------------------------------------------------------------------------------------
# Snapshots


@dataclass(frozen=True)
class MemorySnapshot:
    """An in-memory copy of a model's state: memory-file bytes, independent of the model."""

    data: bytes

    @property
    def header(self) -> MemoryHeader:
        return parse_header(self.data)

    @property
    def position(self) -> int:
        """Tokens consumed when the snapshot was taken."""
        return self.header.position

    @property
    def last_token(self) -> int | None:
        return self.header.last_token


# ---------------------------------------------------------------------------------------------
# Raw memory dumps of the C runtime


def raw_dump_size(config: dict[str, Any]) -> int:
    """Return the size in bytes of the C runtime's raw memory dump for a model of `config`.

    The dump contains `mem` (n_layers, mem_len, dim) as f32, then the key cache and the value
    cache, each (n_layers, seq_len, dim) f32 because the C runtime sized rows by dim even
    for grouped-query attention, then the position as an i32.
    """
    n_layers, dim = config["n_layers"], config["dim"]
    floats = n_layers * config["mem_len"] * dim + 2 * n_layers * config["seq_len"] * dim
    return 4 * floats + 4


def encode_memory_file(
    engine: _llama2rnn.Engine,
    *,
    position: int,
    mem: np.ndarray,
    key_rows: np.ndarray,
    value_rows: np.ndarray,
    logits: np.ndarray | None,
    last_token: int | None,
    saved_unix_ms: int,
) -> bytes:
    """Encode a state as memory-file bytes for `engine`'s model, as rust/memory_file.rs does.

    `key_rows` and `value_rows` are (n_layers, stored window rows, kv_dim); `logits` is
    required exactly when `position` > 0. The sampler state is the engine's.
    """
    config = engine.config
    c = [int(config[name]) for name in CONFIG_FIELDS]
    mem_len, seq_len = config["mem_len"], config["seq_len"]
    chunk_rows = position % mem_len if mem_len else min(position, seq_len)
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        HEADER_BYTES,
        *c,
        int(bool(config["shared_classifier"])),
        FORMAT_CODES[engine.format],
        MODE_CODES[engine.mode],
        0,
        engine.group_size or 0,
        engine.fingerprint,
        position,
        chunk_rows,
        0,
        engine.rng_state,
        -1 if last_token is None else last_token,
        saved_unix_ms,
    )
    parts = [header.ljust(HEADER_BYTES, b"\0")]
    for array in (mem, key_rows, value_rows):
        parts.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
    if (logits is not None) != (position > 0):
        raise ValueError("logits are required exactly when the position is above 0")
    if logits is not None:
        parts.append(np.ascontiguousarray(logits, dtype="<f4").tobytes())
    body = b"".join(parts)
    # zlib's CRC-32 is the IEEE polynomial that the crc32fast crate computes.
    return body + struct.pack("<I", zlib.crc32(body))


def memory_from_raw_dump(engine: _llama2rnn.Engine, raw: bytes, source: str) -> bytes:
    """Convert the C runtime's raw memory dump `raw` (read from `source`) into memory-file
    bytes for `engine`'s model. Raises MemoryFileError when the size does not fit the model.

    Only window rows 0..mem_len + (position % mem_len) of each layer are kept (the memory rows
    and the current chunk's rows), and only the first kv_dim floats of each row.
    """
    config = engine.config
    expected = raw_dump_size(config)
    if len(raw) != expected:
        shape = ", ".join(f"{name} {config[name]}" for name in CONFIG_FIELDS)
        raise MemoryFileError(
            f"invalid raw memory dump: {source} is {len(raw)} bytes, but a raw dump of this "
            f"model ({shape}) is {expected} bytes; it is not a raw dump, or another model "
            "made it"
        )
    n_layers, dim, seq_len = config["n_layers"], config["dim"], config["seq_len"]
    mem_len = config["mem_len"]
    kv_dim = dim // config["n_heads"] * config["n_kv_heads"]
    (position,) = struct.unpack_from("<i", raw, len(raw) - 4)
    if position < 0:
        raise MemoryFileError(
            f"invalid raw memory dump: {source} has a negative position {position}"
        )
    if mem_len == 0 and position > seq_len:
        raise MemoryFileError(
            f"invalid raw memory dump: {source} has position {position}, past seq_len {seq_len}"
        )
    floats = np.frombuffer(raw, dtype="<f4", count=(len(raw) - 4) // 4)
    mem_floats = n_layers * mem_len * dim
    cache_floats = n_layers * seq_len * dim
    mem = floats[:mem_floats]
    key_cache = floats[mem_floats : mem_floats + cache_floats].reshape(n_layers, seq_len, dim)
    value_cache = floats[mem_floats + cache_floats :].reshape(n_layers, seq_len, dim)
    window_rows = mem_len + position % mem_len if mem_len else position
    # NOTE: the dump has no logits of the last token, but the format requires them after
    # the first token. Zeros stand in, so after a raw import the next token must be fed
    # before sampling. Sampling first would draw uniformly (or pick token 0 at temperature 0).
    logits = np.zeros(config["vocab_size"], dtype=np.float32) if position > 0 else None
    return encode_memory_file(
        engine,
        position=position,
        mem=mem,
        key_rows=key_cache[:, :window_rows, :kv_dim],
        value_rows=value_cache[:, :window_rows, :kv_dim],
        logits=logits,
        last_token=None,
        saved_unix_ms=now_unix_ms(),
    )
