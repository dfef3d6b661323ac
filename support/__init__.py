"""The second layer: the operational code the first read calls in one line.

Model folders and their checks, the task table and its readers, the run folder
(lock, signals), checkpoints, the data cache and feature store, distributed
runs, the step log, metrics, the shared flags, and CPU details. Nothing here
imports a script, and nothing here takes a script's set-up object. This file
imports nothing, so that `from support import cpu_threads` still runs first.
"""
