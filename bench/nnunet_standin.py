"""Stand-in for a TotalSegmentator-style tool: nnU-Net v2's own inference on one CT, on CPU.

What it measures: the wall time and peak resident memory that nnU-Net v2's inference code
(``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor`` and its preprocessor/exporter) spends on
one CT, from reading the file to having the label array in the CT's own grid:

    read (SimpleITK) -> crop to non-zero -> CT normalisation -> resample to 3 mm
    -> sliding window (tile step 0.5, Gaussian weighting, mirroring off) -> resample logits back -> argmax

The network is the "3d_fullres" PlainConvUNet that nnU-Net's default planner (ExperimentPlanner) builds
for an isotropic 3 mm spacing and the given patch size: for 128^3 that is 6 stages with 32, 64, 128, 256,
320, 320 features, 3x3x3 convolutions, strides 1, 2, 2, 2, 2, 2, two convolutions per stage, instance
norm and leaky ReLU; one input channel (CT) and 2 output classes.

Why it is only a stand-in: the weights are RANDOM and no trained model is downloaded. The time and memory
depend on the network's size, the patch size and the number of sliding-window tiles, not on the values
of the weights, so the numbers are those a trained model of this shape would cost; the segmentation
itself is meaningless. A real TotalSegmentator run may differ (its own plans, several models, mirroring,
its own resampling before nnU-Net); this one single 3 mm model is the common core.

The plans, the "3d_fullres" configuration and the dataset.json are built here as dictionaries and handed
to the predictor with ``manual_initialization``; nothing is read from a model folder and nothing is
downloaded. The CT intensity statistics used by nnU-Net's CT normalisation are plausible made-up values
(they do not change the cost). Mirroring (test-time augmentation, nnU-Net's own default) is off, to
match a single pass of our pipeline; ``--mirror`` turns it on (8 network passes per tile in 3-D).

The per-case steps are those ``nnUNetPredictor.predict_from_files_sequential`` runs when asked to return
the segmentation instead of writing it (``preprocessor.run_case`` ->
``predict_logits_from_preprocessed_data`` -> ``convert_predicted_logits_to_segmentation_with_correct_shape``),
called one by one here so that each is timed and the thread count is respected (nnU-Net otherwise sets
torch to 8 threads for the export step). No worker processes are started, so the process's own peak
memory is the whole cost.

Peak memory: the kernel's high-water mark of this process's resident set (VmHWM in /proc/self/status),
reset through /proc/self/clear_refs just before the run, so it covers exactly the run. Where that is not
available (not Linux), a psutil sampling thread (every 5 ms) is used if psutil is installed, otherwise
resource.getrusage's ru_maxrss (the peak over the whole process life). The result says which.

nnunetv2 is an optional dependency that only this benchmark needs:

    python bench/nnunet_standin.py CT_PATH [--threads N] [--patch 128 128 128] [--mirror]

prints the result as JSON on stdout; nnU-Net's own messages go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import sys
import threading
import time

NNUNET_MISSING = "nnunetv2 is not installed: pip install nnunetv2 (optional; only this benchmark needs it)"
SPACING_MM = (3.0, 3.0, 3.0)
TILE_STEP = 0.5
NUM_CLASSES = 2
CONFIGURATION = "3d_fullres"


class NnunetNotInstalled(ImportError):
    """nnunetv2 (the optional dependency of this benchmark) cannot be imported."""


# --------------------------------------------------------------------------- peak resident memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_mb() -> float:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)  # bytes on macOS, kB on Linux


class PeakRss:
    """Peak resident memory of this process between start() and stop(), in MB."""

    def __init__(self) -> None:
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_bytes = 0

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets the peak-RSS counter (VmHWM) to the current RSS
            if _status_kb("VmHWM") is not None:
                self.method = "VmHWM (/proc/self/status), reset via /proc/self/clear_refs at the start"
                return
        except OSError:
            pass
        if importlib.util.find_spec("psutil") is not None:
            import psutil

            proc = psutil.Process()
            self.method = "psutil sampling thread, every 5 ms"
            self._peak_bytes = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self._peak_bytes = max(self._peak_bytes, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
            return
        self.method = "resource.getrusage ru_maxrss (peak over the whole process life)"

    def stop(self) -> float:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return self._peak_bytes / 2**20
        if self.method.startswith("VmHWM"):
            return (_status_kb("VmHWM") or 0) / 1024.0
        return _ru_maxrss_mb()


# --------------------------------------------------------------------------- plans built in code


def _planned_unet(patch_size) -> tuple[list[int], dict]:
    """Patch size and PlainConvUNet arguments as nnU-Net's default planner sets them for 3 mm spacing."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from dynamic_network_architectures.building_blocks.helper import (
        convert_dim_to_conv_op,
        get_matching_instancenorm,
    )
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    # Same call and constants as ExperimentPlanner: feature maps no smaller than 4 voxels at the bottom.
    _, strides, kernels, patch, _ = get_pool_and_conv_props(list(SPACING_MM), list(patch_size), 4, 999999)
    n_stages = len(strides)
    conv = convert_dim_to_conv_op(3)
    norm = get_matching_instancenorm(conv)
    architecture = {
        "network_class_name": f"{PlainConvUNet.__module__}.{PlainConvUNet.__name__}",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": [min(320, 32 * 2**i) for i in range(n_stages)],
            "conv_op": f"{conv.__module__}.{conv.__name__}",
            "kernel_sizes": [[int(k) for k in ks] for ks in kernels],
            "strides": [[int(s) for s in st] for st in strides],
            "n_conv_per_stage": [2] * n_stages,
            "n_conv_per_stage_decoder": [2] * (n_stages - 1),
            "conv_bias": True,
            "norm_op": f"{norm.__module__}.{norm.__name__}",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return [int(p) for p in patch], architecture


def _plans_and_dataset(patch_size) -> tuple[dict, dict]:
    patch, architecture = _planned_unet(patch_size)
    resample_data = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    resample_seg = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    resample_prob = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": f"nnUNetPlans_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": [128, 128, 128],
        "spacing": list(SPACING_MM),
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resample_data,
        "resampling_fn_seg_kwargs": resample_seg,
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": resample_prob,
        "architecture": architecture,
        "batch_dice": False,
    }
    plans = {
        "dataset_name": "Dataset999_StandIn",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(SPACING_MM),
        "original_median_shape_after_transp": [128, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],  # what the planner picks for an isotropic target spacing
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            # plausible CT foreground statistics (HU); they do not affect the cost
            "0": {
                "max": 3071.0,
                "mean": 90.0,
                "median": 60.0,
                "min": -1024.0,
                "percentile_00_5": -980.0,
                "percentile_99_5": 1500.0,
                "std": 250.0,
            },
        },
    }
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "target": 1},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }
    return plans, dataset_json


