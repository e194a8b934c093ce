"""Image preparation, identical for generated samples and reference images.

Protocol (recorded in every metrics.json as `image_prep`):
1. decode with PIL and convert to RGB;
2. center-crop the long edge to a square (no padding, no aspect change);
3. resize the square to `eval_res` x `eval_res` with PIL's LANCZOS filter on the uint8 image
   (antialiased; skipped when already that size), giving uint8 (H, W, 3).
Each feature extractor then applies its own fixed input transform to these uint8 images
(clean-fid's clean bicubic to 299 for Inception, PIL bicubic to 224 for DINOv2, OpenCLIP's
preprocess for CLIP, none for LPIPS), so both sides always see the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from ddil_cli.data.shards import tar_problem
from ddil_cli.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESAMPLE_NAME = "PIL.LANCZOS"


def prep_description(eval_res: int) -> dict:
    return {"crop": "center square (long edge cropped)", "resize": RESAMPLE_NAME,
            "eval_res": eval_res, "dtype": "uint8"}


def center_crop_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)) if (w, h) != (side, side) else img


def prepare_image(img: Image.Image, eval_res: int) -> np.ndarray:
    """PIL image -> uint8 (eval_res, eval_res, 3) by the protocol above."""
    img = center_crop_square(img.convert("RGB"))
    if img.size != (eval_res, eval_res):
        img = img.resize((eval_res, eval_res), resample=Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def prepare_all(img: Image.Image, resolutions: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """One decoded image prepared at every resolution the run's feature spaces need."""
    img = img.convert("RGB")
    return tuple(prepare_image(img, res) for res in resolutions)


def _unreadable(path, exc: BaseException) -> str:
    return f"cannot read image {path}: {' '.join(str(exc).split())}; remove or replace the file"


def load_prepared(path: str | Path, eval_res: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return prepare_image(img, eval_res)
    except (OSError, ValueError) as exc:
        raise UserError(_unreadable(path, exc)) from None


class PreparedFiles:
    """Image files, each opened and decoded once and prepared at every resolution asked for
    (a map-style dataset for torch's DataLoader: its workers decode in parallel). A file that
    cannot be read comes back as its error text, raised as one line by the reader."""

    def __init__(self, paths: list[Path], resolutions: tuple[int, ...]):
        self.paths, self.resolutions = list(paths), tuple(resolutions)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...] | str:
        try:
            with Image.open(self.paths[i]) as img:
                return prepare_all(img, self.resolutions)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return _unreadable(self.paths[i], exc)


def _as_batch(items: list, resolutions: tuple[int, ...]) -> dict[int, np.ndarray]:
    problem = next((item for item in items if isinstance(item, str)), None)
    if problem is not None:
        raise UserError(problem)
    return {res: np.stack([item[k] for item in items]) for k, res in enumerate(resolutions)}


def prepared_file_batches(paths: list[Path], resolutions, batch_size: int,
                          workers: int = 0) -> Iterator[tuple[list[int], dict[int, np.ndarray]]]:
    """(positions, {resolution: uint8 (B, res, res, 3)}) over `paths` in order, each file opened
    once; `workers` > 0 decodes in that many DataLoader worker processes."""
    resolutions = tuple(sorted(set(resolutions)))
    dataset = PreparedFiles(paths, resolutions)
    if workers > 0:
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list, prefetch_factor=4)
    else:
        loader = ([dataset[i] for i in range(b, min(b + batch_size, len(dataset)))]
                  for b in range(0, len(dataset), batch_size))
    start = 0
    for items in loader:
        yield list(range(start, start + len(items))), _as_batch(items, resolutions)
        start += len(items)


def list_image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return files


def _stat_digest(paths: Iterable[Path], root: Path) -> str:
    # names, sizes and mtimes: cheap to compute for 30k files, changes when any file does
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class ImageFolderSource:
    """A folder of images (searched recursively, sorted by path)."""

    kind = "image-folder"

    def __init__(self, folder: str | Path, limit: int | None = None):
        self.root = Path(folder)
        self.files = list_image_files(self.root)
        if not self.files:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}; "
                            "pass a folder of images, webdataset shards, a statistics .npz or a gmm: spec")
        if limit is not None:
            self.files = self.files[:limit]

    def __len__(self) -> int:
        return len(self.files)

    def manifest_hash(self) -> str:
        return _stat_digest(self.files, self.root)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.root), "num_images": len(self.files)}

    def prepared(self, resolutions, batch_size: int, workers: int = 0) -> Iterator[dict[int, np.ndarray]]:
        for _, batch in prepared_file_batches(self.files, resolutions, batch_size, workers):
            yield batch

    def batches(self, eval_res: int, batch_size: int) -> Iterator[np.ndarray]:
        for batch in self.prepared([eval_res], batch_size):
            yield batch[eval_res]


