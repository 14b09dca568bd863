"""What both exercises share, one module per step of the data flow; each imports only the modules before it:

errors -> files -> data -> augment -> corruptions -> device -> evaluation -> budget -> train -> plots -> report ->
board -> studies -> export -> settings -> run -> tasks -> cli

The scripts call `common.cli.run_experiment`; below `settings`, functions take plain values, not the run's Settings.
"""
from . import errors, files, data, augment, corruptions, device, evaluation, budget, train, plots, report, board
from . import studies, export, settings, run, tasks, cli
