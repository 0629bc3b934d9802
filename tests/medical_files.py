"""Small NIfTI files and DICOM series written on the spot for the medical-source tests (nothing downloaded)."""

from pathlib import Path

import numpy as np


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4) if affine is None else affine).to_filename(
        str(path)
    )
    return path


def write_dicom_series(
    folder: Path, volume: np.ndarray, spacing=(1.0, 1.0, 2.0), series_uid: str | None = None, prefix: str = ""
) -> Path:
    """``volume[k, row, column]`` as one MR series: slice k at z = k * spacing[2], rows along +y, columns along +x
    (patient LPS). File names are shuffled against slice order, so a reader must sort by position."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    slices = volume.shape[0]
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        item = Dataset()
        item.file_meta = meta
        item.SOPClassUID, item.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        item.StudyInstanceUID, item.SeriesInstanceUID, item.Modality = study_uid, series_uid, "MR"
        item.PatientID, item.InstanceNumber = "anonymous", k + 1
        item.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        item.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        item.PixelSpacing = [spacing[1], spacing[0]]
        item.SliceThickness = spacing[2]
        item.Rows, item.Columns = volume.shape[1:]
        item.SamplesPerPixel, item.PhotometricInterpretation = 1, "MONOCHROME2"
        item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = 16, 16, 15, 0
        item.PixelData = volume[k].astype(np.uint16).tobytes()
        item.save_as(folder / f"{prefix}{(5 * k) % slices:03d}-{k}.dcm", enforce_file_format=True)
    return folder
