"""Checks the items of docs/conformance.md's IHE AI Results table on an SR and SEG the agent wrote.

Usage: air_check.py SR_FILE SEG_FILE SOURCE_FILE DEVICE_UID
Prints "AIR-n ok: ..." for each item; exits non-zero at the first that does not hold.
"""
import sys

import highdicom as hd
import pydicom

sr_path, seg_path, source_path, device_uid = sys.argv[1:5]
sr = pydicom.dcmread(sr_path)
seg = pydicom.dcmread(seg_path)
source = pydicom.dcmread(source_path, stop_before_pixels=True)


def ok(item, what):
    print(f"{item} ok: {what}")


def code(item):
    c = item.ConceptNameCodeSequence[0]
    return c.CodeValue, c.CodingSchemeDesignator


def children(container):
    return {code(i): i for i in container.ContentSequence}


assert sr.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"), sr.SOPClassUID
template = sr.ContentTemplateSequence[0]
assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
assert code(sr) == ("126000", "DCM"), code(sr)
ok("AIR-1", "Comprehensive (3D) SR, TID 1500, title (126000, DCM)")

assert isinstance(hd.sr.srread(sr_path).content, hd.sr.MeasurementReport)
ok("AIR-2", "highdicom reads it as a Measurement Report")

root = children(sr)
assert root[("121005", "DCM")].ConceptCodeSequence[0].CodeValue == "121007", "observer type Device"
assert root[("121012", "DCM")].UID == device_uid, (root[("121012", "DCM")].UID, device_uid)
assert root[("121013", "DCM")].TextValue
assert root[("121014", "DCM")].TextValue == "IDAICS"
assert root[("121015", "DCM")].TextValue
ok("AIR-3", "device observer: type, UID (the algorithm's Device UID), name, manufacturer, model name")

procedure = root[("121058", "DCM")].ConceptCodeSequence[0]
study_codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in source.get("ProcedureCodeSequence", [])]
expected = study_codes[:1] or [("77477000", "SCT")]
assert (procedure.CodeValue, procedure.CodingSchemeDesignator) == expected[0], (procedure, expected)
ok("AIR-4", f"procedure reported: {procedure.CodeMeaning} ({procedure.CodeValue}, {procedure.CodingSchemeDesignator})")


def algorithm_item(ds):
    items = [i for i in ds.ContributingEquipmentSequence
             if (i.PurposeOfReferenceCodeSequence[0].CodeValue,
                 i.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator) == ("Newcode1", "99IHE")]
    assert len(items) == 1, "one Processing Algorithm item"
    item = items[0]
    assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    return (item.Manufacturer, item.ManufacturerModelName, str(item.SoftwareVersions), item.DeviceUID)


sr_algorithm = algorithm_item(sr)
assert sr_algorithm[0] == "IDAICS" and sr_algorithm[1] and sr_algorithm[2], sr_algorithm
ok("AIR-5", f"SR Contributing Equipment: Processing Algorithm {sr_algorithm}")

assert sr_algorithm[3] == device_uid
ok("AIR-6", "Device UID derived from the weights' SHA-256")

assert algorithm_item(seg) == sr_algorithm, (algorithm_item(seg), sr_algorithm)
ok("AIR-7", "the SEG names the same algorithm")

measurements = root[("126010", "DCM")]
groups = [g for g in measurements.ContentSequence if code(g) == ("125007", "DCM")]
assert groups
for g in groups:
    items = children(g)
    for needed in [("112039", "DCM"), ("112040", "DCM"), ("121071", "DCM"), ("111001", "DCM")]:
        assert needed in items, (needed, list(items))
    # TID 4019: the version qualifies the name.
    assert ("111003", "DCM") in children(items[("111001", "DCM")]), "Algorithm Version under Algorithm Name"
    label = items[("112039", "DCM")].TextValue
    assert (("363698007", "SCT") in items) == ("uncertain" not in label), label
ok("AIR-8", f"{len(groups)} measurement groups: tracking identifier and UID, finding, algorithm name and version, site when certain")

sources = [i for g in groups for i in g.ContentSequence if code(i) == ("121112", "DCM")]
assert sources and all(i.ReferencedSOPSequence for i in sources)
assert ("111028", "DCM") in root, "image library"
ok("AIR-9", f"{len(sources)} source images referenced, image library present")

for segment in seg.SegmentSequence:
    assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName
    family = segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0]
    assert family.CodeMeaning == "Artificial Intelligence", family
referenced = [i for g in groups for i in g.ContentSequence if "ReferencedSOPSequence" in i
              and "ReferencedSegmentNumber" in i.ReferencedSOPSequence[0]]
assert referenced, "the SR points at the SEG's segments"
ok("AIR-10", f"{len(seg.SegmentSequence)} segments AUTOMATIC, family Artificial Intelligence, referenced from the SR")

assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
ok("AIR-11", "verification UNVERIFIED, completion COMPLETE")

for ds, modality in [(sr, "SR"), (seg, "SEG")]:
    assert ds.Modality == modality
    for keyword in ["StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "StudyID"]:
        assert ds.get(keyword) == source.get(keyword), (modality, keyword, ds.get(keyword), source.get(keyword))
    for keyword in ["SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "ContentDate", "ContentTime",
                    "InstanceNumber", "Manufacturer", "ManufacturerModelName", "SoftwareVersions"]:
        assert str(ds.get(keyword, "")).strip(), (modality, keyword)
ok("AIR-12", "study, patient and accession as the source's; modality, series, content date and time, equipment filled")
