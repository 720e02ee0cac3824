"""scrypt_shim."""
