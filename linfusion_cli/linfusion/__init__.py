"""LinFusion itself: the linear attention and patching a UNet with it (distillation is train/)."""
