"""Segmenting many files into an output folder: what `prostateseg segment` and Slicer's console API share.

Each input gets ``<stem>.<format>`` files and a ``<stem>.json`` report: its
result set. A bad input (missing, unreadable, not CT) is recorded and the batch
goes on; `Cancelled` and a failure to write (full disk, read-only folder) stop
it. Formats, the output folder and existing outputs are checked before anything
is segmented (`plan_batch`); existing outputs are refused unless `overwrite`.
A result set is one transaction: staged in a hidden folder inside the output
folder, then swapped in as a whole with the report last, the previous set's
other files removed, and SIGINT/SIGTERM held back during the swap. So an
interrupted batch leaves each input's set complete-old, complete-new or absent,
and the next run clears what an interrupted one left (`segcore.files.StagedSet`).

``OUTDIR/manifest.jsonl`` gets one JSON line per input as its result arrives
(`Manifest`): status, outputs, error, model and version, timings, where it ran.
With `resume`, inputs whose last line says done by the same model version, with
every output still there, are skipped; the others are done again, replacing
their earlier results. The same batch runs on a Dask cluster (`segcore.cluster`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from segcore import anatomy
from segcore.anatomy import Structure
from segcore.errors import OutputExistsError, SegcoreError
from segcore.files import exists_message
from segcore.result import Result

# progress(done_inputs + fraction_of_current, total_inputs, input_name, message)
BatchProgress = Callable[[float, int, str, str], None]
ModelId = tuple[str, str]  # a model package's name and version
MANIFEST = "manifest.jsonl"


def input_key(path) -> str:
    """How the manifest names an input: its absolute path (symbolic links kept as given)."""
    return os.path.abspath(path)


class Manifest:
    """``manifest.jsonl`` in an output folder: one JSON line per input as its result arrives, appended in
    one write each (a torn last line after a crash is skipped when read). An input's last line counts."""

    def __init__(self, folder):
        self.path = Path(folder) / MANIFEST

    def last_lines(self) -> dict[str, dict]:
        """Each input's last line, by `input_key`."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        lines = {}
        for row in text.splitlines():
            try:
                line = json.loads(row)
            except ValueError:
                continue
            if isinstance(line, dict) and isinstance(line.get("input"), str):
                lines[line["input"]] = line
        return lines

    def finished(self, model: ModelId) -> set[str]:
        """Inputs done by this model version whose outputs are all still there."""
        return {key for key, line in self.last_lines().items()
                if line.get("status") == "done" and (line.get("model"), line.get("model_version")) == tuple(model)
                and all(isinstance(n, str) and Path(n).name == n and (self.path.parent / n).is_file()
                        for n in line.get("outputs") or [None])}

    def record(self, item: BatchItem, model: ModelId) -> None:
        from segcore.files import append_line

        with signals_deferred():
            append_line(self.path, json.dumps(item.manifest_line(model), allow_nan=False))


@dataclass
class BatchItem:
    """What happened to one input: its outputs and result, or why it failed."""

    input: Path
    outputs: list[Path] = field(default_factory=list)
    result: Result | None = None
    error: str | None = None
    attempts: int = 1
    where: dict = field(default_factory=dict)      # host and process (and Dask worker) that did it
    seconds: dict = field(default_factory=dict)    # beyond the pipeline's own timings: model_load, write

    @property
    def ok(self) -> bool:
        return self.error is None

    def manifest_line(self, model: ModelId) -> dict:
        """Its line in manifest.jsonl."""
        import datetime

        timings = {**(self.result.timings if self.result else {}), **self.seconds}
        return {"input": input_key(self.input), "status": "done" if self.ok else "failed",
                "outputs": [p.name for p in self.outputs], "error": self.error,
                "model": model[0], "model_version": model[1],
                "timings_s": {k: round(v, 3) for k, v in timings.items()}, **self.where,
                "attempts": self.attempts,
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def summary(self) -> str:
        """One line (plus notes) for a log: volumes and confidence, or the error."""
        if not self.ok:
            return f"{self.input}: error: {self.error}"
        result = self.result
        if result is None:  # found complete on disk (segcore.cluster): the report has the details
            return f"{self.input}: done ({', '.join(p.name for p in self.outputs)})"
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


@dataclass
class BatchPlan:
    """What a batch will do, checked before any model is loaded: inputs (with their problems), output
    names, formats, and the output folder."""

    inputs: list[tuple[Path, str | None]]
    stems: list[str]
    formats: list[str]
    output_dir: Path
    overwrite: bool
    roi_names: dict[str, str] | None = None  # structure (ours or TG-263) -> the clinic's ROI name
    skipped: list[Path] = field(default_factory=list)  # done before by the same model (resume)

    def previous_names(self, stem: str) -> list[str]:
        """The files of an earlier result set of `stem`: its report and what the report lists. Only these
        are removed when a new set replaces it; a file we did not write is never touched, even when it is
        named like one of ours (a user's own `<case>_seg.nii.gz`)."""
        outputs = self.report(stem).get("outputs")
        listed = [n for n in outputs if isinstance(n, str) and n.startswith(stem) and Path(n).name == n] \
            if isinstance(outputs, list) else []
        return list(dict.fromkeys([*listed, f"{stem}.json"]))

    def report(self, stem: str) -> dict:
        """The report ``<stem>.json`` in the output folder, as written by `write_case` ({} when there is
        none or it cannot be read)."""
        try:
            facts = json.loads((self.output_dir / f"{stem}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return facts if isinstance(facts, dict) else {}

    def reported_input(self, stem: str) -> str | None:
        """The input (by `input_key`) that the report of `stem` says it came from."""
        given = self.report(stem).get("input")
        return input_key(given) if isinstance(given, str) else None

    def planned_names(self, stem: str, structure_names: Sequence[str] = anatomy.TARGET_NAMES) -> list[str]:
        """The files the new set of `stem` may write in the asked formats (surfaces: one per structure)."""
        from segcore.export import SURFACE_FORMATS, output_name

        return [output_name(stem, fmt, name)
                for fmt in self.formats for name in (structure_names if fmt in SURFACE_FORMATS else [None])]

    def existing(self, known: frozenset[str] = frozenset()) -> list[Path]:
        """Outputs in the way of this batch: an earlier set of one of its inputs, or a file of a name it
        would write; inputs in `known` (by `input_key`) are left out."""
        return [self.output_dir / name for (path, problem), stem in zip(self.inputs, self.stems)
                if not problem and input_key(path) not in known
                for name in dict.fromkeys([*self.previous_names(stem), *self.planned_names(stem)])
                if (self.output_dir / name).exists()]

    def skip_finished(self, model: ModelId) -> None:
        """Resume: leave out the inputs the manifest says this model version has done; refuse (without
        `overwrite`) outputs in the way of an input the manifest does not know, since then we cannot tell
        they are ours; the earlier results of the inputs it does know are replaced."""
        manifest = Manifest(self.output_dir)
        finished = manifest.finished(model)
        # Ours too: a set whose report names this input (written while a stopped batch was ending).
        known = frozenset([*manifest.last_lines(), *(input_key(path) for (path, _), stem in zip(self.inputs, self.stems)
                                                      if self.reported_input(stem) == input_key(path))])
        keep = [n for n, (path, _) in enumerate(self.inputs) if input_key(path) not in finished]
        self.skipped = [path for path, _ in self.inputs if input_key(path) in finished]
        self.inputs, self.stems = [self.inputs[n] for n in keep], [self.stems[n] for n in keep]
        if not self.overwrite:
            existing = self.existing(known)
            if existing:
                raise OutputExistsError(exists_message(existing))
        self.overwrite = True


def plan_batch(paths, output_dir, formats: Sequence[str] = ("seg.nrrd",), *, overwrite: bool = False,
               roi_names: dict[str, str] | None = None, resume: ModelId | None = None) -> BatchPlan:
    """Check a batch before the work: formats, the output folder, clashing names, inputs that cannot give
    the DICOM formats, the ROI name map and, without `overwrite`, existing outputs. With `resume` (the
    model's name and version), inputs that model version has done are skipped (`BatchPlan.skip_finished`).
    Creates nothing."""
    from segcore.export import dicom_input_problem, normalise_formats
    from segcore.files import check_output_folder

    formats = normalise_formats(formats)
    output_dir = check_output_folder(output_dir)
    if roi_names:
        from segcore.dicom.names import roi_names as check_names

        check_names(anatomy.STRUCTURES, roi_names)
    inputs = [(path, problem or dicom_input_problem(path, formats)) for path, problem in expand_inputs(paths)]
    stems = [output_stem(p) for p, _ in inputs]
    clashes = sorted({s for (_, problem), s in zip(inputs, stems) if not problem and stems.count(s) > 1})
    if clashes:
        raise SegcoreError(f"several inputs would write the same output names ({', '.join(clashes)}); "
                           "segment them into different output folders.")
    plan = BatchPlan(inputs, stems, formats, output_dir, overwrite, roi_names)
    if resume:
        plan.skip_finished(resume)
    elif not overwrite:
        existing = plan.existing()
        if existing:
            raise OutputExistsError(exists_message(existing))
    return plan


def write_case(plan: BatchPlan, stem: str, path: Path, result: Result, structures) -> list[Path]:
    """Write one input's result set (label maps, meshes, the report last) as one transaction."""
    from segcore.export import export_labelmap
    from segcore.files import StagedSet, write_text

    report = f"{stem}.json"
    previous = plan.previous_names(stem)
    staged = None
    try:
        with signals_deferred():  # made and named at once, so that `finally` always knows what to remove
            staged = StagedSet(plan.output_dir, report, previous, overwrite=plan.overwrite)
        written = export_labelmap(result.labelmap, list(structures), staged.staging, stem, plan.formats,
                                  source=path, roi_names=plan.roi_names, algorithm=_algorithm(result))
        text = json.dumps({"input": str(path), **result.to_json(), "outputs": [p.name for p in written]},
                          indent=1, allow_nan=False)
        write_text(staged.staging / report, text + "\n")
        # The swap and the removal of what is left of the staging folder under one deferral: a signal
        # delivered between two deferrals would skip the clean-up and leave the staging folder behind.
        with signals_deferred():
            try:
                return staged.commit()
            finally:
                staged.discard()
    finally:
        if staged is not None:
            with signals_deferred():  # an interrupted clean-up would leave half the staging folder
                staged.discard()


def _algorithm(result: Result):
    from segcore.dicom.ct import Algorithm

    return Algorithm(result.model, result.model_version)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM (delivered right after) while a result set is being swapped in, so
    that Ctrl-C or a kill never leaves a half-replaced set. Only the main thread can do this."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    numbers = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    # A handler set outside Python (getsignal gives None) could not be put back: leave that signal alone.
    previous = {n: signal.signal(n, lambda number, frame: received.append(number)) for n in numbers
                if signal.getsignal(n) is not None}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)


def _write_failure(error: Exception, plan: BatchPlan, path: Path) -> Exception | None:
    """The batch-stopping error for a failure to write (full disk, read-only folder), else None."""
    from segcore.errors import OutputWriteError
    from segcore.files import low_on_space, write_error

    cause = error if isinstance(error, OSError) else error.__cause__
    if isinstance(cause, OSError) and isinstance(error, (OSError, OutputWriteError)):
        reason = write_error(plan.output_dir, cause)
    elif isinstance(error, OutputWriteError):
        reason = error
    elif isinstance(error, RuntimeError) and low_on_space(plan.output_dir):  # a library's vague write error
        reason = write_error(plan.output_dir, OSError(28, "No space left on device"))
    else:
        return None
    return OutputWriteError(f"{path.name}: {reason}; the batch stopped")


def segment_files(segment: Callable[..., Result], structures: Sequence[Structure], paths, output_dir,
                  formats: Sequence[str] = ("seg.nrrd",), *, overwrite: bool = False,
                  roi_names: dict[str, str] | None = None, progress: BatchProgress | None = None,
                  on_item: Callable[[BatchItem], None] | None = None, resume: bool = False,
                  model: ModelId | None = None) -> list[BatchItem]:
    """Run ``segment(path, progress)`` on every input and write its outputs into `output_dir`.

    `structures` are the labels written to every output (also when nothing was
    found, so each input gets its files). `roi_names` maps structures to the
    clinic's ROI names in RT Structure Sets. `on_item` sees each finished item.
    Everything that can be checked before segmenting is (`plan_batch`); each
    input's outputs replace its previous ones as a whole; a failure to write
    (full disk, read-only folder) stops the batch with an OutputWriteError.
    `model` (name, version; by default the segmenter's package) goes into each
    manifest line; `resume` skips what that model version has done.
    """
    model = model or model_of(segment)
    plan = plan_batch(paths, output_dir, formats, overwrite=overwrite, roi_names=roi_names,
                      resume=resume_model(resume, model))
    created = open_output_folder(plan)
    report = progress or (lambda done, total, name, message: None)
    items: list[BatchItem] = []
    try:
        for n, ((path, problem), stem) in enumerate(zip(plan.inputs, plan.stems)):
            item = segment_one(segment, structures, plan, path, problem, stem,
                                lambda fraction, message, n=n, name=path.name:
                                report(n + fraction, len(plan.inputs), name, message))
            item.where = where_it_ran()
            record(plan, item, model)
            items.append(item)
            report(n + 1, len(plan.inputs), path.name, "done" if item.ok else "failed")
            if on_item is not None:
                on_item(item)
    finally:
        close_output_folder(plan, created, items)
    return items


def close_output_folder(plan: BatchPlan, created: list[Path], items: list[BatchItem]) -> None:
    """A folder this batch made and wrote no result into is removed again, with its manifest."""
    from segcore.files import remove_empty_folders

    if created and not any(item.outputs for item in items):
        Manifest(plan.output_dir).path.unlink(missing_ok=True)
    remove_empty_folders(created)


def model_of(segment) -> ModelId | None:
    """A segmenter's model package name and version (None for a plain function)."""
    package = getattr(segment, "package", None)
    return (package.name, package.version) if package is not None else None


def resume_model(resume: bool, model: ModelId | None) -> ModelId | None:
    if resume and model is None:
        raise SegcoreError("resuming needs the model's name and version, to tell which results are its own")
    return model if resume else None


def open_output_folder(plan: BatchPlan) -> list[Path]:
    """Make the output folder (unless no input can give outputs) and clear what an interrupted run left in
    it; the folders made, for `remove_empty_folders`."""
    from segcore.files import make_folder

    created = [] if all(problem for _, problem in plan.inputs) else make_folder(plan.output_dir)
    if plan.output_dir.is_dir():
        clear_leftovers(plan)
    return created


def clear_leftovers(plan: BatchPlan) -> None:
    """Finish or remove staging folders of stopped runs and remove their temporary files."""
    from segcore.export import possible_names
    from segcore.files import recover_staging, remove_temporary_leftovers

    recover_staging(plan.output_dir)
    # Only our own `.tmp-<random>-NAME` files are matched, so every name we could ever write is safe here.
    remove_temporary_leftovers(plan.output_dir, [
        name for stem in plan.stems
        for name in [*possible_names(stem, [s.name for s in anatomy.STRUCTURES]), *plan.previous_names(stem)]])


def record(plan: BatchPlan, item: BatchItem, model: ModelId | None) -> None:
    """The item's manifest line (when the model is known and the output folder exists)."""
    if model is not None and plan.output_dir.is_dir():
        Manifest(plan.output_dir).record(item, model)


def where_it_ran() -> dict:
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid()}


def segment_one(segment, structures, plan: BatchPlan, path: Path, problem: str | None, stem: str,
                progress) -> BatchItem:
    """Segment one input and write its result set; its item (a bad input gives an error, not an
    exception). A failure to write stops the batch: OutputWriteError."""
    item = BatchItem(path)
    try:
        if problem:
            raise SegcoreError(problem)
        if not plan.overwrite and (plan.output_dir / f"{stem}.json").exists():  # appeared meanwhile
            raise OutputExistsError(exists_message([plan.output_dir / f"{stem}.json"]))
        item.result = segment(path, progress)
    except SegcoreError as error:
        item.error = str(error)
        return item
    except (OSError, RuntimeError, MemoryError, ValueError) as error:
        # Out of memory, a library failing on odd data: this input fails, the batch goes on.
        item.error = f"could not be processed: {type(error).__name__}: {error}"
        return item
    try:
        tick = time.perf_counter()
        item.outputs = write_case(plan, stem, path, item.result, structures)
        item.seconds["write"] = time.perf_counter() - tick
    except (SegcoreError, OSError, RuntimeError, MemoryError, ValueError) as error:
        stop = _write_failure(error, plan, path)
        if stop is not None:
            raise stop from error
        item.error = str(error) if isinstance(error, SegcoreError) else \
            f"could not be written: {type(error).__name__}: {error}"
    return item
