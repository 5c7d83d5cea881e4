"""Settings, jobs, presets, plans, and the run of one job or a batch: no torch at import time."""
