"""Where a run's lasting state lives: a local directory, or shared storage named by a URI.

``--storage-path`` (a local or NFS path, ``s3://bucket/prefix`` or ``gs://bucket/prefix``) holds
the checkpoints (``ray/train/step-*``, written by Ray Train; ``ray/train-gN/`` of a generation
that took a lapsed lease over, :mod:`enigma.storage.fence`), the TensorBoard events
(``tensorboard/``) and the exported model (``model/``), so a run resumes from it on a machine
that has never seen it. Without it the output directory is the storage, with the same layout.
Every access goes through pyarrow's file systems, which read an S3-compatible endpoint and its
credentials from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), on the driver and on every node. A URI may
carry pyarrow's options as a query (``?scheme=http&endpoint_override=host:port``), never
credentials: those would be written into ``run.json``, the model card, the lock and every
printed path.

With remote storage, rank 0 writes TensorBoard events and the export into the output directory
on its own node first and copies them up; the driver reads the model back from the storage.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from ..errors import InputError

# What says an export is whole: from_pretrained's config, or a PEFT adapter's. Written last.
MARKERS = ("config.json", "adapter_config.json")
# Query options that are credentials (pyarrow's S3 and GCS URI options).
SECRET_OPTIONS = {"access_key", "secret_key", "session_token", "access_token", "credentials"}
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (GOOGLE_APPLICATION_CREDENTIALS)"
)


def is_uri(path: str) -> bool:
    return "://" in path


def check_storage_path(value: str, flag: str = "--storage-path") -> None:
    """Refuse credentials in a URI, in one line that does not repeat them."""
    if not is_uri(value):
        return
    parts = urlsplit(value)
    secret = [k for k, _ in parse_qsl(parts.query) if k.lower() in SECRET_OPTIONS]
    # pyarrow's gs://anonymous@bucket asks for anonymous access: a user name, no secret
    anonymous = parts.scheme == "gs" and parts.netloc.startswith("anonymous@")
    if ("@" in parts.netloc and not anonymous) or secret:
        where = "user:secret@ before the bucket" if "@" in parts.netloc else secret[0]
        raise InputError(
            f"{flag} {parts.scheme}://... carries credentials ({where}), which would be written "
            f"into run.json, the model card and every printed path; remove them and set "
            f"{CREDENTIAL_VARIABLES} instead"
        )


@dataclass(frozen=True)
class Storage:
    """The run's storage root: an absolute local path or a URI (its query, if any, kept apart
    so that sub-paths go before it)."""

    root: str
    query: str = ""

    @classmethod
    def of(cls, storage_path: str, output_dir: str) -> Storage:
        if not storage_path:
            return cls(str(Path(output_dir).resolve()))
        if is_uri(storage_path):
            return cls.at(storage_path)
        return cls(str(Path(storage_path).resolve()))

    @classmethod
    def at(cls, uri: str, flag: str = "--storage-path") -> Storage:
        """The storage a URI names, credentials in it refused naming ``flag``."""
        check_storage_path(uri, flag)
        base, _, query = uri.partition("?")
        return cls(base.rstrip("/"), query)

    @property
    def remote(self) -> bool:
        return is_uri(self.root)

    def uri(self, *parts: str) -> str:
        path = "/".join([self.root, *(p for p in parts if p)])
        return f"{path}?{self.query}" if self.query else path

    def __str__(self) -> str:
        return self.uri()

    def filesystem(self, *parts: str):
        """``(pyarrow file system, path)`` of ``root/parts``."""
        import pyarrow as pa
        import pyarrow.fs as pafs

        target = self.uri(*parts)
        if not self.remote:
            return pafs.LocalFileSystem(), target
        try:
            return pafs.FileSystem.from_uri(target)
        except pa.ArrowInvalid as err:  # an unknown scheme or option, a malformed URI
            raise InputError(f"--storage-path {self.uri()}: {err}") from None

    def check(self, flag: str = "--storage-path") -> None:
        """Reachable and writable, before any worker starts: a file is written and removed."""
        fs, path = self.filesystem(".enigma-probe")
        try:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(b"ok")
            fs.delete_file(path)
        except OSError as err:  # pyarrow's errors: no bucket, no credentials, no route
            raise InputError(
                f"{flag} {self.uri()} is not writable from here ({err}); check the "
                "bucket and the AWS_* variables (endpoint and credentials)"
            ) from None

    def lock(self, what: str):
        """The lock of this storage (see :mod:`enigma.storage.locks`)."""
        from .locks import DirectoryLock
        from .object_lock import ObjectLock

        if self.remote:
            return ObjectLock(self.uri(".lock"), what, shown=self.uri())
        return DirectoryLock(Path(self.root) / ".lock", what)

    def read_text(self, *parts: str) -> str | None:
        """The file ``root/parts`` as text; None when there is none."""
        fs, path = self.filesystem(*parts)
        if not fs.get_file_info(path).is_file:
            return None
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode("utf-8"), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write ``root/parts`` whole: locally through a rename, on an object store in one PUT
        (an object appears when its upload completes), so a reader never sees half of it."""
        if not self.remote:
            path = Path(self.root, *parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            return
        fs, path = self.filesystem(*parts)
        with fs.open_output_stream(path) as f:
            f.write(data)

    def delete(self, *parts: str) -> None:
        """Remove the file or directory ``root/parts``, if there is one."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)

    def list_dirs(self, *parts: str) -> list[str]:
        """Names of the directories under ``root/parts`` (none when it does not exist)."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def move_dir(self, src: tuple[str, ...], dst: tuple[str, ...]) -> None:
        """Move the directory ``root/src`` to ``root/dst`` (a rename locally; on an object store,
        a copy and then the deletion of the original)."""
        import pyarrow.fs as pafs

        fs, source = self.filesystem(*src)
        _, target = self.filesystem(*dst)
        if not self.remote:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(source).rename(target)
            return
        fs.create_dir(target, recursive=True)
        pafs.copy_files(source, target, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(source)

    def upload(self, local: Path, *parts: str) -> None:
        """Copy the directory ``local`` to ``root/parts`` (files of the same name replaced)."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local), path, destination_filesystem=fs)

    def download(self, local: Path, *parts: str) -> bool:
        """Copy ``root/parts`` into the directory ``local`` (a model whose swap a kill
        interrupted completed first); False when there is nothing."""
        import pyarrow.fs as pafs

        if len(parts) == 1:
            self.recover_model(parts[0])
        fs, path = self.filesystem(*parts)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return False
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs)
        return True

    def replace_model(self, staged: Path, name: str, stop_after: str | None = None,
                      guard=None) -> None:  # fmt: skip
        """Put the exported model at ``root/name``. Object stores have no rename, so the swap
        goes in steps each of which leaves a model that loads (see :meth:`recover_model`):
        upload beside it, to ``.name.next/`` (the :data:`MARKERS`, what ``from_pretrained``
        looks for, last: their presence says the copy is whole); empty ``name/``, its marker
        first; copy the new files in, the marker last; remove ``.name.next/``. ``stop_after``
        (a step's name) stops there, as a kill would: for the tests and ``enigma bench
        faults``. ``guard()``, called before the upload beside and again before ``name/`` is
        touched, raises to stop a writer that must no longer write (a generation taken over);
        once ``name/`` is emptied the swap completes."""
        import pyarrow.fs as pafs

        guard = guard or (lambda: None)
        guard()
        self.recover_model(name)
        fs, path = self.filesystem(name)
        _, beside = self.filesystem(f".{name}.next")
        fs.delete_dir_contents(beside, missing_dir_ok=True)
        fs.create_dir(beside, recursive=True)
        for f in sorted(staged.iterdir(), key=lambda f: f.name in MARKERS):
            with open(f, "rb") as src, fs.open_output_stream(f"{beside}/{f.name}") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        if stop_after == "upload":
            return
        guard()
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            for marker in MARKERS:  # first: a model without it is one the next swap completes
                if fs.get_file_info(f"{path}/{marker}").type == pafs.FileType.File:
                    fs.delete_file(f"{path}/{marker}")
            if stop_after == "unmark":
                return
            fs.delete_dir_contents(path)
        if stop_after == "empty":
            return
        self._finish_swap(fs, beside, path, stop_after)

    @staticmethod
    def _finish_swap(fs, beside: str, path: str, stop_after: str | None = None) -> None:
        import pyarrow.fs as pafs

        fs.create_dir(path, recursive=True)
        files = fs.get_file_info(pafs.FileSelector(beside))
        for info in sorted(files, key=lambda i: i.base_name in MARKERS):
            fs.copy_file(info.path, f"{path}/{info.base_name}")  # server-side on object stores
            if stop_after == "copy-one":
                return
        if stop_after == "copy":
            return
        fs.delete_dir(beside)

    def recover_model(self, name: str = "model") -> bool:
        """Finish a swap of ``root/name`` that a kill interrupted: when ``.name.next/`` is
        whole and ``name/`` is not (no marker), copy it in; a whole ``name/`` stays
        (a swap killed before it emptied the old model) and the copy beside goes. True when it
        put a model back. Local storage: :func:`enigma.storage.atomic.recover` does it."""
        import pyarrow.fs as pafs

        if not self.remote:
            return False
        fs, path = self.filesystem(name)
        _, beside = self.filesystem(f".{name}.next")
        if fs.get_file_info(beside).type != pafs.FileType.Directory:
            return False

        def marked(directory: str) -> bool:
            return any(fs.get_file_info(f"{directory}/{m}").type == pafs.FileType.File
                       for m in MARKERS)  # fmt: skip

        whole, current = marked(beside), marked(path)
        if whole and not current:
            # Emptied first: files of the old model that the new one lacks (one
            # model.safetensors where the new has shards) would otherwise stay, and load first.
            fs.delete_dir_contents(path, missing_dir_ok=True)
            self._finish_swap(fs, beside, path)
            print(f"note: {self.uri(name)} was completed from the copy an interrupted export "
                  "left beside it", flush=True)  # fmt: skip
            return True
        fs.delete_dir(beside)
        return False
