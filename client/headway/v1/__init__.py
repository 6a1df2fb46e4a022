"""headway.v1: generated from protos/headway/v1/progress.proto by `make proto`; never edit."""
