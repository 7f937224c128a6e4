"""Structure names in DICOM RT: TG-263 names out, a clinic's names in.

Out: an RT Structure Set names each ROI by AAPM TG-263's standard name
(Prostate, Bladder, Rectum, Femur_Head_L, Femur_Head_R, SeminalVes); a clinic
whose planning system expects its own names maps them with a small YAML (or JSON)
file, ``{prostate: Prostate_AI, Bladder: Blase}`` (keys: our names or TG-263's).

In: a synonym table (`structure_names.yaml`, extended by a user's file of the same
shape) maps ROI names to our labels. Names compare ignoring case and separators;
target volumes (GTV/CTV/ITV/PTV) and PRVs are never mapped to an organ.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from segcore import anatomy
from segcore.anatomy import Structure
from segcore.errors import InputNotFoundError, SegcoreError

# AAPM TG-263 standard names of the catalogue's structures (the organs we deliver first).
TG263_NAMES: dict[str, str] = {
    "prostate": "Prostate",
    "bladder": "Bladder",
    "rectum": "Rectum",
    "femoral_head_left": "Femur_Head_L",
    "femoral_head_right": "Femur_Head_R",
    "seminal_vesicles": "SeminalVes",
    "femur_left": "Femur_L",
    "femur_right": "Femur_R",
    "sacrum": "Sacrum",
    "bowel": "Bowel",
    "skin": "Skin",
}

SYNONYMS_FILE = Path(__file__).with_name("structure_names.yaml")
ROI_NAME_MAX = 64  # ROI Name is a DICOM LO: at most 64 characters

# Target volumes and planning risk volumes: a "CTV_Prostate" is the gland plus a margin, not the gland.
_TARGET_VOLUME = re.compile(r"^(z_?)?(gtv|ctv|itv|ptv|prv)|(^|[^a-z])(gtv|ctv|itv|ptv|prv)([^a-z]|\d|$)", re.IGNORECASE)


def tg263_name(structure: Structure) -> str:
    return TG263_NAMES.get(structure.name, structure.name)


def normalised(name: str) -> str:
    """A name as compared: lower case without spaces, '_', '-' or '.'."""
    return re.sub(r"[\s_\-.]+", "", str(name)).lower()


def is_target_volume(name: str) -> bool:
    """A GTV, CTV, ITV, PTV or PRV (by its name): never an organ."""
    return bool(_TARGET_VOLUME.search(str(name)))


def read_mapping_file(path, what: str) -> dict:
    """A YAML or JSON file holding one mapping; a clear error when it is missing or of another shape."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise SegcoreError(f"{path}: not a readable YAML/JSON {what} file ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SegcoreError(f"{path}: a {what} file holds one mapping (name: value per line), "
                           f"not a {type(data).__name__}")
    return data


def roi_names(structures: Sequence[Structure], mapping: Mapping[str, str] | None = None) -> dict[int, str]:
    """The ROI name of each structure (by label value): TG-263, or the clinic's own from `mapping`, whose
    keys are catalogue or TG-263 names (one clinic-wide file may name organs a model does not write)."""
    by_key = {}
    for s in anatomy.STRUCTURES:
        by_key[normalised(s.name)] = s
        by_key[normalised(tg263_name(s))] = s
    names = {s.value: tg263_name(s) for s in structures}
    for key, local in (mapping or {}).items():
        structure = by_key.get(normalised(key))
        if structure is None:
            known = ", ".join(f"{s} ({tg263_name(anatomy.BY_NAME[s])})" for s in anatomy.TARGET_NAMES)
            raise SegcoreError(f"the name map names {key!r}, which is not a structure we write ({known})")
        local = str(local).strip()
        if not local or len(local) > ROI_NAME_MAX or "\\" in local:
            raise SegcoreError(f"the ROI name {local!r} for {structure.name} must be 1-{ROI_NAME_MAX} "
                               "characters without '\\'")
        if structure.value in names:
            names[structure.value] = local
    if len({normalised(n) for n in names.values()}) != len(names):
        raise SegcoreError(f"two structures would get the same ROI name: {sorted(names.values())}")
    return names


def load_roi_names(path, structures: Sequence[Structure]) -> dict[int, str]:
    """`roi_names` from a name-map file (the `--names FILE` of the CLI)."""
    mapping = read_mapping_file(path, "name map")
    return roi_names(structures, {str(k): str(v) for k, v in mapping.items()})


@dataclass(frozen=True)
class NameMatch:
    """What an ROI name maps to: a structure, or None and why not."""

    structure: Structure | None
    reason: str = ""


class SynonymTable:
    """ROI names -> catalogue structures, from `structure_names.yaml` plus a user's additions."""

    def __init__(self, extra_file=None):
        self.by_name: dict[str, Structure] = {}
        self._add(read_mapping_file(SYNONYMS_FILE, "synonym table"), SYNONYMS_FILE)
        if extra_file is not None:
            self._add(read_mapping_file(extra_file, "synonym table"), Path(extra_file))

    def _add(self, data: dict, source: Path) -> None:
        for key, names in data.items():
            structure = anatomy.BY_NAME.get(str(key))
            if structure is None:
                raise SegcoreError(f"{source}: {key!r} is not a structure name; use one of "
                                   f"{', '.join(anatomy.TARGET_NAMES)}")
            if isinstance(names, str):
                names = [names]
            if not isinstance(names, list):
                raise SegcoreError(f"{source}: {key} must list ROI names, e.g. {key}: [Name1, Name2]")
            for name in [structure.name, tg263_name(structure), *map(str, names)]:
                self.by_name[normalised(name)] = structure  # a user's later entry wins

    def match(self, roi_name: str) -> NameMatch:
        if is_target_volume(roi_name):
            return NameMatch(None, "a target or planning volume (GTV/CTV/ITV/PTV/PRV), not an organ")
        structure = self.by_name.get(normalised(roi_name))
        return NameMatch(structure, "" if structure else "not in the synonym table")
