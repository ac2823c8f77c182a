"""Where a run's lasting state lives: a local directory, or shared storage named by a URI.

``--storage-path`` (a local or NFS path, ``s3://bucket/prefix`` or ``gs://bucket/prefix``) holds
the checkpoints (``ray/train/step-*``, written by Ray Train), the TensorBoard events
(``tensorboard/``) and the exported model (``model/``), so a run resumes from it on a machine
that has never seen it. Without it the output directory is the storage, with the same layout.
Every access goes through pyarrow's file systems, which read an S3-compatible endpoint and its
credentials from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), on the driver and on every node.

With remote storage, rank 0 writes TensorBoard events and the export into the output directory
on its own node first and copies them up; the driver reads the model back from the storage.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

CHECKPOINT_PARTS = ("ray", "train")  # Ray Train's storage_path is ROOT/ray, its run name "train"


def is_uri(path: str) -> bool:
    return "://" in path


@dataclass(frozen=True)
class Storage:
    """The run's storage root: an absolute local path or a URI."""

    root: str

    @classmethod
    def of(cls, storage_path: str, output_dir: str) -> Storage:
        if not storage_path:
            return cls(str(Path(output_dir).resolve()))
        if is_uri(storage_path):
            return cls(storage_path.rstrip("/"))
        return cls(str(Path(storage_path).resolve()))

    @property
    def remote(self) -> bool:
        return is_uri(self.root)

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def filesystem(self, *parts: str):
        """``(pyarrow file system, path)`` of ``root/parts``."""
        import pyarrow.fs as pafs

        target = self.uri(*parts)
        if not self.remote:
            return pafs.LocalFileSystem(), target
        try:
            return pafs.FileSystem.from_uri(target)
        except Exception as err:  # pyarrow's errors for an unknown scheme or a bad URI
            raise InputError(f"--storage-path {self.root}: {err}") from None

    def check(self) -> None:
        """Reachable and writable, before any worker starts: a file is written and removed."""
        fs, path = self.filesystem(".enigma-probe")
        try:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(b"ok")
            fs.delete_file(path)
        except Exception as err:  # OSError from pyarrow: no bucket, no credentials, no route
            raise InputError(
                f"--storage-path {self.root} is not writable from here ({err}); check the bucket "
                "and the AWS_* variables (endpoint and credentials)"
            ) from None

    def list_dirs(self, *parts: str) -> list[str]:
        """Names of the directories under ``root/parts`` (none when it does not exist)."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def upload(self, local: Path, *parts: str) -> None:
        """Copy the directory ``local`` to ``root/parts`` (files of the same name replaced)."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local), path, destination_filesystem=fs)

    def download(self, local: Path, *parts: str) -> bool:
        """Copy ``root/parts`` into the directory ``local``; False when there is nothing."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return False
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs)
        return True

    def replace_model(self, staged: Path, *parts: str) -> None:
        """Put the exported model at ``root/parts``. Object stores have no rename: the old
        files go first and ``config.json`` (what ``from_pretrained`` looks for) comes last."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir_contents(path)
        fs.create_dir(path, recursive=True)
        files = sorted(staged.iterdir(), key=lambda f: f.name == "config.json")
        for f in files:
            with open(f, "rb") as src, fs.open_output_stream(f"{path}/{f.name}") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
