"""Convert LabelMe annotations (as `idaics dataset export` writes them, corrected by a reader) into
a YOLO-seg dataset with the paper's four classes, split into folds grouped by patient.

    python model/tools/labelme_to_yolo.py LABELME_DIR... --out DATASET [--folds 5] [--seed 0]

Writes DATASET/images/NAME.png, DATASET/labels/NAME.txt (one object per line: the class index,
then the outline's x y pairs normalised to the image size), DATASET/cases.csv (image, patient,
fold) and DATASET/fold_K.yaml for each fold K (that fold validates, the others train).

Rules, each refused with the file and the shape named rather than guessed:
- labels are the paper's classes (normal, schmorl, bulge, protrusion); `unlabelled`, a shape
  nobody has decided, and any other label are refused;
- polygons and rectangles are outlines; other shape types (circle, line, point, mask) are refused;
- shapes that share a label and a group_id are one object: a polygon inside another of the group
  is a hole, joined to the outline by a zero-width cut, since a YOLO-seg outline is one ring;
  parts side by side are joined the same way.
Slices of one patient never sit on both sides of a fold: the patient is the export's pseudonym
(`idaics.patient` in the JSON), else the file name up to its first `-S`, else the file name.

Standard library only: it runs where the agent's tests run, without torch.
"""
import argparse
import csv
import json
import os
import random
import shutil
import sys

CLASSES = ["normal", "schmorl", "bulge", "protrusion"]


class AnnotationError(Exception):
    """A LabelMe file the converter refuses, with the file and the shape named."""


def ring_area(points):
    """Signed area (shoelace); positive counter-clockwise with y up."""
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])) / 2.0


def inside(point, ring):
    """Whether a point lies inside a ring (even-odd rule)."""
    x, y = point
    result = False
    for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1]):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            result = not result
    return result


def join_rings(rings):
    """One ring from an outline and its holes or side-by-side parts: each further ring is joined
    at its vertex nearest to the result so far, by a cut walked there and back. Holes run the
    opposite way round, so the area they enclose is left out under the even-odd and non-zero rules."""
    rings = sorted(rings, key=lambda r: -abs(ring_area(r)))
    outline = list(rings[0])
    if ring_area(outline) < 0:
        outline.reverse()
    for ring in rings[1:]:
        ring = list(ring)
        is_hole = inside(ring[0], rings[0])
        if (ring_area(ring) > 0) == is_hole:
            ring.reverse()
        best = min(
            ((i, j) for i in range(len(outline)) for j in range(len(ring))),
            key=lambda ij: (outline[ij[0]][0] - ring[ij[1]][0]) ** 2 + (outline[ij[0]][1] - ring[ij[1]][1]) ** 2,
        )
        i, j = best
        walked = ring[j:] + ring[:j] + [ring[j]]
        outline = outline[: i + 1] + walked + outline[i:]
    return outline


def objects_of(path):
    """The objects of one LabelMe file: (class index, ring of points), and its document."""
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    groups = {}
    for number, shape in enumerate(document.get("shapes", []), start=1):
        label = shape.get("label", "")
        where = f"{path}: shape {number} ({label!r})"
        if label == "unlabelled":
            raise AnnotationError(f"{where}: not labelled yet; give it one of {', '.join(CLASSES)}")
        if label not in CLASSES:
            raise AnnotationError(f"{where}: unknown label; the classes are {', '.join(CLASSES)}")
        kind = shape.get("shape_type") or "polygon"
        points = [(float(x), float(y)) for x, y in shape.get("points", [])]
        if kind == "rectangle" and len(points) == 2:
            (x0, y0), (x1, y1) = points
            points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        elif kind != "polygon":
            raise AnnotationError(f"{where}: shape type {kind!r}; only polygons and rectangles are outlines")
        if len(points) < 3 or abs(ring_area(points)) == 0:
            raise AnnotationError(f"{where}: an outline needs three points enclosing an area")
        group = shape.get("group_id")
        key = (label, group) if group is not None else (label, f"shape {number}")
        groups.setdefault(key, []).append(points)
    return [(CLASSES.index(label), join_rings(rings)) for (label, _), rings in groups.items()], document


