def main() -> int:
    raise SystemExit("qtb-pipe: not implemented yet")
