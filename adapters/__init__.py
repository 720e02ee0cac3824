"""qtb_adapters: the backup-qube side of qtb-pipe (engine adapters for restic and borg)."""

__version__ = "0.2.0"
