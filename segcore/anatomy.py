"""The structures ProstateSeg knows: fixed label values, names, colours and
SNOMED CT terminology.

Label values are fixed for the whole project (phantoms, training data, model
packages, exports): 0 background, 1 prostate, 2 bladder, 3 rectum, 4/5 femoral
head left/right, 6 seminal vesicles, then the supporting tissues of the phantom.
Codes follow DICOM's SNOMED CT usage (scheme "SCT"), as Slicer's terminology
lists do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
TISSUE = ("SCT", "85756007", "Tissue")
PHYSICAL_OBJECT = ("SCT", "260787004", "Physical object")
LEFT = ("SCT", "7771000", "left")
RIGHT = ("SCT", "24028007", "right")


@dataclass(frozen=True)
class Structure:
    """One labelled structure and how it is shown and coded."""

    value: int
    name: str
    color: tuple[int, int, int]
    category: tuple[str, str, str] = ANATOMICAL_STRUCTURE
    type: tuple[str, str, str] = ("", "", "")
    modifier: tuple[str, str, str] | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["color"] = list(self.color)
        for key in ("category", "type", "modifier"):
            if data[key] is not None:
                data[key] = dict(zip(("scheme", "code", "meaning"), data[key]))
        return data

    @staticmethod
    def from_json(data: dict) -> Structure:
        def code(entry):
            if entry is None:
                return None
            return (entry["scheme"], entry["code"], entry["meaning"])

        return Structure(
            value=int(data["value"]),
            name=str(data["name"]),
            color=tuple(int(c) for c in data["color"]),
            category=code(data.get("category")) or ANATOMICAL_STRUCTURE,
            type=code(data.get("type")) or ("", "", ""),
            modifier=code(data.get("modifier")),
        )


def _s(value, name, color, type_code, type_meaning, category=ANATOMICAL_STRUCTURE, modifier=None):
    return Structure(value, name, color, category, ("SCT", type_code, type_meaning), modifier)


# The catalogue. Values 1-6 are the segmentation targets; 7+ are phantom tissues.
STRUCTURES: tuple[Structure, ...] = (
    _s(1, "prostate", (216, 132, 105), "41216001", "Prostate"),
    _s(2, "bladder", (222, 198, 104), "89837001", "Urinary bladder"),
    _s(3, "rectum", (141, 93, 137), "34402009", "Rectum"),
    _s(4, "femoral_head_left", (207, 226, 150), "2812003", "Head of femur", modifier=LEFT),
    _s(5, "femoral_head_right", (150, 226, 207), "2812003", "Head of femur", modifier=RIGHT),
    _s(6, "seminal_vesicles", (230, 158, 140), "64739004", "Seminal vesicle"),
    _s(7, "hip_bone_left", (241, 214, 145), "29836001", "Hip", modifier=LEFT),
    _s(8, "hip_bone_right", (241, 204, 145), "29836001", "Hip", modifier=RIGHT),
    _s(9, "sacrum", (241, 224, 165), "54735007", "Sacrum"),
    _s(10, "femur_left", (236, 214, 145), "71341001", "Femur", modifier=LEFT),
    _s(11, "femur_right", (236, 204, 145), "71341001", "Femur", modifier=RIGHT),
    _s(12, "muscle", (192, 104, 88), "71616004", "Skeletal muscle", category=TISSUE),
    _s(13, "fat", (230, 220, 70), "55603005", "Adipose tissue", category=TISSUE),
    _s(14, "skin", (177, 122, 101), "39937001", "Skin", category=TISSUE),
    _s(15, "metal_implant", (200, 200, 235), "40388003", "Implant", category=PHYSICAL_OBJECT),
    _s(16, "couch", (120, 120, 120), "706032008", "Patient table", category=PHYSICAL_OBJECT),
    _s(17, "bowel", (205, 167, 142), "113276009", "Intestinal structure"),
)

BY_NAME: dict[str, Structure] = {s.name: s for s in STRUCTURES}
BY_VALUE: dict[int, Structure] = {s.value: s for s in STRUCTURES}

# The organs the segmentation tools deliver (the rest only make phantoms look real).
TARGET_NAMES = ("prostate", "bladder", "rectum", "femoral_head_left", "femoral_head_right", "seminal_vesicles")


def structure(key: int | str) -> Structure:
    """Look a structure up by label value or name."""
    table = BY_VALUE if isinstance(key, int) else BY_NAME
    try:
        return table[key]
    except KeyError:
        known = ", ".join(f"{s.value}={s.name}" for s in STRUCTURES)
        raise KeyError(f"unknown structure {key!r}; known: {known}") from None


def labels_json(structures=STRUCTURES) -> dict:
    """The content of a `labels.json` file: label values -> structure records."""
    return {"labels": [s.to_json() for s in structures]}


def structures_from_labels_json(data: dict) -> list[Structure]:
    return [Structure.from_json(entry) for entry in data["labels"]]


# Context names of Slicer's bundled terminology lists (Terminologies module).
SEGMENTATION_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def _code(triple) -> str:
    return "^".join(triple) if triple else "^^"


def terminology_entry(structure: Structure) -> str:
    """Slicer's ``TerminologyEntry`` tag for a structure.

    Seven ``~``-separated fields, each code a ``scheme^value^meaning`` triple:
    segmentation context ~ category ~ type ~ type modifier (left/right) ~ anatomic
    context ~ anatomic region ~ region modifier -- the order of
    ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``.
    """
    return "~".join(
        (
            SEGMENTATION_CONTEXT,
            _code(structure.category),
            _code(structure.type),
            _code(structure.modifier),
            ANATOMIC_CONTEXT,
            "^^",
            "^^",
        )
    )