class ShardSource:
    """Image-caption webdataset shards (.tar): the first image member of each sample is used."""

    kind = "webdataset"

    def __init__(self, shards: list[Path], limit: int | None = None):
        self.shards = sorted(shards)
        if not self.shards:
            raise UserError("no .tar shards found; pass a shard file, a folder of shards or a glob")
        self.limit = limit
        self._count: int | None = None

    @staticmethod
    def from_arg(arg: str, limit: int | None = None) -> "ShardSource":
        """A shard file, a folder of shards, a glob or a brace pattern (the project's one resolver)."""
        from ddil_cli.data.shards import resolve_shards

        urls = resolve_shards(arg)
        remote = [u for u in urls if u.startswith("pipe:") or "://" in u]
        if remote:
            raise UserError(f"reference shards must be local files ({remote[0]} is not): their statistics are "
                            "cached by file size and time; copy them locally or pass a statistics .npz")
        return ShardSource([Path(u).resolve() for u in urls], limit)

    def manifest_hash(self) -> str:
        h = hashlib.sha256(_stat_digest(self.shards, Path("/")).encode())
        h.update(f"limit={self.limit}".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind, "shards": [str(s) for s in self.shards], "num_images": len(self)}

    def _samples(self) -> Iterator[tuple[np.ndarray | bytes, str | None]]:
        """(image bytes, caption) per sample. A damaged shard is refused, never skipped: a reference
        missing part of its images would silently change every score against it."""
        import tarfile

        count = 0
        for shard in self.shards:
            try:
                with tarfile.open(shard) as tar:
                    # webdataset groups members by the key before the first dot of the basename
                    current, image, caption = None, None, None
                    for member in tar:
                        if not member.isfile():
                            continue
                        base = member.name.rsplit("/", 1)[-1]
                        key, _, ext = base.partition(".")
                        key = member.name.rsplit("/", 1)[0] + "/" + key if "/" in member.name else key
                        if key != current:
                            if image is not None:
                                yield image, caption
                                count += 1
                                if self.limit is not None and count >= self.limit:
                                    return
                            current, image, caption = key, None, None
                        data = tar.extractfile(member).read()
                        if "." + ext.lower() in IMAGE_EXTENSIONS and image is None:
                            image = data
                        elif ext.lower() == "txt":
                            caption = data.decode("utf-8").strip()
                        elif ext.lower() == "json" and caption is None:
                            caption = json.loads(data).get("caption")
                    if image is not None and (self.limit is None or count < self.limit):
                        yield image, caption
                        count += 1
                        if self.limit is not None and count >= self.limit:
                            return
            except (tarfile.TarError, OSError, EOFError, ValueError, AttributeError) as exc:
                raise UserError(f"reference shard {shard} is damaged ({tar_problem(exc)}); a reference must be "
                                "complete: replace the shard or leave it out of --reference") from None

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self._samples())
        return self._count

    def prepared(self, resolutions, batch_size: int, workers: int = 0) -> Iterator[dict[int, np.ndarray]]:
        """Each image decoded once, prepared at every resolution (`workers` unused: a tar is read
        in order, by this process)."""
        resolutions = tuple(sorted(set(resolutions)))
        batch = []
        for data, _ in self._samples():
            try:
                with Image.open(io.BytesIO(data)) as img:
                    batch.append(prepare_all(img, resolutions))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise UserError(f"a reference image in {', '.join(str(s) for s in self.shards[:2])} cannot be "
                                f"decoded ({exc}); a reference must be complete: fix or remove that sample") from None
            if len(batch) == batch_size:
                yield _as_batch(batch, resolutions)
                batch = []
        if batch:
            yield _as_batch(batch, resolutions)

    def batches(self, eval_res: int, batch_size: int) -> Iterator[np.ndarray]:
        for batch in self.prepared([eval_res], batch_size):
            yield batch[eval_res]
