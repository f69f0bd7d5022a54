"""What a run needs around MARK's pure core: devices, checkpoints, the workdir, signals,
logs and metrics, and the errors a user can act on."""
