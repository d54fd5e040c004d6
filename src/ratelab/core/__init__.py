"""Framework pieces shared by every family: registry, config, checkpoint, distributed helpers."""
