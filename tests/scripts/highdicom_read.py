"""Reads the agent's SR and SEG back with highdicom, as a third-party toolkit would.

Usage: highdicom_read.py SR_FILE SEG_FILE EXPECTED_LEVELS
Prints what it read; exits non-zero on any problem.
"""
import sys

import highdicom as hd
import pydicom

sr_path, seg_path, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])

sr = hd.sr.srread(sr_path)
# highdicom recognises the document as a TID 1500 Measurement Report and finds its groups.
assert isinstance(sr.content, hd.sr.MeasurementReport), type(sr.content)
# Levels whose finding has a segment read as volumetric ROI groups (they reference the SEG),
# the others as image groups.
image_groups = sr.content.get_image_measurement_groups()
roi_groups = sr.content.get_volumetric_roi_measurement_groups()
assert len(image_groups) + len(roi_groups) == expected, \
    f"highdicom sees {len(image_groups)} + {len(roi_groups)} measurement groups"
for group in roi_groups:
    segment = group.referenced_segment
    assert segment is not None, "a group without its segment"
    print("group", group.tracking_identifier, "segment", segment.referenced_segment_numbers if hasattr(segment, "referenced_segment_numbers") else segment)
measurements = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
assert len(measurements) == 1, "one Imaging Measurements container"
groups = [g for g in measurements[0].ContentSequence if g.ConceptNameCodeSequence[0].CodeValue == "125007"]
assert len(groups) == expected, f"{len(groups)} measurement groups, expected {expected}"
for g in groups:
    names = {i.ConceptNameCodeSequence[0].CodeValue: i for i in g.ContentSequence}
    assert "112039" in names and "121071" in names and "363698007" in names, names.keys()
    print(names["112039"].TextValue, names["121071"].ConceptCodeSequence[0].CodeMeaning,
          names["363698007"].ConceptCodeSequence[0].CodeValue)
print("SR template", sr.ContentTemplateSequence[0].TemplateIdentifier, "verification", sr.VerificationFlag)

seg = hd.seg.segread(seg_path)
print("SEG", seg.SegmentationType, "segments", seg.number_of_segments, "frames", seg.NumberOfFrames)
for number in seg.segment_numbers:
    description = seg.get_segment_description(number)
    print(" segment", number, description.SegmentLabel, description.SegmentAlgorithmType,
          description.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeMeaning)
