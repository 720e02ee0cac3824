"""qtb-pipe, the dom0 side (driver and, in scrypt_shim, the shim). Standard library only."""

__version__ = "0.2.0"
