"""Distillation: training LinFusion for a fine-tune, an application on top of the engine (`linfusion distill`)."""
