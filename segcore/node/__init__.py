"""A DICOM node (`prostateseg serve`): CT series in by C-STORE, RT Structure Sets (and DICOM SEG) out.

- `segcore.node.config`: the node's settings, checked before it starts.
- `segcore.node.spool`: the durable spool on disk: received instances, jobs, results, status.
- `segcore.node.server`: the Storage SCP, the worker that segments complete series, the sender.

pynetdicom is imported by these modules only.
"""
