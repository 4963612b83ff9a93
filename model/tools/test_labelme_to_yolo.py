"""Unit tests of labelme_to_yolo (standard library only; tests/training_tools.rs runs them)."""
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import labelme_to_yolo as converter  # noqa: E402

PNG = bytes.fromhex(  # a 1x1 grey PNG: the converter copies images, it does not decode them
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c63600000000200015d0b4ab40000000049454e44ae426082"
)


def shape(label, points, group=None, kind="polygon"):
    return {"label": label, "points": points, "group_id": group, "shape_type": kind, "flags": {}, "description": ""}


def write_case(folder, name, shapes, patient=None, size=100):
    document = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": name + ".png", "imageData": None,
                "imageHeight": size, "imageWidth": size}
    if patient:
        document["idaics"] = {"patient": patient}
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump(document, f)
    with open(os.path.join(folder, name + ".png"), "wb") as f:
        f.write(PNG)


def labels(out, name):
    with open(os.path.join(out, "labels", name + ".txt")) as f:
        return [line.split() for line in f]


class Conversion(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.src = os.path.join(self.tmp.name, "labelme")
        self.out = os.path.join(self.tmp.name, "dataset")
        os.makedirs(self.src)

    def tearDown(self):
        self.tmp.cleanup()

    def test_polygons_and_rectangles_become_normalised_outlines_with_the_paper_classes(self):
        write_case(self.src, "a", [shape("protrusion", [[10, 10], [50, 10], [50, 30]]),
                                   shape("bulge", [[60, 60], [80, 90]], kind="rectangle")], patient="P1")
        write_case(self.src, "b", [], patient="P2")
        converter.convert([self.src], self.out, folds=2)
        rows = labels(self.out, "a")
        self.assertEqual([r[0] for r in rows], ["3", "2"])
        self.assertEqual(rows[0][1:], ["0.100000", "0.100000", "0.500000", "0.100000", "0.500000", "0.300000"])
        self.assertEqual(len(rows[1][1:]), 8, "a rectangle is four corners")
        self.assertEqual(labels(self.out, "b"), [], "an image with no disc is a background image")
        self.assertTrue(os.path.isfile(os.path.join(self.out, "images", "a.png")))

    def test_a_hole_is_cut_out_of_its_outline(self):
        outer = [[0, 0], [100, 0], [100, 100], [0, 100]]
        hole = [[40, 40], [60, 40], [60, 60], [40, 60]]
        write_case(self.src, "a", [shape("schmorl", outer, group=1), shape("schmorl", hole, group=1)], patient="P1")
        write_case(self.src, "b", [], patient="P2")
        converter.convert([self.src], self.out, folds=2)
        rows = labels(self.out, "a")
        self.assertEqual(len(rows), 1, "one object")
        values = [float(v) * 100 for v in rows[0][1:]]
        ring = list(zip(values[::2], values[1::2]))
        self.assertEqual(len(ring), 4 + 4 + 2, "outline, hole and the cut there and back")
        # The joined ring encloses the outline less the hole.
        self.assertAlmostEqual(abs(converter.ring_area(ring)), 100 * 100 - 20 * 20)
        self.assertFalse(converter.inside((50, 50), ring))
        self.assertTrue(converter.inside((20, 20), ring))

    def test_unknown_and_unlabelled_shapes_are_refused_with_the_file_and_label_named(self):
        for label, says in (("herniation", "unknown label"), ("unlabelled", "not labelled yet")):
            write_case(self.src, "a", [shape(label, [[10, 10], [50, 10], [50, 30]])])
            with self.assertRaises(converter.AnnotationError) as raised:
                converter.convert([self.src], self.out, folds=1)
            message = str(raised.exception)
            self.assertIn(os.path.join(self.src, "a.json"), message)
            self.assertIn(repr(label), message)
            self.assertIn(says, message)
        write_case(self.src, "a", [shape("normal", [[10, 10], [20, 20]], kind="circle")])
        with self.assertRaises(converter.AnnotationError) as raised:
            converter.convert([self.src], self.out, folds=1)
        self.assertIn("circle", str(raised.exception))

    def test_folds_never_split_a_patient(self):
        for patient, images in (("P1", 5), ("P2", 1), ("P3", 3), ("P4", 2), ("P5", 4), ("P6", 1)):
            for n in range(images):
                write_case(self.src, f"{patient}-S1_{n}", [shape("normal", [[1, 1], [9, 1], [9, 9]])])
        cases = converter.convert([self.src], self.out, folds=3, seed=7)
        by_patient = {}
        for case in cases:
            by_patient.setdefault(case["patient"], set()).add(case["fold"])
        self.assertEqual(set(by_patient), {"P1", "P2", "P3", "P4", "P5", "P6"}, "patient from the file name")
        self.assertTrue(all(len(folds) == 1 for folds in by_patient.values()), by_patient)
        sizes = [sum(1 for c in cases if c["fold"] == k) for k in range(3)]
        self.assertEqual(sorted(sizes), [5, 5, 6])
        for fold in range(3):
            with open(os.path.join(self.out, f"fold_{fold}_val.txt")) as f:
                val = {os.path.basename(line.strip()).split("-S")[0] for line in f}
            with open(os.path.join(self.out, f"fold_{fold}_train.txt")) as f:
                train = {os.path.basename(line.strip()).split("-S")[0] for line in f}
            self.assertFalse(val & train, f"fold {fold}: {val & train} on both sides")
        with self.assertRaises(converter.AnnotationError):
            converter.convert([self.src], os.path.join(self.tmp.name, "again"), folds=7)


if __name__ == "__main__":
    unittest.main()
