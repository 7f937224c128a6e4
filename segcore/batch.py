"""Segmenting many files into an output folder: what `prostateseg segment` and Slicer's console API share.

Each input gets ``<stem>.<format>`` files and a ``<stem>.json`` report. A bad
input (missing, unreadable, not CT) is recorded and the batch goes on; only
`Cancelled` stops it. Outputs are written atomically, and existing ones are
refused unless `overwrite`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from segcore.anatomy import Structure
from segcore.errors import SegcoreError
from segcore.result import Result

# progress(done_inputs + fraction_of_current, total_inputs, input_name, message)
BatchProgress = Callable[[float, int, str, str], None]


@dataclass
class BatchItem:
    """What happened to one input: its outputs and result, or why it failed."""

    input: Path
    outputs: list[Path] = field(default_factory=list)
    result: Result | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> str:
        """One line (plus notes) for a log: volumes and confidence, or the error."""
        if not self.ok:
            return f"{self.input}: error: {self.error}"
        result = self.result
        found = ", ".join(f"{s.name} {s.volume_cc:.1f} cc" for s in result.segments) or "nothing found"
        line = f"{self.input}: {found}; confidence {result.confidence:.2f} ({result.timings.get('total', 0):.1f} s)"
        return line + "".join(f"\n  note: {message}" for message in result.messages)


def expand_inputs(paths) -> list[tuple[Path, str | None]]:
    """(input, problem) pairs: files as given; a folder holding DICOM files is one input, any other folder
    gives the images and DICOM series folders in it. A missing path is kept with its problem, so that a
    batch reports it and goes on."""
    from segcore.image import is_dicom_file, is_volume_file

    def holds_dicom(folder: Path) -> bool:
        return any(is_dicom_file(p) for p in sorted(folder.iterdir())[:50] if p.is_file())

    inputs = []
    for path in map(Path, paths):
        if not path.exists():
            inputs.append((path, f"{path} does not exist"))
        elif path.is_dir() and not holds_dicom(path):
            found = [p for p in sorted(path.iterdir()) if (p.is_file() and is_volume_file(p))
                     or (p.is_dir() and holds_dicom(p))]
            if not found:
                inputs.append((path, "the folder holds no DICOM series and no image files (.nii.gz, .nrrd, .mha...)"))
            inputs += [(p, None) for p in found]
        else:
            inputs.append((path, None))
    return inputs


def output_stem(path: Path) -> str:
    """``case_ct.nii.gz`` -> ``case_ct_seg``; a DICOM folder -> ``<folder>_seg``."""
    name = path.resolve().name
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}_seg"


def segment_files(segment: Callable[..., Result], structures: Sequence[Structure], paths, output_dir,
                  formats: Sequence[str] = ("seg.nrrd",), *, overwrite: bool = False,
                  progress: BatchProgress | None = None,
                  on_item: Callable[[BatchItem], None] | None = None) -> list[BatchItem]:
    """Run ``segment(path, progress)`` on every input and write its outputs into `output_dir`.

    `structures` are the labels written to every output (also when nothing was
    found, so each input gets its files). `on_item` sees each finished item.
    """
    from segcore.export import export_labelmap
    from segcore.files import atomic_output

    inputs = expand_inputs(paths)
    stems = [output_stem(p) for p, _ in inputs]
    clashes = sorted({s for (_, problem), s in zip(inputs, stems) if not problem and stems.count(s) > 1})
    if clashes:
        raise SegcoreError(f"several inputs would write the same output names ({', '.join(clashes)}); "
                           "segment them into different output folders.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda done, total, name, message: None)
    items = []
    for n, ((path, problem), stem) in enumerate(zip(inputs, stems)):
        item = BatchItem(path)
        try:
            if problem:
                raise SegcoreError(problem)
            report_path = output_dir / f"{stem}.json"
            if report_path.exists() and not overwrite:
                raise SegcoreError(f"{report_path} exists; use --overwrite to replace the outputs")
            item.result = segment(path, lambda fraction, message, n=n, name=path.name:
                                  report(n + fraction, len(inputs), name, message))
            item.outputs = export_labelmap(item.result.labelmap, list(structures), output_dir, stem, formats,
                                           overwrite=overwrite)
            with atomic_output(report_path, overwrite=overwrite) as tmp:
                tmp.write_text(json.dumps({"input": str(path), **item.result.to_json(),
                                           "outputs": [p.name for p in item.outputs]}, indent=1))
            item.outputs.append(report_path)
        except SegcoreError as error:
            item.error = str(error)
        except (OSError, RuntimeError, MemoryError, ValueError) as error:
            # Disk full, out of memory, a library failing on odd data: this input fails, the batch goes on.
            item.error = f"could not be processed: {type(error).__name__}: {error}"
        items.append(item)
        report(n + 1, len(inputs), path.name, "done" if item.ok else "failed")
        if on_item is not None:
            on_item(item)
    return items
