"""The Refine section's include and exclude points: two markups point lists; each placed point refines at once.

MRML only (no Qt), so that the Python tests run it on a real scene (slicer-core);
the panel (`widgets.SegmentationWidgetBase`) connects its buttons and place
widgets to it and gives it a `schedule` that runs the refinement once the
click's event has been handled (a timer), so the point is drawn first.

Every refinement uses all points placed so far (green include, red exclude) on
the segment's current content, as interactive segmentation does from click to
click. A point that refine refuses (outside the image, too far from the
segment, one too many) is removed again, with segcore's message; Undo takes the
latest refinement back and removes the points that made it.
"""

import logging

import slicer

from segcore.errors import SegcoreError

logger = logging.getLogger(__name__)

INCLUDE_NAME, EXCLUDE_NAME = "Refine include", "Refine exclude"
INCLUDE_COLOR, EXCLUDE_COLOR = (0.15, 0.8, 0.15), (0.9, 0.15, 0.15)


def _run_now(run):
    run()


class RefinePoints:
    """The include and exclude point lists of one panel, and what placing, undoing and clearing points does.

    `logic` is a SegmentationLogicBase (refineSegment, undoRefine); `target()` gives the (segmentation
    node, segment ID, volume node) to refine; `options()` extra keyword arguments for refineSegment (the
    device); `refined(result)` and `failed(message)` report; `schedule(run)` runs `run` (now, by default).
    """

    def __init__(self, logic, scene, target, options=dict, refined=None, failed=None, schedule=_run_now):
        self.logic = logic
        self.scene = scene
        self.target = target
        self.options = options
        self.refined = refined or (lambda result: None)
        self.failed = failed or (lambda message: None)
        self.schedule = schedule
        self._nodes = {}  # "include"/"exclude" -> markups fiducial node
        self._observations = []  # (node, observer tag)
        self._known = set()  # (node ID, control point ID) of every point already refined with
        self._steps = []  # the points of each refinement undo can take back, oldest first
        self._pending = False

    # ----------------------------------------------------------------- nodes

    def node(self, kind):
        """The "include" or "exclude" markups fiducial node, made (green or red) when not in the scene."""
        node = self._nodes.get(kind)
        if node is None or node.GetScene() is not self.scene:
            name, colour, label = ((INCLUDE_NAME, INCLUDE_COLOR, "+%d") if kind == "include"
                                   else (EXCLUDE_NAME, EXCLUDE_COLOR, "-%d"))
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", self.scene.GenerateUniqueName(name))
            node.CreateDefaultDisplayNodes()
            node.SetMarkupLabelFormat(label)
            display = node.GetDisplayNode()
            display.SetSelectedColor(*colour)
            display.SetColor(*colour)
            tag = node.AddObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointDefined)
            self._observations.append((node, tag))
            self._nodes[kind] = node
        return node

    def nodes(self):
        return self.node("include"), self.node("exclude")

    def forgetNodes(self):
        """Let go of the point lists (the scene is being closed; new ones are made when needed)."""
        self.cleanup()
        self._nodes.clear()
        self._known.clear()
        self._steps.clear()

    def cleanup(self):
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations.clear()

    @staticmethod
    def _definedPoints(node):
        """(control point ID, world RAS position) of the node's placed points, in order."""
        defined = slicer.vtkMRMLMarkupsNode.PositionDefined
        return [(node.GetNthControlPointID(i), tuple(node.GetNthControlPointPositionWorld(i)))
                for i in range(node.GetNumberOfControlPoints()) if node.GetNthControlPointPositionStatus(i) == defined]

    def points(self):
        """(include, exclude): the placed points' world RAS positions."""
        return tuple([position for _, position in self._definedPoints(self._nodes[kind])] if kind in self._nodes
                     else [] for kind in ("include", "exclude"))

    def pointCount(self):
        return sum(len(p) for p in self.points())

    def _remove(self, points):
        for node, pointId in points:
            index = node.GetNthControlPointIndexByID(pointId) if node.GetScene() is not None else -1
            if index >= 0:
                node.RemoveNthControlPoint(index)
            self._known.discard((node.GetID(), pointId))

    # -------------------------------------------------------------- refining

    def onPointDefined(self, caller=None, event=None):
        """A point was placed: refine with it (through `schedule`, once for points placed together)."""
        if not self._pending:
            self._pending = True
            self.schedule(self.refineNewPoints)

    def refineNewPoints(self):
        """Refine the target segment with every placed point, when some are new; returns the segcore Result,
        or None when nothing was refined (no new point, or refused: `failed` says why)."""
        self._pending = False
        new = [(node, pointId) for node in self._nodes.values() if node.GetScene() is not None
               for pointId, _ in self._definedPoints(node) if (node.GetID(), pointId) not in self._known]
        if not new:
            return None
        segmentationNode, segmentId, volumeNode = self.target()
        if segmentationNode is None or not segmentId:
            self._remove(new)
            self.failed("choose the segmentation and the segment to refine, then place the point again.")
            return None
        self._known.update((node.GetID(), pointId) for node, pointId in new)
        include, exclude = self.points()
        try:
            result = self.logic.refineSegment(segmentationNode, segmentId, volumeNode, include, exclude,
                                              **self.options())
        except SegcoreError as error:
            self._remove(new)
            self.failed(str(error))
            return None
        except Exception:
            self._remove(new)
            raise
        self._steps.append(new)
        self.refined(result)
        return result

    def undo(self):
        """Take the latest refinement back (logic.undoRefine) and remove the points placed for it; returns the
        segment's ID, or None when there was nothing to undo."""
        segmentId = self.logic.undoRefine()
        if segmentId is not None and self._steps:
            self._remove(self._steps.pop())
        return segmentId

    def clear(self):
        """Remove every include and exclude point (the segment stays as refined; Undo still takes refinements
        back)."""
        for node in self._nodes.values():
            if node.GetScene() is not None:
                node.RemoveAllControlPoints()
        self._known.clear()
        self._steps.clear()