def patient_of(path, document):
    meta = document.get("idaics") or {}
    if meta.get("patient"):
        return meta["patient"]
    name = os.path.splitext(os.path.basename(path))[0]
    return name.split("-S")[0]


def patient_folds(patients, folds, seed):
    """Patients (with their image counts) dealt into folds of nearly equal image counts: the
    largest first, each to the lightest fold; ties broken by a seeded shuffle."""
    order = sorted(patients.items())
    random.Random(seed).shuffle(order)
    order.sort(key=lambda item: -item[1])
    sizes = [0] * folds
    assignment = {}
    for patient, count in order:
        fold = min(range(folds), key=lambda k: (sizes[k], k))
        assignment[patient] = fold
        sizes[fold] += count
    return assignment


def convert(sources, out, folds=5, seed=0):
    """Converts every LabelMe JSON under `sources` into the dataset at `out`; returns its cases."""
    files = []
    for source in sources:
        for root, _, names in os.walk(source):
            files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".json"))
    if not files:
        raise AnnotationError(f"no LabelMe JSON under {', '.join(sources)}")
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    cases = []
    for path in files:
        objects, document = objects_of(path)
        width, height = document.get("imageWidth"), document.get("imageHeight")
        image = os.path.join(os.path.dirname(path), document.get("imagePath") or "")
        if not width or not height or not os.path.isfile(image):
            raise AnnotationError(f"{path}: its image {document.get('imagePath')!r} or its size is missing")
        name = os.path.splitext(os.path.basename(path))[0]
        shutil.copyfile(image, os.path.join(out, "images", name + os.path.splitext(image)[1]))
        with open(os.path.join(out, "labels", name + ".txt"), "w", encoding="utf-8") as f:
            for index, ring in objects:
                coords = " ".join(f"{min(max(x / width, 0.0), 1.0):.6f} {min(max(y / height, 0.0), 1.0):.6f}" for x, y in ring)
                f.write(f"{index} {coords}\n")
        cases.append({"image": name, "patient": patient_of(path, document)})
    counts = {}
    for case in cases:
        counts[case["patient"]] = counts.get(case["patient"], 0) + 1
    if folds > len(counts):
        raise AnnotationError(f"{folds} folds need at least {folds} patients; the annotations hold {len(counts)}")
    assignment = patient_folds(counts, folds, seed)
    for case in cases:
        case["fold"] = assignment[case["patient"]]
    with open(os.path.join(out, "cases.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "patient", "fold"])
        writer.writeheader()
        writer.writerows(cases)
    root = os.path.abspath(out)
    for fold in range(folds):
        for split, wanted in (("train", lambda k: k != fold), ("val", lambda k: k == fold)):
            with open(os.path.join(out, f"fold_{fold}_{split}.txt"), "w", encoding="utf-8") as f:
                for case in cases:
                    if wanted(case["fold"]):
                        f.write(os.path.join(root, "images", case["image"] + ".png") + "\n")
        with open(os.path.join(out, f"fold_{fold}.yaml"), "w", encoding="utf-8") as f:
            f.write(f"path: {root}\ntrain: fold_{fold}_train.txt\nval: fold_{fold}_val.txt\nnames:\n")
            f.writelines(f"  {i}: {c}\n" for i, c in enumerate(CLASSES))
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="folders of LabelMe JSON with their images")
    parser.add_argument("--out", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        cases = convert(args.sources, args.out, args.folds, args.seed)
    except AnnotationError as e:
        sys.exit(f"refused: {e}")
    patients = len({c["patient"] for c in cases})
    print(f"{len(cases)} images of {patients} patients in {args.folds} folds: {args.out}")


if __name__ == "__main__":
    main()
