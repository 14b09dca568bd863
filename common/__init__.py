"""What both exercises share, a module for each thing a reader looks for (README's map of the code says where):

files       the run folder's files: written whole, checkpoints, the lock, train.log; the errors a user reads
device      where and how a run computes: device, precision, autocast, torchrun's processes
data        CIFAR-10 and your pictures as tensors, the train/validation split, batched augmentation
plots       the pictures, and finished runs side by side (--compare, --seeds)
evaluation  accuracy, per class, confusion, the corruption benchmark, the test report and metrics.json
board       TensorBoard's event files
train       the training run, top to bottom: folder, data, plan, network, epochs (the step), test, reports
tasks       --eval-only, --predict and --export on a trained checkpoint
cli         the Settings and their flags, and the one task a command line asks for

The scripts call common.cli.run_experiment; each module imports only those above it.
"""
from . import board, cli, data, device, evaluation, files, plots, tasks, train  # noqa: F401
