"""LinFusion itself: the linear attention, patching a UNet, and distillation."""
