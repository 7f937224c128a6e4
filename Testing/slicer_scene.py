"""Slicer's MRML without the Slicer application, for tests and benchmarks (``slicer-core`` wheel).

Not shipped: the extension runs inside Slicer, where the application has already
set all of this up.
"""

import slicer


def standalone_scene():
    """A scene with the module logics the Slicer application sets up at start-up (colours,
    subject hierarchy, volumes, segmentations). Returns (scene, logics by module name, with
    the application logic as "Application"); ``slicer.mrmlScene`` is set to the scene."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    logics = {"Colors": slicer.vtkSlicerColorLogic(),
              "SubjectHierarchy": slicer.vtkSlicerSubjectHierarchyModuleLogic(),
              "Volumes": slicer.vtkSlicerVolumesLogic(),
              "Segmentations": slicer.vtkSlicerSegmentationsModuleLogic()}
    for name, logic in logics.items():
        logic.SetMRMLApplicationLogic(application)
        logic.SetMRMLScene(scene)
        application.SetModuleLogic(name, logic)
    logics["Application"] = application
    return scene, logics
