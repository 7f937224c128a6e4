"""Slicer-side code shared by the ProstateSeg extension's modules.

`logic` needs only MRML and segcore (usable from the Python console and testable
with slicer-core); `dependencies` installs what segcore needs on first use;
`widgets` holds the Qt panel behaviour the modules share; `refinepoints` the Refine
section's include and exclude points (MRML only); `sampledata` lists the
digital phantom in Slicer's Sample Data module (made on first use); `selftest`
holds what the modules' self-tests share.
"""
