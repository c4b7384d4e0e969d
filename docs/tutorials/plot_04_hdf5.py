"""
Train and evaluate on your own HDF5 files
=========================================

The ``pyro-slots`` command line trains on any HDF5 file in the layout of the
object-centric-library benchmarks (CLEVR6, Multi-dSprites, Tetrominoes): four datasets at the
root of the file (or inside a group named by ``split``):

======================  ==================  =============================================
dataset                 shape               meaning
======================  ==================  =============================================
``image``               (N, H, W, 3)        uint8 RGB in 0..255
``mask``                (N, H, W, 1)        integer object ids, 0 = background
``num_actual_objects``  (N, 1) or (N,)      number of foreground objects
``visibility``          (N, O)              whether mask id ``k`` is visible (column 0 is
                                            the background)
======================  ==================  =============================================

Masks are only used for evaluation (FG-ARI, ARI, mIoU); training sees the images. This page
writes such a file from scenes of its own, reads it back with the Python API, trains a slot
autoencoder on it with ``pyro-slots train`` and evaluates it with ``pyro-slots evaluate``.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import matplotlib.pyplot as plt
import numpy as np

import pyro_slots as ps

FAST = os.environ.get("PYRO_SLOTS_DOCS_FAST") == "1"  # the docs' fast build (CI): tiny sizes
IMAGE_SIZE, STEPS = (16, 4) if FAST else (32, 60)  # raise both (and --steps) for real results

###############################################################################
# Write the file
# --------------
#
# Any source of images and masks will do; here, 96 generated scenes of 1-3 shapes. The last
# images of the file are held out for evaluation by the command line.

folder = Path(tempfile.mkdtemp(prefix="pyro_slots_hdf5_"))
path = folder / "my_scenes.h5"
scenes = ps.data.generate_shapes(96, image_size=IMAGE_SIZE, min_objects=1, max_objects=3, seed=0)
num_images = scenes["image"].shape[0]
with h5py.File(path, "w") as f:
    f["image"] = (scenes["image"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    f["mask"] = scenes["mask"].numpy()[..., None].astype(np.uint8)
    f["num_actual_objects"] = scenes["num_objects"].numpy()[:, None]
    background = np.ones((num_images, 1), dtype=bool)
    f["visibility"] = np.concatenate([background, scenes["visible"].numpy()], axis=1)

###############################################################################
# Read it back
# ------------
#
# :class:`~pyro_slots.data.HDF5Dataset` checks the layout (a missing dataset or a wrong shape is
# reported with what was expected) and reads one slice per item, so files larger than memory
# work with a :class:`torch.utils.data.DataLoader`.

dataset = ps.data.HDF5Dataset(str(path))
item = dataset[0]
print(len(dataset), {k: tuple(getattr(v, "shape", ())) for k, v in item.items()})

fig, axes = plt.subplots(1, 2, figsize=(5, 2.5))
axes[0].imshow(item["image"].permute(1, 2, 0))
axes[1].imshow(item["mask"], cmap="tab10")
axes[0].set_title("image")
axes[1].set_title("mask")
for ax in axes:
    ax.axis("off")
fig.tight_layout()

###############################################################################
# Train with the command line
# ---------------------------
#
# ``--dataset hdf5:PATH`` selects the file. The model, the inner rule, the gradient mode and
# every size are flags (``pyro-slots train --help``); the run folder gets the checkpoint, the
# metrics and the configuration, so ``--resume`` continues it exactly.

run = folder / "run"
train = [
    sys.executable, "-m", "pyro_slots", "train",
    "--model", "slot-autoencoder", "--dataset", f"hdf5:{path}",
    "--steps", str(STEPS), "--batch-size", "8", "--num-slots", "4",
    "--slot-dim", "16", "--hidden-dim", "32",
    "--eval-size", "16", "--eval-every", str(STEPS),
    "--out", str(run), "--no-progress", "--no-pictures", "--threads", "2",
]  # fmt: skip
print(subprocess.run(train, check=True, capture_output=True, text=True).stdout)

###############################################################################
# Evaluate
# --------
#
# ``pyro-slots evaluate`` refines the slots of the held-out images with the trained rule and
# reports segmentation metrics against the masks (and the ELBO); ``--pictures`` draws them.

evaluate = [
    sys.executable, "-m", "pyro_slots", "evaluate", str(run),
    "--json", "--num", "16", "--pictures", str(folder / "pictures"),
]  # fmt: skip
out = subprocess.run(evaluate, check=True, capture_output=True, text=True).stdout
metrics = json.loads(out[out.index("{") : out.rindex("}") + 1])
print({k: round(v, 3) for k, v in metrics.items() if isinstance(v, float)})

###############################################################################
# The picture ``evaluate`` drew: images, reconstructions and the slots' masks (after
# ``STEPS`` updates, so the segmentation is still poor; the README lists what hours of CPU
# training reach).

picture = plt.imread(folder / "pictures" / "slots.png")
fig = plt.figure(figsize=(8, 8 * picture.shape[0] / picture.shape[1]))
plt.imshow(picture)
plt.axis("off")
fig.tight_layout()

###############################################################################
# The run folder is an ordinary directory; this page removes its temporary one.

shutil.rmtree(folder)
