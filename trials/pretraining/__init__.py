"""The embedded checkpoints' recipes and corpora: how ``trials/assets`` was made. Trials never import this package."""
