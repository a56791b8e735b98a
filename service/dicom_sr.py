"""DICOM Structured Report of a scan's results: a TID 1500 Measurement Report in a Comprehensive 3D SR.

The report holds one volumetric measurement group per segment of the scan's DICOM SEG (its volume in mL,
referencing that segment) and one group for the run as a whole: the quality signals of the ML core as
numeric measurements and the guard decision (fell back to the unadapted model: yes/no, with the reason as
a comment).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from service.dicom_seg import MANUFACTURER, SEG_SOP_CLASS_UID, load_series, segment_codes

PRIVATE_SCHEME = "99TTASEG"
MILLILITER = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
FALLBACK = hd.sr.CodedConcept("fallback", PRIVATE_SCHEME, "Fell back to the unadapted model")
RUN_FINDING = hd.sr.CodedConcept("run", PRIVATE_SCHEME, "Automatic segmentation run")
PROCEDURES = {
    "MR": hd.sr.CodedConcept("113091000", "SCT", "Magnetic resonance imaging"),
    "CT": hd.sr.CodedConcept("77477000", "SCT", "Computerized axial tomography"),
}
IMAGING = hd.sr.CodedConcept("363679005", "SCT", "Imaging")


def _quality_code(name: str) -> hd.sr.CodedConcept:
    """Local code of a quality signal: its name, or for names over 16 characters a prefix and a digest."""
    value = name if len(name) <= 16 else f"{name[:7]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, name.replace("_", " ")[:64])


def write_measurement_report(
    seg_path: Path,
    source_dicom_dir: Path,
    volumes_ml: Mapping[str, float],
    quality: Mapping[str, float],
    fallback: bool,
    fallback_reason: str | None,
    out_path: Path,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    algorithm_name: str = "ttaseg",
    algorithm_version: str = "0.1",
) -> Path:
    """Write the SR of a scan whose SEG is ``seg_path`` (written from the series in ``source_dicom_dir``).

    ``volumes_ml`` maps segment labels (the SEG's Segment Label) to volumes in mL; a label that is not a
    segment of the SEG raises ValueError. ``quality`` holds the ML core's unitless quality signals.
    """
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    if seg.SOPClassUID != SEG_SOP_CLASS_UID:
        raise ValueError(f"{seg_path} is not a DICOM Segmentation")
    sources = load_series(Path(source_dicom_dir))
    segments = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    unknown = sorted(set(volumes_ml) - set(segments))
    if unknown:
        raise ValueError(f"volumes of {unknown} have no segment in the SEG")
    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    source_series = hd.sr.SourceSeriesForSegmentation(str(sources[0].SeriesInstanceUID))
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for label, number in sorted(segments.items(), key=lambda item: item[1]):
        if label not in volumes_ml:
            continue
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=pydicom.uid.generate_uid(entropy_srcs=[sop_instance_uid, str(number)]),
                    identifier=label[:64],
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=SEG_SOP_CLASS_UID,
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=number,
                    source_series=source_series,
                ),
                finding_type=segment_codes(label)[1],
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=float(volumes_ml[label]),
                        unit=MILLILITER,
                        algorithm_id=algorithm,
                    )
                ],
            )
        )
    run = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=pydicom.uid.generate_uid(entropy_srcs=[sop_instance_uid, "run"]), identifier="run"
        ),
        finding_type=RUN_FINDING,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=_quality_code(name), value=float(value), unit=NO_UNITS)
            for name, value in sorted(quality.items())
        ]
        or None,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=FALLBACK, value=codes.SCT.Yes if fallback else codes.SCT.No)
        ],
    )
    if fallback_reason:
        run[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=fallback_reason[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    groups.append(run)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=pydicom.uid.generate_uid(entropy_srcs=[MANUFACTURER, algorithm_name]),
            name=algorithm_name,
            manufacturer_name=MANUFACTURER,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURES.get(str(sources[0].get("Modality", "")), IMAGING),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=2000 + int(sources[0].get("SeriesNumber") or 0),
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )
    sr.SeriesDescription = f"{algorithm_name} measurements"[:64]
    scheme = pydicom.Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = f"{MANUFACTURER} local codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(out_path, enforce_file_format=True)
    return out_path


def read_volumes(path: Path) -> dict[str, float]:
    """Volumes in mL by segment label from an SR written by :func:`write_measurement_report`."""
    report = hd.sr.srread(path)
    volumes: dict[str, float] = {}
    for group in report.content.get_volumetric_roi_measurement_groups():
        [measurement] = group.get_measurements(name=codes.SCT.Volume)
        volumes[str(group.tracking_identifier)] = float(measurement.value)
    return volumes
