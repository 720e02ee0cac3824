"""qubes_sim."""
