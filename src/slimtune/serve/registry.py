"""Which adapters a server may serve, where their folders are, and which are loaded (an LRU with pinning).

Every adapter lives in a subfolder of the served DIR. A ``lora_path`` from a request is resolved inside DIR
only: an absolute path or a ``..`` part is refused (400) before touching the disk, and a path that resolves
outside DIR through a symlink is refused (403); the server never reads outside DIR. At most ``max_loaded``
adapters are loaded at once: loading another evicts the least recently used one that no running request
holds (it reloads from its folder on demand). Unloading an adapter that running requests use is refused (409).
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path, PurePosixPath, PureWindowsPath

from slimtune.files import CONFIG_NAME
from slimtune.serve.model import MultiAdapterModel, UnknownAdapter, check_name


class PathRefused(ValueError):
    """A ``lora_path`` that names something outside the adapter folder. ``status``: 400 or 403."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class AdapterBusy(RuntimeError):
    """The adapter (409), or every loaded one when one must be evicted (503), is in use by running requests."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class AdapterRegistry:
    """Servable adapters by name (folders under ``root``), loaded ones in LRU order, in-use counts."""

    def __init__(self, model: MultiAdapterModel, root: str | os.PathLike, max_loaded: int | None = None) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"--max-loaded={max_loaded}: must be at least 1")
        self.model, self.max_loaded = model, max_loaded
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"--adapters={str(root)!r}: no such folder")
        self.folders: dict[str, Path] = {}
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()  # loaded, oldest first
        self.in_use: collections.Counter[str] = collections.Counter()
        self.lock = threading.RLock()
        self.freed = threading.Condition(self.lock)  # notified when a pin is released
        self.wait_s = 30.0  # how long a request waits for a loaded adapter to become evictable
        for sub in sorted(self.root.iterdir()):
            if (sub / CONFIG_NAME).is_file() and sub.resolve().is_relative_to(self.root):
                try:
                    self.folders[check_name(sub.name)] = sub.resolve()
                except ValueError:
                    continue  # a folder whose name is not a valid adapter name is not served

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.folders)

    def resolve(self, lora_path: object) -> Path:
        """The folder ``lora_path`` (relative to DIR) names. PathRefused: 400 for an absolute path or a ``..``
        part, 403 for a path that resolves outside DIR (a symlink)."""
        if not isinstance(lora_path, str) or not lora_path.strip() or "\x00" in lora_path:
            raise PathRefused(f"lora_path={lora_path!r}: must be a folder name relative to the adapter folder", 400)
        if PurePosixPath(lora_path).is_absolute() or PureWindowsPath(lora_path).is_absolute() \
                or lora_path.startswith(("~", "\\")):
            raise PathRefused(f"lora_path={lora_path!r}: absolute paths are refused; give a path relative to the "
                              "server's adapter folder", 400)
        if ".." in PurePosixPath(lora_path.replace("\\", "/")).parts:
            raise PathRefused(f"lora_path={lora_path!r}: '..' is refused; give a path inside the adapter folder", 400)
        path = (self.root / lora_path).resolve()
        if not path.is_relative_to(self.root):
            raise PathRefused(f"lora_path={lora_path!r}: resolves outside the adapter folder (a symlink?)", 403)
        return path

    def add(self, name: str, lora_path: object) -> None:
        """Hot-load ``lora_path`` as ``name``. ValueError for a bad or taken name; PathRefused; the model's
        load errors (AdapterFileError, AdapterRefused, BaseMismatch); AdapterBusy when nothing can be evicted."""
        check_name(name, "lora_name")
        path = self.resolve(lora_path)
        with self.lock:
            if name in self.folders:
                raise ValueError(f"lora_name={name!r}: an adapter of that name exists; unload it first")
            self._load(name, path)
            self.folders[name] = path

    def remove(self, name: str) -> None:
        """Unload ``name`` and stop serving it. UnknownAdapter; AdapterBusy while requests use it."""
        with self.lock:
            if name not in self.folders:
                raise UnknownAdapter(f"lora_name={name!r}: no such adapter; served: {self.names() or 'none'}")
            if self.in_use[name]:
                raise AdapterBusy(f"lora_name={name!r}: in use by {self.in_use[name]} running request(s); retry "
                                  "when they finish", 409)
            if name in self.recent:
                self.model.unload(name)
                del self.recent[name]
            del self.folders[name]

    def acquire(self, name: str) -> None:
        """Make sure ``name`` is loaded (reloading an evicted one) and pin it until ``release``. When it must be
        loaded and every loaded adapter is pinned, wait up to ``wait_s`` for one to be released (then
        AdapterBusy, 503)."""
        with self.lock:
            if name not in self.folders:
                raise UnknownAdapter(f"model={name!r}: no such model; served: {self.names() or 'none'} and the base")
            if name not in self.recent:
                self.freed.wait_for(lambda: name in self.recent or not self._full(), timeout=self.wait_s)
                if name not in self.folders:
                    raise UnknownAdapter(f"model={name!r}: unloaded while waiting")
            if name in self.recent:
                self.recent.move_to_end(name)
            else:
                self._load(name, self.folders[name])
            self.in_use[name] += 1

    def release(self, name: str) -> None:
        with self.lock:
            self.in_use[name] -= 1
            if self.in_use[name] <= 0:
                del self.in_use[name]
                self.freed.notify_all()

    def _full(self) -> bool:
        """Whether a load now would need an eviction and every loaded adapter is pinned."""
        return self.max_loaded is not None and len(self.recent) >= self.max_loaded \
            and all(self.in_use[n] for n in self.recent)

    def _load(self, name: str, path: Path) -> None:
        if self.max_loaded is not None and len(self.recent) >= self.max_loaded:
            victim = next((n for n in self.recent if not self.in_use[n]), None)
            if victim is None:
                raise AdapterBusy(f"all {len(self.recent)} loaded adapters (--max-loaded) are in use; retry shortly",
                                  503)
            self.model.unload(victim)
            del self.recent[victim]
        self.model.load(name, path)
        self.recent[name] = None
