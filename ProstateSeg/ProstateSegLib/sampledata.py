"""The digital pelvis phantom as Slicer *Sample Data*: a CT and its reference organs.

Slicer's Sample Data module downloads a data set's files into Slicer's cache
folder and loads them. This data set is made rather than downloaded, so its
source gets a ``customDownloader``: the function Sample Data calls, with the
source, instead of downloading when the data set's button is clicked (the
supported hook for data that does not come from a URL). That function,
`loadPhantomSample`, makes the files in the cache folder on first use (later
clicks reuse them; they go with the rest of Slicer's cache), then loads the CT
as a volume and the reference labels as a segmentation whose segments carry each
organ's name, colour and terminology, as a ProstateSeg result does
(`segcore.mrml`).

`registerSampleData` is connected to ``slicer.app.startupCompleted`` by the
ProstateSeg module, as in Slicer's module template: nothing is computed when
Slicer starts or the module is imported, and registering never makes the files.
From the Python console: ``from ProstateSegLib import sampledata;
ct, reference = sampledata.loadPhantomSample()``.
"""

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CATEGORY = "ProstateSeg"
SAMPLE_NAME = "ProstateSegPhantom"
# The README tutorial's case (`prostateseg phantom demo/ -n 1 --seed 9000`): a 512 x 512 planning
# CT of the digital pelvis, not one the bundled models were trained on.
SEED = 9000
MATRIX = 512
CT_FILE = f"{SAMPLE_NAME}_CT.nrrd"
LABELS_FILE = f"{SAMPLE_NAME}_labels.nrrd"
CT_NODE_NAME = f"{SAMPLE_NAME}_CT"
REFERENCE_NODE_NAME = f"{SAMPLE_NAME}_reference"
THUMBNAIL = Path(__file__).resolve().parent.parent / "Resources" / "Icons" / f"{SAMPLE_NAME}.png"


def makeSampleFiles(folder, seed=SEED, matrix=MATRIX):
    """The phantom's CT and label map files in `folder`: (ct path, labels path).

    They are made (each written atomically) only when one of them is missing,
    and always together, so the two always belong to the same phantom.
    """
    from segcore.image import write_image
    from segcore.phantom import make_phantom

    folder = Path(folder)
    ctPath, labelsPath = folder / CT_FILE, folder / LABELS_FILE
    if not (ctPath.is_file() and labelsPath.is_file()):
        logger.info("Making the ProstateSeg sample phantom (seed %d) in %s", seed, folder)
        folder.mkdir(parents=True, exist_ok=True)
        case = make_phantom(seed, matrix=matrix)
        write_image(case.labels, labelsPath, overwrite=True)
        write_image(case.ct, ctPath, overwrite=True)
    return ctPath, labelsPath


def referenceStructures(labels):
    """The organs the extension segments (segcore.anatomy.TARGET_NAMES) that the label map holds, in
    that order; the phantom's other tissues (fat, muscle, bones, ...) are left out."""
    import numpy as np
    import SimpleITK as sitk

    from segcore import anatomy

    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    return [anatomy.structure(name) for name in anatomy.TARGET_NAMES if anatomy.structure(name).value in present]


def referenceSegmentation(volumeNode, labelsPath, name=REFERENCE_NODE_NAME, show3D=True):
    """A segmentation node beside `volumeNode` holding the reference organs of the label map file
    (which lies on the volume's grid), named and coloured as a ProstateSeg result."""
    from segcore import mrml
    from segcore.image import read_image

    labels = read_image(labelsPath, kind="labels")
    return mrml.labelmap_to_segmentation_node(labels, referenceStructures(labels), volumeNode, name=name,
                                              show_3d=show3D)


def cacheFolder():
    """Slicer's cache folder, where Sample Data keeps what it downloads (Application Settings: Cache)."""
    import slicer

    return Path(slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory())


def loadPhantomSample(source=None):
    """Make the phantom's files in Slicer's cache folder if needed, then load the CT (shown in the
    slice views) and its reference segmentation; returns [volume node, segmentation node].

    Sample Data calls this with the clicked data set's `source` (its ``customDownloader``).
    """
    import slicer

    with slicer.util.tryWithErrorDisplay("Making the ProstateSeg sample phantom failed.", waitCursor=True):
        ctPath, labelsPath = makeSampleFiles(cacheFolder())
        volume = slicer.util.loadVolume(str(ctPath), {"name": CT_NODE_NAME})
        segmentation = referenceSegmentation(volume, labelsPath)
    return [volume, segmentation]


def registerSampleData():
    """Add the phantom to the Sample Data module, in its own category (nothing is made yet)."""
    try:
        import SampleData
    except ImportError:  # the Sample Data module is disabled: nothing to register with
        logger.info("ProstateSeg: the Sample Data module is not available; its phantom is not listed")
        return
    logic = SampleData.SampleDataLogic
    if hasattr(logic, "registerCustomSampleDataCategory"):  # Slicer versions that name categories apart
        logic.registerCustomSampleDataCategory(CATEGORY, title="ProstateSeg")
    # A source must name its files and where they come from. Here they are the files
    # `loadPhantomSample` makes in the cache folder, which the button always calls; Sample Data's
    # own loading (SampleData.downloadSample) reuses them once made, for the CT.
    folder = cacheFolder()
    logic.registerCustomSampleDataSource(
        category=CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(THUMBNAIL),
        uris=[(folder / CT_FILE).as_uri(), (folder / LABELS_FILE).as_uri()],
        fileNames=[CT_FILE, LABELS_FILE],
        nodeNames=[CT_NODE_NAME, REFERENCE_NODE_NAME],
        loadFiles=[True, False],
        loadFileTypes=["VolumeFile", None],
        customDownloader=loadPhantomSample,
    )

