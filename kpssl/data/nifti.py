"""NIfTI reading and writing that keeps spacing and orientation, with validation.

Arrays are ``(Z, H, W)``: NIfTI axis 2 becomes the slice axis, axes 0 and 1 become rows and columns.
Spacing is ``(z, row, col)`` in millimetres. The affine is kept as read, so a volume written back lands
in the same world coordinates.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import atomic_write, temporary_name

__all__ = ["DataError", "Volume", "read_volume", "write_volume", "atomic_path", "MAX_INTENSITY"]

MAX_INTENSITY = 1e7  # |value| beyond this is no scanner intensity (CT: -1024..~3e4 HU; MRI: < 65536)


class DataError(ValueError):
    """A data file or folder is missing or malformed; the message starts with the path."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass
class Volume:
    """One 3D volume: ``array (Z, H, W)``, ``spacing (z, row, col)`` in mm, ``affine`` 4 x 4 (NIfTI)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def read_volume(path: str | Path, *, label: bool = False) -> Volume:
    """Read a 3D NIfTI file (``.nii`` or ``.nii.gz``) into a :class:`Volume`.

    Images become float32, labels int16 after checking that they hold whole numbers. A 4D file with a
    single volume (trailing axis of size 1) is accepted. Raises :class:`DataError` naming the file when it
    is missing, truncated, not NIfTI, not 3D, holds non-finite values, absurd intensities (beyond
    :data:`MAX_INTENSITY`, such as one corrupted voxel of 3e38 that would swamp normalisation), or (labels)
    non-integer values.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except (nib.filebasedimages.ImageFileError, EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as error:
        raise DataError(path, f"not a readable NIfTI file ({type(error).__name__}: {error})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {tuple(data.shape)}")
    if 0 in data.shape:
        raise DataError(path, f"empty volume of shape {tuple(data.shape)}")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise DataError(path, f"invalid voxel spacing {zooms}")
    array = np.ascontiguousarray(np.transpose(data, (2, 0, 1)))  # (X, Y, Z) -> (Z, H, W)
    if label:
        if not np.issubdtype(array.dtype, np.integer):
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise DataError(path, "label volume holds non-integer values")
        array = array.astype(np.int16)
    else:
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise DataError(path, f"image holds non-finite values (NaN or infinity) in "
                                  f"{int(np.count_nonzero(~np.isfinite(array)))} voxel(s)")
        peak = float(np.max(np.abs(array.astype(np.float64))))
        if peak > MAX_INTENSITY:
            count = int(np.count_nonzero(np.abs(array.astype(np.float64)) > MAX_INTENSITY))
            raise DataError(path, f"absurd intensities: {count} voxel(s) reach {peak:.3g}, beyond "
                                  f"{MAX_INTENSITY:.0e} (a corrupted file?)")
        array = array.astype(np.float32)
    spacing = (zooms[2], zooms[0], zooms[1])
    return Volume(array=array, spacing=spacing, affine=np.asarray(image.affine, dtype=np.float64))


def atomic_path(path: Path) -> Path:
    """A temporary name in the same folder with the same suffixes (so nibabel picks the same format)."""
    return temporary_name(path)


def write_volume(
    path: str | Path,
    array: np.ndarray,
    spacing: tuple[float, float, float],
    affine: np.ndarray | None = None,
    *,
    label: bool = False,
) -> Path:
    """Write ``array (Z, H, W)`` as NIfTI with ``spacing (z, row, col)``, atomically.

    Without an affine, a diagonal one with the spacing is written. Labels are stored as uint8, images
    as float32 (int16 if the values are whole numbers in range, as scanners write them).
    """
    path = Path(path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a (Z, H, W) array, got shape {array.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"{path}: spacing must be three positive numbers, got {spacing}")
    data = np.transpose(array, (1, 2, 0))  # (Z, H, W) -> (X, Y, Z)
    if label:
        data = data.astype(np.uint8)
    elif np.issubdtype(data.dtype, np.integer) or (
        np.all(data == np.round(data)) and data.min() >= -32768 and data.max() <= 32767
    ):
        data = data.astype(np.int16)
    else:
        data = data.astype(np.float32)
    if affine is None:
        affine = np.diag([spacing[1], spacing[2], spacing[0], 1.0])
    image = nib.Nifti1Image(data, affine)
    image.header.set_zooms((spacing[1], spacing[2], spacing[0]))
    image.header.set_xyzt_units("mm")
    return atomic_write(path, lambda tmp: nib.save(image, str(tmp)))
