"""DICOM radiotherapy objects: RT Structure Sets and DICOM SEG out, RT Structure Sets in.

- `segcore.dicom.ct`: the CT series behind an image (each voxel slice's DICOM
  instance, found by geometry) and a writer of CT series (phantoms as DICOM).
- `segcore.dicom.names`: structure names, TG-263 by default, mapped to a clinic's own names
  and back (the synonym table of the importer).
- `segcore.dicom.rtstruct`: label map -> RT Structure Set (marching squares in each CT slice
  plane) and RT Structure Set -> label map (rasterised on the CT grid).
- `segcore.dicom.seg`: label map -> DICOM SEG (highdicom).
- `segcore.dicom.importer`: a folder tree of a clinic's CTs and RT Structure Sets -> training cases.

pydicom, highdicom and scikit-image are imported by these modules only, so the rest
of segcore loads without them.
"""
