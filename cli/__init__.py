"""The `resnet` console script: one entry point, one subcommand per job."""
