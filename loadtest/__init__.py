"""Load tests (Locust users, scenarios, the `resnet loadtest` runner) and the benchmark suite (`resnet bench`)."""
