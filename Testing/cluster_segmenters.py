"""A segmenter whose worker process dies on chosen inputs, for the Dask batch tests (imported by the workers).

An input named ``*die_once*`` kills its worker the first time (a marker file beside it remembers), an input
named ``*die_always*`` every time; any other input is segmented normally.
"""

import os
import signal
from pathlib import Path

from segcore.prostate import ProstateSegmenter


class DyingSegmenter(ProstateSegmenter):
    def __call__(self, image_or_path, progress=None):
        path = Path(image_or_path)
        marker = path.with_name(path.name + ".died")
        if "die_always" in path.name or ("die_once" in path.name and not marker.exists()):
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(image_or_path, progress)
