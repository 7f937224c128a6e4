"""Command lines of the tiny training runs the training tests start."""


def run_args(tmp_path, settings, options=()) -> list[str]:
    """A training script's arguments: the run folder ``tmp_path/run``, a cache of prepared cases shared by
    the tests (beside ``tmp_path``), each of ``settings`` as ``--set KEY=VALUE``, then ``options``."""
    args = ["--output", str(tmp_path / "run"), "--set", f"cache={tmp_path.parent / 'training-cache'}"]
    for item in settings:
        args += ["--set", item]
    return args + list(options)
