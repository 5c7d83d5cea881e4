"""What runs on the device: the stage engine, sampling, memory settings, the tiled VAE, refine methods."""