# --------------------------------------------------------------------------- the run


def _import_nnunet():
    if importlib.util.find_spec("nnunetv2") is None:
        raise NnunetNotInstalled(NNUNET_MISSING)
    with contextlib.redirect_stdout(sys.stderr):  # nnunetv2 may print path warnings on import
        import nnunetv2.inference.predict_from_raw_data  # noqa: F401
    from importlib import metadata

    return metadata.version("nnunetv2")


@contextlib.contextmanager
def _thread_limit(threads: int | None):
    """Limit torch, SimpleITK and the numpy/scipy thread pools to `threads` for the block."""
    import SimpleITK as sitk
    import torch

    old_torch = torch.get_num_threads()
    old_sitk = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    with contextlib.ExitStack() as stack:
        if threads is not None:
            torch.set_num_threads(threads)
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            if importlib.util.find_spec("threadpoolctl") is not None:
                from threadpoolctl import threadpool_limits

                stack.enter_context(threadpool_limits(limits=threads))
        try:
            yield torch.get_num_threads()
        finally:
            torch.set_num_threads(old_torch)
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old_sitk)


def run_nnunet_standin(
    ct_path: str, threads: int | None = None, patch_size=(128, 128, 128), *, mirroring: bool = False
) -> dict:
    """Run nnU-Net v2's CPU inference with a randomly initialised default 3d_fullres U-Net on one CT.

    Returns a JSON-ready dict; "seconds" is the wall time from reading the file to having the label
    array in the CT's grid, "peak_rss_mb" the peak resident memory of this process during that time
    ("peak_rss_method" says how it was measured). Raises NnunetNotInstalled if nnunetv2 is missing.
    """
    if threads is not None and threads < 1:
        raise ValueError("threads must be >= 1")
    if not os.path.exists(ct_path):
        raise FileNotFoundError(ct_path)
    version = _import_nnunet()

    import numpy as np
    import torch
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    out = sys.stderr  # nnU-Net prints progress messages; keep stdout for our JSON
    with _thread_limit(threads) as torch_threads, contextlib.redirect_stdout(out):
        t_setup = time.perf_counter()
        plans, dataset_json = _plans_and_dataset(patch_size)
        plans_manager = PlansManager(plans)
        config = plans_manager.get_configuration(CONFIGURATION)
        label_manager = plans_manager.get_label_manager(dataset_json)
        n_in = determine_num_input_channels(plans_manager, config, dataset_json)
        torch.manual_seed(0)
        network = get_network_from_plans(
            config.network_arch_class_name,
            config.network_arch_init_kwargs,
            config.network_arch_init_kwargs_req_import,
            n_in,
            label_manager.num_segmentation_heads,
            allow_init=True,
            deep_supervision=False,
        )
        predictor = nnUNetPredictor(
            tile_step_size=TILE_STEP,
            use_gaussian=True,
            use_mirroring=mirroring,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.manual_initialization(
            network, plans_manager, config, [network.state_dict()], dataset_json, "nnUNetTrainer", (0, 1, 2)
        )
        preprocessor = config.preprocessor_class(verbose=False)
        setup_s = time.perf_counter() - t_setup

        peak = PeakRss()
        peak.start()
        t0 = time.perf_counter()
        data, _, properties = preprocessor.run_case([ct_path], None, plans_manager, config, dataset_json)
        t1 = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        t2 = time.perf_counter()
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, plans_manager, config, label_manager, properties, False, num_threads_torch=torch_threads
        )
        t3 = time.perf_counter()
        peak_mb = peak.stop()

    net_shape = [int(s) for s in data.shape[1:]]
    padded = [max(s, p) for s, p in zip(net_shape, config.patch_size)]
    steps = compute_steps_for_sliding_window(padded, config.patch_size, TILE_STEP)
    arch = config.network_arch_init_kwargs
    result = {
        "seconds": round(t3 - t0, 3),
        "peak_rss_mb": round(peak_mb, 1),
        "peak_rss_method": peak.method,
        "patch_size": list(config.patch_size),
        "spacing_mm": list(SPACING_MM),
        "nnunetv2_version": version,
        "torch_version": torch.__version__.split("+")[0],
        "threads": torch_threads,
        "device": "cpu",
        "mirroring": mirroring,
        "tile_step_size": TILE_STEP,
        "gaussian": True,
        "stage_seconds": {
            "read_crop_normalize_resample": round(t1 - t0, 3),
            "sliding_window": round(t2 - t1, 3),
            "resample_back_argmax": round(t3 - t2, 3),
        },
        "setup_seconds": round(setup_s, 3),
        "input_shape_zyx": [int(s) for s in properties["shape_before_cropping"]],
        "input_spacing_zyx_mm": [float(s) for s in properties["spacing"]],
        "network_input_shape_zyx": net_shape,
        "n_tiles": int(np.prod([len(s) for s in steps])),
        "segmentation_shape_zyx": [int(s) for s in segmentation.shape],
        "network": {
            "class": config.network_arch_class_name.rsplit(".", 1)[-1],
            "n_stages": arch["n_stages"],
            "features_per_stage": list(arch["features_per_stage"]),
            "strides": arch["strides"],
            "kernel_sizes": arch["kernel_sizes"],
            "n_classes": label_manager.num_segmentation_heads,
            "n_parameters": sum(p.numel() for p in network.parameters()),
            "weights": "random (seed 0)",
        },
        "ru_maxrss_mb_process_lifetime": round(_ru_maxrss_mb(), 1),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("ct_path", help="CT image readable by SimpleITK (e.g. .nii.gz)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        default=(128, 128, 128),
        metavar=("Z", "Y", "X"),
        help="sliding-window patch size (default 128 128 128)",
    )
    parser.add_argument("--mirror", action="store_true", help="turn on nnU-Net's mirroring (test-time aug.)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        # before numpy/torch are imported, so that their thread pools start at this size
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "nnUNet_def_n_proc"):
            os.environ[var] = str(args.threads)
    try:
        result = run_nnunet_standin(args.ct_path, args.threads, tuple(args.patch), mirroring=args.mirror)
    except NnunetNotInstalled as exc:
        print(exc, file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"no such file: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
