"""What a config may say, checked before anything runs: schemas, registries, validation, the
user-facing error, the device choice and the Hydra job a run belongs to."""
