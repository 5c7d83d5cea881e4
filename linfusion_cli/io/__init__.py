"""Files in and out: output names, formats and metadata, input images, locks, the fast PNG writer."""
